"""The real command, timed from outside: ``embed-corpus run`` in a subprocess, as a user starts it.

The clock starts just before the process is started and stops when it exits. What happened in between is read
from the shards' done-markers (each has ``finished_at`` and the shard's ``seconds``, so its start is known):

- ``startup_s``: process start to the first shard's start (imports, planning, model load, compiled warm-up,
  reading and tokenizing the first shard); the first pack goes to the GPU right after;
- ``steady_tokens_per_s``: tokens over the span from the first shard's start to the last shard's end (the
  definition ``embed-corpus status`` uses; with several workers, all of them together);
- ``whole_tokens_per_s``: tokens over the whole wall time from process start to exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def run_args(inputs: list[Path], output: Path, model_dir: Path, *, shard_size: int | None = None,
             extra: tuple[str, ...] = ()) -> list[str]:
    """``python -m pipeline.cli run ...``: the ``embed-corpus`` console script's code path, in this interpreter."""
    args = [sys.executable, "-m", "pipeline.cli", "run"]
    for path in inputs:
        args += ["--input", str(path)]
    args += ["--output", str(output), "--model", str(model_dir), "--quiet"]
    if shard_size:
        args += ["--shard-size", str(shard_size)]
    return args + list(extra)


def command_env(*, compile_cache: Path | None = None, devices: str | None = None,
                trace_recompiles: bool = False) -> dict[str, str]:
    """The environment of a measured command: this checkout first on ``PYTHONPATH``; a compile cache of its
    own, with the bytecode cache in it (a fresh folder makes a cold start; the same folder again a warm one); the
    GPUs it may see."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    if compile_cache is not None:
        env["EMBED_CORPUS_COMPILE_CACHE"] = str(compile_cache)
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTHONPYCACHEPREFIX"):
            env.pop(var, None)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if trace_recompiles:
        env["TORCH_LOGS"] = "recompiles"  # a recompilation in the middle of a run shows in the log
    return env


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> tuple[subprocess.Popen, float]:
    """Start the command with its output in ``log``, in ``cwd`` (``python -m`` imports the package found there
    before ``PYTHONPATH``'s); returns the process and the wall-clock start."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(args)}\n".encode())
        launched = time.time()
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(cwd))
    return proc, launched


def finish(proc: subprocess.Popen, log: Path, timeout: float | None = None) -> float:
    """Wait for the command; raise with the end of its log if it failed. Returns the wall-clock end."""
    code = proc.wait(timeout=timeout)
    ended = time.time()
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"command failed with exit code {code}:\n{tail}")
    return ended


def measure(args: list[str], env: dict[str, str], output: Path, log: Path, timeout: float | None = None,
            cwd: Path = REPO) -> dict[str, Any]:
    """Run one command to the end (in ``cwd``) and return ``timings``, its logs and the GPUs' clocks while it
    ran."""
    with GpuClocks() as clocks:
        proc, launched = start(args, env, log, cwd)
        ended = finish(proc, log, timeout)
    return {**timings(output, launched, ended), "log": startup_log(output, launched),
            "shard_timing": shard_timing(output), "shard_log": shard_log(output, launched),
            "gpu_clocks": clocks.summary()}


