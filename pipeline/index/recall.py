"""Index recall: exact neighbours of held-out corpus vectors, recall@1/10/100 of an index, and the tuning of
``nprobe`` / ``efSearch`` until recall@10 reaches a target.

Recall@k is the mean over queries of ``|found top k & exact top k| / k``, where a query's own position is left out
of both lists (the queries are corpus vectors: finding themselves would be trivial). The exact neighbours come
from the index's own storage when it keeps exact vectors (flat, IVF-Flat, HNSW-Flat: nothing is re-read), else
from a brute-force scan of the vector parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import pipeline.index.vectors as vec
from pipeline.index.build import inner_index
from pipeline.index.vectors import Part

log = logging.getLogger(__name__)

RECALL_KS = (1, 10, 100)
EF_STEPS = (16, 32, 64, 128, 256, 512, 1024)


def set_search_params(index, params: dict[str, Any]) -> None:
    """Apply ``{"nprobe": 16}`` / ``{"efSearch": 64}`` through faiss's ParameterSpace (reaches wrapped indexes)."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _exact_searcher(index) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None:
    """Exact search from the index's own stored vectors, where it keeps them uncompressed."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        return None
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        return lambda q, k: inner.search(q, k)
    if isinstance(inner, faiss.IndexIVFFlat):
        return lambda q, k: _ivf_flat_exact(inner, q, k)
    if hasattr(inner, "hnsw"):
        storage = faiss.downcast_index(inner.storage)
        if isinstance(storage, faiss.IndexFlat):
            return lambda q, k: storage.search(q, k)
    return None


def _ivf_flat_exact(ivf, queries: np.ndarray, k: int, chunk: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the raw vectors stored in an IVF-Flat's inverted lists, a chunk of lists at a time with
    BLAS (scanning every list through ``search`` with ``nprobe = nlist`` is several times slower)."""
    import faiss

    invlists = ivf.invlists
    keep_max = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    heap = faiss.ResultHeap(len(queries), k, keep_max=keep_max)
    codes: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    pending = 0

    def flush() -> None:
        x, i = np.concatenate(codes), np.concatenate(ids)
        kk = min(k, len(x))
        dist, local = faiss.knn(queries, x, kk, metric=ivf.metric_type)
        heap.add_result(np.ascontiguousarray(dist), np.ascontiguousarray(i[local]))
        codes.clear()
        ids.clear()

    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if not size:
            continue
        raw = faiss.rev_swig_ptr(invlists.get_codes(lst), size * ivf.code_size)
        codes.append(np.frombuffer(raw, dtype=np.float32).reshape(size, ivf.d).copy())
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
        pending += size
        if pending >= chunk:
            flush()
            pending = 0
    if codes:
        flush()
    heap.finalize()
    return heap.D, heap.I


