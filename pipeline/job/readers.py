"""Readers: find input files, scan them once to cut row-range shards, read one shard as Arrow.

Three formats: Parquet (row groups from the footer), JSONL (plain, .gz or .zst; shard boundaries are byte
offsets for plain files), and datasets saved with HF ``datasets.save_to_disk`` (Arrow stream files, memory
mapped). Every format yields Arrow tables of the raw fields, which ``records.extract`` turns into the
``id``/``text``/kept columns with the same validation everywhere.
"""

from __future__ import annotations

import base64
import errno
import glob
import gzip
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
JSON_TEXT = b"json"  # field metadata of a kept column holding JSONL objects/arrays as their JSON text
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
    # Decided when the file is planned (``records.check_fields``), empty in manifests of older versions:
    ids: str = ""  # "integer" | "string": the type of its ids; "generated": FILE#ROW ids
    kept_schema: str = ""  # base64 Arrow schema: the type each --keep column is read as (one type per output)

    def describe(self) -> str:
        return self.path

    def kept_types(self) -> dict[str, pa.Field]:
        """The planned type of each kept column (empty: not planned, read as found)."""
        if not self.kept_schema:
            return {}
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.kept_schema)))
        return {f.name: f for f in schema}


def encode_schema(fields: list[pa.Field]) -> str:
    """Kept-column fields as the ``InputFile.kept_schema`` string."""
    return base64.b64encode(pa.schema(fields).serialize().to_pybytes()).decode() if fields else ""


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


