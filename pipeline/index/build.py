"""Index building blocks: streaming vector parts into an index, in-memory runs of a piece written to files, runs
merged in memory or into on-disk inverted lists, training (quiet, two-level k-means for many lists, optionally on
the GPU), and how well a trained structure fits new vectors.

Positions are global and stable: the vector at row ``r`` of an indexed part whose first position is ``start`` has
position ``start + r``, for as long as the index exists (parts that vanish leave a gap; new parts are numbered
after every position ever given). IVF indexes store the position as the vector's id, and graph indexes are
wrapped in an ``IndexIDMap`` to do the same, so pieces built anywhere merge into exactly the index one process
would build. Flat indexes number vectors by insertion order, which equals the position as long as nothing is
removed from them (removals are filtered at search time instead).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.index.vectors as vec
from pipeline.errors import PipelineError
from pipeline.index.vectors import Part

log = logging.getLogger(__name__)

TWO_LEVEL_MIN_LISTS = 4096  # from here k-means on the CPU runs in two levels (sqrt(nlist) clusters, then within)
KMEANS_NITER = 10  # faiss's default for IVF training
MIN_POINTS_PER_CENTROID = 39  # below this faiss warns that k-means has too few points


def _is_ivf(index) -> bool:
    import faiss

    return faiss.try_extract_index_ivf(index) is not None


def inner_index(index):
    """The index under any pre-transforms (OPQ, PCA) and id maps, downcast to its class."""
    import faiss

    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform | faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    return index


def explicit_ids(index) -> bool:
    """Whether the index stores the positions it is given (IVF, id maps) instead of numbering vectors itself."""
    import faiss

    return _is_ivf(index) or isinstance(faiss.downcast_index(index), faiss.IndexIDMap)


def is_graph(index) -> bool:
    """HNSW (or NSG) indexes: a query vector that is itself a node changes how the search walks the graph."""
    inner = inner_index(index)
    return hasattr(inner, "hnsw") or hasattr(inner, "nsg")


def mergeable(index) -> bool:
    """Whether pieces of this index type can be built separately and merged (IVF and flat indexes)."""
    import faiss

    return _is_ivf(index) or isinstance(inner_index(index), faiss.IndexFlatCodes)


def on_disk_lists(index):
    """The ``OnDiskInvertedLists`` of an IVF index, or None."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what faiss's C++ code prints on stdout ("resizing ... bytes", "updating ondisk filename") to /dev/null,
    so that ``--json`` output stays parseable."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def add_parts(index, parts: Sequence[Part], starts: Sequence[int], batch_rows: int, *, gpu_index=None,
              skip: np.ndarray | None = None, on_batch: Callable[[Any], None] | None = None,
              piece: bool = False) -> int:
    """Stream ``parts`` into ``index`` in batches; part ``i``'s rows get positions ``starts[i], starts[i] + 1, ...``.

    Indexes with explicit ids (IVF, ``IndexIDMap``) store the positions; the others number their vectors
    themselves, so they must already hold exactly ``starts[0]`` vectors and the parts must be consecutive, unless
    ``piece`` (a copy whose vectors are numbered by merging the pieces in order).

    Args:
        index: the index (trained).
        parts: the parts, in position order.
        starts: first position of each part.
        batch_rows: vectors read and added at once.
        gpu_index: a GPU clone to add to instead (copied back by the caller).
        skip: sorted positions left out (explicit ids only): held-out recall queries.
        on_batch: called with the target index after each batch (pieces write runs from it).

    Returns:
        The number of vectors added.
    """
    target = gpu_index if gpu_index is not None else index
    with_ids = explicit_ids(index)
    if not with_ids:
        if skip is not None and len(skip):
            raise PipelineError("internal: positions can be held out only of an index with explicit ids")
        if parts and not piece and int(target.ntotal) != int(starts[0]):
            raise PipelineError(f"internal: adding at position {starts[0]} to an index of {target.ntotal} vectors")
    added = 0
    for part, start in zip(parts, starts, strict=True):
        pos = int(start)
        for vectors, _ in vec.iter_batches(part, batch_rows):
            ids = np.arange(pos, pos + len(vectors), dtype=np.int64)
            pos += len(vectors)
            if skip is not None and len(skip):
                keep = ~np.isin(ids, skip, assume_unique=True)
                vectors, ids = np.ascontiguousarray(vectors[keep]), ids[keep]
            if not len(ids):
                continue
            if with_ids:
                target.add_with_ids(vectors, ids)
            else:
                target.add(vectors)
            added += len(ids)
            if on_batch is not None:
                on_batch(target)
    return added


