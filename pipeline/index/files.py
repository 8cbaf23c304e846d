"""The index files of an output: ``OUTPUT/index/`` (info.json, index and id-map generations), atomic installs.

Layout::

    OUTPUT/index/info.json              what is current: factory, metric, dims, ntotal, search parameters,
                                        measured recall@1/10/100, size, build time, the parts in it (with the first
                                        position of each), the parts removed since the build, file names
    OUTPUT/index/index-GEN.faiss        the index (FAISS id = position = row of the id map)
    OUTPUT/index/lists-GEN.ivfdata      the inverted lists of an on-disk IVF index (memory-mapped read-only)
    OUTPUT/index/ids-GEN.parquet        id map: position -> id, shard, row in the part (+ doc_id/token span);
                                        append-only: rows of removed parts stay, their positions are filtered
    OUTPUT/index/queries-GEN.npz        the held-out recall queries (positions, vectors, set), reused by updates
    OUTPUT/index/build-KEY/             a build in pieces: plan, trained index, pieces' runs (``pieces.py``);
                                        removed once merged
    OUTPUT/index/.lock                  one build or update commits at a time

Positions are stable: a part keeps the positions it was given when it was added (``start`` in ``info.json``); new
parts are numbered after every position ever given (``positions``), so the id map only grows until a rebuild.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.index.vectors as vec
from pipeline.errors import PipelineError
from pipeline.index.build import quiet_stdout
from pipeline.index.params import Filter, ranges_of, set_search_params
from pipeline.index.vectors import LOCATOR_COLUMNS, Part
from pipeline.util import fsync_file

INDEX_DIR = "index"
INFO = "info.json"
INFO_VERSION = 2
ID_MAP_ROW_GROUP = 65536


def index_dir(output: str | Path) -> Path:
    return Path(output) / INDEX_DIR


def read_info(output: str | Path) -> dict[str, Any]:
    """``OUTPUT/index/info.json``.

    Raises:
        PipelineError: there is no index yet.
    """
    path = index_dir(output) / INFO
    if not path.exists():
        raise PipelineError(f"{Path(output)} has no index ({path} does not exist): build it with "
                            f"`embed-corpus index build {output}`")
    try:
        return upgrade_info(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); rebuild with `embed-corpus index build {output}`") from exc


def upgrade_info(info: dict[str, Any]) -> dict[str, Any]:
    """An ``info.json`` of version 1 (parts numbered consecutively, nothing ever removed) in version 2's terms."""
    if info.get("version", 1) < 2:
        start = 0
        for entry in info.get("parts", []):
            entry.setdefault("start", start)
            start += int(entry["rows"])
        info.setdefault("positions", start)
        info.setdefault("removed", [])
        info.setdefault("live", start)
        if isinstance(info.get("recall_queries"), int):
            info["recall_queries"] = {"tune": info["recall_queries"], "report": info["recall_queries"],
                                      "note": "version 1: one set, tuned and reported on"}
    return info


def load_index(output: str | Path, info: dict[str, Any] | None = None, *, mmap: bool = False):
    """The current index with its recorded search parameters applied, and its info.

    ``mmap``: map the index file read-only instead of reading it into memory (search start-up: only the pages a
    query touches are read; the results are the same). Not for an index that will be added to.

    Returns:
        ``(faiss.Index, info dict)``.

    Raises:
        PipelineError: no index, or its file is missing.
    """
    import faiss

    info = info or read_info(output)
    folder = index_dir(output)
    path = folder / info["files"]["index"]
    for key in ("index", "lists"):
        name = info["files"].get(key)
        if name and not (folder / name).exists():
            raise PipelineError(f"{folder / name} is missing; rebuild with `embed-corpus index build {output}`")
    if "lists" in info["files"]:
        # the lists file is opened read-only beside the index file, wherever the output has moved; faiss says
        # so on stdout, which must stay clean
        with quiet_stdout():
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    else:  # mapped (search): start-up does not grow with the index's size
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap and hasattr(faiss, "IO_FLAG_MMAP_IFC") else 0
        index = faiss.read_index(str(path), flags)
    set_search_params(index, info.get("search_params") or {})
    return index, info


def new_generation() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"


def install(tmp: Path, final: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, final)


def collect_garbage(folder: Path, keep: set[str]) -> None:
    """Remove files of killed or superseded builds (everything but the lock, info.json, ``keep`` and the folders of
    builds in pieces, which ``pieces`` manages)."""
    for p in folder.iterdir():
        if p.is_file() and p.name not in keep and p.name not in (INFO, ".lock"):
            p.unlink(missing_ok=True)


def job_record(out: Path) -> dict[str, Any]:
    path = out / "job.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def id_map_schema(parts: Sequence[Part]) -> pa.Schema:
    fields = [pa.field("id", pa.string()), pa.field("shard", pa.int32()), pa.field("row", pa.int32())]
    cols = set(parts[0].columns) if parts else set()
    if "doc_id" in cols:
        fields += [pa.field("doc_id", pa.string()), pa.field("token_start", pa.int32()),
                   pa.field("token_end", pa.int32())]
    return pa.schema(fields)


def write_id_map(path: Path, parts: Sequence[Part], previous: Path | None = None) -> int:
    """Write the id map: the rows of ``previous`` (an earlier id map) then one row per vector of ``parts``."""
    schema = pq.read_schema(previous) if previous is not None else id_map_schema(parts)
    extra = [f.name for f in schema if f.name in LOCATOR_COLUMNS]
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        if previous is not None:
            for batch in pq.ParquetFile(previous).iter_batches(batch_size=ID_MAP_ROW_GROUP):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema), row_group_size=ID_MAP_ROW_GROUP)
                rows += batch.num_rows
        for part in parts:
            table = pq.read_table(part.path, columns=["id", *extra])
            cols = {"id": table.column("id").cast(pa.string()),
                    "shard": pa.array(np.full(table.num_rows, part.shard, dtype=np.int32)),
                    "row": pa.array(np.arange(table.num_rows, dtype=np.int32))}
            for name in extra:
                cols[name] = table.column(name).cast(schema.field(name).type)
            writer.write_table(pa.table(cols, schema=schema), row_group_size=ID_MAP_ROW_GROUP)
            rows += table.num_rows
    return rows


def search_filter(output: str | Path, info: dict[str, Any], live: Sequence[Part] | None = None):
    """The positions every search of this index must leave out: parts removed by an update but still in an HNSW
    or flat index, and indexed parts that have vanished from the output since the last update (deleted, or
    rewritten under another done time). Also the live indexed parts, with their first positions.

    Returns:
        ``(params.Filter, live indexed parts, their starts)``.
    """
    live = vec.complete_parts(output) if live is None else live
    by_key = {(p.name, p.finished_at): p for p in live}
    present = [e for e in info["parts"] if (e["name"], e["finished_at"]) in by_key]
    gone = [e for e in info["parts"] if (e["name"], e["finished_at"]) not in by_key]
    unapplied = [e for e in info.get("removed", []) if not e.get("applied")]
    filt = Filter(ranges_of(unapplied) + ranges_of(gone), int(info.get("positions", info["ntotal"])))
    return filt, [by_key[(e["name"], e["finished_at"])] for e in present], [int(e["start"]) for e in present]
