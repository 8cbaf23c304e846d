"""Plan: scan new inputs once, cut them into row-range shards, and keep the manifest of an output directory.

The manifest (``OUTPUT/manifest.json``) records every input file (size and a content digest), every shard
(file, row range, JSONL byte offset, rows to skip) and the fingerprint of the settings that change vectors.
A rerun with the same settings reuses it; new input files are scanned and appended as new shards (the nightly
case); a changed file or changed settings are refused with a message that says how to proceed. Shard ids
never change once given, so done-markers keyed by shard id stay valid whatever the number of workers.

The scan validates every row before any model work: a bad row stops the plan with file, row and field
(``on_bad_record: error``) or is written to ``OUTPUT/rejects/`` and skipped (``skip``). Duplicate ids are
found across all files, including those of earlier runs (their id hashes are kept in ``OUTPUT/plan/``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError, ManifestMismatch
from pipeline.job.config import JobConfig, fingerprint_fields
from pipeline.job.readers import (
    InputFile,
    describe_file,
    expand_inputs,
    file_row_count,
    jsonl_line_offsets,
    parquet_row_groups,
)
from pipeline.job.records import FieldSpec, Reject, check_fields, extract, file_has_ids, iter_raw
from pipeline.util import locked, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_end)`` of one input file; ``skip`` lists rejected rows inside the range."""

    id: int
    file: int
    row_start: int
    row_end: int
    byte_start: int = 0
    skip: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.id:06d}"


@dataclass
class PlannedFile:
    """An input file of the manifest: its identity plus what the scan found."""

    file: InputFile
    rows: int
    generated_ids: bool
    rejected: int = 0


@dataclass
class Manifest:
    fingerprint: str
    settings: dict[str, Any]
    plan: dict[str, Any]
    files: list[PlannedFile] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "plan": self.plan,
            "files": [
                {**asdict(pf.file), "rows": pf.rows, "generated_ids": pf.generated_ids, "rejected": pf.rejected}
                for pf in self.files
            ],
            "shards": [
                {"id": s.id, "file": s.file, "rows": [s.row_start, s.row_end], "byte_start": s.byte_start,
                 "skip": list(s.skip)}
                for s in self.shards
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        files = []
        for entry in data["files"]:
            entry = dict(entry)
            rows, gen, rejected = entry.pop("rows"), entry.pop("generated_ids"), entry.pop("rejected", 0)
            files.append(PlannedFile(InputFile(**entry), rows, gen, rejected))
        shards = [
            Shard(s["id"], s["file"], s["rows"][0], s["rows"][1], s.get("byte_start", 0), tuple(s.get("skip", ())))
            for s in data["shards"]
        ]
        return cls(data["fingerprint"], data["settings"], data["plan"], files, shards)

    @property
    def total_rows(self) -> int:
        """Documents to embed: planned rows less rejected rows and blank JSONL lines (both in ``skip``)."""
        return sum(self.shard_rows(s) for s in self.shards)

    def shard_rows(self, shard: Shard) -> int:
        return shard.row_end - shard.row_start - len(shard.skip)


def load_manifest(output: str | Path) -> Manifest | None:
    path = Path(output) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestMismatch(f"{path}: unreadable manifest ({exc}); start over with --overwrite") from exc
    if data.get("version") != MANIFEST_VERSION:
        raise ManifestMismatch(f"{path}: manifest version {data.get('version')} is not {MANIFEST_VERSION}")
    return Manifest.from_json(data)


OUTPUT_FOLDERS = ("vectors", "shards", "rejects", "plan")


def prepare(cfg: JobConfig, *, overwrite: bool = False) -> Manifest:
    """Create, check or extend the manifest of ``cfg.output``; scan and validate new inputs.

    Raises:
        InputError: bad input (with ``on_bad_record: error``), naming file, row and field.
        ManifestMismatch: the output was planned with other settings or a file changed since.
    """
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / ".plan.lock"):
        found = expand_inputs(cfg.input)
        manifest = load_manifest(out)
        if manifest is not None and overwrite:
            log.warning("--overwrite: discarding the existing output in %s", out)
            for name in OUTPUT_FOLDERS:
                shutil.rmtree(out / name, ignore_errors=True)
            (out / MANIFEST).unlink()
            manifest = None
        settings = {name: _plain(getattr(cfg, name)) for name in fingerprint_fields()}
        if manifest is None:
            manifest = Manifest(cfg.fingerprint(), settings, cfg.plan_settings())
        else:
            _check_settings(out, manifest, settings)
            manifest.plan = cfg.plan_settings()  # shard size and bad-record policy apply to files planned now
        new = _new_files(out, manifest, found)
        if new:
            _add_files(out, manifest, new, cfg)
            write_json_atomic(out / MANIFEST, manifest.to_json())
        elif not (out / MANIFEST).exists():
            write_json_atomic(out / MANIFEST, manifest.to_json())
        return manifest


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_settings(out: Path, manifest: Manifest, settings: dict[str, Any]) -> None:
    changed = [k for k in settings if manifest.settings.get(k) != settings[k]]
    if changed:
        detail = ", ".join(f"{k}: {manifest.settings.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise ManifestMismatch(
            f"{out} was built with other settings ({detail}). Its vectors would not be comparable with new ones: "
            f"write to a new --output, or add --overwrite to discard {out} and start over."
        )


