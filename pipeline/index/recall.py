"""Index recall: exact neighbours of held-out corpus vectors, recall@1/10/100 of an index, and the tuning of
``nprobe`` / ``efSearch`` on one query set, reported on another.

Recall@k is the mean over queries of ``|found top k & exact top k| / k``, where a found neighbour as close as the
exact k-th one counts as found (ties: a corpus with duplicate texts has many vectors at one distance, and any of
them is a right answer; an index that stores exact vectors reports exact distances to compare, a quantized one
is held to the exact positions). The queries are corpus vectors, so a
query's own position is left out of both lists: the exact neighbours are those of the rest of the corpus. Whether
the query is also left out of the *index* matters only for graph indexes: an IVF or flat index scans its lists
exhaustively, and its coarse centroids were trained without the queries, so leaving the query's own entry out of
the results gives exactly the results of an index without it (``tests/index/test_index.py`` checks this). An HNSW
graph, however, would route the search through the query's own node, so for HNSW the queries are added to the
graph only after they have been measured (``store``).

Two disjoint query sets are drawn: ``nprobe``/``efSearch`` is raised on the *tune* set until recall@k (k as asked,
10 by default) reaches the target; recall@1/10/100 are then measured on the *report* set at that setting, so the
reported figure is not the one the parameter was fitted to. Ground truth comes from the index's own storage when
it keeps exact vectors (flat, IVF-Flat, HNSW-Flat: nothing is re-read), else from a brute-force scan of the parts.
Removed positions (``params.Filter``) are left out of both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import pipeline.index.vectors as vec
from pipeline.index.build import inner_index
from pipeline.index.params import Filter, search, set_search_params
from pipeline.index.vectors import Part

log = logging.getLogger(__name__)

RECALL_KS = (1, 10, 100)
EF_STEPS = (16, 32, 64, 128, 256, 512, 1024)

__all__ = ["QuerySet", "RECALL_KS", "ground_truth", "recall_at", "recall_block", "set_search_params",
           "tune_and_measure"]


@dataclass
class QuerySet:
    """Recall queries: vectors and, for corpus vectors, their own positions (-1: not a corpus vector).

    Attributes:
        vectors: float32 (nq, d).
        positions: int64 (nq,).
        truth: exact neighbour positions int64 (nq, k), own position left out; filled by ``recall_block``.
        truth_scores: their exact scores float32 (nq, k) (``ip``: larger is closer; ``l2``: squared distance).
        metric: the index's, for the scores (set with them; ties are counted only where it is known).
    """

    vectors: np.ndarray
    positions: np.ndarray
    truth: np.ndarray | None = None
    truth_scores: np.ndarray | None = None
    metric: str | None = None

    def __len__(self) -> int:
        return len(self.positions)


def _exact_searcher(index, filt: Filter | None) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None:
    """Exact search from the index's own stored vectors, where it keeps them uncompressed and holds no filtered
    position."""
    import faiss

    if filt or not _stores_exact(index):
        return None
    top = faiss.downcast_index(index)
    id_map = None
    if isinstance(top, faiss.IndexIDMap):
        id_map = faiss.vector_to_array(top.id_map)
        top = faiss.downcast_index(top.index)
    if isinstance(top, faiss.IndexFlat) and id_map is None:
        return lambda q, k: top.search(q, k)
    if isinstance(top, faiss.IndexIVFFlat) and id_map is None:
        return lambda q, k: _ivf_flat_exact(top, q, k)
    if hasattr(top, "hnsw"):  # its storage is flat (``_stores_exact``)
        storage = faiss.downcast_index(top.storage)
        if id_map is None:
            return lambda q, k: storage.search(q, k)

        def translated(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            dist, idx = storage.search(q, k)
            return dist, np.where(idx >= 0, id_map[np.maximum(idx, 0)], -1)

        return translated
    return None


def _stores_exact(index) -> bool:
    """Whether ``index`` keeps its vectors uncompressed, so that the distances it reports are exact."""
    import faiss

    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        return False
    if isinstance(top, faiss.IndexIDMap):
        top = faiss.downcast_index(top.index)
    if isinstance(top, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return True
    return hasattr(top, "hnsw") and isinstance(faiss.downcast_index(top.storage), faiss.IndexFlat)


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


def ground_truth(index, parts: Sequence[Part], starts: Sequence[int], queries: np.ndarray, k: int, metric: str,
                 filt: Filter | None = None, batch_rows: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Scores float32 and positions int64 (nq, k) of the exact top-``k`` of each query among the live vectors
    (-1 where fewer).

    ``parts`` (with their first positions ``starts``) are the live parts; they are scanned unless the index keeps
    exact vectors and holds nothing that ``filt`` leaves out.
    """
    exact = _exact_searcher(index, filt)
    if exact is not None:
        return exact(queries, k)
    return vec.exact_search(parts, queries, k, metric, starts=starts, batch_rows=batch_rows)