class GpuClocks:
    """Every GPU's SM clock, power draw and temperature, sampled by ``nvidia-smi`` once a ``interval_ms`` while
    the block runs: whether a long run held its clocks (a rate measured in a burst of seconds and one over ten
    minutes compare only if it did). Where there is no ``nvidia-smi`` it records nothing (``summary()`` is None).
    """

    QUERY = "index,clocks.sm,power.draw,temperature.gpu"

    def __init__(self, interval_ms: int = 1000, binary: str = "nvidia-smi") -> None:
        self.binary = shutil.which(binary)
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen | None = None
        self._out = None
        self._text = ""

    def __enter__(self) -> GpuClocks:
        if self.binary:
            self._out = tempfile.TemporaryFile()
            try:
                self._proc = subprocess.Popen([self.binary, f"--query-gpu={self.QUERY}",
                                               "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
                                              stdout=self._out, stderr=subprocess.DEVNULL)
            except OSError:  # an optional record: a sampler that cannot start records nothing
                self._out.close()
                self._out = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._out is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._out.seek(0)
        self._text += self._out.read().decode(errors="replace")
        self._out.close()
        self._proc = self._out = None

    def summary(self) -> dict[str, Any] | None:
        """Per GPU index: samples, SM clock (MHz: median, min, max, and the medians of the first and the last
        minute), power (W: median, max), temperature (C: max)."""
        by_gpu: dict[str, list[tuple[float, float, float]]] = {}
        for line in self._text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4:
                continue
            try:
                by_gpu.setdefault(parts[0], []).append((float(parts[1]), float(parts[2]), float(parts[3])))
            except ValueError:  # "[N/A]" or a header
                continue
        if not by_gpu:
            return None
        minute = max(1, round(60_000 / self.interval_ms))
        out: dict[str, Any] = {}
        for gpu, rows in sorted(by_gpu.items()):
            a = np.asarray(rows)
            clock = a[:, 0]
            out[gpu] = {"samples": len(a), "sm_clock_mhz": {
                "median": float(np.median(clock)), "min": float(clock.min()), "max": float(clock.max()),
                "first_minute_median": float(np.median(clock[:minute])),
                "last_minute_median": float(np.median(clock[-minute:]))},
                "power_w": {"median": round(float(np.median(a[:, 1])), 1), "max": round(float(a[:, 1].max()), 1)},
                "temperature_c_max": float(a[:, 2].max())}
        return out


def timings(output: Path, launched: float, ended: float | None = None) -> dict[str, Any]:
    """Start-up, steady rate and whole-command rate of a finished output, from its done-markers.

    Args:
        output: the output directory.
        launched: wall-clock time the first process was started.
        ended: wall-clock time the last process exited (None: no whole-command figures).
    """
    from pipeline.job.sink import read_markers

    done, _ = read_markers(output)
    if not done:
        raise RuntimeError(f"{output}: no finished shard")
    starts = np.array([m["finished_at"] - m["seconds"] for m in done.values()])
    ends = np.array([m["finished_at"] for m in done.values()])
    tokens = int(sum(m["tokens"] for m in done.values()))
    span = float(ends.max() - starts.min())
    rec: dict[str, Any] = {
        "shards": len(done),
        "docs": int(sum(m["rows"] for m in done.values())),
        "tokens": tokens,
        "startup_s": round(float(starts.min() - launched), 2),
        "steady_s": round(span, 2),
        "steady_tokens_per_s": round(tokens / span) if span > 0 else None,
        "workers": len({m.get("worker") for m in done.values()}),
    }
    if ended is not None:
        rec["wall_s"] = round(ended - launched, 2)
        rec["whole_tokens_per_s"] = round(tokens / (ended - launched))
        rec["tail_s"] = round(float(ended - ends.max()), 2)  # last commit to exit
    return rec


def startup_log(output: Path, launched: float) -> list[str]:
    """Where start-up and the end of the run go, from the run's own logs (``OUTPUT/logs/run-*.log``, one per
    worker process): each worker's start-up lines (planning, the model's start-up steps, model ready, first
    shard), its first two finished shards and its last lines (version live, worker done), each prefixed with its
    seconds since ``launched``."""
    import datetime

    startup = ("scanning", "shards,", "model start-up", "loaded in", "warmed up in", "model ready", "first shard")
    ending = ("is live", "worker done")
    lines: list[str] = []
    for path in sorted((output / "logs").glob("run-*.log")):
        done = 0
        for line in path.read_text(errors="replace").splitlines():
            first_done = " done: " in line and done < 2
            if not (any(w in line for w in startup + ending) or first_done):
                continue
            done += first_done
            try:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append(f"+{stamp - launched:6.2f}s {line[24:]}")
            except ValueError:
                lines.append(line)
    return lines


def shard_timing(output: Path) -> dict[str, float]:
    """Sums over the finished shards of where their time went besides the model (seconds; see the runner's
    done-markers): ``wait_s`` the model idle waiting for the next shard's rows and tokens, ``read_s`` and
    ``tokenize_s`` the prefetch thread's work, ``write_wait_s`` waiting for the previous part to be written."""
    from pipeline.job.sink import read_markers

    done, _ = read_markers(output)
    keys = ("wait_s", "read_s", "tokenize_s", "write_wait_s")
    return {k: round(sum(float(m.get(k, 0.0)) for m in done.values()), 2) for k in keys}


SHARD_LOG_COLUMNS = ("shard", "worker", "rows", "tokens", "start_s", "seconds", "wait_s", "read_s", "tokenize_s",
                     "model_s", "assemble_s", "write_wait_s")


def shard_log(output: Path, launched: float) -> dict[str, Any]:
    """Every finished shard in the order they started, one row each (``SHARD_LOG_COLUMNS``): which worker (its
    index in order of first appearance), its size, when it started (seconds since ``launched``), how long it
    took and where that time went. What the sums of ``shard_timing`` hide: a wait at one place, a slow worker,
    the end of the job."""
    from pipeline.job.sink import read_markers

    done, _ = read_markers(output)
    rows = sorted(done.items(), key=lambda kv: kv[1]["finished_at"] - kv[1]["seconds"])
    workers: dict[str, int] = {}
    table = []
    for sid, m in rows:
        w = workers.setdefault(str(m.get("worker")), len(workers))
        start = m["finished_at"] - m["seconds"] - launched
        table.append([sid, w, m["rows"], m["tokens"], round(start, 2), round(m["seconds"], 2),
                      *(round(float(m.get(k, 0.0)), 2) for k in SHARD_LOG_COLUMNS[6:])])
    return {"columns": list(SHARD_LOG_COLUMNS), "rows": table}


def after_first_shard(log: dict[str, Any]) -> int | None:
    """Tokens/s of each worker from the end of its first shard to the end of its last (the tokens of the
    shards in between and after), summed over workers: the steady rate without the first shard, which carries
    the process's first pass over real packs (5-9% slower than later passes on an H200, measured:
    ``data/benchmarks/h200-probe-model-alone-2026-12-01.txt``); None unless every worker ran two shards or more
    (a worker's single shard has no rate after its first, and leaving it out would understate the sum)."""
    cols = {name: i for i, name in enumerate(log["columns"])}
    by_worker: dict[int, list[list]] = {}
    for row in log["rows"]:
        by_worker.setdefault(row[cols["worker"]], []).append(row)
    total = 0.0
    for rows in by_worker.values():
        rows.sort(key=lambda r: r[cols["start_s"]])
        if len(rows) < 2:
            return None
        first_end = rows[0][cols["start_s"]] + rows[0][cols["seconds"]]
        last_end = max(r[cols["start_s"]] + r[cols["seconds"]] for r in rows)
        if last_end > first_end:
            total += sum(r[cols["tokens"]] for r in rows[1:]) / (last_end - first_end)
    return round(total) if total else None


def first_shard_extra_s(log: dict[str, Any]) -> float | None:
    """Seconds the first shard of the run took beyond its tokens at the rate after it (``after_first_shard``):
    what the process's first pass over real packs costs once; None where that rate is not known."""
    rate = after_first_shard(log)
    if not rate:
        return None
    cols = {name: i for i, name in enumerate(log["columns"])}
    first = min(log["rows"], key=lambda r: r[cols["start_s"]])
    per_worker = rate / len({r[cols["worker"]] for r in log["rows"]})
    return round(first[cols["seconds"]] - first[cols["tokens"]] / per_worker, 2)


def kill_hard(proc: subprocess.Popen) -> None:
    """``kill -9`` the process (a worker lost with its node)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def read_output(output: Path) -> tuple[list[str], np.ndarray]:
    """Ids and float32 vectors of a finished output, in the order the parts list them."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(output / "vectors")).to_table(columns=["id", "embedding"])
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.column("id").to_pylist(), vectors


def compare_outputs(output: Path, reference: dict[str, np.ndarray], expected_ids: list[str]) -> dict[str, Any]:
    """Every expected id exactly once, and the min cosine of each vector that has a reference against it
    (``reference_rows`` of them)."""
    ids, vectors = read_output(output)
    once = len(ids) == len(set(ids)) and sorted(ids) == sorted(expected_ids)
    known = np.asarray([i in reference for i in ids], dtype=bool)
    cosine = None
    if once and known.any():
        ref = np.stack([reference[i] for i, k in zip(ids, known, strict=True) if k])
        cosine = round(float((vectors[known] * ref).sum(1).min()), 6)
    return {"ids_once": once, "rows": len(ids), "reference_rows": int(known.sum()), "min_cosine_vs_reference": cosine}
