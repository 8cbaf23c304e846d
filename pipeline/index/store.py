"""Index: build the FAISS index of an output directory, with measured recall, and commit its generations.

The files (``OUTPUT/index/``) are laid out in ``files.py``.

A build or update writes a new generation beside the current one (temporary names, fsync, rename), then
replaces ``info.json`` atomically: that rename is the swap. A build killed at any moment leaves the previous
``info.json`` naming the previous, untouched files; the next build removes the leftovers.

Building: the choice (``pipeline.index.choice``) is made from the vector count, size, memory budget and free disk
before any vector is read. Training reads a random sample of positions (from a random subset of parts when the
corpus is large, so reading it costs the sample, not the corpus). Adding streams the parts in batches sized from
the budget, in one process, or in pieces (``pieces.py``): disjoint runs of parts added to copies of the trained
index by separate processes (``--workers`` here, Slurm array tasks on a cluster), then merged, in memory or into
on-disk inverted lists. Both give the same index (ids are global positions).

Recall (``recall.py``): two disjoint sets of held-out corpus vectors; ``nprobe``/``efSearch`` is raised on the tune
set until recall@k (``recall_k``) reaches the target, and recall@1/10/100 are reported on the other set. Where the
job recorded a query instruction, recall is also measured with query-side vectors (``queryside.py``).

Updates (``update.py``): parts that appeared since are added at new positions; parts that vanished are removed.

Modules: ``choice`` (what to build under the budget), ``build`` (streaming add, runs and merges, training, GPU),
``pieces`` (builds in pieces), ``recall`` (exact neighbours, recall, tuning), ``params`` (search parameters and the
removed-vector filter), ``queryside`` (query-side recall), ``files`` (layout, info, id map), ``update`` (updates),
this one (build, commit).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.index.vectors as vec
from pipeline.errors import PipelineError
from pipeline.index import pieces as pc
from pipeline.index.build import (
    add_parts,
    assignment_error,
    explicit_ids,
    gpu_resources,
    is_graph,
    merge_in_memory,
    merge_on_disk,
    mergeable,
    no_polysemous,
    on_disk_lists,
    to_gpu,
    train,
    training_shortfall,
)
from pipeline.index.choice import (
    MIN_RUN_ROWS,
    IndexChoice,
    choose_index,
    describe_factory,
    faiss_metric,
    format_size,
    parse_size,
)
from pipeline.index.files import (
    INFO,
    INFO_VERSION,
    collect_garbage,
    index_dir,
    install,
    job_record,
    new_generation,
    read_info,
    write_id_map,
)
from pipeline.index.params import Filter
from pipeline.index.recall import RECALL_KS, QuerySet, recall_block
from pipeline.index.vectors import Part
from pipeline.util import fsync_dir, locked, write_json_atomic

log = logging.getLogger(__name__)

RECALL_QUERIES = 1000  # per query set (tune and report)
MIN_BATCH, MAX_BATCH = 1024, 262144
READ_ROWS = 65536  # Parquet reads a part's row group whole (the sink writes groups of 65536 rows)


# --------------------------------------------------------------------------------------------- sizes


def _read_bytes(dims: int) -> int:
    return READ_ROWS * dims * 4


def _batch_rows(budget: int, resident: int, dims: int, on_disk: bool = False) -> int:
    if on_disk:  # an eighth of what is left after reading goes to batches, half to the run being filled
        left = max(budget - resident - _read_bytes(dims), 0) // 8
    else:
        left = max(budget - int(resident * 2), 0)  # the index may briefly need twice its size while growing
    return int(min(MAX_BATCH, max(MIN_BATCH, left // (dims * 4 * 4))))  # batch + faiss's copies of it


def _run_rows(budget: int, resident: int, entry_bytes: int, dims: int, on_disk: bool) -> int:
    """Vectors a piece holds in memory before writing a run: all of them for in-memory lists (the index fits the
    budget whole), else half of what is left of the budget after the resident index and reading, at twice the
    entry size (inverted lists grow by doubling); the rest is the batches' and a margin."""
    if not on_disk:
        return 2**62
    left = budget - resident - _read_bytes(dims)
    return int(max(MIN_RUN_ROWS, left // 2 // (2 * max(1, entry_bytes))))


def _disk_free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


# --------------------------------------------------------------------------------------------- training


@dataclass
class Prepared:
    """A trained, empty index and the held-out queries of a build."""

    index: Any
    tune: tuple[np.ndarray, np.ndarray]
    report: tuple[np.ndarray, np.ndarray]
    trained: dict[str, Any]
    gpu_note: str = ""
    notes: list[str] = field(default_factory=list)


def _part_entries(parts: Sequence[Part], starts: Sequence[int]) -> list[dict[str, Any]]:
    return [{"name": p.name, "shard": p.shard, "rows": p.rows, "finished_at": p.finished_at, "start": int(s)}
            for p, s in zip(parts, starts, strict=True)]


def _to_positions(parts: Sequence[Part], starts: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """Rows of the concatenation of ``parts`` -> positions (``starts[i] + row in part i``)."""
    bounds = vec.offsets(parts)
    which = np.searchsorted(bounds, rows, side="right") - 1
    return (np.asarray(starts, dtype=np.int64)[which] + (rows - bounds[which])).astype(np.int64)


def new_index(factory: str, d: int, metric: str):
    """The faiss index for ``factory``; graph indexes are wrapped in an ``IndexIDMap`` so that they store
    positions, which lets recall queries be held out of the graph and added after (``recall.py``)."""
    import faiss

    index = faiss.index_factory(d, factory, faiss_metric(metric))
    if is_graph(index) and not explicit_ids(index):
        index = faiss.index_factory(d, f"IDMap,{factory}", faiss_metric(metric))
    no_polysemous(index)
    return index


def _prepare(parts: Sequence[Part], starts: Sequence[int], choice: IndexChoice, metric: str, nq: int, seed: int,
             res) -> Prepared:
    """Sample the training vectors and two disjoint query sets (one read of the parts they fall in), train."""
    n, d = sum(p.rows for p in parts), parts[0].dims
    rng = np.random.default_rng(seed)
    n_queries = min(2 * nq, max(n - 1, 0)) if n > 1 else 0
    t_read = time.perf_counter()
    rows, from_parts = vec.sample_rows(parts, min(n, choice.train_size + n_queries), rng)
    order = rng.permutation(len(rows))
    q_rows, t_rows = rows[order[:n_queries]], rows[order[n_queries:]]
    overlap = len(t_rows) < choice.train_size
    if overlap:  # too few vectors to keep the training sample apart from the queries
        t_rows = rows
    sample = vec.read_rows(parts, np.concatenate([t_rows, q_rows]))
    read_seconds = time.perf_counter() - t_read
    train_x, q_x = np.ascontiguousarray(sample[: len(t_rows)]), sample[len(t_rows):]
    q_pos = _to_positions(parts, starts, q_rows)
    half = (len(q_rows) + 1) // 2
    index = new_index(choice.factory, d, metric)
    notes = []
    trained: dict[str, Any] = {"vectors": 0, "for_vectors": n}
    if not index.is_trained:
        short = training_shortfall(index, len(train_x), choice.factory, choice.automatic)
        if short:
            log.warning(short)
            notes.append(short)
        t_train = time.perf_counter()
        how = train(index, train_x, res, seed=seed)
        import faiss

        trained.update(vectors=len(train_x), seconds=round(time.perf_counter() - t_train, 3),
                       assignment_error=assignment_error(index, train_x), **how)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            trained["nlist"] = int(ivf.nlist)
        if short:
            trained["shortfall"] = short
    trained.update(sample_read_seconds=round(read_seconds, 3), sample_parts=int(from_parts), parts=len(parts),
                   overlaps_queries=bool(overlap and len(q_rows)))
    return Prepared(index, (np.ascontiguousarray(q_x[:half]), q_pos[:half]),
                    (np.ascontiguousarray(q_x[half:]), q_pos[half:]), trained, notes=notes)


# --------------------------------------------------------------------------------------------- build


def build_index(
    output: str | Path,
    *,
    factory: str | None = None,
    max_memory: str | int = "4G",
    metric: str = "ip",
    target_recall: float = 0.95,
    recall_k: int = 10,
    gpu: bool = False,
    workers: int = 1,
    pieces: int | None = None,
    piece: int | None = None,
    merge: bool = False,
    lists: str = "auto",
    recall_queries: int = RECALL_QUERIES,
    query_side: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the index of ``output`` from its finished vector parts and swap it in atomically.

    Args:
        output: the job's output directory.
        factory: a ``faiss.index_factory`` string; None chooses from the budget (``choice.choose_index``).
        max_memory: budget of each process for the index, its training sample and add buffers (``"4G"``).
        metric: ``ip`` (inner product: cosine on normalised vectors) or ``l2``.
        target_recall: recall that ``nprobe``/``efSearch`` is tuned to reach, at ``recall_k``.
        recall_k: the k of that recall: 1, 10 or 100 (the deepest k searches will ask for).
        gpu: train (and add, in one process) on the GPU when faiss-gpu is installed (a warning otherwise).
        workers: processes adding pieces at once on this machine.
        pieces: pieces the vectors are added in (default: ``workers``); IVF and flat indexes only.
        piece: build only this piece (0-based) of ``pieces``, training first if no process has (a Slurm array
            task); returns the piece's record.
        merge: only merge the pieces (all must be built) and commit.
        lists: ``auto`` (IVF lists on disk when their codes do not fit ``max_memory``), ``memory`` or ``disk``.
        recall_queries: held-out corpus vectors in each of the two recall query sets.
        query_side: texts embedded as queries for the query-side recall (None: ``recall_queries`` when the job
            recorded a query instruction or prompt, else 0; 0: not measured).
        seed: seed of the training and query samples.

    Returns:
        The new ``info.json`` as a dict (``factory``, ``recall@10``, ``search_params``, ``size_bytes``, ...), or with
        ``piece`` the piece's record.

    Raises:
        PipelineError: no finished parts, a bad argument, or nothing fits the budget.

    Example:
        >>> info = build_index("out/", max_memory="2G")          # doctest: +SKIP
        >>> info["factory"], info["recall@10"], info["search_params"]  # doctest: +SKIP
        ('HNSW32', 0.962, {'efSearch': 64})
    """
    out = Path(output)
    budget = parse_size(max_memory)
    faiss_metric(metric)
    if not 0 < target_recall <= 1:
        raise PipelineError(f"target_recall: {target_recall} must be in (0, 1]")
    if recall_k not in RECALL_KS:
        raise PipelineError(f"recall_k: {recall_k} is not one of {', '.join(map(str, RECALL_KS))}")
    if workers < 1:
        raise PipelineError(f"workers: {workers} must be at least 1")
    npieces = workers if pieces is None else pieces
    if npieces < 1:
        raise PipelineError(f"pieces: {npieces} must be at least 1")
    if piece is not None and merge:
        raise PipelineError("--piece and --merge: give one of them")
    if piece is not None and not 0 <= piece < npieces:
        raise PipelineError(f"--piece {piece}: give --pieces N with 0 <= piece < N")
    folder = index_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    parts = vec.complete_parts(out)
    if not parts:
        raise PipelineError(f"{out}: no finished vector parts (no shards/*.done.json); run `embed-corpus run` first")
    starts = vec.offsets(parts)[:-1]
    n, d = sum(p.rows for p in parts), parts[0].dims
    options = {"factory": factory, "max_memory": budget, "lists": lists, "metric": metric, "seed": seed,
               "pieces": npieces, "recall_queries": recall_queries}
    key = pc.plan_key(options, parts)
    args = dict(metric=metric, target_recall=target_recall, recall_k=recall_k, query_side=query_side,
                budget=budget, max_memory=max_memory)
    if piece is not None or merge:
        plan = pc.load_plan(pc.plan_dir(out, key)) if merge else None
        if merge:
            if plan is None:
                raise PipelineError(f"{out}: no build in {npieces} pieces with these options and parts to merge: "
                                    f"build its pieces first (`embed-corpus index build {out} --pieces {npieces} "
                                    "--piece K`, same options)")
            return _merge(out, plan, parts, workers=None, **args)
        plan, _ = pc.ensure_plan(out, key, lambda f: _plan_data(out, f, parts, starts, factory, budget, lists,
                                                                  metric, recall_queries, seed, gpu, npieces))
        return pc.run_piece(plan, parts, piece)
    choice = _choose(out, factory, n, d, budget, lists, metric)
    log.info("index for %s: %s (%s)", out, choice.factory, choice.reason)
    if not choice.automatic and not choice.on_disk and choice.build_bytes(d) > budget:
        log.warning("--factory %s needs about %s for %d vectors, over --max-memory %s", factory,
                    format_size(choice.build_bytes(d)), n, format_size(budget))
    can_merge = mergeable(new_index(choice.factory, d, metric))
    if npieces > 1 and not can_merge:
        log.warning("--pieces/--workers %d: %s cannot be merged from pieces; adding in one process", npieces,
                    choice.factory)
    if can_merge and (npieces > 1 or choice.on_disk):
        plan, made = pc.ensure_plan(out, key, lambda f: _plan_data(out, f, parts, starts, factory, budget, lists,
                                                                    metric, recall_queries, seed, gpu, npieces,
                                                                    choice))
        if not made:
            log.info("resuming the build in pieces %s (%d of %d pieces built)", plan.folder.name, len(plan.done()),
                     plan.pieces)
        pc.run_missing_pieces(out, plan, parts, workers)
        return _merge(out, plan, parts, workers=workers, **args)
    return _build_in_one(out, parts, starts, choice, gpu, workers, recall_queries, seed, **args)


def _choose(out: Path, factory: str | None, n: int, d: int, budget: int, lists: str, metric: str) -> IndexChoice:
    if factory:
        return describe_factory(factory, n, d, metric, max_memory=budget, lists=lists)
    return choose_index(n, d, budget, lists=lists, disk_free=_disk_free(index_dir(out)))


def _plan_data(out: Path, folder: Path, parts: Sequence[Part], starts: Sequence[int], factory: str | None,
               budget: int, lists: str, metric: str, nq: int, seed: int, gpu: bool, npieces: int,
               choice: IndexChoice | None = None) -> dict[str, Any]:
    """The training step of a build in pieces: choose, sample, train, save; the plan's data."""
    n, d = sum(p.rows for p in parts), parts[0].dims
    choice = choice or _choose(out, factory, n, d, budget, lists, metric)
    if not mergeable(new_index(choice.factory, d, metric)):
        raise PipelineError(f"--pieces: {choice.factory} cannot be built in pieces (only IVF and flat indexes "
                            "merge); build it without --pieces/--piece")
    res, gpu_note = gpu_resources(gpu)
    t0 = time.perf_counter()
    prep = _prepare(parts, starts, choice, metric, nq, seed, res)
    pc.save_trained(folder, prep.index)
    pc.save_queries(folder, prep.tune, prep.report)
    resident = choice.resident_bytes
    batch = _batch_rows(budget, resident, d, choice.on_disk)
    run_rows = _run_rows(budget, resident, choice.list_entry_bytes, d, choice.on_disk)
    return {"choice": choice.to_dict(), "metric": metric, "dims": d, "n": n, "budget": budget, "seed": seed,
            "parts": _part_entries(parts, starts), "groups": pc.split_parts([p.rows for p in parts], npieces),
            "batch_rows": batch, "run_rows": run_rows, "trained": prep.trained,
            "gpu": res is not None, "gpu_note": gpu_note, "notes": prep.notes,
            "train_step": {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": pc.peak_rss_bytes(),
                           "pid": os.getpid()}}


def _build_in_one(out: Path, parts: Sequence[Part], starts: Sequence[int], choice: IndexChoice, gpu: bool,
                  workers: int, nq: int, seed: int, **args: Any) -> dict[str, Any]:
    """Train and add in this process (HNSW, or an in-memory index built in one piece)."""
    import faiss

    budget, d = args["budget"], parts[0].dims
    with locked(index_dir(out) / ".lock"):
        t0 = time.perf_counter()
        collect_garbage(index_dir(out), _current_files(out))
        res, gpu_note = gpu_resources(gpu)
        prep = _prepare(parts, starts, choice, args["metric"], nq, seed, res)
        index = prep.index
        batch = _batch_rows(budget, choice.index_bytes, d)
        held_out = np.concatenate([prep.tune[1], prep.report[1]]) if is_graph(index) else None
        t_add = time.perf_counter()
        gpu_index = to_gpu(index, res) if held_out is None else None
        add_parts(index, parts, starts, batch, gpu_index=gpu_index,
                  skip=np.sort(held_out) if held_out is not None else None)
        if gpu_index is not None:
            index = faiss.index_gpu_to_cpu(gpu_index)
        steps = {"add": {"seconds": round(time.perf_counter() - t_add, 3)}}
        return _finish(out, index, parts, starts, choice, prep, steps, held_out=held_out, t0=t0,
                       gpu=res is not None, gpu_note=gpu_note, workers=workers, seed=seed, pieces=None, **args)


def _merge(out: Path, plan: pc.Plan, parts: Sequence[Part], workers: int | None, **args: Any) -> dict[str, Any]:
    """The merge step of a build in pieces: merge the runs (in memory, or into an on-disk lists file), measure,
    commit, remove the build's folder."""
    import faiss

    pc.check_complete(plan, out)
    data = plan.data
    choice = IndexChoice(**data["choice"])
    by_key = {(p.name, p.finished_at): p for p in parts}
    mine = [by_key.get((e["name"], e["finished_at"])) for e in data["parts"]]
    if any(p is None for p in mine):
        raise PipelineError("a part of this build vanished since it was planned: run `embed-corpus index build` "
                            "again (a new build is planned from the current parts)")
    starts = [e["start"] for e in data["parts"]]
    folder = index_dir(out)
    with locked(folder / ".lock"):
        t0 = time.perf_counter()
        collect_garbage(folder, _current_files(out))
        gen = new_generation()
        index = faiss.read_index(str(plan.folder / pc.TRAINED))
        runs = plan.runs()
        lists_tmp = None
        if choice.on_disk:
            lists_tmp = folder / f".tmp-{gen}-lists.ivfdata"
            merge_on_disk(index, runs, lists_tmp)
        else:
            merge_in_memory(index, runs)
        records = plan.piece_records()
        steps = {"train": data.get("train_step", {}),
                 "pieces": [{k: r[k] for k in ("piece", "rows", "runs", "seconds", "peak_rss_bytes", "host")}
                            for r in records],
                 "merge": {"seconds": round(time.perf_counter() - t0, 3)}}
        prep = Prepared(index, *pc.load_queries(plan.folder), trained=data["trained"], notes=data.get("notes", []))
        info = _finish(out, index, mine, starts, choice, prep, steps, held_out=None, t0=t0, gpu=data["gpu"],
                       gpu_note=data["gpu_note"], workers=workers, seed=data.get("seed"), pieces=plan.pieces,
                       gen=gen, lists_tmp=lists_tmp, build_key=data["key"], **args)
    shutil.rmtree(plan.folder, ignore_errors=True)
    return info


def _finish(out: Path, index, parts: Sequence[Part], starts: Sequence[int], choice: IndexChoice, prep: Prepared,
            steps: dict[str, Any], *, held_out: np.ndarray | None, t0: float, gpu: bool, gpu_note: str,
            workers: int | None, seed: int | None, pieces: int | None, metric: str, target_recall: float,
            recall_k: int, query_side: int | None, budget: int, max_memory: str | int, gen: str | None = None,
            lists_tmp: Path | None = None, build_key: str | None = None) -> dict[str, Any]:
    """Measure recall (adding the held-out queries of a graph after), commit."""
    n = sum(p.rows for p in parts)
    tune, report = QuerySet(*prep.tune), QuerySet(*prep.report)
    t_recall = time.perf_counter()
    recall = recall_block(index, parts, starts, tune, report, metric, choice.tune, target_recall, recall_k,
                          absent=held_out, batch_rows=_scan_rows(budget, parts[0].dims))
    steps["recall"] = {"seconds": round(time.perf_counter() - t_recall, 3)}
    if held_out is not None:
        _add_held_out(index, prep)
    recall["recall_queries"]["kind"] = _query_kind(index, held_out is not None, prep.trained)
    _warn_not_reached(recall, choice)
    positions = int(starts[-1]) + parts[-1].rows if parts else 0
    info = {
        "version": INFO_VERSION,
        "generation": gen or new_generation(),
        "factory": choice.factory,
        "metric": metric,
        "dims": parts[0].dims,
        "ntotal": int(index.ntotal),
        "live": n,
        "positions": positions,
        "on_disk": choice.on_disk,
        **recall,
        "choice": {**choice.to_dict(), "max_memory": str(max_memory), "max_memory_bytes": budget},
        "trained": prep.trained,
        "steps": steps,
        "parts": _part_entries(parts, starts),
        "removed": [],
        "gpu": gpu,
        "gpu_note": gpu_note,
        "workers": workers,
        "pieces": pieces,
        "seed": seed,
        "notes": prep.notes,
        "updates": [],
    }
    info["query_side"] = _query_side(out, index, parts, starts, metric, recall, query_side, None, seed or 0)
    return _commit(out, index, info, parts, None, tune, report, t0, lists_tmp=lists_tmp, build_key=build_key)


def _scan_rows(budget: int, dims: int) -> int:
    return int(min(131072, max(4096, budget // 8 // (dims * 4))))


def _add_held_out(index, prep: Prepared) -> None:
    """Put the recall queries held out of a graph index into it, now that they have been measured."""
    for x, pos in (prep.tune, prep.report):
        if len(pos):
            index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.asarray(pos, dtype=np.int64))


def _query_kind(index, held_out: bool, trained: dict[str, Any]) -> str:
    base = "corpus vectors sampled at random, two disjoint sets (nprobe/efSearch tuned on one, recall reported " \
           "on the other)"
    if trained.get("vectors") and not trained.get("overlaps_queries"):
        base += ", none of them in the training sample"
    if held_out:
        return base + "; held out of the graph while measured and added after"
    what = "exact search" if not is_graph(index) and not _is_ivf_index(index) else "an IVF scan"
    return base + f"; each query's own entry is left out of the results, which for {what} equals the query being " \
                  "absent from the index"


def _is_ivf_index(index) -> bool:
    import faiss

    return faiss.try_extract_index_ivf(index) is not None


def _warn_not_reached(recall: dict[str, Any], choice: IndexChoice) -> None:
    tuning = recall["tuning"]
    if tuning["reached"] or not tuning.get("param"):
        return
    k, best = tuning["k"], tuning.get("best_tuned", recall[f"recall@{tuning['k']}"])
    last = tuning["curve"][-1][tuning["param"]] if tuning["curve"] else "?"
    if choice.automatic:
        more = ("`--lists disk` keeps more exact codes on disk" if choice.on_disk
                else "a larger --max-memory allows a more exact index")
        log.warning("recall@%d %.3f < target %.3f even at %s=%s: the codes of this index cap its recall (%s)", k, best,
                    tuning["target"], tuning["param"], last, more)
    else:
        fam = family(choice.factory)
        longer = {"IVF-PQ": "more PQ bytes, or SQ8", "IVF-SQ": "SQfp16, or Flat"}.get(fam, "a more exact index")
        log.warning("recall@%d %.3f < target %.3f even at %s=%s: the codes of --factory %s cap its recall (longer "
                    "codes reach more: %s)", k, best, tuning["target"], tuning["param"], last, choice.factory, longer)


def _query_side(out: Path, index, parts: Sequence[Part], starts: Sequence[int], metric: str,
                recall: dict[str, Any], count: int | None, filt: Filter | None, seed: int) -> dict[str, Any] | None:
    from pipeline.index.queryside import query_side_recall

    return query_side_recall(out, index, parts, starts, metric, recall["search_params"], count=count, filt=filt,
                             seed=seed)


def _current_files(out: Path) -> set[str]:
    try:
        return set(read_info(out).get("files", {}).values())
    except PipelineError:
        return set()


def _commit(out: Path, index, info: dict[str, Any], new_parts: Sequence[Part], previous_ids: Path | None,
            tune: QuerySet, report: QuerySet, t0: float, seconds_key: str = "build_seconds",
            lists_tmp: Path | None = None, build_key: str | None = None) -> dict[str, Any]:
    """Write the generation's files beside the current ones, then swap ``info.json`` in (the commit point)."""
    import faiss

    folder = index_dir(out)
    gen = info["generation"]
    files = {"index": f"index-{gen}.faiss", "ids": f"ids-{gen}.parquet", "queries": f"queries-{gen}.npz"}
    tmp = {k: folder / f".tmp-{gen}-{v}" for k, v in files.items()}
    lists = on_disk_lists(index)
    if lists is not None:
        if lists_tmp is None:
            raise PipelineError("internal: an on-disk index without its new lists file")
        files["lists"] = f"lists-{gen}.ivfdata"
        tmp["lists"] = lists_tmp
        lists.filename = files["lists"]  # recorded in the index file; read back beside it (IO_FLAG_ONDISK_SAME_DIR)
    t_write = time.perf_counter()
    faiss.write_index(index, str(tmp["index"]))
    rows = write_id_map(tmp["ids"], new_parts, previous_ids)
    if rows != info["positions"]:
        raise PipelineError(f"internal: id map has {rows} rows, {info['positions']} positions were given")
    removed_in_index = sum(e["rows"] for e in info["removed"] if not e.get("applied"))
    if int(index.ntotal) != info["live"] + removed_in_index:
        raise PipelineError(f"internal: the index holds {index.ntotal} vectors, {info['live']} live and "
                            f"{removed_in_index} removed were expected")
    with open(tmp["queries"], "wb") as f:
        np.savez(f, tune_vectors=tune.vectors, tune_positions=tune.positions, report_vectors=report.vectors,
                 report_positions=report.positions)
    for key, name in files.items():
        install(tmp[key], folder / name)
    info["write_seconds"] = round(time.perf_counter() - t_write, 3)
    job = job_record(out)
    info.update(
        files=files,
        size_bytes=sum((folder / files[k]).stat().st_size for k in ("index", "lists") if k in files),
        id_map_bytes=(folder / files["ids"]).stat().st_size,
        job_fingerprint=job.get("fingerprint"),
        model=(job.get("model") or {}).get("model"),
        normalized=(job.get("model") or {}).get("normalize"),
        faiss_version=_faiss_version(),
        built_at=time.time(),
    )
    info[seconds_key] = round(time.perf_counter() - t0, 3)
    info["peak_rss_bytes"] = pc.peak_rss_bytes()
    info.setdefault("rebuild_due", False)
    info.setdefault("rebuild_reasons", [])
    write_json_atomic(folder / INFO, info)
    fsync_dir(folder)
    collect_garbage(folder, set(files.values()))
    pc.remove_other_builds(out, keep=build_key)  # unfinished builds in pieces are superseded by this one
    log.info("index %s: %s, %d vectors, recall@10 %.3f at %s, %s on disk, %.1fs", out, info["factory"],
             info["live"], info["recall@10"], info["search_params"], format_size(info["size_bytes"]),
             info[seconds_key])
    return info


def _faiss_version() -> str:
    import faiss

    return getattr(faiss, "__version__", "unknown")


def family(factory: str) -> str:
    """The kind of index a factory string builds: Flat, HNSW, IVF-Flat, IVF-SQ, IVF-PQ or other."""
    f = factory.upper()
    if "IVF" in f:
        return "IVF-PQ" if ",PQ" in f else "IVF-SQ" if ",SQ" in f else "IVF-Flat" if f.endswith(",FLAT") else "IVF"
    if f.startswith("HNSW") or ",HNSW" in f:
        return "HNSW"
    return "Flat" if f == "FLAT" else factory


def ensure_index(output: str | Path, **kwargs: Any) -> dict[str, Any]:
    """For the end of ``embed-corpus run``: build the index when there is none, else bring it up to date.

    ``kwargs`` are ``build_index``'s; only ``target_recall``, ``recall_k``, ``max_memory`` and ``gpu`` apply to an
    update.
    """
    from pipeline.index.update import update_index

    keep = {k: v for k, v in kwargs.items() if k in ("target_recall", "recall_k", "max_memory", "gpu")}
    if (index_dir(output) / INFO).exists():
        return update_index(output, **keep)
    # Workers of one job (Slurm array tasks, say) each end with this step: one builds, the others then update
    # what it built (nothing new: at once) instead of each building the same index again.
    with locked(Path(output) / ".index-ensure.lock"):
        if (index_dir(output) / INFO).exists():
            return update_index(output, **keep)
        return build_index(output, **kwargs)


def choice_for(output: str | Path, *, factory: str | None = None, max_memory: str | int = "4G",
               metric: str = "ip", lists: str = "auto") -> IndexChoice:
    """What ``build_index`` would build for ``output`` now (reads only Parquet footers)."""
    parts = vec.complete_parts(output)
    if not parts:
        raise PipelineError(f"{output}: no finished vector parts")
    n, d = sum(p.rows for p in parts), parts[0].dims
    index_dir(output).mkdir(parents=True, exist_ok=True)
    return _choose(Path(output), factory, n, d, parse_size(max_memory), lists, metric)
