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


def _node_env(devices: list[str], i: int, cache: Path) -> dict[str, str]:
    return command.command_env(compile_cache=cache, devices=devices[i] if devices else "")


def _node_extra(devices: list[str]) -> tuple[str, ...]:
    return () if devices else ("--device", "cpu")


def scaling(size: str, *, tokenizer_dir: str, n_docs: int, shard_size: int, workdir: Path, logs: Path,
            devices: list[str], workers: int = 2, lease_s: float = 15.0, kill: bool = True,
            nodes: bool = True, deadline: float | None = None) -> list[dict[str, Any]]:
    """Records of one model size: the N-GPU launch, N separate processes, and the kill run.

    Args:
        size: a Qwen3-Embedding shape (``bench.synthetic.QWEN3_SHAPES``).
        tokenizer_dir: the Qwen tokenizer folder.
        n_docs: documents of the measured job; ``shard_size`` rows per shard (0: the command's own sizing).
        workdir: where the model, the corpus and the outputs go; ``logs``: each command's output.
        devices: the GPUs (``CUDA_VISIBLE_DEVICES`` values) to use, at least ``workers``; empty: CPU workers.
        workers: N, the GPUs (or CPU workers) of the scaled runs.
        lease_s: the lease of the kill run (how long the survivors wait for a dead worker's claims).
        kill, nodes: also run the separate-process and kill runs.
        deadline: ``time.time()`` after which no further run is started (the records so far are returned).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from pipeline.bench.gpu import make_corpus, random_model
    from pipeline.bench.synthetic import save_embedding_dir

    if devices and len(devices) < workers:
        raise ValueError(f"{workers} workers need {workers} GPUs, got {devices}")
    device = "cuda" if devices else "cpu"
    gpu = torch.cuda.get_device_name(0) if devices else "cpu"
    model_dir = workdir / f"model-{size}"
    model = random_model(size, device, "bfloat16" if devices else "float32")
    save_embedding_dir(model, model_dir, tokenizer_dir=tokenizer_dir)
    del model
    if devices:
        torch.cuda.empty_cache()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.model_max_length = 1 << 30
    texts = make_corpus(tok, n_docs + 64, seed=2)
    ids = [f"d{i}" for i in range(n_docs)]
    corpus = workdir / f"scale-{size}.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts[:n_docs]}), corpus,
                   row_group_size=min(shard_size or 1024, 1024))
    warm_corpus = workdir / f"warm-{size}.parquet"
    pq.write_table(pa.table({"id": [f"w{i}" for i in range(64)], "text": texts[n_docs:]}), warm_corpus)
    cache = workdir / f"compile-cache-{size}"
    shutil.rmtree(cache, ignore_errors=True)

    def out(name: str) -> Path:
        path = workdir / f"scale-{size}-{name}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def late() -> bool:
        return deadline is not None and time.time() > deadline

    base = {"bench": "scaling", "model_size": size, "gpu": gpu, "docs": n_docs,
            "shard_size": shard_size or "default (the command's own sizing: bytes of text per shard)",
            "date": time.strftime("%Y-%m-%d"), "compile_cache": "warm (filled by a 64-document job first)"}
    # 1. a small job fills the compile cache (its start-up is the cold one)
    cold = command.measure(command.run_args([warm_corpus], out("warm"), model_dir, extra=_launch_args(devices, 1)),
                           command.command_env(compile_cache=cache), out("warm"), logs / f"scale-{size}-warm.log")
    base["startup_s_cold"] = cold["startup_s"]
    # 2. one GPU, then N
    one_out = out("1")
    one = command.measure(command.run_args([corpus], one_out, model_dir, shard_size=shard_size,
                                           extra=_launch_args(devices, 1)),
                          command.command_env(compile_cache=cache), one_out, logs / f"scale-{size}-1.log")
    ref_ids, ref_vecs = command.read_output(one_out)
    reference = dict(zip(ref_ids, ref_vecs, strict=True))
    base.update({"tokens": one["tokens"], "shards": one["shards"], "tokens_per_s_1gpu": one["steady_tokens_per_s"],
                 "wall_s_1gpu": one["wall_s"], "startup_s_1gpu": one["startup_s"],
                 "gpu_seconds_1gpu": one["wall_s"], "one_gpu_check": command.compare_outputs(one_out, reference, ids),
                 "shard_timing_1gpu": one["shard_timing"], "log_1gpu": one["log"]})
    records = []
    if late():
        return [dict(base, skipped="deadline before the N-GPU run")]
    n_out = out(str(workers))
    many = command.measure(command.run_args([corpus], n_out, model_dir, shard_size=shard_size,
                                            extra=_launch_args(devices, workers)),
                           command.command_env(compile_cache=cache), n_out, logs / f"scale-{size}-{workers}.log")
    records.append(_record(base, many, one, workers, f"--gpus {workers}" if devices else f"--workers {workers}",
                           command.compare_outputs(n_out, reference, ids)))
    # 3. N separate processes ("nodes"), started together
    if nodes and not late():
        nodes_out = out("nodes")
        runs, launched = _start_nodes(corpus, nodes_out, model_dir, shard_size, devices, workers, cache, logs,
                                      f"scale-{size}-node")
        ended = max(command.finish(p, log_path) for p, log_path in runs)
        sep = {**command.timings(nodes_out, launched, ended), "log": command.startup_log(nodes_out, launched),
               "shard_timing": command.shard_timing(nodes_out)}
        records.append(_record(base, sep, one, workers, f"{workers} processes, one GPU each (two nodes)",
                               command.compare_outputs(nodes_out, reference, ids)))
    # 4. the same, one of them killed once it has committed a shard
    if kill and not late():
        records.append(_kill_run(base, corpus, out("kill"), model_dir, shard_size, devices, workers, cache, logs,
                                 size, lease_s, reference, ids, records[-1]))
    return records


def _record(base: dict[str, Any], many: dict[str, Any], one: dict[str, Any], n: int, launch: str,
            check: dict[str, Any]) -> dict[str, Any]:
    return dict(base, gpus=n, launch=launch, tokens_per_s=many["steady_tokens_per_s"], wall_s=many["wall_s"],
                startup_s=many["startup_s"], tail_s=many["tail_s"], workers_seen=many["workers"],
                scaling_efficiency=round(one["wall_s"] / (n * many["wall_s"]), 3),
                steady_scaling_efficiency=round(many["steady_tokens_per_s"] / (n * one["steady_tokens_per_s"]), 3),
                check=check, shard_timing=many["shard_timing"], log=many["log"])


def _start_nodes(corpus: Path, output: Path, model_dir: Path, shard_size: int, devices: list[str], n: int,
                 cache: Path, logs: Path, name: str, lease_s: float | None = None):
    extra = _node_extra(devices) + (("--lease-seconds", str(round(lease_s))) if lease_s else ())
    runs = []
    launched = None
    for i in range(n):
        log_path = logs / f"{name}{i}.log"
        proc, t = command.start(command.run_args([corpus], output, model_dir, shard_size=shard_size, extra=extra),
                                _node_env(devices, i, cache), log_path)
        launched = t if launched is None else launched
        runs.append((proc, log_path))
    return runs, launched


def _kill_run(base: dict[str, Any], corpus: Path, output: Path, model_dir: Path, shard_size: int,
              devices: list[str], n: int, cache: Path, logs: Path, size: str, lease_s: float,
              reference: dict[str, np.ndarray], ids: list[str], undisturbed: dict[str, Any]) -> dict[str, Any]:
    """N processes; the last is killed with SIGKILL once it has a done shard and holds a claim."""
    from pipeline.job.sink import read_markers

    runs, launched = _start_nodes(corpus, output, model_dir, shard_size, devices, n, cache, logs,
                                  f"scale-{size}-kill", lease_s)
    victim, victim_log = runs[-1]
    claimed: list[int] = []
    killed_at = None
    while killed_at is None and victim.poll() is None:
        done, _ = read_markers(output)
        mine = [sid for sid, m in done.items() if m.get("pid") == victim.pid]
        claimed = _claims_of(output, victim.pid)
        if mine and claimed:
            command.kill_hard(victim)
            killed_at = time.time()
            break
        time.sleep(0.05)
    ended = max(command.finish(p, log_path) for p, log_path in runs[:-1])
    if killed_at is None:  # it finished before it could be killed: report it, do not pretend
        return dict(base, bench="kill", gpus=n, skipped="the worker to kill finished before it held a claim")
    got = command.timings(output, launched, ended)
    return dict(base, bench="kill", gpus=n, launch=f"{n} processes, one GPU each; one killed with SIGKILL",
                lease_s=lease_s, killed_after_s=round(killed_at - launched, 2), shards_held_when_killed=claimed,
                wall_s=got["wall_s"], undisturbed_wall_s=undisturbed["wall_s"],
                time_lost_s=round(got["wall_s"] - undisturbed["wall_s"], 2), shards=got["shards"],
                check=command.compare_outputs(output, reference, ids))


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
                         f"{r['undisturbed_wall_s']:>10} lost {r['time_lost_s']}s (lease {r['lease_s']}s) "
                         f"{str(check.get('ids_once')):>8} {check.get('min_cosine_vs_reference')}")
            continue
        lines.append(f"{r['model_size']:>5} {r['launch']:<46} {r['tokens_per_s']:>9,} {r['wall_s']:>7} "
                     f"{r['wall_s_1gpu']:>10} {r['scaling_efficiency']:>6} {r['steady_scaling_efficiency']:>10} "
                     f"{str(check.get('ids_once')):>8} {check.get('min_cosine_vs_reference')}")
    return "\n".join(lines)
