"""Launch: ranks from external launchers, and several local worker processes (``--workers N`` / ``--gpus``).

Work is shared through shard claims (``claims.py``), never by a fixed split, so the rank only names a worker
and picks its GPU; any number of workers may join or leave. Local workers are spawned processes, one per GPU
with its own ``CUDA_VISIBLE_DEVICES`` (or N CPU workers sharing the cores); the parent plans once, shows one
progress bar from the shard markers, waits for the children, and reports the shards of a worker that failed.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    source: str  # "slurm-array" | "slurm" | "torchrun" | "k8s" | "local"


def detect_rank(env: dict[str, str] | None = None) -> Rank:
    """The worker's rank from the environment of Slurm (array or tasks), torchrun, or a Kubernetes indexed job."""
    env = dict(os.environ if env is None else env)
    local = int(env.get("SLURM_LOCALID", env.get("LOCAL_RANK", "0")))
    if "SLURM_ARRAY_TASK_ID" in env:
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        tasks = int(env.get("SLURM_NTASKS", "1"))
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Rank(task * tasks + int(env.get("SLURM_PROCID", "0")), count * tasks, local, "slurm-array")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Rank(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), local, "slurm")
    if "RANK" in env and "WORLD_SIZE" in env:
        return Rank(int(env["RANK"]), int(env["WORLD_SIZE"]), local, "torchrun")
    if "JOB_COMPLETION_INDEX" in env:
        return Rank(int(env["JOB_COMPLETION_INDEX"]), int(env.get("JOB_COMPLETION_COUNT", "1")), 0, "k8s")
    return Rank(0, 1, 0, "local")


def device_for_rank(device: str | None, env: dict[str, str] | None = None) -> str | None:
    """With several visible GPUs and a launcher's local rank (Slurm tasks or torchrun), each local worker takes
    ``cuda:LOCAL_RANK``; otherwise the configured device is kept."""
    if device not in (None, "cuda"):
        return device
    rank = detect_rank(env)
    if rank.source == "local":
        return device
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:
        return device
    return f"cuda:{rank.local_rank % n}" if n > 1 else device


def parse_gpus(spec: str) -> list[str]:
    """``all`` | ``N`` | ``0,1,3`` -> the GPU ids to use (``all`` needs CUDA)."""
    spec = spec.strip()
    if spec == "all":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return [v for v in visible.split(",") if v.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    if "," in spec:
        return [v.strip() for v in spec.split(",") if v.strip()]
    n = int(spec)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def _child(cfg: JobConfig, env: dict[str, str], lease: float, threads: int | None) -> None:
    os.environ.update(env)
    from pipeline.cli import configure_logging

    configure_logging()
    if threads:
        import torch

        torch.set_num_threads(threads)
    import threading

    from pipeline.runner import run_job

    flag = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: flag.set())
    summary = run_job(cfg, stop=flag, lease_seconds=lease)
    if summary.failed:
        raise SystemExit(1)
    if summary.stopped_early:
        raise SystemExit(75)


def run_workers(cfg: JobConfig, *, workers: int = 1, gpus: list[str] | None = None, lease: float,
                overwrite: bool = False, poll: float = 1.0) -> int:
    """Plan once, run one process per GPU (or ``workers`` CPU processes) on the same output, and wait.

    Returns:
        0 when every shard is done; 75 when stopped by a signal with work left; 1 when a worker failed
        (its shards are named in the log and are taken over by the next run after the lease).
    """
    from tqdm import tqdm

    from pipeline.plan import prepare
    from pipeline.status import job_status

    manifest = prepare(cfg, overwrite=overwrite)
    envs: list[dict[str, str]] = []
    threads = None
    if gpus:
        envs = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
        child_cfg = dataclasses.replace(cfg, device="cuda", quiet=True)
    else:
        envs = [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(workers)]
        child_cfg = dataclasses.replace(cfg, device="cpu", quiet=True)
        threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(child_cfg, env, lease, threads), name=f"worker-{i}")
             for i, env in enumerate(envs)]
    for p in procs:
        p.start()
    log.info("%d workers started on %s", len(procs), cfg.output)

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    total = manifest.total_rows
    bar = tqdm(total=total, unit="doc", disable=cfg.quiet, dynamic_ncols=True, desc=f"embedding x{len(procs)}")
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(poll)
            st = job_status(cfg.output)
            bar.n = st.docs_done
            bar.set_postfix_str(f"{st.tokens_per_s:,.0f} tok/s", refresh=False)
            bar.refresh()
        for p in procs:
            p.join()
    finally:
        bar.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [p.exitcode for p in procs]
    st = job_status(cfg.output)
    failed = [i for i, c in enumerate(codes) if c not in (0, 75)]
    if failed:
        claims = sorted(Path(cfg.output, "shards").glob("*.claim"))
        log.error("workers %s failed (exit codes %s); shards left claimed: %s; failed shards: %s. Rerun the same "
                  "command: their shards are taken over once the lease (%ss) runs out.", failed,
                  [codes[i] for i in failed], [c.name.split(".")[0] for c in claims], sorted(st.failures), lease)
        return 1
    if st.shards_pending:
        return 75
    return 0