def _new_files(out: Path, manifest: Manifest, found: list[tuple[Path, Path]]) -> list[InputFile]:
    known = {pf.file.path: pf for pf in manifest.files}
    keys = {pf.file.key for pf in manifest.files}
    new: list[InputFile] = []
    for path, root in found:
        planned = known.get(str(path))
        if planned is None:
            info = describe_file(path, root)
            if info.key in keys:
                info = InputFile(info.path, info.path, info.format, info.compression, info.size, info.digest)
            keys.add(info.key)
            new.append(info)
            continue
        current = describe_file(path, root)
        if (current.size, current.digest) != (planned.file.size, planned.file.digest):
            raise ManifestMismatch(
                f"{path} changed since it was planned in {out} (size {planned.file.size} -> {current.size}). "
                "Rows already embedded from it would mix with new ones: give the new content a new file name "
                "to embed it as new input, or add --overwrite to start over."
            )
    paths = {str(p) for p, _ in found}
    done = _done_shard_ids(out)
    for idx, pf in enumerate(manifest.files):
        if pf.file.path in paths:
            continue
        pending = [s for s in manifest.shards if s.file == idx and s.id not in done]
        if pending:
            raise ManifestMismatch(
                f"{pf.file.path} was planned in {out} but is not among the inputs now, and {len(pending)} of its "
                "shards are not embedded yet: give it again with --input, or add --overwrite to start over."
            )
        log.info("%s is not among the inputs now; its vectors stay in the output", pf.file.path)
    return new


def _done_shard_ids(out: Path) -> set[int]:
    folder = out / "shards"
    if not folder.is_dir():
        return set()
    return {int(p.name.split(".")[0]) for p in folder.glob("*.done.json")}


@dataclass
class _Scan:
    rows: int
    generated_ids: bool
    ranges: list[tuple[int, int, int]]  # (row_start, row_end, byte_start)
    rejects: list[Reject]
    id_hashes: np.ndarray  # uint64, one per valid row with a real id
    id_rows: np.ndarray  # int64, the rows of those ids
    blank: np.ndarray  # int64, blank JSONL lines: counted as rows, but no documents


def _hash_ids(ids: pa.ChunkedArray) -> np.ndarray:
    try:
        from pandas.util import hash_array
    except ImportError:  # pandas comes with `datasets`; keep a slow path without it
        import hashlib

        return np.array(
            [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in ids.to_pylist()],
            dtype=np.uint64,
        )
    return hash_array(ids.to_numpy(zero_copy_only=False).astype(object))


