"""Launch: ranks from external launchers, and several local worker processes (``--workers N`` / ``--gpus``).

Work is shared through shard claims (``claims.py``), never by a fixed split, so the rank only names a worker
and picks its GPU; any number of workers may join or leave. Local workers are spawned processes, one per GPU
with its own ``CUDA_VISIBLE_DEVICES`` (or N CPU workers sharing the cores); the parent plans once, shows one
progress bar from the shard markers, waits for the children, and reports the shards of a worker that failed.

Start-up overlaps: the workers are started first and load their model (GPU workers: and warm up its compiled
forward, from the shared compile cache) while the parent plans; they claim nothing until the plan is written.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
from pathlib import Path

from pipeline.errors import EXIT_STORAGE
from pipeline.job.config import JobConfig

log = logging.getLogger(__name__)


def parse_gpus(spec: str) -> list[str]:
    """``all`` | ``N`` | ``0,1,3`` -> one ``CUDA_VISIBLE_DEVICES`` value per worker.

    Counts and ids are taken among the GPUs this process may use: where ``CUDA_VISIBLE_DEVICES`` is set (Slurm
    sets it to the job's allocation) id ``0`` is its first entry, as in ``cuda:0``, so a worker never lands on a
    GPU outside the allocation; otherwise the ids are those of ``torch.cuda.device_count()``.

    Raises:
        ConfigError: no GPU is visible, more GPUs are asked for than are visible, or the spec is malformed.
    """
    from pipeline.job.config import ConfigError

    spec = spec.strip()
    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible_env is not None:
        visible = [v.strip() for v in visible_env.split(",") if v.strip()]
    else:
        visible = [str(i) for i in range(visible_gpu_count())]
    if not visible:
        raise ConfigError(f"gpus: {spec!r}, but no CUDA device is visible (use --workers N for CPU workers)")
    if spec == "all":
        return visible
    try:
        if "," in spec:
            wanted = [int(v) for v in spec.split(",") if v.strip()]
        else:
            wanted = list(range(int(spec)))
    except ValueError:
        raise ConfigError(f"gpus: {spec!r} is not all, a count, or a list of ids like 0,1,3") from None
    if not wanted or len(set(wanted)) != len(wanted) or min(wanted) < 0 or max(wanted) >= len(visible):
        raise ConfigError(f"gpus: {spec!r} does not fit the {len(visible)} visible GPUs (ids 0-{len(visible) - 1})")
    return [visible[i] for i in wanted]


def expected_workers(cfg: JobConfig) -> int:
    """Workers expected on a job, for sizing its last shards: this launch's (one per GPU of ``--gpus``, else
    ``--workers``) times the ranks of an external launcher (Slurm tasks or array tasks, torchrun, Kubernetes),
    each of which runs its own. Others may join or leave; this is only where the plan starts from."""
    from pipeline.job.config import ConfigError
    from pipeline.job.ranks import detect_rank

    local = max(1, cfg.workers)
    if cfg.gpus:
        try:
            local = len(parse_gpus(cfg.gpus))
        except ConfigError:
            local = 1
    return local * max(1, detect_rank().world)


def visible_gpu_count() -> int:
    """GPUs this process may use, asked of the CUDA driver itself (which honours ``CUDA_VISIBLE_DEVICES``): the
    launcher does not import torch for it, which would delay every worker's start by seconds. Falls back to
    ``torch.cuda.device_count()`` where the driver library cannot be loaded or answers with an error."""
    count = _driver_gpu_count()
    if count is None:
        import torch

        return torch.cuda.device_count()
    return count


def _driver_gpu_count(library: str = "libcuda.so.1") -> int | None:
    import ctypes

    try:
        lib = ctypes.CDLL(library)
    except OSError:
        return None
    n = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return None  # torch then says what is wrong, as before
    return n.value


def _cpu_count() -> int:
    """CPUs this process may run on (a Slurm or cgroup cpuset), not all the machine's cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _child(cfg: JobConfig, env: dict[str, str], lease: float, threads: int | None, planned=None,
           parent: int | None = None) -> None:
    """A worker process: load the model while the parent plans, then work shards until none is left. It ends
    without the interpreter's teardown (``util.fast_exit``) once its parts and markers are written: seconds
    per worker on a GPU, paid by the job's wall time. An unexpected error ends it the usual way (traceback)."""
    from pipeline.model.caches import use_bytecode_cache
    from pipeline.util import exit_code, fast_exit

    use_bytecode_cache()  # a spawned process starts with Python's own setting, not the parent's
    fast_exit(exit_code(_work, cfg, env, lease, threads, planned, parent))


