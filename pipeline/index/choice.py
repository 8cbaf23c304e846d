"""Index choice: which FAISS index fits N vectors of D dims in a memory budget, decided before any work.

Choosing is kept apart from building (as autofaiss does): it is a pure function of the vector count, their size,
the budget and the free disk, so the choice and its reason can be printed, recorded and tested without data.

The rules, in order:

1. exact search (``Flat``) when the vectors fit and a query scans at most ``EXACT_MAX_WORK`` floats
   (a few milliseconds per query and core);
2. ``HNSW32`` up to ``HNSW_MAX_VECTORS`` vectors when vectors plus graph links fit: fast queries, no training;
3. ``IVF{nlist},Flat`` when the full vectors fit: trained on a sample, mergeable, extendable;
4. ``IVF{nlist},SQ8`` (one byte per dimension, recall close to the full vectors) when that fits;
5. ``IVF{nlist},SQfp16`` with its inverted lists **on disk** (a file memory-mapped at search time) when the codes
   do not fit memory but what stays in memory does (coarse quantizer, training sample, add buffers) and the disk
   holds the codes twice (the pieces' runs and the merged lists exist together while merging); half-precision
   codes keep recall near exact (8-bit codes cap recall@10 near 0.95 on clustered 128-dim vectors), and with
   the lists on disk their size costs disk and page cache, not the budget; ``SQ8`` when the disk holds only that;
6. ``OPQ{m}_{d},IVF{nlist},PQ{m}x8`` in memory with the largest ``m`` whose codes fit (with fewer lists, hence a
   smaller training sample, when the budget is very tight);
7. the same PQ codes with their lists on disk, when not even they fit memory;
8. otherwise an error that says how much memory the smallest index needs.

``lists="memory"`` leaves out the on-disk rungs (5 and 7); ``lists="disk"`` keeps only IVF indexes, all with their
lists on disk, with the most exact codes that the disk holds (full vectors, SQfp16, SQ8, then PQ).

The budget covers the peak memory of the index while vectors are added plus the training sample held while
training; the add batches are sized from what is left. The peak is above the final size because faiss grows its
code arrays by doubling: measured 1.5x for inverted lists and up to 2x for a flat index (``PEAK_FACTOR``). With the
lists on disk the budget covers what stays in memory plus the add buffers: codes go to in-memory runs that are
written out when they reach what is left of the budget, and the runs are merged into the lists file without
being loaded (``pipeline.index.build.merge_on_disk``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import PipelineError

EXACT_MAX_WORK = 2**25  # n * d floats scanned per query: ~3 ms on one core with BLAS
HNSW_MAX_VECTORS = 500_000  # above this, IVF builds much faster on CPUs and can be built in parallel pieces
HNSW_M = 32
TRAIN_PER_LIST = 40  # training vectors per inverted list (faiss warns below 39)
PQ_MIN_TRAIN = 39  # per PQ centroid
PQ_CANDIDATES = (128, 96, 64, 48, 32, 24, 16, 8, 4)
ID_BYTES = 8  # an inverted list stores an int64 id next to each code
PEAK_FACTOR = {"Flat": 2.0}  # peak / final size while adding (std::vector doubling); others 1.5
DEFAULT_PEAK_FACTOR = 1.5
MIN_BATCH_ROWS = 1024  # the smallest add batch
MIN_RUN_ROWS = 65536  # an on-disk build keeps at least this many codes in memory before writing a run
DISK_COPIES = 2  # an on-disk build holds the pieces' runs and the merged lists at once
LISTS = ("auto", "memory", "disk")

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: str | int | float) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"100000"`` or a number -> bytes (powers of 1024).

    Raises:
        PipelineError: not a size.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise PipelineError(f"max_memory: {value!r} must be positive")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not match or float(match.group(1)) <= 0:
        raise PipelineError(f"max_memory: {value!r} is not a size such as 4G, 512M or 100000")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(n: float) -> str:
    """Bytes -> ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class IndexChoice:
    """An index to build, and why.

    Attributes:
        factory: the ``faiss.index_factory`` string.
        reason: one sentence for the user (printed and recorded).
        index_bytes: estimated size of the full index (about its size on disk, lists file included).
        train_size: vectors sampled to train it (0: needs no training).
        tune: the search parameter tuned for recall (``nprobe``, ``efSearch``) or None (exact).
        automatic: chosen from the budget (False: ``--factory`` given).
        on_disk: the inverted lists live in a file memory-mapped at search time, not in memory.
        list_entry_bytes: bytes per vector in the inverted lists (code + id); 0 for other indexes.
        vectors: the number of vectors it was chosen for.
    """

    factory: str
    reason: str
    index_bytes: int
    train_size: int
    tune: str | None
    automatic: bool = True
    on_disk: bool = False
    list_entry_bytes: int = 0
    vectors: int = 0

    @property
    def peak_factor(self) -> float:
        return PEAK_FACTOR.get(self.factory, DEFAULT_PEAK_FACTOR)

    @property
    def lists_bytes(self) -> int:
        """Bytes of the inverted lists (what goes to disk when ``on_disk``)."""
        return self.vectors * self.list_entry_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory once built: all of it, or without the lists when they are on disk (the OS caches
        what it can of the lists file besides)."""
        return self.index_bytes - (self.lists_bytes if self.on_disk else 0)

    def build_bytes(self, dims: int) -> int:
        """Peak host memory of a build beyond the add batches: the growing index and the training sample. On disk:
        what stays in memory, the training sample and the smallest add buffers."""
        sample = self.train_size * dims * 4
        if self.on_disk:
            return self.resident_bytes + sample + MIN_BATCH_ROWS * dims * 16 + MIN_RUN_ROWS * self.list_entry_bytes * 2
        return int(self.index_bytes * self.peak_factor) + sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two at or below ``4 * sqrt(n)``, with at least
    ``TRAIN_PER_LIST`` vectors per list, at least 1."""
    if n < 2 * TRAIN_PER_LIST:
        return 1
    target = min(4 * math.sqrt(n), n / TRAIN_PER_LIST)
    return max(1, 2 ** int(math.floor(math.log2(target))))


