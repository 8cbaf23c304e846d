"""Search parameters, and the filter that keeps removed vectors out of every result.

A vector part of the output can vanish between two index updates (an incremental run deleted or changed some of
its rows and wrote a new part under a new name). Its vectors must never be returned, even before ``index update``
removes them, and HNSW and flat indexes keep them until a rebuild. So every search passes the positions to leave
out as a faiss ``IDSelector`` (``Filter``); the parameters (``nprobe``, ``efSearch``) then travel in a
``SearchParameters`` object with it, built for the index's type (``search_parameters``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

BATCH_SELECTOR_MAX = 1 << 20  # up to this many removed positions: a hash set; beyond, a bitmap of live positions


class Filter:
    """Positions left out of searches: a union of ``[start, end)`` ranges (whole parts) below ``positions``.

    Args:
        ranges: ``(start, end)`` position ranges to leave out.
        positions: one past the largest position the index may hold (the id map's length).
    """

    def __init__(self, ranges: Iterable[tuple[int, int]], positions: int) -> None:
        self.ranges = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
        self.positions = int(positions)
        self._selector: Any = None
        self._keep: list[Any] = []
        self._bounds: np.ndarray | None = None

    def __bool__(self) -> bool:
        return bool(self.ranges)

    @property
    def count(self) -> int:
        """Positions left out."""
        return sum(b - a for a, b in self.ranges)

    def removed(self, positions: np.ndarray) -> np.ndarray:
        """bool mask: which of ``positions`` are left out (one binary search each, whatever the number of
        ranges: an update may remove thousands of parts)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.ranges:
            return np.zeros(positions.shape, dtype=bool)
        if self._bounds is None:  # the ranges merged where they touch or overlap: sorted, disjoint
            merged: list[list[int]] = []
            for a, b in self.ranges:
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            self._bounds = np.asarray(merged, dtype=np.int64).T
        starts, ends = self._bounds
        i = np.searchsorted(starts, positions, side="right") - 1
        return (i >= 0) & (positions < ends[np.maximum(i, 0)])

    def selector(self):
        """The faiss ``IDSelector`` of the positions to keep (None when nothing is left out); built once."""
        if not self.ranges:
            return None
        if self._selector is None:
            import faiss

            if self.count <= BATCH_SELECTOR_MAX:
                ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges])
                inner = faiss.IDSelectorBatch(ids)
                self._selector = faiss.IDSelectorNot(inner)
                self._keep = [inner]
            else:
                live = np.ones(self.positions, dtype=bool)
                for a, b in self.ranges:
                    live[a:min(b, self.positions)] = False
                bits = np.packbits(live, bitorder="little")
                self._selector = faiss.IDSelectorBitmap(self.positions, faiss.swig_ptr(bits))
                self._keep = [bits]
        return self._selector


def search_parameters(index, values: dict[str, Any], selector) -> tuple[Any, list[Any]]:
    """A faiss ``SearchParameters`` for ``index`` carrying ``values`` (``nprobe``/``efSearch``) and ``selector``.

    Returns:
        ``(params, objects to keep alive while it is used)``.
    """
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        inner, keep = search_parameters(index.index, values, selector)
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
        return params, [inner, *keep]
    if isinstance(index, faiss.IndexIDMap):
        if selector is None:
            return search_parameters(index.index, values, selector)
        # The selector speaks of ids; the index inside numbers its vectors in insertion order. IndexIDMap translates
        # only a selector in the parameters it is given, and with a transform inside (IDMap -> PreTransform -> HNSW)
        # those carry none: translated here, wherever it ends up (the map leaves one already translated alone).
        translated = faiss.IDSelectorTranslated(index.id_map, selector)
        params, keep = search_parameters(index.index, values, translated)
        return params, [selector, *keep]
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(values.get("nprobe", index.nprobe)))
    elif hasattr(index, "hnsw"):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(values.get("efSearch", index.hnsw.efSearch)))
    else:
        params = faiss.SearchParameters(sel=selector)
    return params, [selector]


def search(index, queries: np.ndarray, k: int, values: dict[str, Any] | None = None,
           filt: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` at ``values`` (``nprobe``/``efSearch``; None: the index's own, as set with
    ``set_search_params``), leaving out the filtered positions.

    Returns:
        ``(distances float32 (nq, k), positions int64 (nq, k))``; -1 where fewer results exist.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sel = filt.selector() if filt else None
    if sel is None and not values:
        return index.search(queries, k)
    params, keep = search_parameters(index, values or {}, sel)
    result = index.search(queries, k, params=params)
    del keep
    return result


def set_search_params(index, params: dict[str, Any]) -> None:
    """Apply ``{"nprobe": 16}`` / ``{"efSearch": 64}`` through faiss's ParameterSpace (reaches wrapped indexes)."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def ranges_of(entries: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """``[start, start + rows)`` of each part entry of ``info.json``."""
    return [(int(e["start"]), int(e["start"]) + int(e["rows"])) for e in entries]
