"""Readers: find input files, scan them once to cut row-range shards, read one shard as Arrow.

Three formats: Parquet (row groups from the footer), JSONL (plain, .gz or .zst; shard boundaries are byte
offsets for plain files), and datasets saved with HF ``datasets.save_to_disk`` (Arrow stream files, memory
mapped). Every format yields Arrow tables of the raw fields, which ``records.extract`` turns into the
``id``/``text``/kept columns with the same validation everywhere.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
SCAN_ROWS = 8192  # rows per Arrow batch while scanning and reading


@dataclass(frozen=True)
class InputFile:
    """One input file as planned. ``key`` names it in generated ids and messages (its path under its input root).

    ``digest`` is a hash of the whole content; ``stat`` (size, mtime, ctime, inode) tells when it must be taken
    again (see ``scan.identify``).
    """

    path: str
    key: str
    format: str  # "parquet" | "jsonl" | "arrow"
    compression: str | None
    size: int
    digest: str
    stat: tuple[int, ...] = ()

    def describe(self) -> str:
        return self.path


def _format_of(path: Path) -> tuple[str, str | None] | None:
    name = path.name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(".arrow") and compression is None:
        return "arrow", None
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _saved_dataset_files(path: Path) -> list[Path]:
    try:
        state = json.loads((path / "state.json").read_text())
        return [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable `datasets` save_to_disk folder ({exc})") from exc


def expand_inputs(specs: tuple[str, ...] | list[str]) -> list[tuple[Path, Path]]:
    """Resolve ``--input`` values into files, each with the root its key is taken relative to.

    A directory is searched recursively for Parquet/JSONL files (a ``datasets`` save_to_disk folder gives
    its Arrow files in order); a pattern with ``*?[`` is a glob; anything else must be an existing file.

    Returns:
        ``(file, root)`` pairs, absolute, in a stable order, without repeats.

    Raises:
        InputError: a path that does not exist, a glob that matches nothing, an unsupported file type.
    """
    found: list[tuple[Path, Path]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            files = [(m, m.parent) for m in matches if m.is_file() and _format_of(m)]
            files += [(f, m) for m in matches if m.is_dir() for f, _ in _dir_files(m)]
            if not files:
                raise InputError(f"input {spec!r}: the pattern matches no Parquet, JSONL or Arrow file")
        elif path.is_dir():
            files = _dir_files(path)
            if not files:
                raise InputError(f"input {spec!r}: the directory holds no Parquet, JSONL or Arrow file")
        elif path.is_file():
            if _format_of(path) is None:
                raise InputError(
                    f"input {spec!r}: unsupported file type (expected .parquet, .jsonl[.gz|.zst], .arrow)"
                )
            files = [(path, path.parent)]
        else:
            raise InputError(f"input {spec!r}: no such file or directory")
        found.extend(files)
    seen: set[Path] = set()
    unique = []
    for file, root in found:
        file, root = file.resolve(), root.resolve()
        if file not in seen:
            seen.add(file)
            unique.append((file, root))
    return unique


def _dir_files(root: Path) -> list[tuple[Path, Path]]:
    if _is_saved_dataset(root):
        return [(f, root.parent) for f in _saved_dataset_files(root)]
    out: list[tuple[Path, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if _is_saved_dataset(here):
            out.extend((f, root) for f in _saved_dataset_files(here))
            dirnames.clear()
            continue
        for name in sorted(filenames):
            if not name.startswith(".") and _format_of(here / name):
                out.append((here / name, root))
    return out


# --------------------------------------------------------------------------------------------- reading


def _open_text_stream(path: str, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise InputError(f"{path}: reading .zst files needs the `zstandard` package") from exc
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _lines(file: InputFile, stream: IO[bytes], first_row: int = 0) -> Iterator[bytes]:
    """The lines of a stream; a corrupt or truncated compressed stream raises ``InputError`` naming the file."""
    row = first_row
    try:
        for line in stream:
            yield line
            row += 1
    except Exception as exc:  # gzip: OSError/EOFError; zstandard: ZstdError (an Exception subclass)
        if isinstance(exc, InputError):
            raise
        kind = file.compression or "text"
        raise InputError(f"{file.path}: line {row + 1}: unreadable {kind} stream ({exc})") from exc


@dataclass
class RawBatch:
    """Raw rows of one file: ``table`` columns as found in the file, ``rows`` their row numbers in it.

    ``bad`` lists rows that could not even be parsed (invalid JSON, a field of the wrong JSON type), as
    ``(row, field, reason)``; those rows are absent from ``table``.
    """

    table: pa.Table
    rows: pa.Array
    bad: list[tuple[int, str, str]]
    end_offset: int | None = None  # JSONL: byte offset just after the last line of this batch


def _json_batch(
    lines: list[tuple[int, bytes]], columns: list[str], string_fields: set[str], id_field: str
) -> RawBatch:
    """Parse JSONL lines into an Arrow table of ``columns`` (missing keys become nulls)."""
    values: dict[str, list[Any]] = {c: [] for c in columns}
    rows: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for row, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # not str(exc): its "line 1 column 5" would read as a line of the file
            bad.append((row, "", f"invalid JSON at character {exc.pos + 1}: {exc.msg}"))
            continue
        except UnicodeDecodeError as exc:
            bad.append((row, "", f"invalid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            bad.append((row, "", f"a JSON line must be an object, got {type(obj).__name__}"))
            continue
        problem = None
        for name in columns:
            value = obj.get(name)
            if name in string_fields and value is not None and not isinstance(value, str):
                problem = (row, name, f"expected a string, got {type(value).__name__}")
                break
            if name == id_field and value is not None and (
                isinstance(value, bool) or not isinstance(value, (str, int))
            ):
                problem = (row, name, f"an id must be a string or an integer, got {type(value).__name__}")
                break
        if problem:
            bad.append(problem)
            continue
        rows.append(row)
        for name in columns:
            value = obj.get(name)
            if name == id_field and isinstance(value, int):
                value = str(value)
            values[name].append(value)
    arrays = {}
    for name, vals in values.items():
        typ = pa.string() if name in string_fields or name == id_field else None
        try:
            arrays[name] = pa.array(vals, type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"field {name!r}: values of mixed JSON types cannot form one column ({exc})") from exc
    table = pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(rows))}).drop(["_"])
    return RawBatch(table, pa.array(rows, pa.int64()), bad)


def iter_jsonl(
    file: InputFile,
    columns: list[str],
    string_fields: set[str],
    id_field: str,
    *,
    row_start: int = 0,
    row_end: int | None = None,
    byte_start: int = 0,
) -> Iterator[RawBatch]:
    """Yield parsed batches of lines ``row_start <= row < row_end``.

    Row numbers are 0-based line numbers (blank lines count but yield no record). Plain files seek to
    ``byte_start`` (the offset of line ``row_start``); compressed files are read from the start.
    """
    with _open_text_stream(file.path, file.compression) as stream:
        row, offset = 0, 0
        if byte_start and file.compression is None:
            stream.seek(byte_start)
            row, offset = row_start, byte_start
        pending: list[tuple[int, bytes]] = []
        for line in _lines(file, stream, row):
            if row_end is not None and row >= row_end:
                break
            offset += len(line)
            if row >= row_start and line.strip():
                pending.append((row, line))
            row += 1
            if len(pending) >= SCAN_ROWS:
                batch = _json_batch(pending, columns, string_fields, id_field)
                batch.end_offset = offset
                yield batch
                pending = []
        batch = _json_batch(pending, columns, string_fields, id_field)
        batch.end_offset = offset
        yield batch


def _check_columns(file: InputFile, schema: pa.Schema, columns: list[str], optional: set[str]) -> list[str]:
    present = [c for c in columns if c in schema.names]
    for name in columns:
        if name not in schema.names and name not in optional:
            raise InputError(
                f"{file.path}: row 0: field {name!r} is missing (columns: {', '.join(schema.names)})",
            )
    return present


def open_parquet(file: InputFile) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file.path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file.path}: unreadable Parquet file ({exc})") from exc


def iter_parquet(
    file: InputFile, columns: list[str], optional: set[str], *, row_start: int = 0, row_end: int | None = None
) -> Iterator[RawBatch]:
    """Yield the rows ``row_start <= row < row_end`` of the needed ``columns``, reading only their row groups."""
    pf = open_parquet(file)
    present = _check_columns(file, pf.schema_arrow, columns, optional)
    meta = pf.metadata
    end = meta.num_rows if row_end is None else row_end
    first = 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        lo, hi = max(row_start, first), min(end, first + n)
        if lo < hi:
            try:
                table = pf.read_row_group(rg, columns=present)
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{file.path}: row {first}: unreadable row group {rg} ({exc})") from exc
            yield from _slices(table.slice(lo - first, hi - lo), lo)
        first += n
        if first >= end:
            break


def _slices(table: pa.Table, first_row: int) -> Iterator[RawBatch]:
    """``table`` (whose first row is row ``first_row`` of its file) in batches of ``SCAN_ROWS`` rows."""
    for off in range(0, table.num_rows, SCAN_ROWS):
        part = table.slice(off, SCAN_ROWS)
        yield RawBatch(part, pa.array(range(first_row + off, first_row + off + part.num_rows), pa.int64()), [])


def _arrow_table(file: InputFile) -> pa.Table:
    try:
        source = pa.memory_map(file.path)
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file.path}: unreadable Arrow file ({exc})") from exc


def iter_arrow(
    file: InputFile, columns: list[str], optional: set[str], *, row_start: int = 0, row_end: int | None = None
) -> Iterator[RawBatch]:
    """Rows of a memory-mapped Arrow file (``datasets.save_to_disk`` output); slicing copies nothing."""
    table = _arrow_table(file)
    present = _check_columns(file, table.schema, columns, optional)
    end = table.num_rows if row_end is None else row_end
    yield from _slices(table.select(present).slice(row_start, max(0, end - row_start)), row_start)


def file_row_count(file: InputFile) -> int | None:
    """Rows of a Parquet/Arrow file from its metadata (None for JSONL, which needs a scan)."""
    if file.format == "parquet":
        return open_parquet(file).metadata.num_rows
    if file.format == "arrow":
        return _arrow_table(file).num_rows
    return None


def parquet_row_groups(file: InputFile) -> list[int]:
    """Row counts of each row group, from the footer."""
    meta = open_parquet(file).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
