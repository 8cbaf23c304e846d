"""Records: turn raw input rows into the ``id``/``text``/kept columns, with one validation for every format.

A row is rejected when its text is missing, null, empty or not a string, its id is null, or it could not be
parsed at all. Rejections carry the file, row and field; the caller decides whether one stops the job
(``on_bad_record: error``) or is recorded in ``OUTPUT/rejects/`` (``skip``).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError, where
from pipeline.job.readers import InputFile, RawBatch, iter_arrow, iter_jsonl, iter_parquet

DEFAULT_ID_FIELD = "id"


@dataclass(frozen=True)
class Reject:
    """A row that is not embedded, and why."""

    file: str
    fmt: str
    row: int
    field: str
    reason: str
    id: str | None = None

    def message(self) -> str:
        field = f"field {self.field!r}: " if self.field else ""
        return f"{self.file}: {where(self.fmt, self.row)}: {field}{self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "row": self.row, "field": self.field, "reason": self.reason, "id": self.id}


@dataclass(frozen=True)
class FieldSpec:
    """Which input columns make the id, the text and the kept columns.

    ``text_field`` is a column name, or a template such as ``"{title} {text}"`` whose fields are joined
    (nulls as empty strings) and stripped of surrounding whitespace, as MTEB builds BEIR documents.
    """

    text_field: str = "text"
    id_field: str = DEFAULT_ID_FIELD
    keep: tuple[str, ...] = ()

    @property
    def template(self) -> list[tuple[str, str | None]] | None:
        if "{" not in self.text_field:
            return None
        parts = []
        for literal, name, spec, conv in string.Formatter().parse(self.text_field):
            if spec or conv:
                raise InputError(f"text_field {self.text_field!r}: format specs and conversions are not supported")
            if name == "":
                raise InputError(f"text_field {self.text_field!r}: name every field, as in '{{title}} {{text}}'")
            parts.append((literal, name))
        return parts

    @property
    def text_columns(self) -> list[str]:
        template = self.template
        if template is None:
            return [self.text_field]
        return list(dict.fromkeys(name for _, name in template if name is not None))

    def columns(self) -> list[str]:
        """Every raw column needed, in a stable order."""
        return list(dict.fromkeys([self.id_field, *self.text_columns, *self.keep]))

    def optional(self) -> set[str]:
        """Columns a file may lack: the default id field (ids are then generated from file and row)."""
        return {self.id_field} if self.id_field == DEFAULT_ID_FIELD else set()


def _as_string(file: InputFile, table: pa.Table, name: str) -> pa.ChunkedArray:
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type):
        return col.cast(pa.string())
    raise InputError(f"{file.path}: row 0: field {name!r} has type {col.type}, expected string")


def _text(file: InputFile, table: pa.Table, spec: FieldSpec) -> tuple[pa.ChunkedArray, str]:
    """The text column and the field named when it is bad."""
    template = spec.template
    if template is None:
        return _as_string(file, table, spec.text_field), spec.text_field
    pieces: list[pa.ChunkedArray | pa.Scalar] = []
    for literal, name in template:
        if literal:
            pieces.append(pa.scalar(literal))
        if name is not None:
            pieces.append(_as_string(file, table, name).fill_null(""))
    joined = pc.binary_join_element_wise(*pieces, "")
    return pc.utf8_trim_whitespace(joined), "+".join(spec.text_columns)


def extract(raw: RawBatch, file: InputFile, spec: FieldSpec, generated_ids: bool) -> tuple[pa.Table, list[Reject]]:
    """Validate a raw batch and build its clean table.

    Returns:
        ``(table, rejects)``: ``table`` has ``id`` (string), ``text`` (string), the kept columns and ``_row``
        (int64, the row in the file), for the valid rows only; ``rejects`` names every other row.
    """
    table, rows = raw.table, raw.rows
    rejects = [Reject(file.path, file.format, r, f, why) for r, f, why in raw.bad]
    if table.num_rows == 0:
        return _empty(spec, table), rejects
    text, text_name = _text(file, table, spec)
    if generated_ids:
        ids = pc.binary_join_element_wise(pa.scalar(file.key + "#"), pc.cast(rows, pa.string()), "")
        id_null = pa.array([False] * table.num_rows)
    else:
        raw_ids = table.column(spec.id_field)
        if not (pa.types.is_string(raw_ids.type) or pa.types.is_integer(raw_ids.type)
                or pa.types.is_large_string(raw_ids.type) or pa.types.is_null(raw_ids.type)):
            raise InputError(
                f"{file.path}: row 0: field {spec.id_field!r} has type {raw_ids.type}, expected string or integer"
            )
        ids = raw_ids.cast(pa.string())
        id_null = pc.is_null(ids)
    text_null = pc.is_null(text)
    text_empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text.fill_null(""))), 0)
    bad = pc.or_(pc.or_(id_null, text_null), text_empty)
    if pc.any(bad).as_py():
        for i in pc.indices_nonzero(bad).to_pylist():
            row_id = ids[i].as_py()
            if id_null[i].as_py():
                field, why = spec.id_field, "the id is missing or null"
            elif text_null[i].as_py():
                field, why = text_name, "the text is missing or null"
            else:
                field, why = text_name, "the text is empty"
            rejects.append(Reject(file.path, file.format, rows[i].as_py(), field, why, row_id))
        keep_mask = pc.invert(bad)
        table, text, ids, rows = (pc.filter(x, keep_mask) for x in (table, text, ids, rows))
    columns = {"id": ids, "text": text}
    for name in spec.keep:
        columns[name] = table.column(name)
    columns["_row"] = rows
    return pa.table(columns), rejects


def _empty(spec: FieldSpec, raw: pa.Table) -> pa.Table:
    cols: dict[str, pa.Array] = {"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}
    for name in spec.keep:
        typ = raw.schema.field(name).type if name in raw.schema.names else pa.null()
        cols[name] = pa.array([], typ)
    cols["_row"] = pa.array([], pa.int64())
    return pa.table(cols)


def iter_raw(
    file: InputFile, spec: FieldSpec, *, row_start: int = 0, row_end: int | None = None, byte_start: int = 0
) -> Iterator[RawBatch]:
    """Raw batches of a file's rows ``[row_start, row_end)`` in any supported format."""
    columns = spec.columns()
    if file.format == "jsonl":
        strings = set(spec.text_columns)
        return iter_jsonl(
            file, columns, strings, spec.id_field, row_start=row_start, row_end=row_end, byte_start=byte_start
        )
    reader = iter_parquet if file.format == "parquet" else iter_arrow
    return reader(file, columns, spec.optional(), row_start=row_start, row_end=row_end)


def file_has_ids(file: InputFile, spec: FieldSpec) -> bool:
    """Whether the file has the id field; if not (and it is the default field) ids are generated."""
    if spec.id_field not in spec.optional():
        return True
    if file.format == "jsonl":
        for raw in iter_raw(file, FieldSpec(spec.text_field, spec.id_field, ())):
            present = pc.sum(pc.is_valid(raw.table.column(spec.id_field))).as_py() or 0
            if raw.table.num_rows:
                return present > 0
        return True
    for raw in iter_raw(file, spec, row_end=1):
        return spec.id_field in raw.table.column_names
    return True
