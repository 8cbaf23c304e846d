"""Index: build, update and open the FAISS index of an output directory, with measured recall.

The files (``OUTPUT/index/``) are laid out in ``files.py``.

A build or update writes a new generation beside the current one (temporary names, fsync, rename), then
replaces ``info.json`` atomically: that rename is the swap. A build killed at any moment leaves the previous
``info.json`` naming the previous, untouched files; the next build removes the leftovers.

Building: the choice (``pipeline.index.choice``) is made from the vector count, size and memory budget before any
data is read. Training reads a random sample of positions; adding streams the parts in batches sized from the
budget. With ``workers > 1`` disjoint runs of parts are added to copies of the trained index in separate processes
and the pieces are merged in order, which gives the same index as one process (ids are global positions).

Recall: ``RECALL_QUERIES`` corpus vectors held out of the training sample are searched; their exact neighbours
(other than themselves) come from a brute-force scan (from the index's own storage when it keeps exact vectors,
else streamed from the parts). ``nprobe``/``efSearch`` is raised until recall@10 reaches the target.

Modules: ``choice`` (what to build under the budget), ``build`` (streaming add, pieces and merge, training, GPU),
``recall`` (exact neighbours, recall, tuning), ``files`` (layout, info, id map), this one (build, update).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.index.vectors as vec
from pipeline.errors import PipelineError
from pipeline.index.build import (
    add_parallel,
    add_parts,
    assignment_error,
    gpu_resources,
    mergeable,
    no_polysemous,
    to_gpu,
    train,
)
from pipeline.index.choice import (
    IndexChoice,
    choose_index,
    describe_factory,
    faiss_metric,
    format_size,
    ivf_lists,
    parse_size,
)
from pipeline.index.files import (
    INFO,
    INFO_VERSION,
    collect_garbage,
    fsync_dir,
    index_dir,
    install,
    job_record,
    load_index,
    new_generation,
    read_info,
    write_id_map,
)
from pipeline.index.recall import recall_block
from pipeline.index.vectors import Part
from pipeline.util import locked, write_json_atomic

log = logging.getLogger(__name__)

RECALL_QUERIES = 1000
DRIFT_RATIO = 1.25  # new vectors this much farther from their centroid than the training sample: retrain
GROWTH_RATIO = 4  # lists trained for N vectors serve up to 4N before a rebuild is advised
MIN_BATCH, MAX_BATCH = 1024, 262144


# --------------------------------------------------------------------------------------------- build


def _batch_rows(budget: int, index_bytes: int, dims: int) -> int:
    left = max(budget - int(index_bytes * 2), 0)  # the index may briefly need twice its size while growing
    return int(min(MAX_BATCH, max(MIN_BATCH, left // (dims * 4 * 4))))  # batch + faiss's copies of it


def _sample_positions(n: int, train: int, nq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random training and query positions (queries overlap training only when n is too small)."""
    train = min(train, n)
    perm = rng.permutation(n)
    train_pos = np.sort(perm[:train])
    rest = perm[train:]
    if len(rest) >= nq:
        query_pos = np.sort(rest[:nq])
    else:
        query_pos = np.sort(np.concatenate([rest, perm[: nq - len(rest)]]))
    return train_pos, query_pos


def _part_entries(parts: Sequence[Part]) -> list[dict[str, Any]]:
    return [{"name": p.name, "shard": p.shard, "rows": p.rows, "finished_at": p.finished_at} for p in parts]