def _ivf_train_size(n: int, nlist: int, pq_bits: int = 0) -> int:
    need = TRAIN_PER_LIST * nlist
    if pq_bits:
        need = max(need, PQ_MIN_TRAIN * 2**pq_bits)
    return min(n, need)


def _pq_bits(n: int) -> int:
    """8-bit PQ codes need ``39 * 256`` training vectors; small corpora get fewer bits."""
    return max(4, min(8, int(math.log2(max(n, 1) / PQ_MIN_TRAIN)))) if n >= PQ_MIN_TRAIN * 16 else 4


def _coarse(nlist: int) -> str:
    # Above 16k lists a flat coarse quantizer dominates the search time; an HNSW one does not (autofaiss does
    # the same).
    return f"IVF{nlist}_HNSW32" if nlist >= 2**14 else f"IVF{nlist}"


def _hnsw_bytes(n: int, d: int, m: int = HNSW_M) -> int:
    # Level 0 keeps 2M links per vector, upper levels about M/(M-1) * M / M more; int32 each, plus levels.
    return n * (d * 4 + int(2 * m * 4 * 1.1) + 12)


def _ivf_fixed(d: int, nlist: int) -> int:
    return nlist * d * 4 + (nlist * (HNSW_M * 2 * 4 + 12) if nlist >= 2**14 else 0)


def _ivf(factory: str, n: int, d: int, nlist: int, code: int, fixed: int, train: int, on_disk: bool,
         automatic: bool = True, reason: str = "") -> IndexChoice:
    entry = code + ID_BYTES
    return IndexChoice(factory, reason, n * entry + fixed, train, "nprobe", automatic, on_disk, entry, n)


def _fits(choice: IndexChoice, d: int, budget: int, disk_free: int | None) -> bool:
    if choice.build_bytes(d) > budget:
        return False
    return not choice.on_disk or disk_free is None or DISK_COPIES * choice.lists_bytes <= disk_free


