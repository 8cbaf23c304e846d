"""Claims: workers on a shared filesystem take shards one at a time, with a lease kept alive by a heartbeat.

A claim is ``OUTPUT/shards/NNNNNN.claim`` (JSON naming the worker); its modification time is the heartbeat.
Taking a shard happens under an exclusive ``flock`` on ``OUTPUT/.claims.lock``, so two workers never take
the same shard at once; a claim whose heartbeat is older than the lease belongs to a dead or stuck worker and
may be taken over. A worker checks that it still owns its claim before it commits a shard, so a worker that
stalled past its lease drops its result instead of committing it. Because every shard has exactly one part
file (written by rename), even a commit race leaves every id exactly once.

A claim also records its process: host name, boot id, pid namespace, pid and the process's start time. A claim
of a process that is gone from this very machine (same host name, same boot, same pid namespace; the pid is
free, or now belongs to a process started later) is taken over at once, without waiting out the lease: that
is a worker killed with -9 on this host. Anything less certain (another host, a container with the same host
name, no /proc) waits for the lease.

``claimed`` is what a worker takes, in plan order, and ``PlanWatch`` whether the plan it works from is still
open, committed or replaced by another run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.job.manifest import MANIFEST, Manifest, Shard, load_manifest
from pipeline.job.ranks import worker_name
from pipeline.job.sink import done_path, is_done
from pipeline.util import locked, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_LEASE = 300.0


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot, ``/proc/PID/stat`` field 22); None if it is gone
    (or a zombie: dead, not yet reaped by its parent)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the fields after "pid (comm)": state (field 3) ... starttime (22)
    return None if fields[0] in ("Z", "X") else fields[19]


def process_identity() -> dict[str, Any]:
    """What tells this process apart on this machine: host, boot id, pid namespace, pid, start time (Linux)."""
    return dict(_identity(os.getpid()))  # keyed by pid: a forked child is another process


@functools.cache
def _identity(pid: int) -> dict[str, Any]:
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns, "pid": pid, "started": _start_ticks(pid)}


def process_is_gone(claim: dict[str, Any]) -> bool:
    """Whether the process that wrote ``claim`` certainly no longer runs: it ran on this machine (host name, boot
    and pid namespace all match this process's) and its pid is free or belongs to a process started since."""
    me = process_identity()
    if None in (me["boot_id"], me["pid_ns"], me["started"]):
        return False  # no /proc: nothing is certain
    if any(claim.get(k) != me[k] for k in ("host", "boot_id", "pid_ns")) or not claim.get("started"):
        return False
    pid = claim.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    return _start_ticks(pid) != claim["started"]


class Claims:
    """The claims one worker holds on an output directory.

    Args:
        out: the output directory.
        lease_seconds: a claim older than this (no heartbeat) may be taken over.
        worker: this worker's name (default ``worker_name()``).
    """

    def __init__(self, out: Path, lease_seconds: float = DEFAULT_LEASE, worker: str | None = None) -> None:
        self.out = Path(out)
        self.folder = self.out / "shards"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lease = float(lease_seconds)
        self.worker = worker or worker_name()
        self.held: set[int] = set()
        self.rows_done: dict[int, int] = {}  # documents of each held shard embedded so far (for status)
        self.claimed_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waited_for: set[frozenset[str]] = set()

    def path(self, shard: Shard) -> Path:
        return self.folder / f"{shard.name}.claim"

    def _done(self, shard: Shard) -> bool:
        return is_done(self.out, shard)

    def _owner(self, shard: Shard) -> tuple[str | None, float]:
        """(worker, seconds since its last heartbeat) of a claim; (None, inf) when there is none."""
        return self._read(self.path(shard))

    @staticmethod
    def _read(path: Path) -> tuple[str | None, float]:
        data, age = Claims._read_claim(path)
        return data.get("worker"), age

    @staticmethod
    def _read_claim(path: Path) -> tuple[dict[str, Any], float]:
        """(the claim's content, seconds since its last heartbeat); ({}, inf) when there is none."""
        try:
            age = time.time() - path.stat().st_mtime
            data = json.loads(path.read_text())
            return (data if isinstance(data, dict) else {}), age
        except (OSError, ValueError):
            return {}, float("inf")

    def try_claim(self, shard: Shard) -> bool:
        """Take ``shard`` if it is not done and nobody else holds a live claim on it."""
        with locked(self.out / ".claims.lock"):
            if self._done(shard):
                return False
            claim, age = self._read_claim(self.path(shard))
            owner = claim.get("worker")
            if owner is not None and owner != self.worker:
                if process_is_gone(claim):
                    log.warning("shard %d: taking over the claim of %s (its process %s on this host is gone)",
                                shard.id, owner, claim.get("pid"))
                elif age <= max(self.lease, float(claim.get("lease") or 0)):  # the holder's lease, if longer
                    return False
                else:
                    log.warning("shard %d: taking over the claim of %s (no heartbeat for %.0fs)", shard.id, owner,
                                age)
            now = time.time()
            write_json_atomic(self.path(shard), {"shard": shard.id, "worker": self.worker, "claimed_at": now,
                                                 "lease": self.lease, **process_identity()})
        with self._lock:
            self.held.add(shard.id)
            self.claimed_at[shard.id] = now
        return True

    def progress(self, shard: Shard, rows: int) -> None:
        """Count ``rows`` more documents of ``shard`` done; the next heartbeat writes them into the claim."""
        with self._lock:
            self.rows_done[shard.id] = self.rows_done.get(shard.id, 0) + rows

    def note_waiting(self, shards: list[Shard]) -> None:
        """Say which shards are held by which live workers and when their leases run out, while this worker has
        nothing left to do but wait for them: at WARNING once per set of workers waited for, else at INFO."""
        by_worker: dict[str, list[int]] = {}
        lease_left: dict[str, float] = {}
        for shard in shards:
            claim, age = self._read_claim(self.path(shard))
            owner = claim.get("worker")
            if owner is None or owner == self.worker:
                continue
            by_worker.setdefault(owner, []).append(shard.id)
            lease_left[owner] = min(lease_left.get(owner, float("inf")), max(0.0, self.lease - age))
        if not by_worker:
            return
        what = "; ".join(f"shards {', '.join(map(str, ids[:10]))}{' ...' if len(ids) > 10 else ''} held by "
                         f"{w} (taken over in {lease_left[w]:.0f}s unless its heartbeat goes on)"
                         for w, ids in sorted(by_worker.items()))
        key = frozenset(by_worker)
        with self._lock:
            busy = bool(self.held)  # its own shards are still in flight: that is not waiting
        if busy or key in self._waited_for:
            log.info("waiting for other workers: %s", what)
            return
        self._waited_for.add(key)
        log.warning("waiting for other workers to finish their shards: %s", what)

    def owns(self, shard: Shard) -> bool:
        owner, _ = self._owner(shard)
        return owner == self.worker

    def forget(self, shard: Shard) -> None:
        """Stop holding (and heartbeating) a claim that another worker has taken over; its file is theirs."""
        with self._lock:
            self.held.discard(shard.id)

    def release(self, shard: Shard) -> None:
        """Give up a claim (after the shard's done-marker, or to leave it to others)."""
        with self._lock:
            self.held.discard(shard.id)
            self.rows_done.pop(shard.id, None)
            self.claimed_at.pop(shard.id, None)
        with locked(self.out / ".claims.lock"):
            if self.owns(shard):
                self.path(shard).unlink(missing_ok=True)

    def drop_committed(self, shards: list[Shard]) -> int:
        """Remove the claims of a committed plan's shards: a worker killed between a shard's done-marker and its
        release leaves one, and nothing else would ever remove it. Returns how many were removed."""
        ids = {s.id for s in shards}
        removed = 0
        with locked(self.out / ".claims.lock"):
            for path in self.folder.glob("*.claim"):  # a few: one per shard in flight or left behind
                head = path.name.split(".")[0]
                if head.isdigit() and int(head) in ids and done_path(self.out, int(head)).exists():
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("removed %d claims of done shards (left by workers killed after their done-marker)", removed)
        return removed

    def busy_elsewhere(self, shards: list[Shard]) -> list[Shard]:
        """Shards not done whose claims are live and not ours (others are working on them)."""
        out = []
        for shard in shards:
            if self._done(shard):
                continue
            owner, age = self._owner(shard)
            if owner is not None and owner != self.worker and age <= self.lease:
                out.append(shard)
        return out

    # ------------------------------------------------------------------------------------------ heartbeat

    def _beat(self) -> None:
        """Refresh the claims this worker still owns. A claim taken over by another worker (this one stalled
        past its lease) is dropped, never refreshed: refreshing it would keep the new owner's claim alive in
        this worker's name, and nobody would take the shard over if the new owner died."""
        while not self._stop.wait(min(15.0, max(0.5, self.lease / 5))):
            with self._lock:
                held = list(self.held)
                rows = dict(self.rows_done)
                since = dict(self.claimed_at)
            if not held:
                continue
            lost, gone = [], []
            with locked(self.out / ".claims.lock"):  # no take-over between the check and the touch
                for sid in held:
                    path = self.folder / f"{sid:06d}.claim"
                    owner = self._read(path)[0]
                    if owner is None and done_path(self.out, sid).exists():
                        gone.append(sid)  # done, and its claim removed after the commit (drop_committed)
                        continue
                    if owner != self.worker:
                        lost.append(sid)
                        continue
                    try:  # the claim's mtime is the heartbeat; its body carries the shard's progress
                        write_json_atomic(path, {"shard": sid, "worker": self.worker, "claimed_at": since.get(sid),
                                                 "rows_done": rows.get(sid, 0), "beat_at": time.time(),
                                                 "lease": self.lease, **process_identity()})
                    except OSError:
                        lost.append(sid)
            with self._lock:
                self.held.difference_update(gone)
            for sid in lost:
                if sid in self.held:  # a shard committed meanwhile is released, not lost
                    log.warning("shard %d: the claim was taken over by another worker; leaving the shard to it", sid)
                    with self._lock:
                        self.held.discard(sid)

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for sid in list(self.held):
            self.release(Shard(sid, 0, 0, 0))


# --------------------------------------------------------------------------------------------- taking shards

# Longest pause between a waiting worker's looks for free shards (measured: at 5 s, the worker that finished
# first exited 2.6 s after the job's commit, on two H200s).
WAIT_MAX = 1.0


def _ready(manifest: Manifest, shard: Shard, done) -> bool:
    """A dup shard waits until every embed shard is ``done`` (the texts it copies can be in any of them)."""
    if shard.kind != "dup":
        return True
    return all(done(s) for s in manifest.shards if s.kind == "embed")


class PlanWatch:
    """Whether the plan a worker works from is still open, committed (by any worker), or replaced by another
    run; ``manifest.json`` is parsed again only when its file changed (a waiting worker looks every second)."""

    def __init__(self, out: Path, manifest: Manifest) -> None:
        self.path = out / MANIFEST
        self.plan_id = manifest.plan_id
        self._key: tuple[int, ...] | None = None
        self._state = "open"

    def state(self) -> str:
        """``open``, ``committed`` or ``replaced``."""
        try:
            st = self.path.stat()
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            return "replaced"
        if key != self._key:
            current = load_manifest(self.path.parent)
            self._state = ("replaced" if current is None or current.plan_id != self.plan_id else
                           "committed" if current.committed else "open")
            self._key = key
        return self._state


def claimed(manifest: Manifest, claims: Claims, halt: threading.Event, stop: threading.Event | None
             ) -> Iterator[Shard]:
    """Shards this worker claims, in plan order, until none is left; waits while others hold live claims
    (a dead worker's claims go stale after the lease and are taken over). Ends once ``halt`` or ``stop`` is set,
    once the plan is committed (by any worker: shards with no document leave no part behind, so they look
    pending again), or when another run replaced the plan."""
    out = claims.out
    plan = PlanWatch(out, manifest)
    seen_done: set[int] = set()

    def done(shard: Shard) -> bool:
        # A done-marker is final within a plan: each look reads only those not seen yet, so a worker waiting at
        # the end of a job looks at a handful of files, not at every shard's.
        if shard.id in seen_done:
            return True
        if is_done(out, shard):
            seen_done.add(shard.id)
            return True
        return False

    def ended() -> bool:
        return halt.is_set() or (stop is not None and stop.is_set())

    pause = 0.25  # between looks at others' claims: short at first (a peer finishing its last shard), then
    # up to WAIT_MAX: a worker waiting at the end of a job exits within a second of the last shard (the job's
    # wall time waits for every worker), and each look costs a few file checks
    while not ended():
        state = plan.state()
        if state == "replaced":
            log.warning("%s: the plan was replaced by another run (other input or settings); this worker stops", out)
            return
        if state == "committed":
            return
        for shard in manifest.shards:
            if ended():
                return
            if shard.id in claims.held or done(shard) or not _ready(manifest, shard, done):
                continue
            if plan.state() != "open":  # committed, or replaced: its work tables may be gone already
                break
            if claims.try_claim(shard):
                pause = 0.25
                yield shard
        pending = [s for s in manifest.shards if not done(s)]
        if not pending:
            return
        left = [s for s in pending if s.id not in claims.held]
        if not left:
            # Only this worker's own shards are in flight. Keep watching until they are committed: one whose
            # result is dropped (its claim was taken over while this worker stalled) is back in play.
            halt.wait(0.2)
            continue
        claims.note_waiting(left)  # which shards, which workers, when their leases run out (WARNING once)
        pause = min(2 * pause, WAIT_MAX, claims.lease / 10)
        halt.wait(pause)