def _work(cfg: JobConfig, env: dict[str, str], lease: float, threads: int | None, planned, parent: int | None
          ) -> None:
    import threading

    # First thing: a signal that arrives while torch and the model load must stop the run, not kill it.
    flag = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: flag.set())
    os.environ.update(env)
    from pipeline.util import configure_logging

    configure_logging()
    if threads:
        import torch

        torch.set_num_threads(threads)
    from pipeline.errors import EXIT_ERROR, EXIT_STORAGE, PipelineError, full_disk_error
    from pipeline.job.runner import load_embedder, loads_during_planning, run_job
    from pipeline.job.startup import ModelLoad

    # The model loads while the parent plans; nothing is claimed before the plan is written.
    loading = ModelLoad(lambda: load_embedder(cfg)) if loads_during_planning(cfg) else None
    if planned is not None:
        while not planned.wait(0.5):
            if os.getppid() != parent:  # the parent died while planning: no plan will come
                raise SystemExit(1)
    try:
        summary = run_job(cfg, stop=flag, lease_seconds=lease, embedder=loading)
    except Exception as exc:  # one line, no traceback: the parent reports the exit code
        storage = full_disk_error(exc, cfg.output)
        if storage is None and not isinstance(exc, PipelineError):
            raise
        log.error("%s", storage or exc)
        raise SystemExit(EXIT_STORAGE if storage is not None else EXIT_ERROR) from None
    if summary.failed:
        raise SystemExit(1)
    if summary.stopped_early or summary.replaced:
        raise SystemExit(75)


def _stop_unplanned(procs: list) -> None:
    """End workers that are still waiting for the plan (they have claimed nothing, so nothing is lost)."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()


def run_workers(cfg: JobConfig, *, workers: int = 1, gpus: list[str] | None = None, lease: float,
                overwrite: bool = False, poll: float = 1.0, signals: list[int] | None = None) -> int:
    """Plan once, run one process per GPU (or ``workers`` CPU processes) on the same output, and wait.

    Args:
        signals: stop signals already received (the CLI's early record); the list is appended to while this runs.

    Returns:
        0 when every shard is done; 75 when stopped by a signal with work left; 74 when a worker stopped on a
        full disk; 1 when a worker failed (its shards are named in the log and are taken over by the next run,
        at once when its process is gone from this host, else after the lease).
    """
    from tqdm import tqdm

    from pipeline.job.plan import prepare
    from pipeline.job.runner import try_commit
    from pipeline.job.sink import is_done
    from pipeline.job.status import job_status

    procs: list[mp.process.BaseProcess] = []
    received: list[int] = signals if signals is not None else []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signum)

    # Installed before planning, so that a signal during a long plan stops the run (75) instead of killing it.
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        envs: list[dict[str, str]] = []
        threads = None
        if gpus:
            envs = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
            child_cfg = dataclasses.replace(cfg, device="cuda", quiet=True)
        else:
            envs = [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(workers)]
            child_cfg = dataclasses.replace(cfg, device="cpu", quiet=True)
            threads = max(1, _cpu_count() // workers)
        # Workers start first, so that their start-up (imports, model load, compiled warm-up) overlaps the plan;
        # they wait for it before claiming anything.
        ctx = mp.get_context("spawn")
        planned = ctx.Event()
        for i, env in enumerate(envs):
            p = ctx.Process(target=_child, args=(child_cfg, env, lease, threads, planned, os.getpid()),
                            name=f"worker-{i}")
            p.start()
            procs.append(p)
        try:
            manifest = prepare(cfg, overwrite=overwrite)
        except BaseException:
            _stop_unplanned(procs)
            raise
        if received:
            _stop_unplanned(procs)
            log.warning("signal %d while planning: nothing done", received[0])
            return 75
        if manifest.committed or all(is_done(Path(cfg.output), s) for s in manifest.shards):
            _stop_unplanned(procs)  # nothing to embed: the workers have claimed nothing
            try_commit(Path(cfg.output), manifest)
            return 0
        planned.set()
        log.info("%d workers started on %s", len(procs), cfg.output)
        bar = tqdm(total=manifest.total_rows, unit="doc", disable=cfg.quiet, dynamic_ncols=True,
                   desc=f"embedding x{len(procs)}")
        try:
            while any(p.is_alive() for p in procs):
                mp.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=poll)  # or a child ends
                st = job_status(cfg.output)
                bar.n = st.docs_done
                bar.set_postfix_str(f"{st.tokens_per_s:,.0f} tok/s", refresh=False)
                bar.refresh()
            for p in procs:
                p.join()
        finally:
            bar.close()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [p.exitcode for p in procs]
    st = job_status(cfg.output)
    # A worker killed by the signal this parent forwarded (before it could install its handler) was stopped.
    stopped = {-s for s in received}
    if EXIT_STORAGE in codes:
        return EXIT_STORAGE
    failed = [i for i, c in enumerate(codes) if c not in (0, 75) and c not in stopped]
    if failed:
        claims = sorted(Path(cfg.output, "shards").glob("*.claim"))
        log.error("workers %s failed (exit codes %s); shards left claimed: %s; failed shards: %s. Rerun the same "
                  "command: their shards are taken over once the lease (%ss) runs out.", failed,
                  [codes[i] for i in failed], [c.name.split(".")[0] for c in claims], sorted(st.failures), lease)
        return 1
    if st.shards_pending:
        return 75
    if not try_commit(Path(cfg.output), manifest):  # a worker normally commits; make sure of it
        return 75
    return 0
