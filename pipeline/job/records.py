"""Records: turn raw input rows into the ``id``/``text``/kept columns, with one validation for every format.

A row is rejected when its text is missing, null, not a string or blank (nothing but whitespace, control or
zero-width characters), its id is null or blank, a kept value is of another type than its column, or it could
not be parsed at all. Rejections carry the file, row and field; the caller decides whether one stops the job
(``on_bad_record: error``) or is recorded in ``OUTPUT/rejects/`` (``skip``).

Before a file is scanned, ``check_fields`` checks what no single row can: every named field exists in the file
(for JSONL: in at least one row), the ids of every file of an output come from one source and have one type,
and each kept column has one type across the output.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError, where
from pipeline.job.readers import (
    JSON_TEXT,
    InputFile,
    RawBatch,
    encode_schema,
    iter_arrow,
    iter_jsonl,
    iter_parquet,
    survey_jsonl,
    table_schema,
)

DEFAULT_ID_FIELD = "id"
# Nothing but whitespace, control characters (NUL...) and format characters (zero-width space/joiners, BOM, soft
# hyphen): such a text embeds as an empty document, and such an id names nothing.
BLANK = r"^[\p{Cc}\p{Cf}\p{Z}\s]*$"


def is_blank(text: str) -> bool:
    """``BLANK`` in Python (its ``re`` has no ``\\p{...}``): for texts that do not go through Arrow (a server's)."""
    import unicodedata

    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


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
    id_required: bool = False  # the id field was named (even as the default "id"): every file must have it

    @classmethod
    def of(cls, cfg: Any) -> FieldSpec:
        """The fields of a ``JobConfig``."""
        return cls(cfg.text_field, cfg.id_field, tuple(cfg.keep), bool(getattr(cfg, "id_field_given", False)))

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
        """Columns a file may lack: the default id field when it was not named (ids are then generated from file
        and row)."""
        return {self.id_field} if self.id_field == DEFAULT_ID_FIELD and not self.id_required else set()


def plain_type(t: pa.DataType) -> pa.DataType:
    """The type values are stored as: dictionary-encoded (pandas ``category``) columns decoded, large and view
    strings and binaries as plain ones."""
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    return t


def _as_string(file: InputFile, table: pa.Table, name: str) -> pa.ChunkedArray:
    col = table.column(name)
    t = plain_type(col.type)
    if pa.types.is_string(t) or pa.types.is_null(t):
        return col.cast(pa.string())
    raise InputError(f"{file.path}: row 0: field {name!r} has type {col.type}, expected string")


def _id_type_ok(t: pa.DataType) -> bool:
    t = plain_type(t)
    return pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_null(t)


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


def _invalid_utf8_rows(table: pa.Table, names: list[str]) -> dict[int, str]:
    """``{row: field}`` of string values that are not valid UTF-8 (a Parquet writer may store any bytes as a
    string; Arrow checks only when asked). Whole chunks are checked first; rows one by one only in a bad one."""
    found: dict[int, str] = {}
    for name in names:
        if name not in table.column_names:
            continue
        col = table.column(name)
        typ = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
            continue
        base = 0
        for chunk in col.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                plain = chunk.dictionary_decode() if pa.types.is_dictionary(chunk.type) else chunk
                for i, value in enumerate(plain.cast(pa.large_binary()).to_pylist()):
                    try:
                        if value is not None:
                            value.decode("utf-8")
                    except UnicodeDecodeError:
                        found.setdefault(base + i, name)
            base += len(chunk)
    return found


def extract(raw: RawBatch, file: InputFile, spec: FieldSpec, generated_ids: bool) -> tuple[pa.Table, list[Reject]]:
    """Validate a raw batch and build its clean table.

    Returns:
        ``(table, rejects)``: ``table`` has ``id`` (string), ``text`` (string), the kept columns and ``_row``
        (int64, the row in the file), for the valid rows only; ``rejects`` names every other row.
    """
    table, rows = raw.table, raw.rows
    rejects = [Reject(file.path, file.format, r, f, why) for r, f, why in raw.bad]
    if table.num_rows == 0:
        return _empty(spec, table, file), rejects
    broken = _invalid_utf8_rows(table, spec.columns())
    if broken:
        rejects += [Reject(file.path, file.format, rows[i].as_py(), name,
                           "not valid UTF-8 text (bytes that the file's writer stored as a string unchecked)")
                    for i, name in sorted(broken.items())]
        mask = np.ones(table.num_rows, bool)
        mask[list(broken)] = False
        table, rows = table.filter(mask), rows.filter(mask)
        if table.num_rows == 0:
            return _empty(spec, table, file), rejects
    text, text_name = _text(file, table, spec)
    if generated_ids:
        ids = pc.binary_join_element_wise(pa.scalar(file.key + "#"), pc.cast(rows, pa.string()), "")
        id_null = pa.array([False] * table.num_rows)
    else:
        raw_ids = table.column(spec.id_field)
        if not _id_type_ok(raw_ids.type):
            raise InputError(
                f"{file.path}: row 0: field {spec.id_field!r} has type {raw_ids.type}, expected string or integer"
            )
        ids = raw_ids.cast(plain_type(raw_ids.type)).cast(pa.string())
        id_null = pc.is_null(ids)
        id_null = pc.or_(id_null, pc.fill_null(pc.match_substring_regex(ids, BLANK), False))
    text_null = pc.is_null(text)
    text_empty = pc.match_substring_regex(text.fill_null(""), BLANK)
    bad = pc.or_(pc.or_(id_null, text_null), text_empty)
    if pc.any(bad).as_py():
        for i in pc.indices_nonzero(bad).to_pylist():
            row_id = ids[i].as_py()
            if id_null[i].as_py():
                field = spec.id_field
                why = "the id is missing or null" if row_id is None else "the id is blank"
            elif text_null[i].as_py():
                field, why = text_name, "the text is missing or null"
            else:
                field, why = text_name, "the text is empty (nothing but whitespace, control or zero-width characters)"
            rejects.append(Reject(file.path, file.format, rows[i].as_py(), field, why, row_id))
        keep_mask = pc.invert(bad)
        table, text, ids, rows = (pc.filter(x, keep_mask) for x in (table, text, ids, rows))
    columns = {"id": ids, "text": text}
    kept = file.kept_types()
    for name in spec.keep:
        columns[name] = _kept_column(file, table.column(name), kept.get(name))
    columns["_row"] = rows
    return pa.table(columns), rejects


def _kept_column(file: InputFile, col: pa.ChunkedArray, planned: pa.Field | None) -> pa.ChunkedArray:
    """A kept column as its planned type (one type across the output)."""
    if planned is None or col.type == planned.type:
        return col
    try:
        return col.cast(plain_type(col.type)).cast(planned.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{file.path}: field {planned.name!r}: cannot be read as {planned.type} ({exc})") from exc


def _empty(spec: FieldSpec, raw: pa.Table, file: InputFile) -> pa.Table:
    cols: dict[str, pa.Array] = {"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}
    kept = file.kept_types()
    for name in spec.keep:
        if name in kept:
            typ = kept[name].type
        else:
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
    if file.ids:  # planned by check_fields
        return file.ids != "generated"
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


# ------------------------------------------------------------------------------ fields, id source, kept types


@dataclass
class _Found:
    """What a file holds, before its rows are scanned."""

    info: InputFile
    ids: str  # "integer" | "string" | "generated"
    kept: dict[str, tuple[pa.DataType | None, bool]]  # name -> (type, JSON text); None: no value to tell


def _role(spec: FieldSpec, name: str) -> str:
    if name == spec.id_field:
        return "--id-field"
    if name in spec.text_columns:
        return "--text-field" if spec.template is None else f"in --text-field {spec.text_field!r}"
    return "--keep"


def _found_jsonl(info: InputFile, spec: FieldSpec) -> _Found:
    text_cols = set(spec.text_columns)
    typed = [n for n in spec.keep if n not in text_cols and n != spec.id_field]
    survey = survey_jsonl(info, spec.columns(), typed, spec.id_field)
    generated = False
    if survey.first_keys is not None:  # an empty file (or one of bad lines only) has no fields to check
        for name in spec.columns():
            if name in survey.present:
                continue
            if name == spec.id_field and name in spec.optional():
                generated = True
                continue
            keys = ", ".join(repr(k) for k in survey.first_keys) or "none"
            first = where("jsonl", survey.first_row)
            raise InputError(
                f"{info.path}: field {name!r} ({_role(spec, name)}) is in no row of the file ({first} has the fields "
                f"{keys}). Every named field must exist in the file: check the name."
            )
    id_kinds = set(survey.kinds[spec.id_field])
    if generated:
        ids = "generated"
    else:  # "none": no row tells (an empty file, bad rows only): it takes part in no check across files
        ids = "none" if not id_kinds else "integer" if id_kinds == {"integer"} else "string"
    kept: dict[str, tuple[pa.DataType | None, bool]] = {}
    for name in spec.keep:
        if name not in typed:
            kept[name] = (pa.string(), False)  # the id or a text field: read as strings
            continue
        families: dict[str, tuple[int, int]] = {}
        for kind, (n, first) in survey.kinds[name].items():
            fam = "number" if kind in ("integer", "number") else "json" if kind in ("object", "array") else kind
            count, row = families.get(fam, (0, first))
            families[fam] = (count + n, min(row, first))
        if not families:
            kept[name] = (None, False)
            continue
        fam = max(families, key=lambda f: (families[f][0], -families[f][1]))  # the most common; ties: first seen
        if fam == "number":
            typ = pa.int64() if "number" not in survey.kinds[name] else pa.float64()
        else:
            typ = {"string": pa.string(), "boolean": pa.bool_(), "json": pa.string()}[fam]
        kept[name] = (typ, fam == "json")
    return _Found(info, ids, kept)


def _found_table(info: InputFile, spec: FieldSpec) -> _Found:
    schema = table_schema(info)
    for name in spec.columns():
        if name not in schema.names and name not in spec.optional():
            raise InputError(f"{info.path}: row 0: field {name!r} is missing (columns: {', '.join(schema.names)})")
    if spec.id_field not in schema.names:
        ids = "generated"
    else:
        t = schema.field(spec.id_field).type
        if not _id_type_ok(t):
            raise InputError(f"{info.path}: row 0: field {spec.id_field!r} has type {t}, expected string or integer")
        ids = "integer" if pa.types.is_integer(plain_type(t)) else "string"
    kept: dict[str, tuple[pa.DataType | None, bool]] = {}
    for name in spec.keep:
        t = plain_type(schema.field(name).type)
        kept[name] = (None if pa.types.is_null(t) else t, False)
    return _Found(info, ids, kept)


def _fits(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether every value of type ``src`` can be stored as ``dst`` without loss of meaning."""
    if src == dst:
        return True
    if pa.types.is_integer(src) and pa.types.is_integer(dst):
        if pa.types.is_signed_integer(src) and not pa.types.is_signed_integer(dst):
            return False
        widen = 1 if pa.types.is_unsigned_integer(src) and pa.types.is_signed_integer(dst) else 0
        return dst.bit_width >= src.bit_width + widen
    if pa.types.is_integer(src) and pa.types.is_floating(dst):
        return True
    return pa.types.is_floating(src) and pa.types.is_floating(dst) and dst.bit_width >= src.bit_width


def _unify(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """One type for values of types ``a`` and ``b`` (files planned together), or None."""
    if _fits(a, b):
        return b
    if _fits(b, a):
        return a
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (pa.types.is_integer(b) or pa.types.is_floating(b)):
        return pa.float64()
    return None


def check_fields(new: list[InputFile], planned: list[InputFile], spec: FieldSpec) -> list[InputFile]:
    """Check what no single row can tell, before the rows of ``new`` files are scanned; no model work yet.

    - Every named field (the text field or the template's fields, ``--keep`` fields, an explicit ``--id-field``)
      exists in every file: a column of a Parquet/Arrow file; a key of at least one row of a JSONL file (rows
      lacking it are then bad rows for the text and the id, empty template parts, null kept values). Only the
      default ``id`` may be absent, and then ids are generated as ``FILE#ROW``.
    - The ids of an output come from one source and have one type: the files (``new`` and those ``planned``
      earlier) all have ids or all have generated ones, and their ids are all integers or all strings (a JSONL
      file whose ids are not all integers counts as string). An integer id is written in decimal, so a mix would
      make ``7`` and ``"7"`` one id: refused.
    - A kept column has one type in the output: the type of the files planned first; a JSONL field takes the
      JSON type most of its values have (integers and numbers together; objects and arrays kept as JSON text).

    Returns:
        ``new`` with ``ids`` and ``kept_schema`` set (how each file's rows are read from now on).

    Raises:
        InputError: naming the field and the file(s), whatever ``on_bad_record`` says.
    """
    found = [_found_jsonl(f, spec) if f.format == "jsonl" else _found_table(f, spec) for f in new]
    known = [(f.path, f.ids) for f in planned if f.ids not in ("", "none")]
    known += [(f.info.path, f.ids) for f in found if f.ids != "none"]
    generated = [p for p, ids in known if ids == "generated"]
    real = [(p, ids) for p, ids in known if ids != "generated"]
    if generated and real:
        raise InputError(
            f"{generated[0]} has no {spec.id_field!r} field, so its ids would be generated as FILE#ROW, but "
            f"{real[0][0]} has one: ids of two kinds would mix in one output. Give every file an "
            f"{spec.id_field!r} field, or none of them, or embed them into separate outputs."
        )
    kinds = {ids: p for p, ids in reversed(real)}  # the first file of each id type
    if len(kinds) > 1:
        raise InputError(
            f"the ids of {kinds['integer']} are integers but those of {kinds['string']} are strings: ids are "
            "stored as strings, so 7 and \"7\" would become one id. Give the files one id type (cast the id "
            "column), or embed them into separate outputs."
        )
    out_types: dict[str, tuple[pa.DataType, str]] = {}  # kept column -> (type in the output, the file that set it)
    for f in planned:
        for name, fld in f.kept_types().items():
            out_types.setdefault(name, (fld.type, f.path))
    for name in spec.keep:
        if name in out_types:
            continue
        typed = [(fd.kept[name][0], fd.info.path) for fd in found if fd.kept[name][0] is not None]
        if typed:
            t, origin = typed[0]
            for other, path in typed[1:]:
                joint = _unify(t, other)
                if joint is not None and joint != t:
                    t, origin = joint, f"{origin} and {path}"
            out_types[name] = (t, origin)  # a conflict is named below
    results = []
    for fd in found:
        fields = []
        for name in spec.keep:
            own, json_text = fd.kept[name]
            out, origin = out_types.get(name, (pa.string(), ""))
            if own is not None and not _fits(own, out):
                raise InputError(
                    f"{fd.info.path}: kept field {name!r} is {own} here but {out} in the output (as in {origin}): "
                    "a kept column has one type across the output. Cast it, or embed the files into separate "
                    "outputs."
                )
            fields.append(pa.field(name, out, metadata={JSON_TEXT: b"1"} if json_text else None))
        results.append(dataclasses.replace(fd.info, ids=fd.ids, kept_schema=encode_schema(fields)))
    return results
