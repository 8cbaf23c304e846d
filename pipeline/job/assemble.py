"""Output rows of a shard: documents with their ids and kept values, and vectors embedded here or copied from parts
that already hold the same text (whole documents: every chunk of a chunked one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.job.config import JobConfig
from pipeline.job.sink import embedding_array, part_path
from pipeline.model.tokens import Encoded


def _output_columns(cfg: JobConfig, ids: pa.Array, seq: dict[str, Any], keep: dict[str, Any]) -> pa.Table:
    """An output table: ``id`` (and the chunk columns), ``embedding``, ``n_tokens``, ``truncated``, kept columns.

    ``ids`` are the documents' ids, one per output row; ``seq`` the per-row values (``embedding``, ``n_tokens``,
    ``truncated``, and ``chunk``/``token_start``/``token_end`` when chunking).
    """
    cols: dict[str, Any] = {}
    if cfg.long_docs == "chunk":
        cols["id"] = pc.binary_join_element_wise(ids, pc.cast(seq["chunk"], pa.string()), "#")
        cols["doc_id"] = ids
        cols["chunk"] = seq["chunk"]
        cols["token_start"] = seq["token_start"]
        cols["token_end"] = seq["token_end"]
    else:
        cols["id"] = ids
    cols["embedding"] = seq["embedding"]
    cols["n_tokens"] = seq["n_tokens"]
    cols["truncated"] = seq["truncated"]
    cols.update(keep)
    return pa.table(cols)


def output_table(table: pa.Table, enc: Encoded, vectors: np.ndarray, cfg: JobConfig,
                 owner: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:
    """Output rows of the documents of ``table`` from their embedded sequences.

    ``owner[i]`` is the text (a document index of ``enc``) whose sequences document ``i`` takes: itself, or
    another document with the same text (embedded once). Returns ``(table, sequences per document)``.
    """
    n_docs = table.num_rows
    owner = np.arange(n_docs) if owner is None else owner
    counts = np.bincount(enc.doc, minlength=int(owner.max()) + 1 if len(owner) else 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    nseq = counts[owner] if len(owner) else np.zeros(0, np.int64)
    doc_of = np.repeat(np.arange(n_docs), nseq)
    within = np.arange(len(doc_of)) - np.repeat(np.cumsum(nseq) - nseq, nseq)
    seq = np.repeat(starts[owner], nseq) + within if len(owner) else np.zeros(0, np.int64)
    take = pa.array(doc_of)
    values = {"embedding": embedding_array(vectors[seq], cfg.dtype),
              "n_tokens": pa.array(enc.lengths[seq].astype(np.int32)),
              "truncated": pa.array(enc.truncated[seq]),
              "chunk": pa.array(enc.chunk[seq]), "token_start": pa.array(enc.span[seq, 0]),
              "token_end": pa.array(enc.span[seq, 1])}
    keep = {name: table.column(name).take(take) for name in cfg.keep}
    return _output_columns(cfg, table.column("id").take(take), values, keep), nseq


class PartCache:
    """Source parts read for copying, a few at a time."""

    def __init__(self, out: Path, size: int = 4) -> None:
        self.out, self.size = out, size
        self.tables: dict[int, pa.Table] = {}

    def get(self, part: int) -> pa.Table:
        if part not in self.tables:
            if len(self.tables) >= self.size:
                self.tables.pop(next(iter(self.tables)))
            self.tables[part] = pq.read_table(part_path(self.out, part))
        return self.tables[part]


def copied_table(cache: PartCache, docs: pa.Table, part: np.ndarray, prow: np.ndarray, nseq: np.ndarray,
                 cfg: JobConfig) -> pa.Table:
    """Output rows of ``docs`` (their ids and kept values) with the vectors of rows already in parts: document
    ``i`` takes rows ``[prow[i], prow[i] + nseq[i])`` of part ``part[i]``."""
    pieces, order = [], []
    for p in np.unique(part):
        sel = np.flatnonzero(part == p)
        rows = np.concatenate([np.arange(prow[i], prow[i] + nseq[i]) for i in sel])
        pieces.append(cache.get(int(p)).take(pa.array(rows)))
        order.append(sel)
    src = pa.concat_tables(pieces, promote_options="permissive") if pieces else None
    sel_all = np.concatenate(order) if order else np.zeros(0, np.int64)
    # rows of src are grouped by part; put them back in document order
    doc_of_src = np.repeat(sel_all, nseq[sel_all])
    back = np.argsort(doc_of_src, kind="stable")
    take = pa.array(np.repeat(np.arange(docs.num_rows), nseq))
    if src is None:
        return _output_columns(cfg, docs.column("id").take(take), _empty_seq(cfg), {
            name: docs.column(name).take(take) for name in cfg.keep})
    src = src.take(pa.array(back))
    values = {name: src.column(name) for name in ("embedding", "n_tokens", "truncated")}
    if cfg.long_docs == "chunk":
        values.update({name: src.column(name) for name in ("chunk", "token_start", "token_end")})
    keep = {name: docs.column(name).take(take) for name in cfg.keep}
    return _output_columns(cfg, docs.column("id").take(take), values, keep)


def _empty_seq(cfg: JobConfig) -> dict[str, Any]:
    return {"embedding": embedding_array(np.zeros((0, 1), np.float32), cfg.dtype), "n_tokens": pa.array([], pa.int32()),
            "truncated": pa.array([], pa.bool_()), "chunk": pa.array([], pa.int32()),
            "token_start": pa.array([], pa.int32()), "token_end": pa.array([], pa.int32())}


