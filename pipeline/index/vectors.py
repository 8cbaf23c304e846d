"""Vectors: the finished vector parts of an output directory, read back as float32 NumPy batches.

The parts are those of the live version (``OUTPUT/vectors``, resolved once, so a reader stays on one version).
Parts are taken in part-id order; a vector's *position* is its row number in the concatenation of the parts in
that order, which is also its FAISS id in an index and its row in the id map.

Everything here streams: a part is read one batch at a time, and exact search keeps a running top-k heap, so
memory stays bounded by a batch whatever the number of vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.job.sink import WRITTEN_AT, part_number

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
LOCATOR_COLUMNS = ("doc_id", "token_start", "token_end")  # chunk mode: which document and which tokens


@dataclass(frozen=True)
class Part:
    """One complete vector part.

    Attributes:
        shard: the shard id (from the manifest) the part belongs to.
        path: the Parquet file.
        rows: number of vectors.
        dims: vector size.
        dtype: ``float32`` or ``float16`` as stored (always read as float32).
        finished_at: when the part was written (its Parquet metadata; the file's modification time for parts
            written before it was kept there); another value under the same name means the part was rewritten.
        columns: the part's column names.
    """

    shard: int
    path: Path
    rows: int
    dims: int
    dtype: str
    finished_at: float
    columns: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name


def complete_parts(output: str | Path) -> list[Part]:
    """The parts of ``output``'s live version, in part-id order (a part id is never reused: a part whose rows
    change is written again under a new id, so parts only appear and vanish between versions).

    Only Parquet footers are read. Raises:
        PipelineError: parts disagree on the vector size.
    """
    from pipeline.job.versions import live_vectors

    out = Path(output)
    folder = live_vectors(out)
    if folder is None:
        return []
    folder = folder.resolve()
    parts = [_describe_part(path, part_number(path)) for path in sorted(folder.glob("part-*.parquet"), key=part_number)]
    dims = {p.dims for p in parts}
    if len(dims) > 1:
        raise PipelineError(f"{out}: vector parts have different sizes {sorted(dims)}; the output mixes two jobs")
    return parts


def _describe_part(path: Path, shard: int) -> Part:
    schema = pq.read_schema(path)
    written = (schema.metadata or {}).get(WRITTEN_AT)
    finished_at = float(written) if written else path.stat().st_mtime
    if EMBEDDING not in schema.names:
        raise PipelineError(f"{path}: no {EMBEDDING!r} column")
    tp = schema.field(EMBEDDING).type
    if not pa.types.is_fixed_size_list(tp):
        raise PipelineError(f"{path}: column {EMBEDDING!r} is {tp}, not a fixed-size list of floats")
    dtype = "float16" if pa.types.is_float16(tp.value_type) else "float32"
    rows = pq.read_metadata(path).num_rows
    return Part(shard, path, rows, tp.list_size, dtype, finished_at, tuple(schema.names))


def as_matrix(column: pa.Array | pa.ChunkedArray, dims: int) -> np.ndarray:
    """A ``fixed_size_list<float>[dims]`` column -> C-contiguous float32 (n, dims)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dims), dtype=np.float32)


def iter_batches(part: Part, batch_rows: int = 65536, columns: Sequence[str] = ()) -> Iterator[
    tuple[np.ndarray, pa.RecordBatch]
]:
    """Yield ``(vectors float32 (b, dims), record batch of the other requested columns)`` for one part."""
    names = [EMBEDDING, *[c for c in columns if c != EMBEDDING]]
    # streamed with small read buffers: pre-buffering a whole row group would hold it twice while decoding
    pf = pq.ParquetFile(part.path, pre_buffer=False, buffer_size=1 << 20)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
        yield as_matrix(batch.column(EMBEDDING), part.dims), batch
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise: memory is budgeted


def read_part_vectors(part: Part) -> np.ndarray:
    """All vectors of one part, float32 (rows, dims)."""
    table = pq.read_table(part.path, columns=[EMBEDDING])
    return as_matrix(table.column(EMBEDDING), part.dims)


def offsets(parts: Sequence[Part]) -> np.ndarray:
    """int64 (len(parts) + 1,): part i holds positions ``[offsets[i], offsets[i + 1])``."""
    out = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.rows for p in parts], out=out[1:])
    return out


