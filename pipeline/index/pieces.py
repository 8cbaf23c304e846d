"""Builds in pieces: one training, N processes (Slurm array tasks, or ``--workers`` locally) each adding a disjoint
run of vector parts to its own piece files, and a merge.

A build in pieces lives in ``OUTPUT/index/build-KEY/``, where KEY hashes the build's options and the finished parts
(names, rows, done times), so every process of one build finds the same folder and a build over other parts or
options never mixes with it::

    plan.json               the choice, the parts with their first positions, the pieces' runs of parts, the
                            training record; written last by the training step (its presence = trained)
    trained.faiss           the trained, empty index
    queries.npz             the held-out recall queries (tune and report sets)
    piece-K-run-R.faiss     piece K's vectors, in runs of bounded size (each written to a temporary name first)
    piece-K.json            piece K is complete (its runs, rows, seconds, peak memory); written last
    .train.lock             the first piece process trains; the others wait on this lock, then reuse it

A killed piece leaves no ``piece-K.json``: rerunning that piece alone (or the local build, which runs only the
missing pieces) redoes it; the merge refuses to start until every piece is complete and names the missing ones.
The merge runs under the index lock, commits a new generation and removes the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.index.build import add_runs, write_atomic
from pipeline.index.files import index_dir
from pipeline.index.vectors import Part
from pipeline.util import locked, write_json_atomic

log = logging.getLogger(__name__)

PLAN = "plan.json"
TRAINED = "trained.faiss"
QUERIES = "queries.npz"
PREFIX = "build-"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``: anonymous memory plus mapped file pages), 0 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan_key(options: dict[str, Any], parts: Sequence[Part]) -> str:
    """A short hash of the build's options and of the parts (name, rows, done time) it indexes."""
    blob = json.dumps({"options": options, "parts": [(p.name, p.rows, p.finished_at) for p in parts]},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def plan_dir(output: str | Path, key: str) -> Path:
    return index_dir(output) / f"{PREFIX}{key}"


def split_parts(rows: Sequence[int], pieces: int) -> list[tuple[int, int]]:
    """Cut parts (given by their row counts) into exactly ``pieces`` consecutive runs ``[first, end)`` of about equal
    rows; with fewer parts than pieces some runs are empty (their piece adds nothing), so that every task of a
    Slurm array of ``pieces`` has a piece to build."""
    total = sum(rows)
    cum = np.concatenate([[0], np.cumsum(rows)]) if len(rows) else np.zeros(1)
    bounds = [0]
    for k in range(1, pieces):
        # the first part boundary at or after k/pieces of the rows, never before the previous one
        at = int(np.searchsorted(cum, total * k / pieces, side="left"))
        bounds.append(min(max(at, bounds[-1]), len(rows)))
    bounds.append(len(rows))
    return [(bounds[k], bounds[k + 1]) for k in range(pieces)]


@dataclass
class Plan:
    """A build in pieces as recorded in ``plan.json`` (see the module docstring)."""

    folder: Path
    data: dict[str, Any]

    @property
    def pieces(self) -> int:
        return len(self.data["groups"])

    def piece_file(self, k: int) -> Path:
        return self.folder / f"piece-{k}.json"

    def run_file(self, k: int, r: int) -> Path:
        return self.folder / f"piece-{k}-run-{r}.faiss"

    def done(self) -> list[int]:
        return [k for k in range(self.pieces) if self.piece_file(k).exists()]

    def missing(self) -> list[int]:
        return [k for k in range(self.pieces) if not self.piece_file(k).exists()]

    def runs(self) -> list[Path]:
        """Every run of every piece, in position order."""
        out = []
        for k in range(self.pieces):
            record = json.loads(self.piece_file(k).read_text())
            out += [self.folder / name for name in record["runs"]]
        return out

    def piece_records(self) -> list[dict[str, Any]]:
        return [json.loads(self.piece_file(k).read_text()) for k in self.done()]


def load_plan(folder: Path) -> Plan | None:
    path = folder / PLAN
    if not path.exists():
        return None
    return Plan(folder, json.loads(path.read_text()))


def ensure_plan(output: str | Path, key: str, make: Callable[[Path], dict[str, Any]]) -> tuple[Plan, bool]:
    """The plan of build ``key``: read it, or make it (train) under the folder's lock, so that of N processes
    started together one trains and the others wait and reuse its work.

    ``make(folder)`` writes ``trained.faiss`` and ``queries.npz`` into the folder and returns the plan's data.

    Returns:
        ``(plan, whether this call made it)``.
    """
    folder = plan_dir(output, key)
    plan = load_plan(folder)
    if plan is not None:
        return plan, False
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".train.lock"):
        plan = load_plan(folder)
        if plan is not None:
            return plan, False
        remove_other_builds(output, keep=key)
        data = make(folder)
        write_json_atomic(folder / PLAN, {"key": key, "created_at": time.time(), **data})
        return Plan(folder, json.loads((folder / PLAN).read_text())), True


