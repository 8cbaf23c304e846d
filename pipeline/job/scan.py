"""Scan: what each input file holds, row by row, as fixed-size hashes; cached by the file's content digest.

A file is identified by a digest of its whole content (BLAKE2b-128 of every byte). A file whose size, mtime,
ctime and inode are those recorded with its digest is not read again: any write to a file changes its ctime,
which no user command can set back. A changed file gets a new digest, and its rows are scanned again.

The scan of a file reads and validates every row once (``records.extract``) and keeps, for each valid row:

- ``h1, h2``: the id's hash (BLAKE2b-128 of its UTF-8 bytes; zero where ids are generated, see ``id_hashes``);
- ``k1, k2``: the text's key, the hash of exactly the text the model is given (under the output's settings, which
  are fixed by its fingerprint): rows with one key share one vector;
- ``x``: a hash of the kept columns' values (0 without ``--keep``), so that a changed kept value is a changed row;
- ``nbytes``: the text's UTF-8 size, to cut shards by work.

Scans are stored in ``OUTPUT/plan/scans/DIGEST.parquet`` (+ ``.json``: rows, rejects, row groups; + ``.lines.npy``:
the byte offset of every JSONL line of a plain file), so a rerun over unchanged input reads no input row again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.job.readers import InputFile, _format_of, _open_text_stream, parquet_row_groups
from pipeline.job.records import FieldSpec, Reject, extract, file_has_ids, iter_raw
from pipeline.util import write_json_atomic

log = logging.getLogger(__name__)

SCANS = "plan/scans"
SCAN_VERSION = 1
CHUNK = 1 << 22  # bytes read at a time while digesting


# --------------------------------------------------------------------------------------------- hashing


def hash128(values: Iterable[str | bytes]) -> np.ndarray:
    """BLAKE2b-128 of each value (str as UTF-8), as a (n, 2) uint64 array: deterministic on every machine."""
    blob = b"".join(hashlib.blake2b(v.encode() if isinstance(v, str) else v, digest_size=16).digest()
                    for v in values)
    return np.frombuffer(blob, dtype="<u8").reshape(-1, 2).copy()


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, 2) uint64 hashes of string ids (two different ids share a hash with odds of ~n^2 / 2^129)."""
    return hash128(ids.to_pylist())


def keep_hashes(table: pa.Table, keep: tuple[str, ...]) -> np.ndarray:
    """uint64 hash of each row's kept values (0 for every row without kept columns)."""
    if not keep:
        return np.zeros(table.num_rows, np.uint64)
    cols = [table.column(name).to_pylist() for name in keep]
    rows = (json.dumps(values, default=str, sort_keys=True, ensure_ascii=False) for values in zip(*cols, strict=True))
    return hash128(rows)[:, 0]


# --------------------------------------------------------------------------------------------- file identity