def write_atomic(index, path: Path) -> None:
    """``faiss.write_index`` to a temporary name, then rename."""
    import faiss

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def add_runs(index, parts: Sequence[Part], starts: Sequence[int], batch_rows: int, run_rows: int,
             run_path: Callable[[int], Path], skip: np.ndarray | None = None) -> tuple[list[Path], int]:
    """Add ``parts`` to the (trained, empty) ``index`` and write its contents as a run file each time it holds
    ``run_rows`` vectors, then empty it: memory stays bounded by one run whatever the number of vectors.

    Returns:
        ``(run files in order, vectors added)``.
    """
    runs: list[Path] = []

    def flush(target) -> None:
        if target.ntotal >= run_rows:
            path = run_path(len(runs))
            write_atomic(target, path)
            runs.append(path)
            target.reset()

    added = add_parts(index, parts, starts, batch_rows, skip=skip, on_batch=flush, piece=True)
    if index.ntotal or not runs:
        path = run_path(len(runs))
        write_atomic(index, path)
        runs.append(path)
        index.reset()
    return runs, added


def merge_in_memory(trained, run_paths: Sequence[str | Path]):
    """Merge runs (built from disjoint position ranges, in position order) into the empty ``trained`` index."""
    import faiss

    for path in run_paths:
        piece = faiss.read_index(str(path))
        trained.merge_from(piece, 0)  # ids are already global positions (IVF) or implied by the order (flat)
        del piece
    return trained