def choose_index(
    n: int,
    d: int,
    max_memory: int | str,
    *,
    lists: str = "auto",
    disk_free: int | None = None,
    exact_max_work: int = EXACT_MAX_WORK,
    hnsw_max_vectors: int = HNSW_MAX_VECTORS,
) -> IndexChoice:
    """The index for ``n`` vectors of ``d`` dims under ``max_memory`` (see the module docstring).

    Args:
        n: number of vectors.
        d: vector size.
        max_memory: budget in bytes, or a size string (``"4G"``).
        lists: ``auto`` (inverted lists on disk when their codes do not fit the budget), ``memory`` or ``disk``.
        disk_free: free bytes where the index is written (None: not checked).
        exact_max_work: largest ``n * d`` searched exactly.
        hnsw_max_vectors: largest ``n`` given an HNSW graph.

    Returns:
        The choice, with the reason and the estimated memory.

    Raises:
        PipelineError: not even the smallest compressed index fits.

    Example:
        >>> choose_index(1_000_000, 384, "4G").factory
        'IVF2048,Flat'
        >>> choose_index(10_000_000, 128, "1G").on_disk
        True
    """
    if lists not in LISTS:
        raise PipelineError(f"lists: {lists!r} is not one of {', '.join(LISTS)}")
    budget = parse_size(max_memory)
    size = f"{n:,} vectors x {d} dims"
    flat = n * d * 4
    disk_note = "" if disk_free is None else f" and {format_size(disk_free)} of free disk"
    if lists != "disk":
        if n <= 1 or n * d <= exact_max_work:
            choice = IndexChoice("Flat", "", flat, 0, None, vectors=n)
            if choice.build_bytes(d) <= budget:
                return _with_reason(choice, f"{size}: exact search ({format_size(flat)}) fits the budget of "
                                    f"{format_size(budget)} and a query scans only {n * d:,} floats")
        if n <= hnsw_max_vectors:
            choice = IndexChoice(f"HNSW{HNSW_M}", "", _hnsw_bytes(n, d), 0, "efSearch", vectors=n)
            if choice.build_bytes(d) <= budget:
                return _with_reason(choice, f"{size}: too many for exact search per query; HNSW{HNSW_M} "
                                    f"({format_size(choice.index_bytes)}) fits {format_size(budget)}; efSearch is "
                                    "tuned")
    nlist = ivf_lists(n)
    coarse = _coarse(nlist)
    train = _ivf_train_size(n, nlist)
    why = "too many for exact search" if n <= hnsw_max_vectors else "too many for exact search or a fast HNSW build"
    if lists == "disk":
        for codec, code in (("Flat", d * 4), ("SQfp16", d * 2), ("SQ8", d)):
            fixed = _ivf_fixed(d, nlist) + (d * 8 if codec == "SQ8" else 0)
            choice = _ivf(f"{coarse},{codec}", n, d, nlist, code, fixed, train, True)
            if _fits(choice, d, budget, disk_free):
                return _with_reason(choice, f"{size}: lists on disk as asked (--lists disk): {codec} codes "
                                    f"({format_size(choice.lists_bytes)} in a memory-mapped file), {nlist} lists; "
                                    f"{format_size(choice.resident_bytes)} stays in memory; nprobe is tuned")
    else:
        ivf = _ivf(f"{coarse},Flat", n, d, nlist, d * 4, _ivf_fixed(d, nlist), train, False)
        if ivf.build_bytes(d) <= budget:
            return _with_reason(ivf, f"{size}: {why}; IVF-Flat with {nlist} lists ({format_size(ivf.index_bytes)}) "
                                f"fits {format_size(budget)}; nprobe is tuned")
        sq8 = _ivf(f"{coarse},SQ8", n, d, nlist, d, _ivf_fixed(d, nlist) + d * 8, train, False)
        if sq8.build_bytes(d) <= budget:
            return _with_reason(sq8, f"{size}: full vectors ({format_size(flat)}) do not fit {format_size(budget)}; "
                                f"8-bit scalar-quantised vectors with {nlist} lists ({format_size(sq8.index_bytes)}) "
                                "do; nprobe is tuned")
        for codec, code, what in (("SQfp16", d * 2, "half-precision"), ("SQ8", d, "8-bit scalar-quantised")):
            disk = _ivf(f"{coarse},{codec}", n, d, nlist, code, _ivf_fixed(d, nlist) + (d * 8 if code == d else 0),
                        train, True)
            if lists == "auto" and _fits(disk, d, budget, disk_free):
                return _with_reason(disk, f"{size}: the {what} codes ({format_size(disk.lists_bytes)}) do not fit "
                                    f"{format_size(budget)} of memory: their {nlist} inverted lists are kept on disk "
                                    "and memory-mapped at search time (search memory: the coarse quantizer, "
                                    f"{format_size(disk.resident_bytes)}, plus what the OS caches); nprobe is tuned")
    bits = _pq_bits(n)
    smallest = None
    placements = (True,) if lists == "disk" else (False, True) if lists == "auto" else (False,)
    for on_disk in placements:
        lists_n = nlist
        while True:
            for m in PQ_CANDIDATES:
                if m > d or d % m:
                    continue
                fixed = _ivf_fixed(d, lists_n) + d * d * 4 + 2**bits * d * 4
                choice = _ivf(f"OPQ{m}_{d},{_coarse(lists_n)},PQ{m}x{bits}", n, d, lists_n, m * bits // 8, fixed,
                              _ivf_train_size(n, lists_n, bits), on_disk)
                if smallest is None or choice.build_bytes(d) < smallest.build_bytes(d):
                    smallest = choice
                if _fits(choice, d, budget, disk_free):
                    where = ("kept on disk and memory-mapped at search time (they do not fit "
                             f"{format_size(budget)} of memory)" if on_disk else f"fit {format_size(budget)}")
                    return _with_reason(choice, f"{size}: full vectors ({format_size(flat)}) do not fit "
                                        f"{format_size(budget)}; {m}-byte PQ codes with OPQ and {lists_n} lists "
                                        f"({format_size(choice.index_bytes)}) {where}; nprobe is tuned")
            if lists_n <= max(1, nlist // 16):
                break
            lists_n //= 2
    need = smallest.build_bytes(d) if smallest else flat
    raise PipelineError(f"{size} need at least {format_size(need)} even as compressed codes "
                        f"({smallest.factory if smallest else 'Flat'}, with its training sample{disk_note}); raise "
                        f"--max-memory above {format_size(budget)}")


def _with_reason(choice: IndexChoice, reason: str) -> IndexChoice:
    return IndexChoice(choice.factory, reason, choice.index_bytes, choice.train_size, choice.tune, choice.automatic,
                       choice.on_disk, choice.list_entry_bytes, choice.vectors)


def describe_factory(factory: str, n: int, d: int, metric: str = "ip", *, max_memory: int | str | None = None,
                     lists: str = "auto") -> IndexChoice:
    """Estimates for a factory string the user gave (``--factory``), and where its lists go.

    An IVF index keeps its lists on disk with ``lists="disk"``, or with ``lists="auto"`` when its build does not fit
    ``max_memory`` in memory but does with the lists on disk.

    Raises:
        PipelineError: faiss does not understand the factory string, or ``lists="disk"`` for an index without
            inverted lists.
    """
    import faiss

    if lists not in LISTS:
        raise PipelineError(f"lists: {lists!r} is not one of {', '.join(LISTS)}")
    try:
        index = faiss.index_factory(d, factory, faiss_metric(metric))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise PipelineError(f"--factory {factory!r}: faiss cannot build it for {d} dims ({first})") from exc
    fixed = 0
    inner = index
    while isinstance(inner, faiss.IndexPreTransform):
        fixed += sum(_transform_bytes(inner.chain.at(i)) for i in range(inner.chain.size()))
        inner = faiss.downcast_index(inner.index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)  # IndexIVFPQ: its PQ's bits size the training sample
        bits = int(ivf.pq.nbits) if hasattr(ivf, "pq") else 0
        fixed += _ivf_fixed(ivf.d, ivf.nlist) + (2**bits * ivf.d * 4 if bits else 0)
        train = _ivf_train_size(n, ivf.nlist, bits)
        reason = f"--factory {factory}"
        choice = _ivf(factory, n, d, ivf.nlist, int(ivf.code_size), fixed, train, False, False, reason)
        budget = parse_size(max_memory) if max_memory is not None else None
        if lists == "disk":
            return _ivf(factory, n, d, ivf.nlist, int(ivf.code_size), fixed, train, True, False,
                        f"{reason}, lists on disk as asked (--lists disk)")
        if lists == "auto" and budget is not None and choice.build_bytes(d) > budget:
            disk = _ivf(factory, n, d, ivf.nlist, int(ivf.code_size), fixed, train, True, False, "")
            if disk.build_bytes(d) <= budget:
                return _with_reason(disk, f"{reason}: its codes ({format_size(disk.lists_bytes)}) do not fit "
                                    f"--max-memory {format_size(budget)}: the lists are kept on disk and "
                                    "memory-mapped at search time")
        return choice
    if lists == "disk":
        raise PipelineError(f"--lists disk: --factory {factory} has no inverted lists to keep on disk (only IVF "
                            "indexes do)")
    if hasattr(inner, "hnsw"):
        storage = faiss.downcast_index(inner.storage)
        m = int(inner.hnsw.nb_neighbors(1))
        per = storage.sa_code_size() + int(2 * m * 4 * 1.1) + 12
        train = 0 if index.is_trained else min(n, 100_000)
        return IndexChoice(factory, f"--factory {factory}", n * per + fixed, train, "efSearch", automatic=False,
                           vectors=n)
    train = 0 if index.is_trained else min(n, 100_000)
    return IndexChoice(factory, f"--factory {factory}", n * inner.sa_code_size() + fixed, train, None,
                       automatic=False, vectors=n)


def _transform_bytes(vt: Any) -> int:
    return int(vt.d_in) * int(vt.d_out) * 4 + int(vt.d_out) * 4


def faiss_metric(metric: str) -> int:
    """``ip`` / ``l2`` -> the faiss metric constant.

    Raises:
        PipelineError: another value.
    """
    import faiss

    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise PipelineError(f"metric: {metric!r} is not one of ip, l2")