def sample_rows(parts: Sequence[Part], count: int, rng: np.random.Generator, *, spread: int = 8,
                min_parts: int = 64) -> tuple[np.ndarray, int]:
    """``count`` distinct rows drawn at random, as indices into the concatenation of ``parts`` (sorted).

    Reading a sample costs the reading of every part it touches, so rows are drawn from a random subset of parts
    holding at least ``spread * count`` rows (and at least ``min_parts`` parts, or all): the time to read a sample
    is bounded by the sample size, not by the corpus size.

    Returns:
        ``(rows int64 (count,), number of parts drawn from)``.
    """
    bounds = offsets(parts)
    total = int(bounds[-1])
    count = min(count, total)
    if total <= spread * count or len(parts) <= min_parts:
        chosen = np.arange(len(parts))
    else:
        order = rng.permutation(len(parts))
        cum = np.cumsum([parts[i].rows for i in order])
        k = max(min_parts, int(np.searchsorted(cum, spread * count)) + 1)
        chosen = np.sort(order[:k])
    sizes = np.array([parts[i].rows for i in chosen], dtype=np.int64)
    pool_bounds = np.concatenate([[0], np.cumsum(sizes)])
    picked = np.sort(rng.choice(int(pool_bounds[-1]), min(count, int(pool_bounds[-1])), replace=False))
    which = np.searchsorted(pool_bounds, picked, side="right") - 1  # no array of the whole pool is made
    rows = bounds[chosen[which]] + (picked - pool_bounds[which])
    return np.sort(rows).astype(np.int64), len(chosen)


def read_rows(parts: Sequence[Part], positions: np.ndarray, reader=None) -> np.ndarray:
    """The vectors at the given rows of the concatenation of ``parts``, float32 (len(positions), dims), in the order
    given.

    Each part that holds at least one position is read once, a batch at a time (memory: one batch and the result),
    or whole through ``reader`` when given.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if not len(parts):
        return np.empty((0, 0), dtype=np.float32)
    out = np.empty((len(positions), parts[0].dims), dtype=np.float32)
    if not len(positions):
        return out
    bounds = offsets(parts)
    which = np.searchsorted(bounds, positions, side="right") - 1
    for i in np.unique(which):
        sel = np.flatnonzero(which == i)
        local = positions[sel] - bounds[i]
        if reader is not None:
            out[sel] = reader(parts[int(i)])[local]
            continue
        start = 0
        for vectors, _ in iter_batches(parts[int(i)], 16384):
            end = start + len(vectors)
            mine = (local >= start) & (local < end)
            if mine.any():
                out[sel[mine]] = vectors[local[mine] - start]
            start = end
    return out


def exact_search(
    parts: Sequence[Part], queries: np.ndarray, k: int, metric: str, *, starts: Sequence[int] | None = None,
    batch_rows: int = 131072, reader=None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over all vectors of ``parts``, streamed part by part.

    Args:
        parts: the parts, in position order.
        queries: float32 (nq, dims).
        k: neighbours per query (fewer exist when the parts hold fewer vectors: ids are then -1).
        metric: ``ip`` (larger is closer) or ``l2`` (squared distance, smaller is closer).
        starts: the first position of each part (default: consecutive from 0).
        batch_rows: vectors scored at once.
        reader: read a part's vectors (default ``read_part_vectors``); tests count reads through it.

    Returns:
        ``(scores float32 (nq, k), positions int64 (nq, k))``, best first.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keep_max = metric == "ip"
    heap = faiss.ResultHeap(len(queries), k, keep_max=keep_max)
    fmetric = faiss.METRIC_INNER_PRODUCT if keep_max else faiss.METRIC_L2
    first = offsets(parts)[:-1] if starts is None else np.asarray(starts, dtype=np.int64)
    for part, start in zip(parts, first, strict=True):
        start = int(start)
        if reader is not None:
            chunks: Iterator[np.ndarray] = iter([reader(part)])
        else:
            chunks = (v for v, _ in iter_batches(part, batch_rows))
        for vectors in chunks:
            kk = min(k, len(vectors))
            if kk:
                dist, idx = faiss.knn(queries, vectors, kk, metric=fmetric)
                heap.add_result(np.ascontiguousarray(dist), np.ascontiguousarray(idx + start))
            start += len(vectors)
    heap.finalize()
    return heap.D, heap.I
