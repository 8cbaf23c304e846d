"""``embed-corpus bench-scale``: the real command on one GPU against N GPUs of one host, start-up counted.

For a Qwen3-Embedding shape it saves a random model of that shape to disk, writes a Parquet corpus (the
benchmark's lognormal lengths), fills a compile cache with a small job (so every measured run starts warm, as
a second run on a machine does), then runs ``embed-corpus run`` to the end:

1. ``--gpus 1`` and ``--gpus N`` (one process per GPU, the launch path);
2. N separate processes, each with its own ``CUDA_VISIBLE_DEVICES`` (two "nodes" as two Slurm array tasks
   would run);
3. the same N processes with one killed (``kill -9``) once it has finished a shard: the others finish its
   shards after the lease.

Wall time runs from the first process's start to the last one's exit. ``scaling_efficiency`` is
``wall(1 GPU) / (N x wall(N GPUs))``, ``steady_scaling_efficiency`` the same ratio of the steady rates
(``command.timings``). Every output is checked: each id exactly once, vectors against the one-GPU run's.
A job of ~10 GPU-minutes does not fit one call of a lent machine: ``phase`` splits it (preparation, the
one-GPU run, the rest) over calls that keep the same work folder.
On a machine without GPUs the same runs use CPU worker processes (``--workers``), for tests.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import command

log = logging.getLogger(__name__)


def _launch_args(devices: list[str], n: int) -> tuple[str, ...]:
    return ("--gpus", str(n)) if devices else ("--workers", str(n), "--device", "cpu")


def _node_env(devices: list[str], i: int, n: int, cache: Path) -> dict[str, str]:
    """Node ``i`` of ``n`` as a Slurm array task sees it: its own GPU, and its place in the array (from which
    the plan learns how many workers to size its last shards for, as it does under Slurm)."""
    return {**command.command_env(compile_cache=cache, devices=devices[i] if devices else ""),
            "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": str(n)}


def _node_extra(devices: list[str]) -> tuple[str, ...]:
    return () if devices else ("--device", "cpu")


PHASES = ("all", "prepare", "one", "many")


class NoOneGpuRun(RuntimeError):
    """The ``many`` phase found no one-GPU run of its job in the work folder."""


def scaling(size: str, *, tokenizer_dir: str, n_docs: int, shard_size: int, workdir: Path, logs: Path,
            devices: list[str], workers: int = 2, lease_s: float = 15.0, kill: bool = True,
            nodes: bool = True, launch: bool = True, kill_at: float = 0.0, deadline: float | None = None,
            phase: str = "all", note: str | None = None) -> list[dict[str, Any]]:
    """Records of one model size: the N-GPU launch, N separate processes, and the kill run.

    Args:
        size: a Qwen3-Embedding shape (``bench.synthetic.QWEN3_SHAPES``).
        tokenizer_dir: the Qwen tokenizer folder.
        n_docs: documents of the measured job; ``shard_size`` rows per shard (0: the command's own sizing).
        workdir: where the model, the corpus, the outputs and the phases' state (``scale-SIZE.json``) go.
        logs: each command's output.
        devices: the GPUs (``CUDA_VISIBLE_DEVICES`` values) to use, at least ``workers``; empty: CPU workers.
        workers: N, the GPUs (or CPU workers) of the scaled runs.
        lease_s: the lease of the kill run (how long the survivors wait for a dead worker's claims).
        kill_at: the kill run kills its worker once this fraction of the job's documents is done (and the
            worker has finished a shard and holds a claim); 0: at its first finished shard.
        launch, nodes, kill: which scaled runs to make: the N-GPU launch (``--gpus N``), the N separate
            processes, the kill run. A ``many`` phase may make some and a later one the rest (each fits a call):
            the kill run's time lost is counted against the undisturbed separate-process run of the same work
            folder (else its launch run).
        deadline: ``time.time()`` after which no further run is started (the records so far are returned).
        phase: ``all``; or one part, so that a job of ~10 GPU-minutes fits calls of a few minutes on the same
            machine (``workdir`` kept between them): ``prepare`` (model, corpus, compile cache), ``one`` (the
            one-GPU run, preparing first if ``workdir`` holds no preparation of this job), ``many`` (the rest,
            against the one-GPU run already in ``workdir``). ``prepare`` and ``one`` return no record.
        note: how the phase ran (e.g. what else shared the machine), kept in the records.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
    if devices and len(devices) < workers:
        raise ValueError(f"{workers} workers need {workers} GPUs, got {devices}")
    job = _Job(size, workdir, logs, devices, n_docs, shard_size)
    state = job.load()
    if phase == "many":
        if state is None or "one" not in state:
            raise NoOneGpuRun(f"{job.state}: no one-GPU run of this job ({size}, {n_docs} docs, shard size "
                               f"{shard_size}); run the 'one' phase first with the same --workdir")
    else:
        if phase in ("all", "prepare") or state is None:
            state = {"base": job.prepare(tokenizer_dir, note)}
        if phase in ("all", "one"):
            state = job.one_gpu(state["base"], note)
        if phase != "all":
            return []
    base = dict(state["base"], **state["one"])
    if note:
        base["note_many"] = note
    return job.scaled(base, workers, lease_s=lease_s, kill=kill, nodes=nodes, launch=launch, kill_at=kill_at,
                      late=lambda: deadline is not None and time.time() > deadline)


class _Job:
    """One size's job in ``workdir``: its model, corpus, compile cache, outputs and phase state."""

    def __init__(self, size: str, workdir: Path, logs: Path, devices: list[str], n_docs: int, shard_size: int):
        self.size, self.workdir, self.logs, self.devices = size, workdir, logs, devices
        self.n_docs, self.shard_size = n_docs, shard_size
        self.model_dir = workdir / f"model-{size}"
        self.corpus = workdir / f"scale-{size}.parquet"
        self.cache = workdir / f"compile-cache-{size}"
        self.state = workdir / f"scale-{size}.json"
        self.ids = [f"d{i}" for i in range(n_docs)]

    def load(self) -> dict[str, Any] | None:
        """The saved state of this job (None: none, or one of another job)."""
        try:
            state = json.loads(self.state.read_text())
        except FileNotFoundError:
            return None
        base = state.get("base", {})
        if (base.get("docs"), base.get("shard_size_rows")) != (self.n_docs, self.shard_size):
            return None
        if (base.get("gpu") == "cpu") != (not self.devices) or not (self.model_dir.is_dir() and self.corpus.exists()):
            return None  # prepared for the other kind of device, or its files are gone
        return state

    def save(self, state: dict[str, Any]) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.state)
        return state

    def out(self, name: str) -> Path:
        path = self.workdir / f"scale-{self.size}-{name}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def prepare(self, tokenizer_dir: str, note: str | None) -> dict[str, Any]:
        """The model saved to disk, the corpus written, the compile cache filled (the cold start-up)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from transformers import AutoTokenizer

        from pipeline.bench.gpu import make_corpus, random_model
        from pipeline.bench.synthetic import save_embedding_dir

        t0 = time.time()
        self.state.unlink(missing_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        model = random_model(self.size, "cuda" if self.devices else "cpu",
                             "bfloat16" if self.devices else "float32")
        save_embedding_dir(model, self.model_dir, tokenizer_dir=tokenizer_dir)
        del model
        if self.devices:
            torch.cuda.empty_cache()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.model_max_length = 1 << 30
        texts = make_corpus(tok, self.n_docs + 64, seed=2)
        pq.write_table(pa.table({"id": self.ids, "text": texts[:self.n_docs]}), self.corpus,
                       row_group_size=min(self.shard_size or 1024, 1024))
        warm_corpus = self.workdir / f"warm-{self.size}.parquet"
        pq.write_table(pa.table({"id": [f"w{i}" for i in range(64)], "text": texts[self.n_docs:]}), warm_corpus)
        shutil.rmtree(self.cache, ignore_errors=True)
        base = {"bench": "scaling", "model_size": self.size,
                "gpu": torch.cuda.get_device_name(0) if self.devices else "cpu", "docs": self.n_docs,
                "shard_size": self.shard_size or "default (the command's own sizing: bytes of text per shard)",
                "shard_size_rows": self.shard_size, "date": time.strftime("%Y-%m-%d"),
                "compile_cache": "warm (filled by a 64-document job first)"}
        # a small job fills the compile cache (its start-up is the cold one)
        cold = command.measure(command.run_args([warm_corpus], self.out("warm"), self.model_dir,
                                                extra=_launch_args(self.devices, 1)),
                               command.command_env(compile_cache=self.cache), self.out("warm"),
                               self.logs / f"scale-{self.size}-warm.log")
        base["startup_s_cold"] = cold["startup_s"]
        base["prepare_s"] = round(time.time() - t0, 1)
        if note:
            base["note_prepare"] = note
        self.save({"base": base})
        return base

    def one_gpu(self, base: dict[str, Any], note: str | None) -> dict[str, Any]:
        """The one-GPU run (its output stays in ``workdir``: the reference of the scaled runs)."""
        import os

        self.save({"base": base})  # an earlier one-GPU run is gone with its output: a failed run leaves none
        one_out = self.out("1")
        one = command.measure(command.run_args([self.corpus], one_out, self.model_dir, shard_size=self.shard_size,
                                               extra=_launch_args(self.devices, 1)),
                              command.command_env(compile_cache=self.cache), one_out,
                              self.logs / f"scale-{self.size}-1.log")
        ref_ids, ref_vecs = command.read_output(one_out)
        got = {"tokens": one["tokens"], "shards": one["shards"], "tokens_per_s_1gpu": one["steady_tokens_per_s"],
               "wall_s_1gpu": one["wall_s"], "startup_s_1gpu": one["startup_s"], "gpu_seconds_1gpu": one["wall_s"],
               "one_gpu_check": command.compare_outputs(one_out, dict(zip(ref_ids, ref_vecs, strict=True)),
                                                        self.ids),
               "shard_timing_1gpu": one["shard_timing"], "shard_log_1gpu": one["shard_log"], "log_1gpu": one["log"],
               "gpu_clocks_1gpu": one["gpu_clocks"],
               "cpus_1gpu": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
        if note:
            got["note_1gpu"] = note
        return self.save({"base": base, "one": got})

    def scaled(self, base: dict[str, Any], workers: int, *, lease_s: float, kill: bool, nodes: bool, launch: bool,
               kill_at: float, late) -> list[dict[str, Any]]:
        """The N-GPU launch, then N separate processes and the kill run (those asked for), each checked against
        the one-GPU run. Each undisturbed run's wall time is kept in the job's state for a later kill run."""
        ref_ids, ref_vecs = command.read_output(self.workdir / f"scale-{self.size}-1")
        reference = dict(zip(ref_ids, ref_vecs, strict=True))
        records: list[dict[str, Any]] = []
        undisturbed: dict[str, dict[str, Any]] = {}

        def keep(name: str, record: dict[str, Any]) -> None:
            records.append(record)
            undisturbed[name] = record
            state = self.load() or {}
            state.setdefault("many", {})[name] = {"wall_s": record["wall_s"], "launch": record["launch"],
                                                  "gpus": workers, "tokens_per_s": record["tokens_per_s"]}
            self.save(state)

        if launch:
            if late():
                return [dict(base, skipped="deadline before the N-GPU run")]
            n_out = self.out(str(workers))
            many = command.measure(command.run_args([self.corpus], n_out, self.model_dir,
                                                    shard_size=self.shard_size,
                                                    extra=_launch_args(self.devices, workers)),
                                   command.command_env(compile_cache=self.cache), n_out,
                                   self.logs / f"scale-{self.size}-{workers}.log")
            keep("launch", _record(base, many, workers, f"--gpus {workers}" if self.devices else f"--workers {workers}",
                                   command.compare_outputs(n_out, reference, self.ids)))
        # N separate processes ("nodes"), started together
        if nodes and not late():
            nodes_out = self.out("nodes")
            runs, launched = _start_nodes(self.corpus, nodes_out, self.model_dir, self.shard_size, self.devices,
                                          workers, self.cache, self.logs, f"scale-{self.size}-node")
            ended = max(command.finish(p, log_path) for p, log_path in runs)
            sep = {**command.timings(nodes_out, launched, ended), "log": command.startup_log(nodes_out, launched),
                   "shard_timing": command.shard_timing(nodes_out),
                   "shard_log": command.shard_log(nodes_out, launched)}
            keep("nodes", _record(base, sep, workers, f"{workers} processes, one GPU each (two nodes)",
                                  command.compare_outputs(nodes_out, reference, self.ids)))
        # the same, one of them killed once it has committed a shard
        if kill and not late():
            saved = {k: v for k, v in (self.load() or {}).get("many", {}).items() if v.get("gpus") == workers}
            against = undisturbed.get("nodes") or saved.get("nodes") or undisturbed.get("launch") or saved.get("launch")
            if against is None:
                records.append(dict(base, bench="kill", gpus=workers,
                                    skipped="no undisturbed N-GPU run of this job to count the time lost against"))
            else:
                records.append(_kill_run(base, self.corpus, self.out("kill"), self.model_dir, self.shard_size,
                                         self.devices, workers, self.cache, self.logs, self.size, lease_s, reference,
                                         self.ids, against, kill_at))
        return records


def _record(base: dict[str, Any], many: dict[str, Any], n: int, launch: str,
            check: dict[str, Any]) -> dict[str, Any]:
    return dict(base, gpus=n, launch=launch, tokens_per_s=many["steady_tokens_per_s"], wall_s=many["wall_s"],
                startup_s=many["startup_s"], tail_s=many["tail_s"], workers_seen=many["workers"],
                scaling_efficiency=round(base["wall_s_1gpu"] / (n * many["wall_s"]), 3),
                steady_scaling_efficiency=round(many["steady_tokens_per_s"] / (n * base["tokens_per_s_1gpu"]), 3),
                check=check, shard_timing=many["shard_timing"], shard_log=many["shard_log"], log=many["log"],
                gpu_clocks=many.get("gpu_clocks"))


def _start_nodes(corpus: Path, output: Path, model_dir: Path, shard_size: int, devices: list[str], n: int,
                 cache: Path, logs: Path, name: str, lease_s: float | None = None):
    extra = _node_extra(devices) + (("--lease-seconds", str(round(lease_s))) if lease_s else ())
    runs = []
    launched = None
    for i in range(n):
        log_path = logs / f"{name}{i}.log"
        proc, t = command.start(command.run_args([corpus], output, model_dir, shard_size=shard_size, extra=extra),
                                _node_env(devices, i, n, cache), log_path)
        launched = t if launched is None else launched
        runs.append((proc, log_path))
    return runs, launched


def _kill_run(base: dict[str, Any], corpus: Path, output: Path, model_dir: Path, shard_size: int,
              devices: list[str], n: int, cache: Path, logs: Path, size: str, lease_s: float,
              reference: dict[str, np.ndarray], ids: list[str], undisturbed: dict[str, Any],
              kill_at: float = 0.0) -> dict[str, Any]:
    """N processes; the last is killed with SIGKILL once ``kill_at`` of the documents are done and it has a
    done shard and holds a claim.

    Besides the wall time against the undisturbed run (``time_lost_s``, which counts the dead GPU's missing
    capacity), the record has what recovery adds: ``expected_wall_s`` is the time of the kill plus the tokens not
    yet in a finished shard then (the dead worker's shard in flight included, so redoing it is expected) at the
    survivors' rate (the undisturbed run's steady rate per GPU, else the one-GPU run's), and
    ``lost_to_recovery_s`` the wall time beyond it: the lease waited for, a longer tail, slower survivors."""
    from pipeline.job.sink import read_markers

    runs, launched = _start_nodes(corpus, output, model_dir, shard_size, devices, n, cache, logs,
                                  f"scale-{size}-kill", lease_s)
    victim, victim_log = runs[-1]
    claimed: list[int] = []
    killed_at = None
    done: dict[int, dict[str, Any]] = {}
    while killed_at is None and victim.poll() is None:
        done, _ = read_markers(output)
        mine = [sid for sid, m in done.items() if m.get("pid") == victim.pid]
        claimed = _claims_of(output, victim.pid)
        if mine and claimed and sum(m["rows"] for m in done.values()) >= kill_at * len(ids):
            command.kill_hard(victim)
            killed_at = time.time()
            break
        time.sleep(0.05)
    ended = max(command.finish(p, log_path) for p, log_path in runs[:-1])
    if killed_at is None:  # it finished before it could be killed: report it, do not pretend
        return dict(base, bench="kill", gpus=n, skipped="the worker to kill finished before it held a claim")
    got = command.timings(output, launched, ended)
    tokens_done = int(sum(m["tokens"] for m in done.values()))
    per_gpu = (undisturbed["tokens_per_s"] / n if undisturbed.get("tokens_per_s") else base["tokens_per_s_1gpu"])
    expected = killed_at - launched + (got["tokens"] - tokens_done) / (max(n - 1, 1) * per_gpu)
    return dict(base, bench="kill", gpus=n, launch=f"{n} processes, one GPU each; one killed with SIGKILL",
                lease_s=lease_s, kill_at=kill_at, killed_after_s=round(killed_at - launched, 2),
                shards_held_when_killed=claimed, tokens_done_at_kill=tokens_done,
                wall_s=got["wall_s"], undisturbed_wall_s=undisturbed["wall_s"],
                undisturbed_launch=undisturbed["launch"],
                time_lost_s=round(got["wall_s"] - undisturbed["wall_s"], 2),
                expected_wall_s=round(expected, 2), lost_to_recovery_s=round(got["wall_s"] - expected, 2),
                shards=got["shards"], check=command.compare_outputs(output, reference, ids))


def _claims_of(output: Path, pid: int) -> list[int]:
    out = []
    for path in (output / "shards").glob("*.claim"):
        try:
            worker = json.loads(path.read_text()).get("worker", "")
        except (OSError, ValueError):
            continue
        if f":{pid}:" in worker:
            out.append(int(path.name.split(".")[0]))
    return sorted(out)


def table(records: list[dict[str, Any]]) -> str:
    """A short text table of the scaling records."""
    lines = [f"{'size':>5} {'launch':<46} {'tok/s':>9} {'wall s':>7} {'1-GPU wall':>10} {'eff':>6} {'steady eff':>10} "
             f"{'ids once':>8} {'min cos':>8}"]
    for r in records:
        if r.get("skipped"):
            lines.append(f"{r['model_size']:>5} skipped: {r['skipped']}")
            continue
        check = r.get("check", {})
        if r.get("bench") == "kill":
            lines.append(f"{r['model_size']:>5} {r['launch']:<46} {'':>9} {r['wall_s']:>7} "
                         f"{r['undisturbed_wall_s']:>10} lost {r['time_lost_s']}s, to recovery "
                         f"{r['lost_to_recovery_s']}s (lease {r['lease_s']}s) "
                         f"{str(check.get('ids_once')):>8} {check.get('min_cosine_vs_reference')}")
            continue
        lines.append(f"{r['model_size']:>5} {r['launch']:<46} {r['tokens_per_s']:>9,} {r['wall_s']:>7} "
                     f"{r['wall_s_1gpu']:>10} {r['scaling_efficiency']:>6} {r['steady_scaling_efficiency']:>10} "
                     f"{str(check.get('ids_once')):>8} {check.get('min_cosine_vs_reference')}")
    return "\n".join(lines)
