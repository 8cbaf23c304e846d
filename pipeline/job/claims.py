"""Claims: workers on a shared filesystem take shards one at a time, with a lease kept alive by a heartbeat.

A claim is ``OUTPUT/shards/NNNNNN.claim`` (JSON naming the worker); its modification time is the heartbeat.
Taking a shard happens under an exclusive ``flock`` on ``OUTPUT/.claims.lock``, so two workers never take
the same shard at once; a claim whose heartbeat is older than the lease belongs to a dead or stuck worker and
may be taken over. A worker checks that it still owns its claim before it commits a shard, so a worker that
stalled past its lease drops its result instead of committing it. Because every shard has exactly one part
file (written by rename), even a commit race leaves every id exactly once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from pipeline.job.manifest import Shard
from pipeline.job.ranks import worker_name
from pipeline.job.sink import is_done
from pipeline.util import locked, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_LEASE = 300.0


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

    def path(self, shard: Shard) -> Path:
        return self.folder / f"{shard.name}.claim"

    def _done(self, shard: Shard) -> bool:
        return is_done(self.out, shard)

    def _owner(self, shard: Shard) -> tuple[str | None, float]:
        """(worker, seconds since its last heartbeat) of a claim; (None, inf) when there is none."""
        return self._read(self.path(shard))

    @staticmethod
    def _read(path: Path) -> tuple[str | None, float]:
        try:
            age = time.time() - path.stat().st_mtime
            return json.loads(path.read_text()).get("worker"), age
        except (OSError, ValueError):
            return None, float("inf")

    def try_claim(self, shard: Shard) -> bool:
        """Take ``shard`` if it is not done and nobody else holds a live claim on it."""
        with locked(self.out / ".claims.lock"):
            if self._done(shard):
                return False
            owner, age = self._owner(shard)
            if owner is not None and owner != self.worker and age <= self.lease:
                return False
            if owner is not None and owner != self.worker:
                log.warning("shard %d: taking over the claim of %s (no heartbeat for %.0fs)", shard.id, owner, age)
            now = time.time()
            write_json_atomic(self.path(shard), {"shard": shard.id, "worker": self.worker, "claimed_at": now})
        with self._lock:
            self.held.add(shard.id)
            self.claimed_at[shard.id] = now
        return True

    def progress(self, shard: Shard, rows: int) -> None:
        """Count ``rows`` more documents of ``shard`` done; the next heartbeat writes them into the claim."""
        with self._lock:
            self.rows_done[shard.id] = self.rows_done.get(shard.id, 0) + rows

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
            lost = []
            with locked(self.out / ".claims.lock"):  # no take-over between the check and the touch
                for sid in held:
                    path = self.folder / f"{sid:06d}.claim"
                    if self._read(path)[0] != self.worker:
                        lost.append(sid)
                        continue
                    try:  # the claim's mtime is the heartbeat; its body carries the shard's progress
                        write_json_atomic(path, {"shard": sid, "worker": self.worker, "rows_done": rows.get(sid, 0),
                                                 "claimed_at": since.get(sid), "beat_at": time.time()})
                    except OSError:
                        lost.append(sid)
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