def expand_inputs(specs: tuple[str, ...] | list[str], taken: frozenset[str] | set[str] = frozenset(),
                  output: Path | None = None) -> list[tuple[Path, Path]]:
    """Resolve ``--input`` values into files, each with the root its key is taken relative to.

    A directory is searched recursively for Parquet/JSONL/Arrow files (a ``datasets`` save_to_disk folder gives
    its Arrow files in order). Hidden files and folders (``.git/``, ``.ipynb_checkpoints/``) are skipped, symbolic
    links to folders are not followed, and a ``.json`` file is read only when it is JSON Lines (its first line is
    a whole JSON object): a ``config.json`` is not a corpus. A ``.json`` file in ``taken`` (the paths the last
    plan read) is read whatever its first line: damaged since, it is named with its bad line, not left out (which
    would delete its documents from the output). A pattern with ``*?[`` is a glob; the files it matches are read
    as if named. Anything else must be an existing file (a named ``.json`` file is JSONL). Files under
    ``output`` (the job's output folder inside an input folder: its parts and plan files) are not input.

    Returns:
        ``(file, root)`` pairs, absolute, in a stable order, without repeats.

    Raises:
        InputError: a path that does not exist, a glob that matches nothing, an unsupported file type, a
            symbolic link that loops or points to nothing.
    """
    found: list[tuple[Path, Path]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            files = [(_check_link(m), m.parent) for m in matches if _format_of(m) and not m.is_dir()]
            files += [(f, m) for m in matches if m.is_dir() for f, _ in _dir_files(m, taken)]
            if not files:
                raise InputError(f"input {spec!r}: the pattern matches no Parquet, JSONL or Arrow file")
        elif path.is_dir():
            files = _dir_files(path, taken)
            if not files:
                raise InputError(f"input {spec!r}: the directory holds no Parquet, JSONL or Arrow file")
        elif path.is_file():
            if _format_of(path) is None:
                raise InputError(
                    f"input {spec!r}: unsupported file type (expected .parquet, .jsonl[.gz|.zst], .arrow)"
                )
            files = [(path, path.parent)]
        elif path.is_symlink():
            _check_link(path)
            raise AssertionError("unreachable: a link that neither loops nor dangles is a file or a folder")
        else:
            raise InputError(f"input {spec!r}: no such file or directory")
        found.extend(files)
    seen: set[Path] = set()
    unique = []
    skip = output.resolve() if output is not None else None
    for file, root in found:
        file, root = file.resolve(), root.resolve()
        if skip is not None and file.is_relative_to(skip):
            continue
        if file not in seen:
            seen.add(file)
            unique.append((file, root))
    return unique


def _check_link(path: Path) -> Path:
    """``path``, unless it is a symbolic link that loops or points to nothing (``InputError`` naming it)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: a symbolic link that loops ({exc.strerror})") from None
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist") from None
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    return path


def _is_json_lines(path: Path) -> bool:
    """Whether a ``.json`` file is JSON Lines: its first non-blank line is a whole JSON object on its own."""
    fmt = _format_of(path)
    try:
        with _open_text_stream(str(path), fmt[1] if fmt else None) as stream:
            for line in stream:
                if line.strip():
                    try:
                        return isinstance(json.loads(line), dict)
                    except (ValueError, RecursionError):
                        return False
    except (OSError, EOFError, InputError):
        return True  # unreadable: taken, so that planning names the file and the problem
    return False  # empty


def _dir_files(root: Path, taken: frozenset[str] | set[str] = frozenset()) -> list[tuple[Path, Path]]:
    if _is_saved_dataset(root):
        return [(f, root.parent) for f in _saved_dataset_files(root)]
    out: list[tuple[Path, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        links = [d for d in dirnames if not d.startswith(".") and (here / d).is_symlink()]
        if links:
            log.warning("%s: not following the symbolic links to folders %s; give them as --input to read them",
                        here, ", ".join(sorted(links)))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden folders: .git, checkpoints
        if _is_saved_dataset(here):
            out.extend((f, root) for f in _saved_dataset_files(here))
            dirnames.clear()
            continue
        for name in sorted(filenames):
            path = here / name
            fmt = _format_of(path)
            if name.startswith(".") or fmt is None:
                continue
            _check_link(path)
            if _is_plain_json(path) and str(path) not in taken and not _is_json_lines(path):
                log.warning("%s: skipped, a .json file that is not JSON Lines (name it with --input to read it)",
                            path)
                continue
            out.append((path, root))
    return out


def _is_plain_json(path: Path) -> bool:
    """``x.json`` (or ``x.json.gz``): a name that JSON documents share with JSON Lines."""
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return name.endswith(".json")


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


MAX_JSON_DEPTH_MESSAGE = "invalid JSON: nested too deeply to parse"


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value: null, boolean, integer, number, string, object or array."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array"


def accepted_kinds(kept: pa.Field) -> tuple[str, ...]:
    """The JSON types a kept field of this planned type takes from a JSONL row (others make the row bad)."""
    if kept.metadata and kept.metadata.get(JSON_TEXT):
        return ("object", "array")
    t = kept.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return ("string",)
    if pa.types.is_boolean(t):
        return ("boolean",)
    if pa.types.is_integer(t):
        return ("integer",)
    if pa.types.is_floating(t):
        return ("integer", "number")
    return ("boolean", "integer", "number", "string", "object", "array")


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _json_batch(
    lines: list[tuple[int, bytes]], columns: list[str], string_fields: set[str], id_field: str,
    kept: dict[str, pa.Field] | None = None,
) -> RawBatch:
    """Parse JSONL lines into an Arrow table of ``columns`` (missing keys become nulls).

    ``kept`` gives the planned type of kept fields (not the text or id fields): a row whose value is of another
    JSON type, or does not fit the type, is a bad row; objects and arrays of a JSON-text field become their JSON
    text. Without a planned type a kept column takes the type of its first value here.
    """
    kept = {k: f for k, f in (kept or {}).items() if k in columns and k not in string_fields and k != id_field}
    accepts = {name: accepted_kinds(f) for name, f in kept.items()}
    json_text = {name for name, f in kept.items() if f.metadata and f.metadata.get(JSON_TEXT)}
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
        except RecursionError:
            bad.append((row, "", MAX_JSON_DEPTH_MESSAGE))
            continue
        if not isinstance(obj, dict):
            bad.append((row, "", f"a JSON line must be an object, got {type(obj).__name__}"))
            continue
        problem = None
        record: list[Any] = []
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
            if name == id_field and isinstance(value, int):
                value = str(value)
            elif name in kept and value is not None:
                kind = json_kind(value)
                if kind not in accepts[name]:
                    expected = " or ".join(_a(k) for k in accepts[name])
                    problem = (row, name, f"expected {expected} (the type of this kept field), got {_a(kind)}")
                    break
                if name in json_text:
                    try:
                        value = json.dumps(value, ensure_ascii=False)
                    except (RecursionError, ValueError):
                        problem = (row, name, "a value nested too deeply to keep")
                        break
            record.append(value)
        if problem:
            bad.append(problem)
            continue
        rows.append(row)
        for name, value in zip(columns, record, strict=True):
            values[name].append(value)
    types = {name: pa.string() if name in string_fields or name == id_field else
             kept[name].type if name in kept else None for name in columns}
    misfits = _misfits(values, types)
    if misfits:
        for i, name, why in misfits:
            bad.append((rows[i], name, why))
        drop = {i for i, _, _ in misfits}
        rows = [r for i, r in enumerate(rows) if i not in drop]
        values = {name: [v for i, v in enumerate(vals) if i not in drop] for name, vals in values.items()}
    arrays = {name: pa.array(vals, type=types[name] or _first_type(vals)) for name, vals in values.items()}
    table = pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(rows))}).drop(["_"])
    return RawBatch(table, pa.array(rows, pa.int64()), bad)


def _first_type(values: list[Any]) -> pa.DataType | None:
    """The Arrow type of the first non-null value Arrow can take (None: let Arrow infer from all of them); a lone
    surrogate in the first one must not fail it."""
    for v in values:
        if v is not None:
            try:
                return pa.array([v]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
                continue
    return None


def _misfits(values: dict[str, list[Any]], types: dict[str, pa.DataType | None]) -> list[tuple[int, str, str]]:
    """``(position, field, reason)`` of values that do not fit their column's type (an integer out of range,
    mixed types in a column without a planned type); checked one by one only when a whole column fails."""
    out = []
    for name, vals in values.items():
        typ = types[name]
        try:
            pa.array(vals, type=typ)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
            pass
        typ = typ or _first_type(vals)
        for i, v in enumerate(vals):
            try:
                pa.array([v], type=typ)
            except UnicodeEncodeError as exc:  # JSON allows "\ud83d" alone, which no UTF-8 text holds
                out.append((i, name, f"a lone UTF-16 surrogate ({exc.object[exc.start:exc.end]!a}) at character "
                                     f"{exc.start + 1}: not text that can be stored"))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                out.append((i, name, f"the value does not fit the column's type {typ} ({exc})"))
    return out


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
    ``byte_start`` (the offset of line ``row_start``); compressed files are read from the start. Kept fields
    are read as the file's planned types (``InputFile.kept_schema``).
    """
    kept = file.kept_types()
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
                batch = _json_batch(pending, columns, string_fields, id_field, kept)
                batch.end_offset = offset
                yield batch
                pending = []
        batch = _json_batch(pending, columns, string_fields, id_field, kept)
        batch.end_offset = offset
        yield batch