def ground_truth(index, parts: Sequence[Part], queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Positions of the exact top-``k`` of each query, int64 (nq, k) (-1 where fewer exist)."""
    exact = _exact_searcher(index)
    if exact is not None:
        return exact(queries, k)[1]
    return vec.exact_search(parts, queries, k, metric)[1]


def _drop_self(ids: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own position (and without -1), cut to ``k`` (padded with -1)."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, row in enumerate(ids):
        row = row[(row != self_pos[i]) & (row >= 0)][:k]
        out[i, : len(row)] = row
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of ``|found[:k] & truth[:k]| / |truth[:k]|`` (-1 entries ignored)."""
    f, t = found[:, :k], truth[:, :k]
    hits = ((f[:, :, None] == t[:, None, :]) & (t[:, None, :] >= 0)).any(axis=2).sum(axis=1)
    size = (t >= 0).sum(axis=1)
    valid = size > 0
    return float((hits[valid] / size[valid]).mean()) if valid.any() else 1.0


def _measure(index, queries: np.ndarray, self_pos: np.ndarray, truth: np.ndarray, kmax: int) -> dict[str, float]:
    """recall@1/10/100 of the index as currently parameterised.

    HNSW explores ``max(efSearch, k)`` candidates, so each k is searched on its own, as a user would; for the
    other index types the top k of a deeper search is the same list, so one search serves all three.
    """
    out: dict[str, float] = {}
    separate = hasattr(inner_index(index), "hnsw")
    found_all = None if separate else _drop_self(index.search(queries, kmax + 1)[1], self_pos, kmax)
    for k in RECALL_KS:
        kk = min(k, kmax)
        found = _drop_self(index.search(queries, kk + 1)[1], self_pos, kk) if separate else found_all[:, :kk]
        out[f"recall@{k}"] = round(recall_at(found, truth, kk), 6)
    return out


def _param_values(index, tune: str | None) -> list[int]:
    import faiss

    if tune == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        values = [2**i for i in range(int(np.log2(nlist)) + 1)]
        return values + ([nlist] if values[-1] != nlist else [])
    if tune == "efSearch":
        return list(EF_STEPS)
    return []


def tune_and_measure(index, queries: np.ndarray, self_pos: np.ndarray, truth: np.ndarray, tune: str | None,
                     target: float) -> dict[str, Any]:
    """Raise the search parameter until recall@10 reaches ``target``; leave the index set to the choice.

    Returns:
        ``{"search_params": {...}, "recall@1": ..., "recall@10": ..., "recall@100": ...,
        "tuning": {"param", "target", "reached", "curve"}}``.
    """
    kmax = truth.shape[1]
    if not len(queries) or kmax == 0:
        return {"search_params": {}, **{f"recall@{k}": 1.0 for k in RECALL_KS},
                "tuning": {"param": tune, "target": target, "reached": True, "curve": [],
                           "note": "fewer than two vectors: nothing to measure"}}
    values = _param_values(index, tune)
    if not values:
        rec = _measure(index, queries, self_pos, truth, kmax)
        return {"search_params": {}, **rec,
                "tuning": {"param": None, "target": target, "reached": rec["recall@10"] >= target, "curve": []}}
    curve = []
    chosen = None
    for v in values:
        set_search_params(index, {tune: v})
        rec = _measure(index, queries, self_pos, truth, kmax)
        curve.append({tune: v, **rec})
        if rec["recall@10"] >= target:
            chosen = curve[-1]
            break
    reached = chosen is not None
    if chosen is None:
        best = max(c["recall@10"] for c in curve)
        chosen = next(c for c in curve if c["recall@10"] >= best - 1e-9)
        log.warning("recall@10 %.3f < target %.3f even at %s=%d: the codes of this index cap its recall "
                    "(a larger --max-memory allows a more exact index)", best, target, tune, curve[-1][tune])
    set_search_params(index, {tune: chosen[tune]})
    return {"search_params": {tune: chosen[tune]}, **{f"recall@{k}": chosen[f"recall@{k}"] for k in RECALL_KS},
            "tuning": {"param": tune, "target": target, "reached": reached, "curve": curve}}


def recall_block(index, parts: Sequence[Part], queries: np.ndarray, self_pos: np.ndarray, metric: str,
                  tune: str | None, target: float) -> dict[str, Any]:
    kmax = int(min(max(RECALL_KS), index.ntotal - 1))
    t0 = time.perf_counter()
    truth = _drop_self(ground_truth(index, parts, queries, kmax + 1, metric), self_pos, kmax) if kmax > 0 else \
        np.zeros((len(queries), 0), dtype=np.int64)
    t1 = time.perf_counter()
    block = tune_and_measure(index, queries, self_pos, truth, tune, target)
    block["recall_queries"] = int(len(queries))
    block["tuning"]["neighbours"] = kmax
    block["tuning"]["ground_truth_seconds"] = round(t1 - t0, 3)
    block["tuning"]["seconds"] = round(time.perf_counter() - t1, 3)
    return block
