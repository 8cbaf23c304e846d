"""Status of an output directory: the live version, and the plan at work (shards, documents, throughput, ETA).

Progress counts finished shards (their done-markers) and the documents of shards in flight (their claims'
heartbeats carry them), so throughput and ETA are known from the first minute of a run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.job import versions
from pipeline.job.claims import process_is_gone
from pipeline.job.manifest import load_manifest
from pipeline.job.sink import is_done, read_markers

IDLE_AFTER = 300  # seconds without a live claim or a finished shard after which a plan counts as stopped


@dataclass
class Status:
    output: str
    shards_total: int
    shards_done: int
    shards_failed: int
    shards_pending: int
    docs_total: int
    docs_done: int
    tokens_done: int
    docs_per_s: float
    tokens_per_s: float
    eta_seconds: float | None
    rejected_rows: int
    failures: dict[int, str] = field(default_factory=dict)
    version: int = 0  # the live version (0: none yet)
    version_docs: int = 0  # documents in the live version
    plan_target: int = 0  # the version the plan makes
    plan_committed: bool = False
    docs_in_flight: int = 0  # documents done in shards not finished yet
    counts: dict[str, int] = field(default_factory=dict)  # what the plan changes
    versions_kept: list[int] = field(default_factory=list)
    idle_seconds: float | None = None  # no worker holds a shard and none finished one for this long (None: busy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        eta = "-" if self.eta_seconds is None else _duration(self.eta_seconds)
        live = f"version {self.version}, {self.version_docs:,} documents" if self.version else "none yet"
        state = "committed" if self.plan_committed else f"in progress (makes version {self.plan_target})"
        if self.idle_seconds is not None:
            state = (f"stopped (makes version {self.plan_target}): no worker has held a shard for "
                     f"{_duration(self.idle_seconds)}; a run that failed or was stopped: rerun it to finish")
        c = self.counts
        changes = (f"{c.get('added', 0):,} added, {c.get('changed', 0):,} changed, {c.get('deleted', 0):,} deleted, "
                   f"{c.get('unchanged', 0):,} unchanged; texts: {c.get('embedded', 0):,} to embed, "
                   f"{c.get('reused', 0):,} reused, {c.get('deduplicated', 0):,} deduplicated") if c else "-"
        out = [
            f"output     {self.output}",
            f"live       {live}",
            f"run        {state}: {changes}",
            f"shards     {self.shards_done} done, {self.shards_pending} pending, {self.shards_failed} failed "
            f"(of {self.shards_total})",
            f"documents  {self.docs_done:,} of {self.docs_total:,} written"
            + (f" ({self.docs_in_flight:,} in shards in flight)" if self.docs_in_flight else "")
            + (f", {self.rejected_rows:,} rows rejected" if self.rejected_rows else ""),
            f"tokens     {self.tokens_done:,}",
            f"throughput {self.docs_per_s:,.1f} docs/s, {self.tokens_per_s:,.0f} tokens/s",
            f"eta        {eta}",
        ]
        out += [f"failed     shard {sid}: {err}" for sid, err in sorted(self.failures.items())]
        return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _claims(out: Path, ids: set[int]) -> list[dict[str, Any]]:
    folder = out / "shards"
    found = []
    for path in folder.glob("*.claim") if folder.is_dir() else []:
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if int(body.get("shard", -1)) in ids:
            body["age"] = time.time() - path.stat().st_mtime
            found.append(body)
    return found


def job_status(output: str | Path) -> Status:
    """Read the manifest, the shard markers and claims, and the live version of ``output``.

    Throughput is measured from the start of the first shard of the plan to now (or to the last finished shard
    once none is in flight), so several workers add up; the ETA divides the documents left by it.
    """
    out = Path(output)
    manifest = load_manifest(out)
    if manifest is None:
        raise PipelineError(f"{out}: no manifest.json here; is this an embed-corpus output directory?")
    done, failed = read_markers(out)
    ids = {s.id for s in manifest.shards}
    # after the commit, parts that hold no document (all their rows copied elsewhere) are collected: the marker counts
    done = {s.id: done[s.id] for s in manifest.shards if s.id in done and (manifest.committed or is_done(out, s))}
    failed = {k: v for k, v in failed.items() if k in ids and k not in done}
    # in flight: a heartbeat within the claim's lease (its worker's --lease-seconds; 300 s in older claims), from a
    # process that may still run (one of this machine that is gone is not in flight, whatever its last heartbeat)
    claims, dead = [], []  # claims of processes that may still run; last beats of those certainly gone
    for c in _claims(out, ids):
        if process_is_gone(c):
            dead.append(time.time() - c["age"])
        else:
            claims.append(c)
    flying = [c for c in claims if int(c.get("shard", -1)) not in done
              and c.get("age", 1e9) <= float(c.get("lease") or 300)]
    in_flight = sum(int(c.get("rows_done", 0)) for c in flying)
    docs_done = sum(int(m.get("rows", 0)) for m in done.values()) + in_flight
    tokens_done = sum(int(m.get("tokens", 0)) for m in done.values())
    docs_total = manifest.total_rows
    starts = [m["finished_at"] - m.get("seconds", 0) for m in done.values()]
    starts += [float(c["claimed_at"]) for c in flying if c.get("claimed_at")]
    ends = [m["finished_at"] for m in done.values()]
    span = 0.0
    if starts:
        end = time.time() if flying else max(ends) if ends else time.time()
        span = end - min(starts)
    docs_rate = docs_done / span if span > 0 else 0.0
    pending_docs = max(0, docs_total - docs_done)
    # no claim alive, and nothing finished or claimed for a lease or last done by a process of this machine that
    # is gone: no worker is at it (a run that failed on bad input, was killed or stopped); within a lease it may be
    # starting (loading its model) or between two shards
    lease = max([float(c.get("lease") or IDLE_AFTER) for c in claims] or [IDLE_AFTER])
    last = max([manifest.created_at, *ends, *(time.time() - c["age"] for c in claims)])
    idle = time.time() - last
    stopped = idle > lease or (dead and max(dead) >= last)
    idle_seconds = idle if not manifest.committed and not flying and pending_docs and stopped else None
    live = versions.live_version(out)
    info = versions.version_info(out, live) if live else {}
    kept = sorted(int(p.name) for p in (out / versions.VERSIONS).glob("[0-9]*")) \
        if (out / versions.VERSIONS).is_dir() else []
    return Status(
        output=str(out),
        shards_total=len(manifest.shards),
        shards_done=len(done),
        shards_failed=len(failed),
        shards_pending=len(manifest.shards) - len(done),
        docs_total=docs_total,
        docs_done=docs_done,
        tokens_done=tokens_done,
        docs_per_s=docs_rate,
        tokens_per_s=tokens_done / span if span > 0 else 0.0,
        eta_seconds=0.0 if not pending_docs else (pending_docs / docs_rate if docs_rate > 0 and idle_seconds is None
                                                  else None),
        rejected_rows=sum(pf.rejected for pf in manifest.files),
        failures={k: str(v.get("error", "")) for k, v in failed.items()},
        version=live,
        version_docs=int(info.get("docs", 0)),
        plan_target=manifest.target,
        plan_committed=manifest.committed,
        docs_in_flight=in_flight,
        counts=dict(manifest.counts),
        versions_kept=kept,
        idle_seconds=idle_seconds,
    )