@dataclass
class JsonlSurvey:
    """One pass over a JSONL file: which named fields occur, and the JSON types of some fields' values.

    Attributes:
        first_keys: the keys of the first JSON object (for messages), None when there is none.
        first_row: the row (0-based line) of that object.
        present: the named fields that are a key of at least one row (a null value counts).
        kinds: for each surveyed field, JSON type -> (number of non-null values, first row holding one).
    """

    first_keys: list[str] | None = None
    first_row: int = 0
    present: set[str] = field(default_factory=set)
    kinds: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)


def survey_jsonl(file: InputFile, names: list[str], typed: list[str], id_field: str | None = None) -> JsonlSurvey:
    """Read the lines of a JSONL file: which of ``names`` occur in some row, and the JSON types of the ``typed``
    fields (every line) and of ``id_field`` (until a string id shows that the ids are strings).

    The pass ends early once every name was found, no field needs every line and the ids are known to be strings
    (the common case: one line). Lines that are blank, not JSON or not an object are passed over here: the scan
    names them as bad rows.
    """
    survey = JsonlSurvey(kinds={name: {} for name in [*typed, *([id_field] if id_field else [])]})
    watched = set(survey.kinds)
    wanted = set(names)
    with _open_text_stream(file.path, file.compression) as stream:
        for row, line in enumerate(_lines(file, stream)):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict):
                continue
            if survey.first_keys is None:
                survey.first_keys, survey.first_row = list(obj), row
            for name in names:
                if name not in obj:
                    continue
                survey.present.add(name)
                value = obj[name]
                if name in watched and value is not None:
                    counts = survey.kinds[name]
                    kind = json_kind(value)
                    n, first = counts.get(kind, (0, row))
                    counts[kind] = (n + 1, first)
            if not typed and survey.present >= wanted and (id_field is None or "string" in survey.kinds[id_field]):
                break
    return survey


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


def table_schema(file: InputFile) -> pa.Schema:
    """The Arrow schema of a Parquet or Arrow file (from the footer, or the memory-mapped stream)."""
    if file.format == "parquet":
        return open_parquet(file).schema_arrow
    return _arrow_table(file).schema


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