def _scan_file(info: InputFile, spec: FieldSpec, shard_size: int) -> _Scan:
    """Read every row of a new file once: validate, count, hash ids, and cut row ranges."""
    generated = not file_has_ids(info, spec)
    rejects: list[Reject] = []
    hashes: list[np.ndarray] = []
    id_rows: list[np.ndarray] = []
    seen: list[np.ndarray] = []  # rows that hold a record (valid or not); the other JSONL rows are blank lines
    for raw in iter_raw(info, spec):
        seen += [raw.rows.to_numpy(), np.array([r for r, _, _ in raw.bad], np.int64)]
        table, bad = extract(raw, info, spec, generated)
        rejects.extend(bad)
        if not generated and table.num_rows:
            hashes.append(_hash_ids(table.column("id")))
            id_rows.append(table.column("_row").to_numpy())
    if info.format == "jsonl":
        offsets, rows = jsonl_line_offsets(info, shard_size)
        starts = list(range(0, rows, shard_size))
        byte_starts = offsets if offsets is not None else [0] * len(starts)
        ranges = [(s, min(s + shard_size, rows), b) for s, b in zip(starts, byte_starts, strict=True)]
    elif info.format == "parquet":
        groups = parquet_row_groups(info)
        rows = sum(groups)
        ranges = _row_group_ranges(groups, shard_size)
    else:
        rows = file_row_count(info) or 0
        ranges = [(s, min(s + shard_size, rows), 0) for s in range(0, rows, shard_size)]
    return _Scan(
        rows,
        generated,
        ranges,
        rejects,
        np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
        np.concatenate(id_rows) if id_rows else np.zeros(0, np.int64),
        np.setdiff1d(np.arange(rows, dtype=np.int64), np.concatenate(seen)) if info.format == "jsonl"
        else np.zeros(0, np.int64),
    )