def remove_other_builds(output: str | Path, keep: str | None = None) -> None:
    """Remove the folders of builds in pieces other than ``keep`` (killed or superseded: one build at a time)."""
    folder = index_dir(output)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name != f"{PREFIX}{keep}":
            log.info("removing the unfinished build %s", p.name)
            shutil.rmtree(p, ignore_errors=True)


def run_piece(plan: Plan, parts: Sequence[Part], k: int, *, threads: int = 0) -> dict[str, Any]:
    """Build piece ``k``: add its parts to the trained index in runs of at most ``plan.data["run_rows"]`` vectors,
    write each run, then ``piece-K.json`` (the commit). A rerun starts the piece over.

    Args:
        plan: the build.
        parts: the live parts; those of the plan must all be there (by name and done time).
        k: the piece, 0-based.
        threads: faiss threads (0: faiss's default).

    Returns:
        The piece's record.

    Raises:
        PipelineError: ``k`` out of range, or a part of the plan vanished since it was made.
    """
    import faiss

    if not 0 <= k < plan.pieces:
        raise PipelineError(f"--piece {k}: this build has pieces 0 to {plan.pieces - 1}")
    t0 = time.perf_counter()
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    by_key = {(p.name, p.finished_at): p for p in parts}
    first, end = plan.data["groups"][k]
    entries = plan.data["parts"][first:end]
    mine = []
    for e in entries:
        part = by_key.get((e["name"], e["finished_at"]))
        if part is None:
            raise PipelineError(f"part {e['name']} of this build vanished since it was planned: run `embed-corpus "
                                "index build` again (a new build is planned from the current parts)")
        mine.append(part)
    plan.piece_file(k).unlink(missing_ok=True)
    for old in plan.folder.glob(f"piece-{k}-run-*.faiss"):
        old.unlink()
    index = faiss.read_index(str(plan.folder / TRAINED))
    runs, added = add_runs(index, mine, [e["start"] for e in entries], int(plan.data["batch_rows"]),
                           int(plan.data["run_rows"]), lambda r: plan.run_file(k, r))
    record = {"piece": k, "parts": [first, end], "rows": int(added), "runs": [p.name for p in runs],
              "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes(),
              "host": socket.gethostname(), "pid": os.getpid()}
    write_json_atomic(plan.piece_file(k), record)
    log.info("piece %d/%d: %d vectors from %d parts in %d runs, %.1fs", k + 1, plan.pieces, added, len(mine),
             len(runs), record["seconds"])
    return record


def _piece_worker(output: str, key: str, k: int, threads: int) -> dict[str, Any]:
    """Process pool entry: a piece in a fresh process (its peak memory is its own)."""
    import pipeline.index.vectors as vec

    plan = load_plan(plan_dir(output, key))
    assert plan is not None
    return run_piece(plan, vec.complete_parts(output), k, threads=threads)


def run_missing_pieces(output: str | Path, plan: Plan, parts: Sequence[Part], workers: int) -> list[int]:
    """Build the pieces not built yet: in this process with one worker, else ``workers`` at a time, each in a
    fresh process. Returns the pieces built."""
    todo = plan.missing()
    if not todo:
        return []
    if workers <= 1:
        for k in todo:
            run_piece(plan, parts, k)
        return todo
    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("building %d pieces, %d at a time (%d threads each)", len(todo), workers, threads)
    with get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        results = [pool.apply_async(_piece_worker, (str(output), plan.data["key"], k, threads)) for k in todo]
        for r in results:
            r.get()
    return todo


def check_complete(plan: Plan, output: str | Path) -> None:
    """Raise, naming the missing pieces and how to build them, unless every piece is complete."""
    missing = plan.missing()
    if missing:
        names = ", ".join(str(k) for k in missing)
        raise PipelineError(f"{len(missing)} of {plan.pieces} pieces are not built ({names}): run `embed-corpus "
                            f"index build {output} --pieces {plan.pieces} --piece K` for each (or the same build "
                            "without --piece/--merge, which builds the missing ones here)")


def save_queries(folder: Path, tune: tuple[np.ndarray, np.ndarray], report: tuple[np.ndarray, np.ndarray]) -> None:
    with open(folder / f".{QUERIES}.tmp", "wb") as f:
        np.savez(f, tune_vectors=tune[0], tune_positions=tune[1], report_vectors=report[0],
                 report_positions=report[1])
    os.replace(folder / f".{QUERIES}.tmp", folder / QUERIES)


def load_queries(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    data = np.load(folder / QUERIES)
    return ((data["tune_vectors"], data["tune_positions"]), (data["report_vectors"], data["report_positions"]))


def save_trained(folder: Path, index) -> None:
    write_atomic(index, folder / TRAINED)
