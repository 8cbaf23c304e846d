"""Index updates: bring an index up to date with the live vector parts of its output (the nightly case).

Parts that appeared since the last build or update are added at new positions (numbered after every position
ever given, so positions stay stable); parts that vanished (deleted, or rewritten by an incremental run) are
removed from IVF indexes with ``remove_ids`` and, in HNSW and flat indexes, filtered out of every search
(``params.Filter``) until a rebuild, which is advised once they exceed ``REMOVED_REBUILD_SHARE`` of the index. An
on-disk index gets a new lists file (its old lists and runs of the new vectors merged, never loaded whole), so
the previous generation stays untouched until the swap. Recall is re-measured on the live vectors and the update
says whether a rebuild is due (growth, drift, recall, removed vectors).
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
    add_parts,
    add_runs,
    assignment_error,
    explicit_ids,
    gpu_resources,
    is_graph,
    merge_on_disk,
    on_disk_lists,
    quiet_stdout,
    to_gpu,
)
from pipeline.index.choice import IndexChoice, choose_index, format_size, ivf_lists, parse_size
from pipeline.index.files import INFO, INFO_VERSION, collect_garbage, index_dir, load_index, new_generation, read_info
from pipeline.index.params import Filter, ranges_of
from pipeline.index.recall import QuerySet, recall_block
from pipeline.index.store import (
    RECALL_QUERIES,
    _batch_rows,
    _commit,
    _part_entries,
    _query_side,
    _run_rows,
    _scan_rows,
    _to_positions,
    _warn_not_reached,
    build_index,
    family,
)
from pipeline.index.vectors import Part
from pipeline.util import locked

log = logging.getLogger(__name__)

DRIFT_RATIO = 1.25  # new vectors this much farther from their centroid than the training sample: retrain
GROWTH_RATIO = 4  # lists trained for N vectors serve up to 4N before a rebuild is advised
REMOVED_REBUILD_SHARE = 0.10  # HNSW/flat: filtered (removed) vectors above this share of the index: rebuild
GRAPH_MIN_HELD_OUT = 50  # an HNSW update measures on new vectors held out of the graph when it has this many per set



def update_index(
    output: str | Path,
    *,
    target_recall: float | None = None,
    recall_k: int | None = None,
    max_memory: str | int | None = None,
    gpu: bool = False,
    recall_queries: int | None = None,
    query_side: int | None = None,
    seed: int = 0,
    **build_args: Any,
) -> dict[str, Any]:
    """Bring the index up to date with the output's live parts (the nightly case): add the parts that are new,
    remove those that vanished, re-measure recall, and say whether a rebuild is due. Without an index, build one.

    A part that vanished (its done-marker is gone, or it was rewritten: another done time) is removed from an IVF
    index (``remove_ids``, positions of the others unchanged); HNSW and flat indexes keep its vectors but every
    search filters them out, and a rebuild is advised once they exceed ``REMOVED_REBUILD_SHARE`` of the index.
    Only the new parts are read to add them; an on-disk index gets a new lists file (the old lists and the new
    vectors merged, never loaded whole). The recall check reuses the recorded held-out queries (less those of
    removed parts) plus a sample of the new vectors.

    Args:
        output: the job's output directory.
        target_recall: recall to re-tune for (default: the recorded target).
        recall_k: the k of that recall (default: the recorded one).
        max_memory: budget to check the grown index against (default: the recorded one).
        gpu: add on the GPU when faiss-gpu is installed (in-memory indexes).
        recall_queries: queries per recall set (default: as many as the build's sets held, so that the recall of
            successive updates is measured on sets of one size; ``RECALL_QUERIES`` for a build).
        query_side: as for ``build_index`` (None: measured again when the build measured it).
        seed: seed of the query sample.
        **build_args: passed to ``build_index`` when there is no index yet.

    Returns:
        The new info dict, with ``added`` (vectors), ``added_parts`` and ``removed_parts`` (names),
        ``rebuild_due`` and ``rebuild_reasons``. Nothing is written when nothing changed.
    """
    out = Path(output)
    folder = index_dir(out)
    if not (folder / INFO).exists():
        log.warning("%s has no index yet: building one", out)
        kwargs = dict(build_args, gpu=gpu, recall_queries=recall_queries or RECALL_QUERIES, seed=seed,
                      query_side=query_side)
        for name, value in (("target_recall", target_recall), ("max_memory", max_memory), ("recall_k", recall_k)):
            if value is not None:
                kwargs[name] = value
        info = build_index(out, **kwargs)
        return {**info, "added": info["live"], "added_parts": [p["name"] for p in info["parts"]],
                "removed_parts": [], "built": True}
    if build_args:
        raise PipelineError(f"update_index: unknown arguments {sorted(build_args)}")
    with locked(folder / ".lock"):
        if recall_queries is None:
            held = read_info(out).get("recall_queries") or {}
            recall_queries = int(held.get("asked") or max(held.get("tune", 0), held.get("report", 0))
                                 or RECALL_QUERIES)
        return _update(out, target_recall, recall_k, max_memory, gpu, recall_queries, query_side, seed)


def _update(out: Path, target_recall: float | None, recall_k: int | None, max_memory: str | int | None, gpu: bool,
            nq: int, query_side: int | None, seed: int) -> dict[str, Any]:
    import faiss

    folder = index_dir(out)
    t0 = time.perf_counter()
    info = read_info(out)
    collect_garbage(folder, set(info.get("files", {}).values()))
    live = vec.complete_parts(out)
    live_keys = {(p.name, p.finished_at) for p in live}
    vanished = [e for e in info["parts"] if (e["name"], e["finished_at"]) not in live_keys]
    kept = [e for e in info["parts"] if (e["name"], e["finished_at"]) in live_keys]
    kept_keys = {(e["name"], e["finished_at"]) for e in kept}
    new = [p for p in live if (p.name, p.finished_at) not in kept_keys]
    tuning = info["tuning"]
    target = tuning["target"] if target_recall is None else target_recall
    k_tuned = int(tuning.get("k", 10)) if recall_k is None else recall_k
    if new and new[0].dims != info["dims"]:
        raise PipelineError(f"new parts have {new[0].dims} dims, the index {info['dims']}: rebuild the index")
    if not new and not vanished:
        reasons = _still_due(info, _rebuild_reasons(info, None, info["live"], True))
        log.info("%s: index up to date (%d parts)", out, len(kept))
        return {**info, "added": 0, "added_parts": [], "removed_parts": [], "rebuild_due": bool(reasons),
                "rebuild_reasons": reasons}
    index, _ = load_index(out, info)
    ivf = faiss.try_extract_index_ivf(index)
    graph = is_graph(index)
    res, gpu_note = gpu_resources(gpu)
    budget = parse_size(max_memory if max_memory is not None else info["choice"]["max_memory_bytes"])
    first = int(info["positions"])
    new_starts = (first + vec.offsets(new)[:-1]).tolist()
    positions = first + sum(p.rows for p in new)
    now = time.time()
    removed = info.get("removed", []) + [{**e, "removed_at": now, "applied": ivf is not None} for e in vanished]
    gone = Filter(ranges_of(vanished), positions)
    by_key = {(p.name, p.finished_at): p for p in live}
    kept_parts = [by_key[(e["name"], e["finished_at"])] for e in kept]
    parts_now = kept_parts + new
    starts_now = [e["start"] for e in kept] + new_starts
    n_live = sum(p.rows for p in parts_now)
    rng = np.random.default_rng(seed + len(info.get("updates", [])) + 1)
    tune, report, held_out, kind, new_err = _update_queries(out, info, new, new_starts, gone, nq, rng, index, graph,
                                                            explicit_ids(index))
    t_add = time.perf_counter()
    lists_tmp = None
    gen = new_generation()
    d = info["dims"]
    if info.get("on_disk") or on_disk_lists(index) is not None:
        lists_tmp = folder / f".tmp-{gen}-lists.ivfdata"
        resident = int(info["choice"].get("index_bytes", 0)) - int(info["choice"].get("list_entry_bytes", 0)) * int(
            info["live"])
        batch = _batch_rows(budget, max(resident, 0), d, True)
        run_rows = _run_rows(budget, max(resident, 0), int(info["choice"].get("list_entry_bytes", 1)), d, True)
        scratch = _empty_copy(out, info)
        runs, added = add_runs(scratch, new, new_starts, batch, run_rows,
                               lambda r: folder / f".tmp-{gen}-run-{r}.faiss")
        old_lists = faiss.extract_index_ivf(index).invlists
        merge_on_disk(index, [old_lists, *runs], lists_tmp, drop=gone if gone else None)
        for r in runs:
            r.unlink(missing_ok=True)
    else:
        if ivf is not None and gone:
            index.remove_ids(_members(gone))
        batch = _batch_rows(budget, int(info.get("size_bytes", 0)), d)
        gpu_index = to_gpu(index, res) if not graph else None
        added = add_parts(index, new, new_starts, batch, gpu_index=gpu_index,
                          skip=np.sort(held_out) if held_out is not None and len(held_out) else None)
        if gpu_index is not None:
            index = faiss.index_gpu_to_cpu(gpu_index)
    add_seconds = time.perf_counter() - t_add
    unapplied = [e for e in removed if not e.get("applied")]
    filt = Filter(ranges_of(unapplied), positions)
    recall = recall_block(index, parts_now, starts_now, tune, report, info["metric"], tuning["param"], target, k_tuned,
                          filt=filt, live=n_live, absent=held_out if held_out is not None and len(held_out) else None,
                          batch_rows=_scan_rows(budget, d))
    if held_out is not None and len(held_out):
        for qs in (tune, report):
            mask = np.isin(qs.positions, held_out)
            if mask.any():
                index.add_with_ids(np.ascontiguousarray(qs.vectors[mask]), qs.positions[mask])
        added += len(held_out)
    recall["recall_queries"].update(kind=kind, asked=nq)
    choice = IndexChoice(**{k: v for k, v in info["choice"].items() if k in IndexChoice.__dataclass_fields__})
    _warn_not_reached(recall, choice)
    reasons = _still_due(info, _rebuild_reasons({**info, "removed": removed}, new_err, n_live,
                                                 recall["tuning"]["reached"]))
    if info["choice"].get("automatic"):
        try:
            now_choice = choose_index(n_live, d, budget, lists=info["choice"].get("lists", "auto") or "auto")
            if family(now_choice.factory) != family(info["factory"]) or now_choice.on_disk != bool(info.get("on_disk")):
                where = " with lists on disk" if now_choice.on_disk else ""
                reasons.append(f"the automatic choice for {n_live:,} vectors is now {now_choice.factory}{where}")
        except PipelineError as exc:
            reasons.append(str(exc))
    grown = info["size_bytes"] * n_live / max(int(info["live"]), 1)
    resident_now = grown if not info.get("on_disk") else 0
    if resident_now > budget:
        reasons.append(f"the index (about {format_size(grown)}) no longer fits --max-memory {format_size(budget)}")
    previous_ids = folder / info["files"]["ids"]
    update = {"at": now, "parts": [p.name for p in new], "removed_parts": [e["name"] for e in vanished],
              "added": int(added), "removed": int(gone.count), "live": n_live, "ntotal": int(index.ntotal),
              "add_seconds": round(add_seconds, 3), "recall@10": recall["recall@10"],
              "recall@100": recall["recall@100"], "assignment_error": new_err}
    new_info = {
        **info,
        **recall,
        "version": INFO_VERSION,
        "generation": gen,
        "ntotal": int(index.ntotal),
        "live": n_live,
        "positions": positions,
        "parts": kept + _part_entries(new, new_starts),
        "removed": removed,
        "updates": info.get("updates", []) + [update],
        "rebuild_due": bool(reasons),
        "rebuild_reasons": reasons,
        "gpu_note": gpu_note or info.get("gpu_note", ""),
    }
    measured_before = isinstance(info.get("query_side"), dict) and "recall@10" in info["query_side"]
    side = query_side if query_side is not None else (None if measured_before else 0)
    new_info["query_side"] = _query_side(out, index, parts_now, starts_now, info["metric"], recall, side, filt,
                                         seed) if side != 0 else info.get("query_side")
    new_info = _commit(out, index, new_info, new, previous_ids, tune, report, t0, "update_seconds",
                       lists_tmp=lists_tmp)
    for reason in reasons:
        log.warning("rebuild due: %s", reason)
    return {**new_info, "added": int(added), "added_parts": [p.name for p in new],
            "removed_parts": [e["name"] for e in vanished]}


def _empty_copy(out: Path, info: dict[str, Any]):
    """An empty in-memory copy of the current (on-disk) IVF index: its quantizer and codec, empty lists."""
    import faiss

    with quiet_stdout():
        copy = faiss.read_index(str(index_dir(out) / info["files"]["index"]),
                                faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    ivf = faiss.extract_index_ivf(copy)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.ntotal = copy.ntotal = 0
    return copy


def _members(filt: Filter):
    """A selector of the positions ``filt`` leaves out (for ``remove_ids``)."""
    import faiss

    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in filt.ranges])
    return faiss.IDSelectorBatch(ids)


def _stored_queries(out: Path, info: dict[str, Any]) -> tuple[QuerySet, QuerySet]:
    data = np.load(index_dir(out) / info["files"]["queries"])
    if "tune_positions" in data:
        return (QuerySet(data["tune_vectors"], data["tune_positions"]),
                QuerySet(data["report_vectors"], data["report_positions"]))
    pos, x = data["positions"], data["vectors"]  # version 1: one set
    half = (len(pos) + 1) // 2
    return QuerySet(x[:half], pos[:half]), QuerySet(x[half:], pos[half:])


def _update_queries(out: Path, info: dict[str, Any], new: Sequence[Part], new_starts: Sequence[int], gone: Filter,
                    nq: int, rng: np.random.Generator, index, graph: bool, with_ids: bool
                    ) -> tuple[QuerySet, QuerySet, np.ndarray | None, str, float | None]:
    """Recall queries after an update: the recorded ones (less those of removed parts) kept in proportion to the
    old share of the corpus, plus a sample of the new vectors (read from the new parts only); for a graph index
    with ids, new vectors held out of the graph until measured. Also the new vectors' assignment error."""
    old_t, old_r = _stored_queries(out, info)
    olds = []
    for qs in (old_t, old_r):
        keep = ~gone.removed(qs.positions)
        olds.append(QuerySet(qs.vectors[keep], qs.positions[keep]))
    n_new = sum(p.rows for p in new)
    n_old = int(info["live"]) - gone.count
    total = max(n_old + n_new, 1)
    hold = graph and with_ids
    if hold:
        per_set = min(nq, n_new // 2)
        if per_set < min(nq, GRAPH_MIN_HELD_OUT):
            hold = False
    if not hold:
        per_set = min(n_new // 2 if n_new > 1 else n_new, max(1, round(nq * n_new / total))) if n_new else 0
    drift_n = min(n_new, max(2 * per_set, 2000))
    drift_local = np.sort(rng.choice(n_new, drift_n, replace=False)) if drift_n else np.empty(0, dtype=np.int64)
    drift_vec = vec.read_rows(new, drift_local) if drift_n else np.empty((0, info["dims"]), dtype=np.float32)
    pick = rng.permutation(drift_n)[: 2 * per_set] if drift_n else np.empty(0, dtype=np.int64)
    new_pos = _to_positions(new, new_starts, drift_local[pick]) if len(pick) else np.empty(0, dtype=np.int64)
    new_vec = drift_vec[pick]
    sets = []
    for i, old in enumerate(olds):
        mine = slice(i * per_set, (i + 1) * per_set)
        take_old = 0 if hold else min(len(old), max(nq - per_set, 0))
        keep = np.sort(rng.choice(len(old), take_old, replace=False)) if take_old else np.empty(0, dtype=np.int64)
        sets.append(QuerySet(np.ascontiguousarray(np.concatenate([old.vectors[keep], new_vec[mine]]),
                                                  dtype=np.float32),
                             np.concatenate([old.positions[keep], new_pos[mine]]).astype(np.int64)))
    held_out = np.sort(new_pos) if hold else None
    if hold:
        kind = (f"{2 * per_set} new corpus vectors sampled at random, two disjoint sets, held out of the graph "
                "while measured and added after")
    elif graph:
        kind = (f"recorded corpus queries (in the graph: their own entry left out of the results, which a graph "
                f"does not make equal to their absence) plus {2 * per_set} new vectors")
    else:
        kind = (f"recorded corpus queries plus {2 * per_set} new corpus vectors, two disjoint sets; each query's "
                "own entry is left out of the results, which for this index type equals its absence")
    return sets[0], sets[1], held_out, kind, assignment_error(index, drift_vec)


# What each reason of ``_rebuild_reasons`` says, by a phrase only it has.
REASON_KINDS = ("of removed parts", "lists were trained", "has drifted", "no longer reaches")


def _still_due(info: dict[str, Any], reasons: list[str]) -> list[str]:
    """The reasons for a rebuild found now, and those an earlier update found of kinds not found now: a rebuild
    once due stays due until it is made (a night that skipped or failed it, or one that adds nothing, must not
    drop it), and a reason found again replaces its older wording (its figures change from night to night)."""
    def kind(reason: str) -> str:
        return next((k for k in REASON_KINDS if k in reason), reason)

    now = {kind(r) for r in reasons}
    return [r for r in info.get("rebuild_reasons") or [] if kind(r) not in now] + reasons


def _rebuild_reasons(info: dict[str, Any], new_err: float | None, live: int, reached: bool) -> list[str]:
    reasons = []
    filtered = sum(int(e["rows"]) for e in info.get("removed", []) if not e.get("applied"))
    if filtered and filtered > REMOVED_REBUILD_SHARE * (live + filtered):
        reasons.append(f"{filtered:,} vectors of removed parts ({filtered / (live + filtered):.0%} of the index) are "
                       f"still in this {family(info['factory'])} index, filtered out of every search; a rebuild "
                       "drops them")
    trained = info.get("trained", {})
    nlist = trained.get("nlist")
    if nlist and live > GROWTH_RATIO * trained.get("for_vectors", live):
        reasons.append(f"{live:,} vectors now, {trained['for_vectors']:,} when the {nlist} lists were trained "
                       f"(now {ivf_lists(live)} lists would be chosen)")
    old_err = trained.get("assignment_error")
    if new_err is not None and old_err and new_err > DRIFT_RATIO * old_err:
        reasons.append(f"new vectors lie {new_err / old_err:.2f}x farther from their centroids than the training "
                       "sample: the data has drifted from what the index was trained on")
    if not reached and info["tuning"].get("reached", True):
        reasons.append(f"recall@{info['tuning'].get('k', 10)} no longer reaches the target {info['tuning']['target']}")
    return reasons