def build_index(
    output: str | Path,
    *,
    factory: str | None = None,
    max_memory: str | int = "4G",
    metric: str = "ip",
    target_recall: float = 0.95,
    gpu: bool = False,
    workers: int = 1,
    recall_queries: int = RECALL_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the index of ``output`` from its finished vector parts and swap it in atomically.

    Args:
        output: the job's output directory.
        factory: a ``faiss.index_factory`` string; None chooses from the budget (``choice.choose_index``).
        max_memory: budget for the index plus the training sample (``"4G"``, ``"512M"`` or bytes).
        metric: ``ip`` (inner product: cosine on normalised vectors) or ``l2``.
        target_recall: recall@10 that ``nprobe``/``efSearch`` is tuned to reach.
        gpu: train and add on the GPU when faiss-gpu is installed (a warning and the CPU otherwise).
        workers: processes adding disjoint runs of parts to copies of the trained index (merged in order).
        recall_queries: held-out corpus vectors used to measure recall.
        seed: seed of the training and query samples.

    Returns:
        The new ``info.json`` as a dict (``factory``, ``recall@10``, ``search_params``, ``size_bytes``, ...).

    Raises:
        PipelineError: no finished parts, a bad argument, or nothing fits the budget.

    Example:
        >>> info = build_index("out/", max_memory="2G")          # doctest: +SKIP
        >>> info["factory"], info["recall@10"], info["search_params"]  # doctest: +SKIP
        ('HNSW32', 0.962, {'efSearch': 64})
    """
    import faiss

    out = Path(output)
    budget = parse_size(max_memory)
    fmetric = faiss_metric(metric)
    if not 0 < target_recall <= 1:
        raise PipelineError(f"target_recall: {target_recall} must be in (0, 1]")
    if workers < 1:
        raise PipelineError(f"workers: {workers} must be at least 1")
    folder = index_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):
        t0 = time.perf_counter()
        current = _current_files(out)
        collect_garbage(folder, current)
        parts = vec.complete_parts(out)
        if not parts:
            raise PipelineError(f"{out}: no finished vector parts (no shards/*.done.json); run `embed-corpus run` "
                                "first")
        n, d = sum(p.rows for p in parts), parts[0].dims
        choice = describe_factory(factory, n, d, metric) if factory else choose_index(n, d, budget)
        log.info("index for %s: %s (%s)", out, choice.factory, choice.reason)
        if not choice.automatic and choice.build_bytes(d) > budget:
            log.warning("--factory %s needs about %s for %d vectors, over --max-memory %s", factory,
                        format_size(choice.build_bytes(d)), n, format_size(budget))
        res, gpu_note = gpu_resources(gpu)
        rng = np.random.default_rng(seed)
        train_pos, query_pos = _sample_positions(n, choice.train_size, min(recall_queries, n), rng)
        t_read = time.perf_counter()
        sample = vec.read_rows(parts, np.concatenate([train_pos, query_pos]))
        read_seconds = time.perf_counter() - t_read
        train_x, queries = sample[: len(train_pos)], np.ascontiguousarray(sample[len(train_pos):])
        index = faiss.index_factory(d, choice.factory, fmetric)
        no_polysemous(index)
        trained: dict[str, Any] = {"vectors": 0, "for_vectors": n}
        if not index.is_trained:
            t_train = time.perf_counter()
            train(index, train_x, res)
            trained.update(vectors=len(train_x), seconds=round(time.perf_counter() - t_train, 3),
                           assignment_error=assignment_error(index, train_x))
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                trained["nlist"] = int(ivf.nlist)
        del sample, train_x
        batch = _batch_rows(budget, choice.index_bytes, d)
        gen = new_generation()
        t_add = time.perf_counter()
        gpu_index = to_gpu(index, res)
        if workers > 1 and gpu_index is None and mergeable(index):
            index = add_parallel(index, parts, 0, batch, workers, folder, gen)
        else:
            if workers > 1:
                log.warning("workers=%d: %s cannot be merged from pieces; adding in one process", workers,
                            choice.factory)
            add_parts(index, parts, 0, batch, gpu_index=gpu_index)
            if gpu_index is not None:
                index = faiss.index_gpu_to_cpu(gpu_index)
        add_seconds = time.perf_counter() - t_add
        recall = recall_block(index, parts, queries, query_pos, metric, choice.tune, target_recall)
        info = {
            "version": INFO_VERSION,
            "generation": gen,
            "factory": choice.factory,
            "metric": metric,
            "dims": d,
            "ntotal": int(index.ntotal),
            **recall,
            "choice": {**choice.to_dict(), "max_memory": str(max_memory), "max_memory_bytes": budget},
            "trained": trained,
            "sample_read_seconds": round(read_seconds, 3),
            "add_seconds": round(add_seconds, 3),
            "parts": _part_entries(parts),
            "gpu": res is not None,
            "gpu_note": gpu_note,
            "workers": workers,
            "seed": seed,
            "updates": [],
        }
        return _commit(out, index, info, parts, None, queries, query_pos, t0)


def _current_files(out: Path) -> set[str]:
    try:
        return set(read_info(out).get("files", {}).values())
    except PipelineError:
        return set()


def _commit(out: Path, index, info: dict[str, Any], new_parts: Sequence[Part], previous_ids: Path | None,
            queries: np.ndarray, query_pos: np.ndarray, t0: float, seconds_key: str = "build_seconds"
            ) -> dict[str, Any]:
    """Write the generation's files beside the current ones, then swap ``info.json`` in (the commit point)."""
    import faiss

    folder = index_dir(out)
    gen = info["generation"]
    files = {"index": f"index-{gen}.faiss", "ids": f"ids-{gen}.parquet", "queries": f"queries-{gen}.npz"}
    tmp = {k: folder / f".tmp-{gen}-{v}" for k, v in files.items()}
    t_write = time.perf_counter()
    faiss.write_index(index, str(tmp["index"]))
    rows = write_id_map(tmp["ids"], new_parts, previous_ids)
    if rows != index.ntotal:
        raise PipelineError(f"internal: id map has {rows} rows, index {index.ntotal}")
    with open(tmp["queries"], "wb") as f:
        np.savez(f, positions=query_pos.astype(np.int64), vectors=queries.astype(np.float32))
    for key, name in files.items():
        install(tmp[key], folder / name)
    info["write_seconds"] = round(time.perf_counter() - t_write, 3)
    job = job_record(out)
    info.update(
        files=files,
        size_bytes=(folder / files["index"]).stat().st_size,
        id_map_bytes=(folder / files["ids"]).stat().st_size,
        job_fingerprint=job.get("fingerprint"),
        model=(job.get("model") or {}).get("model"),
        normalized=(job.get("model") or {}).get("normalize"),
        faiss_version=_faiss_version(),
        built_at=time.time(),
    )
    info[seconds_key] = round(time.perf_counter() - t0, 3)
    info.setdefault("rebuild_due", False)
    info.setdefault("rebuild_reasons", [])
    write_json_atomic(folder / INFO, info)
    fsync_dir(folder)
    collect_garbage(folder, set(files.values()))
    log.info("index %s: %s, %d vectors, recall@10 %.3f at %s, %s on disk, %.1fs", out, info["factory"],
             info["ntotal"], info["recall@10"], info["search_params"], format_size(info["size_bytes"]),
             info[seconds_key])
    return info


def _faiss_version() -> str:
    import faiss

    return getattr(faiss, "__version__", "unknown")


# --------------------------------------------------------------------------------------------- update


def update_index(
    output: str | Path,
    *,
    target_recall: float | None = None,
    max_memory: str | int | None = None,
    gpu: bool = False,
    recall_queries: int = RECALL_QUERIES,
    seed: int = 0,
    **build_args: Any,
) -> dict[str, Any]:
    """Add the finished parts that are not in the index yet (the nightly case), re-measure recall, and say
    whether a rebuild is due. Without an index, build one.

    Only the new parts are read to add them; the recall check reuses the recorded held-out queries plus a sample
    of the new vectors, and finds their exact neighbours from the index itself when it stores exact vectors
    (otherwise by scanning the parts' vectors).

    Args:
        output: the job's output directory.
        target_recall: recall@10 to re-tune for (default: the recorded target).
        max_memory: budget to check the grown index against (default: the recorded one).
        gpu: add on the GPU when faiss-gpu is installed.
        recall_queries: queries for the recall check.
        seed: seed of the query sample.
        **build_args: passed to ``build_index`` when there is no index yet.

    Returns:
        The new info dict, with ``added`` (vectors), ``added_parts`` (names), ``rebuild_due`` and
        ``rebuild_reasons``. Nothing is written when no part is new.
    """
    out = Path(output)
    folder = index_dir(out)
    if not (folder / INFO).exists():
        log.warning("%s has no index yet: building one", out)
        kwargs = dict(build_args, gpu=gpu, recall_queries=recall_queries, seed=seed)
        if target_recall is not None:
            kwargs["target_recall"] = target_recall
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        info = build_index(out, **kwargs)
        return {**info, "added": info["ntotal"], "added_parts": [p["name"] for p in info["parts"]], "built": True}
    if build_args:
        raise PipelineError(f"update_index: unknown arguments {sorted(build_args)}")
    with locked(folder / ".lock"):
        t0 = time.perf_counter()
        info = read_info(out)
        collect_garbage(folder, set(info.get("files", {}).values()))
        parts = vec.complete_parts(out)
        by_name = {p.name: p for p in parts}
        indexed = {e["name"]: e for e in info["parts"]}
        new = [p for p in parts if p.name not in indexed]
        changed = [p.name for p in parts if p.name in indexed and p.finished_at != indexed[p.name]["finished_at"]]
        missing = [name for name in indexed if name not in by_name]
        target = info["tuning"]["target"] if target_recall is None else target_recall
        if new and new[0].dims != info["dims"]:
            raise PipelineError(f"new parts have {new[0].dims} dims, the index {info['dims']}: rebuild the index")
        if not new:
            reasons = _rebuild_reasons(info, None, info["ntotal"], changed, missing, True)
            log.info("%s: index up to date (%d parts)", out, len(indexed))
            return {**info, "added": 0, "added_parts": [], "rebuild_due": bool(reasons), "rebuild_reasons": reasons}
        index, _ = load_index(out, info)
        res, gpu_note = gpu_resources(gpu)
        start = int(index.ntotal)
        budget = parse_size(max_memory if max_memory is not None else info["choice"]["max_memory_bytes"])
        batch = _batch_rows(budget, info["size_bytes"], info["dims"])
        gpu_index = to_gpu(index, res)
        t_add = time.perf_counter()
        added = add_parts(index, new, start, batch, gpu_index=gpu_index)
        if gpu_index is not None:
            import faiss

            index = faiss.index_gpu_to_cpu(gpu_index)
        add_seconds = time.perf_counter() - t_add
        ntotal = int(index.ntotal)
        rng = np.random.default_rng(seed + len(info.get("updates", [])) + 1)
        queries, query_pos, new_err = _update_queries(out, info, new, start, ntotal, recall_queries, rng, index)
        in_order = [by_name[e["name"]] for e in info["parts"] if e["name"] in by_name] + new
        recall = recall_block(index, in_order, queries, query_pos, info["metric"], info["tuning"]["param"], target)
        reasons = _rebuild_reasons(info, new_err, ntotal, changed, missing, recall["tuning"]["reached"])
        if info["choice"].get("automatic"):
            try:
                now = choose_index(ntotal, info["dims"], budget)
                if family(now.factory) != family(info["factory"]):
                    reasons.append(f"the automatic choice for {ntotal:,} vectors is now {now.factory}")
            except PipelineError as exc:
                reasons.append(str(exc))
        if info["size_bytes"] * ntotal / max(start, 1) > budget:
            reasons.append(f"the index (about {format_size(info['size_bytes'] * ntotal / max(start, 1))}) no "
                           f"longer fits --max-memory {format_size(budget)}")
        previous_ids = folder / info["files"]["ids"]
        gen = new_generation()
        update = {"at": time.time(), "parts": [p.name for p in new], "added": added, "ntotal": ntotal,
                  "add_seconds": round(add_seconds, 3), "recall@10": recall["recall@10"],
                  "assignment_error": new_err}
        new_info = {
            **info,
            **recall,
            "generation": gen,
            "ntotal": ntotal,
            "parts": info["parts"] + _part_entries(new),
            "updates": info.get("updates", []) + [update],
            "rebuild_due": bool(reasons),
            "rebuild_reasons": reasons,
            "gpu_note": gpu_note or info.get("gpu_note", ""),
        }
        new_info = _commit(out, index, new_info, new, previous_ids, queries, query_pos, t0, "update_seconds")
        for reason in reasons:
            log.warning("rebuild due: %s", reason)
        return {**new_info, "added": added, "added_parts": [p.name for p in new]}


def family(factory: str) -> str:
    """The kind of index a factory string builds: Flat, HNSW, IVF-Flat, IVF-SQ, IVF-PQ or other."""
    f = factory.upper()
    if "IVF" in f:
        return "IVF-PQ" if ",PQ" in f else "IVF-SQ" if ",SQ" in f else "IVF-Flat" if f.endswith(",FLAT") else "IVF"
    if f.startswith("HNSW") or ",HNSW" in f:
        return "HNSW"
    return "Flat" if f == "FLAT" else factory


def _update_queries(out: Path, info: dict[str, Any], new: Sequence[Part], start: int, ntotal: int, nq: int,
                    rng: np.random.Generator, index) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Recall queries after an update: recorded ones kept in proportion to the old share of the corpus, plus a
    sample of the new vectors (read from the new parts only). Also the new vectors' assignment error."""
    stored = np.load(index_dir(out) / info["files"]["queries"])
    old_pos, old_vec = stored["positions"], stored["vectors"]
    n_new = ntotal - start
    take_new = min(n_new, max(1, round(nq * n_new / ntotal)))
    take_old = min(len(old_pos), nq - take_new)
    keep = np.sort(rng.choice(len(old_pos), take_old, replace=False)) if take_old else np.array([], dtype=np.int64)
    # the drift check wants more new vectors than the recall check may: sample those, queries are a subset
    drift_local = rng.choice(n_new, min(n_new, max(take_new, 2000)), replace=False)
    drift_vec = vec.read_rows(new, drift_local)
    new_local, new_vec = drift_local[:take_new], drift_vec[:take_new]
    queries = np.ascontiguousarray(np.concatenate([old_vec[keep], new_vec]), dtype=np.float32)
    positions = np.concatenate([old_pos[keep], new_local + start]).astype(np.int64)
    return queries, positions, assignment_error(index, drift_vec)


def _rebuild_reasons(info: dict[str, Any], new_err: float | None, ntotal: int, changed: list[str],
                     missing: list[str], reached: bool) -> list[str]:
    reasons = []
    if changed:
        reasons.append(f"{len(changed)} indexed parts were rewritten since ({', '.join(changed[:3])}...)")
    if missing:
        reasons.append(f"{len(missing)} indexed parts no longer exist ({', '.join(missing[:3])}...)")
    trained = info.get("trained", {})
    nlist = trained.get("nlist")
    if nlist and ntotal > GROWTH_RATIO * trained.get("for_vectors", ntotal):
        reasons.append(f"{ntotal:,} vectors now, {trained['for_vectors']:,} when the {nlist} lists were trained "
                       f"(now {ivf_lists(ntotal)} lists would be chosen)")
    old_err = trained.get("assignment_error")
    if new_err is not None and old_err and new_err > DRIFT_RATIO * old_err:
        reasons.append(f"new vectors lie {new_err / old_err:.2f}x farther from their centroids than the training "
                       "sample: the data has drifted from what the index was trained on")
    if not reached and info["tuning"].get("reached", True):
        reasons.append(f"recall@10 no longer reaches the target {info['tuning']['target']}")
    return reasons


def ensure_index(output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """For the end of ``embed-corpus run``: build the index when there is none, else add the new parts.

    ``kwargs`` are ``build_index``'s; only ``target_recall``, ``max_memory`` and ``gpu`` apply to an update.
    """
    if (index_dir(output) / INFO).exists():
        keep = {k: v for k, v in kwargs.items() if k in ("target_recall", "max_memory", "gpu")}
        return update_index(output, **keep)
    return build_index(output, **kwargs)


def choice_for(output: str | Path, *, factory: str | None = None, max_memory: str | int = "4G",
               metric: str = "ip") -> IndexChoice:
    """What ``build_index`` would build for ``output`` now (reads only Parquet footers)."""
    parts = vec.complete_parts(output)
    if not parts:
        raise PipelineError(f"{output}: no finished vector parts")
    n, d = sum(p.rows for p in parts), parts[0].dims
    return describe_factory(factory, n, d, metric) if factory else choose_index(n, d, max_memory)
