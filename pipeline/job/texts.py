"""Texts of output rows, read back from the inputs: (part, row) -> the document's input file and row -> its text.

Each kept version's ``rows.parquet`` says where every document of its parts came from; the row is read from the
input file (plain JSONL files by seeking to the line, through the scan's line offsets), a block of rows at a time,
a few blocks cached. A file that changed since (its digest differs) gives no text rather than a wrong one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.job import versions
from pipeline.job.readers import InputFile
from pipeline.job.records import FieldSpec, extract, iter_raw
from pipeline.job.scan import SCANS, file_digest, file_stat

log = logging.getLogger(__name__)

BLOCK = 1024  # rows read from an input file at once
CACHE = 16  # blocks kept


class DocumentTexts:
    """Where the documents of an output's parts came from, and their texts and kept values.

    Args:
        output: the output directory.
        spec: the job's text/id/kept fields.
        parts: only these parts of the live version (a few documents looked up in a large output: the versions'
            rows tables are read filtered, not whole); default: every part of every kept version.
    """

    def __init__(self, output: str | Path, spec: FieldSpec, parts: set[int] | None = None) -> None:
        self.out = Path(output)
        self.spec = spec
        self.files: dict[int, list[dict[str, Any]]] = {}  # version -> its files
        self.index: dict[int, tuple[int, int]] = {}  # part -> (version, first row of the part in `table`)
        self.tables: dict[int, pa.Table] = {}
        self._blocks: OrderedDict[tuple[int, int, int], dict[int, int] | None] = OrderedDict()
        self._rows: dict[tuple[int, int, int], pa.Table] = {}
        self._warned = False
        self._digests: dict[str, str] = {}
        folder = self.out / versions.VERSIONS
        live = versions.live_version(self.out)
        numbers = sorted((int(p.name) for p in folder.glob("[0-9]*")), key=lambda n: (n != live, -n)) \
            if folder.is_dir() else []
        if parts is not None:
            numbers = [live] if live else []
        for n in numbers:  # the live version first: a part in several versions is looked up there
            info = versions.version_info(self.out, n)
            path = versions.version_dir(self.out, n) / versions.ROWS
            if not info or not path.exists():
                continue
            table = pq.read_table(path, columns=["file", "frow", "part", "prow", "nseq"],
                                  filters=None if parts is None else [("part", "in", sorted(parts))])
            order = np.lexsort((table.column("prow").to_numpy(), table.column("part").to_numpy()))
            table = table.take(pa.array(order))
            self.tables[n] = table
            self.files[n] = info.get("files", [])
            parts = table.column("part").to_numpy()
            starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]]) if len(parts) else []
            for s in starts:
                self.index.setdefault(int(parts[s]), (n, int(s)))

    def locate(self, part: int, row: int) -> tuple[dict[str, Any], int] | None:
        """The input file (as recorded) and row of the document that output row ``row`` of ``part`` belongs to."""
        found = self.index.get(int(part))
        if found is None:
            return None
        n, start = found
        table = self.tables[n]
        parts = table.column("part").to_numpy()
        end = start + int(np.searchsorted(parts[start:], part, side="right"))
        prow = table.column("prow").to_numpy()[start:end]
        i = start + int(np.searchsorted(prow, row, side="right")) - 1
        if i < start or row >= int(table.column("prow")[i].as_py()) + int(table.column("nseq")[i].as_py()):
            return None
        file = int(table.column("file")[i].as_py())
        if not 0 <= file < len(self.files[n]):  # a document that came from no input file (``versions.publish``)
            return None
        return self.files[n][file], int(table.column("frow")[i].as_py())

    def lookup(self, parts: list[int], rows: list[int]) -> list[tuple[str, dict[str, Any]] | None]:
        """``(text, kept values)`` of the documents of output rows ``(parts[i], rows[i])``; None where unknown."""
        out: list[tuple[str, dict[str, Any]] | None] = []
        for part, row in zip(parts, rows, strict=True):
            where = self.locate(part, row)
            out.append(self._read(*where) if where else None)
        return out

    def _warn(self, why: str) -> None:
        if not self._warned:
            log.warning("texts unavailable: %s", why)
            self._warned = True

    def _read(self, file: dict[str, Any], frow: int) -> tuple[str, dict[str, Any]] | None:
        key = (hash(file["path"]), hash(file["digest"]), frow // BLOCK)
        if key not in self._blocks:
            self._blocks[key] = self._load(file, frow // BLOCK, key)
            if len(self._blocks) > CACHE:
                old, _ = self._blocks.popitem(last=False)
                self._rows.pop(old, None)
        else:
            self._blocks.move_to_end(key)
        index = self._blocks[key]
        if index is None or frow not in index:
            return None
        table = self._rows[key]
        j = index[frow]
        return table.column("text")[j].as_py(), {name: table.column(name)[j].as_py() for name in self.spec.keep}

    def _load(self, file: dict[str, Any], block: int, key: tuple[int, int, int]) -> dict[int, int] | None:
        path = Path(file["path"])
        try:
            info = InputFile(file["path"], file["key"], file["format"], file.get("compression"), 0, file["digest"])
            if not path.exists():
                raise PipelineError(f"{path} does not exist any more")
            if list(file.get("stat", ())) != file_stat(path):
                digest = self._digests.get(file["path"]) or file_digest(path)
                self._digests[file["path"]] = digest
                if digest != file["digest"]:
                    raise PipelineError(f"{path} changed since it was embedded")
            lines_path = self.out / SCANS / f"{file['digest']}.lines.npy"
            lo, hi = block * BLOCK, (block + 1) * BLOCK
            byte_start = 0
            if lines_path.exists():
                lines = np.load(lines_path, mmap_mode="r")
                if len(lines) - 1 < lo:
                    return {}
                hi = min(hi, len(lines) - 1)
                byte_start = int(lines[lo])
            tables = []
            for raw in iter_raw(info, self.spec, row_start=lo, row_end=hi, byte_start=byte_start):
                table, _ = extract(raw, info, self.spec, bool(file.get("generated_ids")))
                tables.append(table)
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        except (PipelineError, OSError, ValueError) as exc:
            self._warn(str(exc))
            return None
        self._rows[key] = table
        return {int(r): i for i, r in enumerate(table.column("_row").to_pylist())}