def _row_group_ranges(groups: list[int], shard_size: int) -> list[tuple[int, int, int]]:
    """Shards of whole row groups (about ``shard_size`` rows); a larger row group is split into row ranges."""
    ranges: list[tuple[int, int, int]] = []
    start = pos = 0
    for n in groups:
        if n > shard_size:
            if pos > start:
                ranges.append((start, pos, 0))
            parts = -(-n // shard_size)
            step = -(-n // parts)
            ranges.extend((pos + i, min(pos + i + step, pos + n), 0) for i in range(0, n, step))
            pos += n
            start = pos
            continue
        if pos - start + n > shard_size and pos > start:
            ranges.append((start, pos, 0))
            start = pos
        pos += n
    if pos > start:
        ranges.append((start, pos, 0))
    return ranges


def _add_files(out: Path, manifest: Manifest, new: list[InputFile], cfg: JobConfig) -> None:
    spec = FieldSpec.of(cfg)
    new = check_fields(new, [pf.file for pf in manifest.files], spec)  # records.py: fields exist, id kinds, kept types
    first_idx = len(manifest.files)
    scans = []
    for info in new:
        log.info("scanning %s", info.path)
        scans.append(_scan_file(info, spec, cfg.shard_size))
    for info, scan in zip(new, scans, strict=True):
        if len(scan.rejects) > 1 and len(scan.rejects) >= scan.rows - len(scan.blank):
            # Not a few bad records but a wrong setting (as a missing Parquet column is): even `skip` stops.
            raise InputError(
                f"{scan.rejects[0].message()}, and so is every other row of {info.path}: check --text-field "
                "and --id-field"
            )
    rejects = [r for scan in scans for r in scan.rejects]
    rejects += _duplicates(out, manifest, new, scans, spec, first_idx)
    if rejects and cfg.on_bad_record == "error":
        rejects.sort(key=lambda r: (r.file, r.row))
        more = f" (and {len(rejects) - 1} more bad rows)" if len(rejects) > 1 else ""
        raise InputError(
            f"{rejects[0].message()}{more}. Fix the input, or run with --on-bad-record skip to record bad rows "
            "in OUTPUT/rejects/ and embed the rest."
        )
    by_file: dict[str, list[Reject]] = {}
    for r in rejects:
        by_file.setdefault(r.file, []).append(r)
    (out / "plan").mkdir(exist_ok=True)
    next_id = max((s.id for s in manifest.shards), default=-1) + 1
    for k, (info, scan) in enumerate(zip(new, scans, strict=True)):
        idx = first_idx + k
        bad = sorted(by_file.get(info.path, []), key=lambda r: r.row)
        if bad:
            (out / "rejects").mkdir(exist_ok=True)
            with open(out / "rejects" / f"{idx:05d}.jsonl", "w", encoding="utf-8") as f:
                for r in bad:
                    f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            log.warning("%s: %d bad rows skipped, listed in %s", info.path, len(bad), out / "rejects")
        if not scan.generated_ids:
            np.savez(out / "plan" / f"ids-{idx:05d}.npz", hash=scan.id_hashes, row=scan.id_rows)
        bad_rows = np.union1d(np.array([r.row for r in bad], dtype=np.int64), scan.blank)
        for start, end, byte_start in scan.ranges:
            lo, hi = np.searchsorted(bad_rows, [start, end])
            skip = tuple(int(r) for r in bad_rows[lo:hi])
            manifest.shards.append(Shard(next_id, idx, start, end, byte_start, skip))
            next_id += 1
        manifest.files.append(PlannedFile(info, scan.rows, scan.generated_ids, len(bad)))


def _duplicates(
    out: Path, manifest: Manifest, new: list[InputFile], scans: list[_Scan], spec: FieldSpec, first_idx: int
) -> list[Reject]:
    """Rows whose id appeared earlier (in an earlier file or row, or an earlier run); the first one is kept."""
    hashes, files, rows = [], [], []
    for idx, pf in enumerate(manifest.files):
        path = out / "plan" / f"ids-{idx:05d}.npz"
        if not pf.generated_ids and path.exists():
            with np.load(path) as z:
                hashes.append(z["hash"])
                rows.append(z["row"])
            files.append(np.full(len(rows[-1]), idx, np.int32))
    for k, scan in enumerate(scans):
        hashes.append(scan.id_hashes)
        rows.append(scan.id_rows)
        files.append(np.full(len(scan.id_rows), first_idx + k, np.int32))
    if not hashes:
        return []
    h, f, r = np.concatenate(hashes), np.concatenate(files), np.concatenate(rows)
    order = np.lexsort((r, f, h))
    h, f, r = h[order], f[order], r[order]
    dup = np.flatnonzero(h[1:] == h[:-1]) + 1
    if not len(dup):
        return []
    # first occurrence of each duplicated hash
    first = np.searchsorted(h, h[dup], side="left")
    all_files = [pf.file for pf in manifest.files] + list(new)
    wanted: dict[int, set[int]] = {}
    for i in np.concatenate([dup, first]):
        wanted.setdefault(int(f[i]), set()).add(int(r[i]))
    ids = {fi: _ids_at(all_files[fi], spec, sorted(rs)) for fi, rs in wanted.items()}
    rejects = []
    for d, o in zip(dup, first, strict=True):
        fd, rd, fo, ro = int(f[d]), int(r[d]), int(f[o]), int(r[o])
        if fd < first_idx:
            continue  # both in earlier runs: already handled then
        dup_id, orig_id = ids[fd].get(rd), ids[fo].get(ro)
        if dup_id is None or dup_id != orig_id:
            continue  # a 64-bit hash collision between different ids
        origin = all_files[fo]
        from pipeline.errors import where

        rejects.append(
            Reject(all_files[fd].path, all_files[fd].format, rd, spec.id_field,
                   f"duplicate id {dup_id!r} (first at {origin.path}: {where(origin.format, ro)})", dup_id)
        )
    return rejects


def _ids_at(info: InputFile, spec: FieldSpec, rows: list[int]) -> dict[int, str]:
    want = set(rows)
    found: dict[int, str] = {}
    id_spec = FieldSpec(spec.text_field, spec.id_field, ())
    for raw in iter_raw(info, id_spec, row_start=rows[0], row_end=rows[-1] + 1):
        for row, value in zip(raw.rows.to_pylist(), raw.table.column(spec.id_field).to_pylist(), strict=True):
            if row in want:
                found[row] = str(value)
    return found
