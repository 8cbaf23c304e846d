"""Index building blocks: streaming vector parts into an index, building pieces in parallel processes and
merging them, training (optionally on the GPU), and how well a trained structure fits new vectors.

Positions are global: the vector at row ``r`` of the ``i``-th part (in index order) has position
``offsets[i] + r``. IVF indexes store it as the vector's id, so pieces built anywhere from consecutive runs of
parts merge into exactly the index one process would build; flat indexes number vectors by insertion order,
which merging the pieces in order preserves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.index.vectors as vec
from pipeline.errors import PipelineError
from pipeline.index.vectors import Part

log = logging.getLogger(__name__)


def _is_ivf(index) -> bool:
    import faiss

    return faiss.try_extract_index_ivf(index) is not None


def inner_index(index):
    """The index under any pre-transforms (OPQ, PCA), downcast to its class."""
    import faiss

    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return faiss.downcast_index(index)


def mergeable(index) -> bool:
    """Whether pieces of this index type can be built separately and merged (IVF and flat indexes)."""
    import faiss

    return _is_ivf(index) or isinstance(inner_index(index), faiss.IndexFlatCodes)


def add_parts(index, parts: Sequence[Part], start: int, batch_rows: int, *, gpu_index=None,
              piece: bool = False) -> int:
    """Stream ``parts`` into ``index`` in batches; the vectors get positions ``start, start + 1, ...``.

    IVF indexes get explicit ids (so pieces built elsewhere can be merged); flat and HNSW indexes number their
    vectors themselves, so they must already hold exactly ``start`` vectors, unless ``piece`` (an empty copy
    whose vectors are renumbered by merging the pieces in order).

    Returns:
        The number of vectors added.
    """
    target = gpu_index if gpu_index is not None else index
    with_ids = _is_ivf(index)
    if not with_ids and not piece and target.ntotal != start:
        raise PipelineError(f"internal: adding at position {start} to an index of {target.ntotal} vectors")
    pos = start
    for part in parts:
        for vectors, _ in vec.iter_batches(part, batch_rows):
            if with_ids:
                target.add_with_ids(vectors, np.arange(pos, pos + len(vectors), dtype=np.int64))
            else:
                target.add(vectors)
            pos += len(vectors)
    return pos - start


def build_piece(trained_path: str, parts: list[Part], start: int, piece_path: str, batch_rows: int,
                threads: int) -> int:
    """Worker: read the trained empty index, add ``parts`` at positions from ``start``, write the piece.

    Pieces are merged with ``merge_pieces``; run this on any machine that sees the parts (e.g. one Slurm task
    per run of parts) for corpora too large for one process.
    """
    import faiss

    if threads > 0:
        faiss.omp_set_num_threads(threads)
    index = faiss.read_index(trained_path)
    added = add_parts(index, parts, start, batch_rows, piece=True)
    tmp = Path(piece_path).with_name(Path(piece_path).name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, piece_path)
    return added


def merge_pieces(trained, piece_paths: Sequence[str | Path]):
    """Merge pieces (built from disjoint, consecutive position ranges, in that order) into ``trained``."""
    import faiss

    for path in piece_paths:
        piece = faiss.read_index(str(path))
        trained.merge_from(piece, 0)  # ids are already global positions (IVF) or implied by the order (flat)
        del piece
    return trained


def _split_parts(parts: Sequence[Part], pieces: int) -> list[list[Part]]:
    """Cut the parts into up to ``pieces`` consecutive runs of about equal rows."""
    total = sum(p.rows for p in parts)
    groups: list[list[Part]] = [[]]
    acc = 0
    for part in parts:
        if groups[-1] and acc >= total * len(groups) / pieces and len(groups) < pieces:
            groups.append([])
        groups[-1].append(part)
        acc += part.rows
    return [g for g in groups if g]


def add_parallel(index, parts: Sequence[Part], start: int, batch_rows: int, workers: int, folder: Path,
                  tag: str):
    import faiss

    groups = _split_parts(parts, workers)
    trained = folder / f".tmp-{tag}-trained.faiss"
    faiss.write_index(index, str(trained))
    starts = np.cumsum([start] + [sum(p.rows for p in g) for g in groups])[:-1]
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    pieces = [folder / f".tmp-{tag}-piece-{i:04d}.faiss" for i in range(len(groups))]
    log.info("adding %d parts in %d pieces (%d threads each)", len(parts), len(groups), threads)
    with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(build_piece, str(trained), g, int(s), str(p), batch_rows, threads)
                   for g, s, p in zip(groups, starts, pieces, strict=True)]
        for f in futures:
            f.result()
    # merge into the index as read back from the file, so that its type is the pieces' own (the factory may
    # build a generic IndexFlat where a file reads back as IndexFlatIP)
    merged = merge_pieces(faiss.read_index(str(trained)), pieces)
    for p in [trained, *pieces]:
        p.unlink(missing_ok=True)
    return merged


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


def train(index, sample: np.ndarray, res) -> None:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if res is not None and ivf is not None:
        # k-means assignment on the GPU; PQ/OPQ training stays on the CPU (cheap next to it)
        ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(ivf.d))
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None


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
    structure fits these vectors."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not len(x):
        return None
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    _, assign = ivf.quantizer.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    diff = x - centroids[assign[:, 0]]
    return float((diff * diff).sum(axis=1).mean())