def merge_on_disk(index, sources: Sequence[Any], lists_path: Path, drop=None) -> int:
    """Merge inverted lists into a new on-disk lists file and make it ``index``'s lists (replacing the ones it has,
    which may be among the sources).

    ``sources`` are run files (read memory-mapped, so their codes are never loaded) or InvertedLists objects (the
    lists of the previous generation of an index, for an update). Entries keep their ids.

    Returns:
        The number of vectors in the merged lists.
    """
    import faiss

    ivf = faiss.extract_index_ivf(index)
    keep = []  # the run indexes own their memory-mapped lists: alive until the merge is done
    ptrs = faiss.InvertedListsPtrVector()
    for src in sources:
        if isinstance(src, str | Path):
            run = faiss.read_index(str(src), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            keep.append(run)
            ptrs.push_back(faiss.extract_index_ivf(run).invlists)
        else:
            ptrs.push_back(src)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
    with quiet_stdout():
        if drop:  # entries at positions ``drop`` (a params.Filter) left out while merging: never ``remove_ids`` on
            # on-disk lists (faiss's OnDiskInvertedLists::resize corrupts a list shrunk to half its capacity)
            ntotal = _merge_filtered(lists, [ptrs.at(i) for i in range(ptrs.size())], drop, int(ivf.code_size))
        else:
            ntotal = lists.merge_from_multiple(ptrs.data(), ptrs.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.ntotal = index.ntotal = ntotal
    del keep
    return int(ntotal)


def _merge_filtered(lists, sources: Sequence[Any], drop, code_size: int, slice_rows: int = 65536) -> int:
    """Fill the empty on-disk ``lists`` with the entries of ``sources`` whose ids ``drop`` does not leave out, one
    list at a time, each list allocated once at its final size (no resize), read and written ``slice_rows``
    entries at a time (a long list is never copied whole)."""
    import faiss

    def kept(src, j: int):
        """(ids, codes) of list ``j`` of ``src`` without the dropped entries, a slice at a time."""
        n = src.list_size(j)
        if not n:
            return
        ids = faiss.rev_swig_ptr(src.get_ids(j), n)  # views of the list's memory: no copy
        codes = faiss.rev_swig_ptr(src.get_codes(j), n * code_size).reshape(n, code_size)
        for a in range(0, n, slice_rows):
            keep = ~drop.removed(ids[a : a + slice_rows])
            yield np.ascontiguousarray(ids[a : a + slice_rows][keep]), np.ascontiguousarray(
                codes[a : a + slice_rows][keep])

    nlist = lists.nlist
    sizes = np.zeros(nlist, dtype=np.uint64)
    for j in range(nlist):
        for src in sources:
            n = src.list_size(j)
            if n:
                ids = faiss.rev_swig_ptr(src.get_ids(j), n)
                sizes[j] += n - int(drop.removed(ids).sum())
    total = int(sizes.sum())
    lists.update_totsize(max(total, 1) * (8 + code_size))
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    for j in range(nlist):
        at = 0
        for src in sources:
            for ids, codes in kept(src, j):
                if len(ids):
                    lists.update_entries(j, at, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                    at += len(ids)
    return total


def gpu_resources(gpu: bool) -> tuple[Any, str]:
    """``(StandardGpuResources or None, note)``; without faiss-gpu or a visible GPU, None and why."""
    if not gpu:
        return None, ""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        note = ("--gpu: this faiss has no GPU support (faiss-cpu is installed); building on the CPU. "
                "Install faiss-gpu-cu12 (pip install 'embed-corpus[gpu]') to train and add on the GPU")
        log.warning(note)
        return None, note
    if faiss.get_num_gpus() == 0:
        note = "--gpu: faiss-gpu is installed but sees no GPU; building on the CPU"
        log.warning(note)
        return None, note
    return faiss.StandardGpuResources(), "trained and added on the GPU"


def no_polysemous(index) -> None:
    """Skip polysemous training (faiss's factory turns it on for 8-bit PQ): it only serves Hamming-filtered
    search, which is not used, and it makes PQ training several times slower."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    for obj in (ivf, inner_index(index)):
        if obj is not None and hasattr(faiss.downcast_index(obj), "do_polysemous_training"):
            faiss.downcast_index(obj).do_polysemous_training = False


def _quantizers(index) -> Iterator[tuple[str, int, Any]]:
    """``(what, centroids, ClusteringParameters)`` of every k-means a training of ``index`` runs."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        yield "coarse quantizer", int(ivf.nlist), ivf.cp
        if hasattr(ivf, "pq"):
            yield f"{ivf.pq.M} PQ sub-quantizers", 2 ** int(ivf.pq.nbits), ivf.pq.cp
    else:
        inner = inner_index(index)
        if hasattr(inner, "pq"):
            yield f"{inner.pq.M} PQ sub-quantizers", 2 ** int(inner.pq.nbits), inner.pq.cp


def training_shortfall(index, n_train: int, factory: str, automatic: bool) -> str | None:
    """One sentence when ``n_train`` vectors are fewer than faiss advises for the k-means of ``index`` (39 per
    centroid), in words that fit how the index was chosen; None when there are enough."""
    short = [(what, k) for what, k, _ in _quantizers(index) if n_train < k * MIN_POINTS_PER_CENTROID]
    if not short:
        return None
    what, k = max(short, key=lambda s: s[1])
    need = k * MIN_POINTS_PER_CENTROID
    if automatic:
        return (f"{n_train:,} training vectors for {factory}'s {what} of {k} centroids each (faiss advises at least "
                f"{need:,}): its clusters are coarser than they could be")
    return (f"--factory {factory}: {n_train:,} vectors to train its {what} of {k} centroids each (faiss advises at "
            f"least {need:,}); the clusters will be coarse and recall lower. With this few vectors, fewer centroids "
            "fit better (fewer lists, or PQ codes of fewer bits such as PQ16x4)")


def _silence_clustering(index) -> list[Any]:
    """Stop faiss printing its "please provide at least N training points" warning once per k-means (16 times for
    PQ16, hundreds for OPQ): ``training_shortfall`` says it once. Returns objects to keep alive while training."""
    import faiss

    keep = []
    for _, _, cp in _quantizers(index):
        cp.min_points_per_centroid = 1
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        ivf = faiss.try_extract_index_ivf(index)
        nbits = int(faiss.downcast_index(ivf).pq.nbits) if ivf is not None and hasattr(
            faiss.downcast_index(ivf), "pq") else 8
        chain = faiss.downcast_index(index).chain
        for i in range(chain.size()):
            vt = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(vt, faiss.OPQMatrix) and vt.pq is None:
                # OPQ trains its own product quantizer (8 bits unless given one): give it the index's code size
                pq = faiss.ProductQuantizer(vt.d_out, vt.M, nbits)
                pq.cp.min_points_per_centroid = 1
                vt.pq = pq
                keep.append(pq)
    return keep


def _two_level_centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """``nlist`` k-means centroids in two levels: ``sqrt(nlist)`` clusters, then each split into a share of the
    lists proportional to its size. The cost is ``O(n * sqrt(nlist) * d)`` per iteration instead of
    ``O(n * nlist * d)`` (as ``faiss.contrib.clustering.two_level_clustering``, for any metric and without empty
    sub-clusters)."""
    import faiss

    n, d = x.shape
    nc1 = max(2, int(math.sqrt(nlist)))
    km = faiss.Kmeans(d, nc1, niter=KMEANS_NITER, seed=seed, max_points_per_centroid=2000,
                      min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    counts = np.bincount(assign, minlength=nc1)
    share = counts / counts.sum() * nlist
    alloc = np.minimum(np.floor(share).astype(np.int64), counts)
    alloc[(alloc == 0) & (counts > 0)] = 1
    order = np.argsort(-(share - np.floor(share)))  # largest remainders first, where the cluster has room
    while alloc.sum() < nlist:
        grew = False
        for c in order:
            if alloc.sum() >= nlist:
                break
            if alloc[c] < counts[c]:
                alloc[c] += 1
                grew = True
        if not grew:
            break
    while alloc.sum() > nlist:
        c = int(np.argmax(alloc))
        alloc[c] -= 1
    centroids = []
    for c in range(nc1):
        if not alloc[c]:
            continue
        sub = np.ascontiguousarray(x[assign == c])
        if alloc[c] == 1:
            centroids.append(sub.mean(axis=0, keepdims=True))
            continue
        km2 = faiss.Kmeans(d, int(alloc[c]), niter=KMEANS_NITER, seed=seed + c + 1, min_points_per_centroid=1)
        km2.train(sub)
        centroids.append(km2.centroids)
    out = np.concatenate(centroids).astype(np.float32)
    if len(out) < nlist:  # fewer distinct training vectors than lists: repeat centroids (empty lists)
        out = np.concatenate([out, out[: nlist - len(out)]])
    return np.ascontiguousarray(out[:nlist])


def train(index, sample: np.ndarray, res, *, seed: int = 0) -> dict[str, Any]:
    """Train ``index`` on ``sample`` (float32 (n, d)).

    The coarse quantizer's k-means runs on the GPU when ``res`` is given, else on the CPU, in two levels from
    ``TWO_LEVEL_MIN_LISTS`` lists (time proportional to the sample size times ``sqrt(nlist)``). faiss's own
    too-few-points warnings are silenced: ``training_shortfall`` says it once.

    Returns:
        ``{"kmeans": "gpu" | "two-level" | "flat"}``.
    """
    import faiss

    keep = _silence_clustering(index)
    ivf = faiss.try_extract_index_ivf(index)
    how = "flat"
    if res is not None and ivf is not None:
        # k-means assignment on the GPU; PQ/OPQ training stays on the CPU (cheap next to it)
        ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(ivf.d))
        how = "gpu"
    elif ivf is not None and ivf.nlist >= TWO_LEVEL_MIN_LISTS and len(sample) > ivf.nlist:
        x = sample
        top = faiss.downcast_index(index)
        if isinstance(top, faiss.IndexPreTransform):
            for i in range(top.chain.size()):
                vt = top.chain.at(i)
                vt.train(x)
                x = vt.apply(x)
        ivf.quantizer.train(x)
        ivf.quantizer.add(_two_level_centroids(np.ascontiguousarray(x, dtype=np.float32), int(ivf.nlist), seed))
        how = "two-level"
    index.train(sample)  # with the quantizer filled, faiss trains only what is left (codes, transforms)
    if ivf is not None:
        ivf.clustering_index = None
    del keep
    return {"kmeans": how} if ivf is not None else {}


def to_gpu(index, res):
    import faiss

    if res is None:
        return None
    try:
        return faiss.index_cpu_to_gpu(res, 0, index)
    except RuntimeError as exc:
        log.warning("this index type cannot be cloned to the GPU (%s); adding on the CPU", str(exc).splitlines()[-1])
        return None


def assignment_error(index, x: np.ndarray) -> float | None:
    """Mean squared distance of ``x`` to its nearest coarse centroid (IVF only): how well the trained
    structure fits these vectors. Computed in chunks, so the temporaries stay small next to ``x``."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not len(x):
        return None
    top = faiss.downcast_index(index)
    chain = [top.chain.at(i) for i in range(top.chain.size())] if isinstance(top, faiss.IndexPreTransform) else []
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    total = 0.0
    for start in range(0, len(x), 16384):
        chunk = np.ascontiguousarray(x[start:start + 16384], dtype=np.float32)
        for vt in chain:
            chunk = vt.apply(chunk)
        _, assign = ivf.quantizer.search(chunk, 1)
        diff = chunk - centroids[assign[:, 0]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total / len(x)