def _drop_self(ids: np.ndarray, self_pos: np.ndarray, k: int, scores: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Each row without the query's own position (and without -1), cut to ``k`` (padded with -1), and the scores
    of what is kept (NaN padded) if ``scores`` is given."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    kept = None if scores is None else np.full((len(ids), k), np.nan, dtype=np.float32)
    for i, row in enumerate(ids):
        mask = (row != self_pos[i]) & (row >= 0)
        row = row[mask][:k]
        out[i, : len(row)] = row
        if kept is not None:
            kept[i, : len(row)] = scores[i][mask][: len(row)]
    return out, kept


def recall_at(found: np.ndarray, truth: np.ndarray, k: int, found_scores: np.ndarray | None = None,
              truth_scores: np.ndarray | None = None, metric: str = "ip") -> float:
    """Mean over queries of ``|found[:k] & truth[:k]| / |truth[:k]|`` (-1 entries ignored).

    With the exact scores of both lists, a found position as close as the last of ``truth[:k]`` counts too
    (within float32 rounding: 1e-5 relative), so that ties among equally close vectors are not misses.
    """
    f, t = found[:, :k], truth[:, :k]
    hit = ((f[:, :, None] == t[:, None, :]) & (t[:, None, :] >= 0)).any(axis=2)
    size = (t >= 0).sum(axis=1)
    if found_scores is not None and truth_scores is not None:
        last = truth_scores[np.arange(len(t)), np.maximum(size - 1, 0)][:, None]
        slack = 1e-5 * np.maximum(np.abs(last), 1.0)
        fs = found_scores[:, :k]
        tied = fs >= last - slack if metric == "ip" else fs <= last + slack
        hit |= tied & (f >= 0) & (size[:, None] > 0)
    hits = np.minimum(hit.sum(axis=1), size)
    valid = size > 0
    return float((hits[valid] / size[valid]).mean()) if valid.any() else 1.0


def measure(index, qs: QuerySet, kmax: int, values: dict[str, Any] | None = None,
            filt: Filter | None = None) -> dict[str, float]:
    """recall@1/10/100 of the index at ``values`` (or as currently parameterised) on one query set.

    HNSW explores ``max(efSearch, k)`` candidates, so each k is searched on its own, as a user would; for the
    other index types the top k of a deeper search is the same list, so one search serves all three.
    """
    assert qs.truth is not None
    out: dict[str, float] = {}
    separate = hasattr(inner_index(index), "hnsw")
    # the distances the index reports are exact where it stores exact vectors: then ties count as found
    exact = qs.truth_scores is not None and qs.metric is not None and _stores_exact(index)

    def found(k: int) -> tuple[np.ndarray, np.ndarray | None]:
        dist, ids = search(index, qs.vectors, k + 1, values, filt)
        return _drop_self(ids, qs.positions, k, dist if exact else None)

    found_all = None if separate else found(kmax)
    for k in RECALL_KS:
        kk = min(k, kmax)
        got, scores = found(kk) if separate else (found_all[0][:, :kk],
                                                  None if found_all[1] is None else found_all[1][:, :kk])
        out[f"recall@{k}"] = round(recall_at(got, qs.truth, kk, scores, qs.truth_scores, qs.metric or "ip"), 6)
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


def tune_and_measure(index, tune_set: QuerySet, report_set: QuerySet, tune: str | None, target: float,
                     recall_k: int = 10, filt: Filter | None = None) -> dict[str, Any]:
    """Raise the search parameter until recall@``recall_k`` on ``tune_set`` reaches ``target``; measure
    recall@1/10/100 on ``report_set`` at that setting; leave the index set to it.

    Returns:
        ``{"search_params": {...}, "recall@1": ..., "recall@10": ..., "recall@100": ... (report set),
        "tuning": {"param", "target", "k", "reached", "report_reached", "curve" (tune set)}}``.
    """
    kmax = tune_set.truth.shape[1] if tune_set.truth is not None else 0
    key = f"recall@{recall_k}"
    if not len(tune_set) or kmax == 0:
        return {"search_params": {}, **{f"recall@{k}": 1.0 for k in RECALL_KS},
                "tuning": {"param": tune, "target": target, "k": recall_k, "reached": True, "report_reached": True,
                           "curve": [], "note": "fewer than two vectors: nothing to measure"}}
    values = _param_values(index, tune)
    if not values:
        rec = measure(index, report_set, kmax, None, filt)
        return {"search_params": {}, **rec,
                "tuning": {"param": None, "target": target, "k": recall_k, "reached": rec[key] >= target,
                           "report_reached": rec[key] >= target, "curve": []}}
    curve = []
    chosen = None
    for v in values:
        set_search_params(index, {tune: v})
        rec = measure(index, tune_set, kmax, {tune: v}, filt)
        curve.append({tune: v, **rec})
        if rec[key] >= target:
            chosen = curve[-1]
            break
    reached = chosen is not None
    if chosen is None:
        best = max(c[key] for c in curve)
        chosen = next(c for c in curve if c[key] >= best - 1e-9)
    set_search_params(index, {tune: chosen[tune]})
    report = measure(index, report_set, kmax, {tune: chosen[tune]}, filt)
    return {"search_params": {tune: chosen[tune]}, **report,
            "tuning": {"param": tune, "target": target, "k": recall_k, "reached": reached,
                       "report_reached": report[key] >= target, "best_tuned": chosen[key], "curve": curve}}


def recall_block(index, parts: Sequence[Part], starts: Sequence[int], tune_set: QuerySet, report_set: QuerySet,
                 metric: str, tune: str | None, target: float, recall_k: int = 10, filt: Filter | None = None,
                 live: int | None = None, absent: np.ndarray | None = None, batch_rows: int = 131072
                 ) -> dict[str, Any]:
    """Ground truth for both query sets (one scan), then ``tune_and_measure``.

    Args:
        index: the index, holding the live vectors (and maybe filtered ones).
        parts, starts: the live parts and their first positions.
        tune_set, report_set: the query sets.
        metric: ``ip`` or ``l2``.
        tune: ``nprobe``, ``efSearch`` or None.
        target: recall to reach at ``recall_k``.
        recall_k: the k tuned for (1, 10 or 100).
        filt: positions to leave out.
        live: number of live vectors (default: the parts' rows).
        absent: live positions not in the index while it is measured (queries held out of a graph): left out of
            the exact neighbours too, so that both sides see the same corpus.
        batch_rows: vectors scored at once when the parts are scanned for the exact neighbours.
    """
    live = sum(p.rows for p in parts) if live is None else live
    kmax = int(min(max(RECALL_KS), live - 1))
    t0 = time.perf_counter()
    both = np.concatenate([tune_set.vectors, report_set.vectors]) if len(report_set) else tune_set.vectors
    pos = np.concatenate([tune_set.positions, report_set.positions])
    if kmax > 0:
        extra = 0 if absent is None or _exact_searcher(index, filt) is not None else len(absent)
        scores, ids = ground_truth(index, parts, starts, both, kmax + 1 + extra, metric, filt, batch_rows)
        if extra:
            ids = np.where(np.isin(ids, absent), -1, ids)  # _drop_self skips -1
        truth, truth_scores = _drop_self(ids, pos, kmax, scores)
    else:
        truth = np.zeros((len(pos), 0), dtype=np.int64)
        truth_scores = np.zeros((len(pos), 0), dtype=np.float32)
    tune_set.truth, report_set.truth = truth[: len(tune_set)], truth[len(tune_set):]
    tune_set.truth_scores, report_set.truth_scores = truth_scores[: len(tune_set)], truth_scores[len(tune_set):]
    tune_set.metric = report_set.metric = metric
    t1 = time.perf_counter()
    block = tune_and_measure(index, tune_set, report_set, tune, target, recall_k, filt)
    block["recall_queries"] = {"tune": int(len(tune_set)), "report": int(len(report_set))}
    block["tuning"]["neighbours"] = kmax
    block["tuning"]["ground_truth_seconds"] = round(t1 - t0, 3)
    block["tuning"]["seconds"] = round(time.perf_counter() - t1, 3)
    return block