def file_stat(path: Path) -> list[int]:
    """``[size, mtime_ns, ctime_ns, inode]``: when all four are unchanged, so is the content."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def check_unchanged(path: Path, stat: list[int] | tuple[int, ...]) -> None:
    """Raise ``InputError`` where ``path``'s stat is no longer ``stat`` (the file changed while it was read)."""
    if list(file_stat(path)) != list(stat):
        raise InputError(f"{path}: the file changed while it was being read; run again once it is written")


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of the whole file (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# A stat is trusted only for a file last modified this long before the plan that recorded it: on a filesystem
# with coarse timestamps (ext3, FAT, some network and FUSE mounts: 1-2 s) a same-size rewrite within the same tick
# as the digest leaves size, mtime, ctime and inode as they were ("racy" entries, as git calls them).
RACY_SECONDS = 3.0


def identify(path: Path, root: Path, known: dict[str, InputFile], planned_at: float = 0.0) -> InputFile:
    """The ``InputFile`` of ``path``: its digest is taken from ``known`` (by path) when the stat is unchanged and
    the file was last modified ``RACY_SECONDS`` before ``planned_at`` (when ``known`` was recorded; 0: unknown,
    an older manifest), else computed from the whole content."""
    fmt = _format_of(path)
    assert fmt is not None
    stat = file_stat(path)
    before = known.get(str(path))
    settled = not planned_at or stat[1] < (planned_at - RACY_SECONDS) * 1e9
    if before is not None and list(before.stat) == stat and before.digest and settled:
        digest = before.digest
    else:
        digest = file_digest(path)
        check_unchanged(path, stat)
    key = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return InputFile(str(path), key, fmt[0], fmt[1], stat[0], digest, tuple(stat))


# --------------------------------------------------------------------------------------------- scans


@dataclass
class FileScan:
    """The valid rows of one file (arrays of equal length, in row order) and what else the scan found."""

    rows: int  # rows of the file (JSONL: lines, blank ones included)
    generated_ids: bool
    frow: np.ndarray  # int64
    h: np.ndarray  # (n, 2) uint64; zeros where ids are generated
    k: np.ndarray  # (n, 2) uint64
    x: np.ndarray  # uint64
    nbytes: np.ndarray  # int64
    rejects: list[Reject] = field(default_factory=list)
    row_groups: list[int] | None = None  # Parquet: rows per row group
    lines: np.ndarray | None = None  # plain JSONL: byte offset of every line, and of the end (rows + 1)
    valid_rows: int | None = None  # set where the row arrays were handed over (then empty)

    @property
    def valid(self) -> int:
        return len(self.frow) if self.valid_rows is None else self.valid_rows


def _paths(out: Path, digest: str) -> tuple[Path, Path, Path]:
    folder = out / SCANS
    return folder / f"{digest}.parquet", folder / f"{digest}.json", folder / f"{digest}.lines.npy"


def _spec_of(spec: FieldSpec) -> dict[str, Any]:
    return {"text_field": spec.text_field, "id_field": spec.id_field, "keep": list(spec.keep),
            "id_required": spec.id_required}


def _load_meta(out: Path, info: InputFile, spec: FieldSpec) -> tuple[dict[str, Any], list[Reject]] | None:
    """The cached scan's JSON (rows, rejects, row groups) and its rejects, or None (no scan of this version, or
    one made with other fields: its valid rows, hashes and rejects are those fields')."""
    try:
        meta = json.loads(_paths(out, info.digest)[1].read_text())
        if meta.get("version") != SCAN_VERSION or meta.get("spec", _spec_of(spec)) != _spec_of(spec):
            return None
        rejects = [Reject(info.path, info.format, r["row"], r["field"], r["reason"], r.get("id"))
                   for r in meta["rejects"]]
    except (OSError, ValueError, KeyError):
        return None
    return meta, rejects


def metadata_only(rows: int, generated_ids: bool, rejects: list[Reject], row_groups: list[int] | None,
                  valid: int) -> FileScan:
    """A scan without its row arrays and line offsets (what planning keeps of every file)."""
    empty = np.zeros(0, np.int64)
    return FileScan(rows, generated_ids, empty, np.zeros((0, 2), np.uint64), np.zeros((0, 2), np.uint64),
                    np.zeros(0, np.uint64), empty, rejects, row_groups, None, valid_rows=valid)


def load_scan(out: Path, info: InputFile, spec: FieldSpec) -> FileScan | None:
    """The cached scan of ``info``'s content with the fields of ``spec``, or None."""
    table_path, _, lines_path = _paths(out, info.digest)
    found = _load_meta(out, info, spec)
    if found is None:
        return None
    meta, rejects = found
    try:
        table = pq.read_table(table_path)
        lines = np.load(lines_path) if meta.get("lines") else None
    except (OSError, ValueError, pa.ArrowException):
        return None
    cols = {name: table.column(name).to_numpy() for name in table.column_names}
    return FileScan(meta["rows"], meta["generated_ids"], cols["frow"], np.stack([cols["h1"], cols["h2"]], 1),
                    np.stack([cols["k1"], cols["k2"]], 1), cols["x"], cols["nbytes"], rejects,
                    meta.get("row_groups"), lines)


def save_scan(out: Path, info: InputFile, scan: FileScan, spec: FieldSpec) -> None:
    """Store a scan (table and offsets first, then the JSON that marks it complete)."""
    table_path, meta_path, lines_path = _paths(out, info.digest)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"frow": scan.frow, "h1": scan.h[:, 0], "h2": scan.h[:, 1], "k1": scan.k[:, 0],
                      "k2": scan.k[:, 1], "x": scan.x, "nbytes": scan.nbytes})
    tmp = table_path.with_name(f".{table_path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, table_path)
    if scan.lines is not None:
        tmp = lines_path.with_name(f".{lines_path.name}.tmp-{os.getpid()}.npy")
        np.save(tmp, scan.lines)
        os.replace(tmp, lines_path)
    write_json_atomic(meta_path, {
        "version": SCAN_VERSION, "path": info.path, "rows": scan.rows, "generated_ids": scan.generated_ids,
        "rejects": [r.to_dict() for r in scan.rejects], "row_groups": scan.row_groups,
        "lines": scan.lines is not None, "spec": _spec_of(spec),
    })


def remove_unused_scans(out: Path, digests: set[str]) -> None:
    """Delete cached scans of contents no input file has any more."""
    folder = out / SCANS
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.split(".")[0] not in digests and not path.name.startswith("."):
            path.unlink(missing_ok=True)


def line_offsets(info: InputFile) -> np.ndarray | None:
    """Byte offset of every line of a plain JSONL file, and of its end (None for compressed files)."""
    if info.compression is not None:
        return None
    offsets = [np.zeros(1, np.int64)]
    pos = 0
    with open(info.path, "rb") as f:
        while chunk := f.read(CHUNK):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + pos + 1
            offsets.append(ends.astype(np.int64))
            pos += len(chunk)
    lines = np.concatenate(offsets)
    if lines[-1] != pos:  # a last line without a newline
        lines = np.append(lines, pos)
    return lines


def scan_file(info: InputFile, spec: FieldSpec) -> FileScan:
    """Read every row of a file once: validate, hash ids, texts and kept values, count text bytes.

    Raises:
        InputError: the file cannot be read, or a field the settings name is missing.
    """
    generated = not file_has_ids(info, spec)
    rejects: list[Reject] = []
    frow, h, k, x, nbytes = [], [], [], [], []
    last_row = -1
    for raw in iter_raw(info, spec):
        if len(raw.rows):
            last_row = max(last_row, int(pc.max(raw.rows).as_py()))
        if raw.bad:
            last_row = max(last_row, max(r for r, _, _ in raw.bad))
        table, bad = extract(raw, info, spec, generated)
        rejects.extend(bad)
        if not table.num_rows:
            continue
        text = table.column("text")
        frow.append(table.column("_row").to_numpy())
        h.append(np.zeros((table.num_rows, 2), np.uint64) if generated else id_hashes(table.column("id")))
        k.append(hash128(text.to_pylist()))
        x.append(keep_hashes(table, spec.keep))
        nbytes.append(pc.binary_length(text).to_numpy().astype(np.int64))
    lines = row_groups = None
    if info.format == "jsonl":
        lines = line_offsets(info)
        rows = len(lines) - 1 if lines is not None else last_row + 1
        if lines is None:  # compressed: count the lines (blank ones at the end included)
            rows = _count_lines(info)
    elif info.format == "parquet":
        row_groups = parquet_row_groups(info)
        rows = sum(row_groups)
    else:
        rows = last_row + 1 if frow or rejects else _arrow_rows(info)

    def cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape, dtype)

    rejects.sort(key=lambda r: r.row)
    return FileScan(rows, generated, cat(frow, (0,), np.int64), cat(h, (0, 2), np.uint64),
                    cat(k, (0, 2), np.uint64), cat(x, (0,), np.uint64), cat(nbytes, (0,), np.int64), rejects,
                    row_groups, lines)


