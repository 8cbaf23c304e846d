"""Status of an output directory: shards done / pending / failed, documents, tokens, throughput, ETA."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.job.plan import load_manifest
from pipeline.job.sink import read_markers


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        eta = "-" if self.eta_seconds is None else _duration(self.eta_seconds)
        out = [
            f"output     {self.output}",
            f"shards     {self.shards_done} done, {self.shards_pending} pending, {self.shards_failed} failed "
            f"(of {self.shards_total})",
            f"documents  {self.docs_done:,} of {self.docs_total:,} embedded"
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


def job_status(output: str | Path) -> Status:
    """Read the manifest and the shard markers of ``output``.

    Throughput is measured over the wall-clock span of the finished shards (so several workers add up);
    the ETA divides the pending documents by it.
    """
    out = Path(output)
    manifest = load_manifest(out)
    if manifest is None:
        raise PipelineError(f"{out}: no manifest.json here; is this an embed-corpus output directory?")
    done, failed = read_markers(out)
    ids = {s.id for s in manifest.shards}
    done = {k: v for k, v in done.items() if k in ids}
    failed = {k: v for k, v in failed.items() if k in ids and k not in done}
    docs_done = sum(int(m.get("rows", 0)) for m in done.values())
    tokens_done = sum(int(m.get("tokens", 0)) for m in done.values())
    docs_total = manifest.total_rows
    span = 0.0
    if done:
        starts = [m["finished_at"] - m.get("seconds", 0) for m in done.values()]
        span = max(m["finished_at"] for m in done.values()) - min(starts)
    docs_rate = docs_done / span if span > 0 else 0.0
    pending_docs = docs_total - docs_done
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
        eta_seconds=0.0 if not pending_docs else (pending_docs / docs_rate if docs_rate > 0 else None),
        rejected_rows=sum(pf.rejected for pf in manifest.files),
        failures={k: str(v.get("error", "")) for k, v in failed.items()},
    )