def _count_lines(info: InputFile) -> int:
    n = 0
    with _open_text_stream(info.path, info.compression) as stream:
        for _ in stream:
            n += 1
    return n


def _arrow_rows(info: InputFile) -> int:
    from pipeline.job.readers import file_row_count

    return file_row_count(info) or 0


def scan_meta(out: Path, info: InputFile, spec: FieldSpec) -> FileScan:
    """The scan of ``info`` without its rows (``metadata_only``): from the cache without reading them, or
    made now (and cached)."""
    found = _load_meta(out, info, spec)
    if found is not None:
        meta, rejects = found
        try:
            valid = pq.read_metadata(_paths(out, info.digest)[0]).num_rows
        except (OSError, pa.ArrowException):
            valid = None
        if valid is not None:
            return metadata_only(meta["rows"], meta["generated_ids"], rejects, meta.get("row_groups"), valid)
    s = scan(out, info, spec)[0]
    return metadata_only(s.rows, s.generated_ids, s.rejects, s.row_groups, s.valid)


def load_lines(out: Path, info: InputFile) -> np.ndarray | None:
    """The cached JSONL line offsets of ``info`` (memory-mapped), or None."""
    _, _, lines_path = _paths(out, info.digest)
    return np.load(lines_path, mmap_mode="r") if lines_path.exists() else None


def scan(out: Path, info: InputFile, spec: FieldSpec) -> tuple[FileScan, bool]:
    """The scan of ``info``: cached, or made now and cached. Returns ``(scan, was_cached)``."""
    cached = load_scan(out, info, spec)
    if cached is not None:
        return cached, True
    log.info("scanning %s", info.path)
    result = scan_file(info, spec)
    if info.stat:  # a scan of other content would be kept under this content's digest
        check_unchanged(Path(info.path), info.stat)
    save_scan(out, info, result, spec)
    return result, False


def generated_id_hashes(info: InputFile, frow: np.ndarray) -> np.ndarray:
    """Hashes of the ids ``KEY#ROW`` generated for rows of a file without ids (they follow the file's key)."""
    return hash128(f"{info.key}#{r}" for r in frow.tolist())
