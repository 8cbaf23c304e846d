"""Scale-out: several workers on one OUTPUT share shards through leased claims and give the vectors of one
worker, every id once, whatever happens to them (killed with -9, stopped with SIGTERM, stalled past their lease);
launcher ranks and GPU lists; the Slurm job scripts' signal handling and requeue (with stand-in commands); the
``slurm submit`` command; the nightly cron script run twice at once. Real Slurm is in ``test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    MODEL,
    REPO,
    assert_ids_once,
    assert_same_vectors,
    done_markers,
    embed_args,
    invoke,
    make_docs,
    part_mtimes,
    read_vectors,
    run_ok,
    subprocess_env,
    write_jsonl,
    write_parquet,
)

from pipeline.job.claims import Claims
from pipeline.job.config import ConfigError
from pipeline.job.launch import parse_gpus
from pipeline.job.manifest import Shard
from pipeline.job.ranks import detect_rank, device_for_rank
from pipeline.util import write_json_atomic

EMBED_SBATCH = REPO / "jobs" / "slurm" / "embed.sbatch"
NIGHTLY = REPO / "jobs" / "cron" / "nightly.sh"
N_JSONL, N_PARQUET, SHARD = 800, 400, 50


def n_shards(out: Path) -> int:
    """Shards of the output's plan (embed shards of SHARD rows, and dup shards for texts that repeat)."""
    return len(json.loads((out / "manifest.json").read_text())["shards"])


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: see conftest


# --- launcher ranks and GPU lists -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1, 0, "local")),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
          "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, (3, 4, 0, "slurm-array")),
        # an array whose ids start at 10, two srun tasks per array task: task 11's second task is rank 3 of 4
        ({"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "10",
          "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}, (3, 4, 1, "slurm-array")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1, "slurm")),
        ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}, (2, 4, 2, "torchrun")),
        ({"JOB_COMPLETION_INDEX": "7", "JOB_COMPLETION_COUNT": "9"}, (7, 9, 0, "k8s")),
        # Slurm wins over torchrun variables that a wrapper may have left behind
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "0", "WORLD_SIZE": "1"}, (1, 2, 0, "slurm")),
    ],
)
def test_detect_rank(env: dict[str, str], expected: tuple[int, int, int, str]) -> None:
    rank = detect_rank(env)
    assert (rank.rank, rank.world, rank.local_rank, rank.source) == expected


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import pipeline.job.launch as launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(launch, "_driver_gpu_count", lambda: None)  # as on a machine without the driver


def test_device_for_rank(four_gpus: None) -> None:
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert device_for_rank(None, torchrun) == "cuda:1"
    assert device_for_rank("cuda", {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "6"}) == "cuda:2"
    assert device_for_rank("cpu", torchrun) == "cpu"  # an explicit device is kept
    assert device_for_rank("cuda:3", torchrun) == "cuda:3"
    assert device_for_rank(None, {}) is None  # no launcher: the configured default


def test_device_for_rank_with_one_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # Slurm bound one GPU to this task
    assert device_for_rank("cuda", {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}) == "cuda"


def test_parse_gpus_without_cuda_visible_devices(four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_gpus("all") == ["0", "1", "2", "3"]
    assert parse_gpus("2") == ["0", "1"]
    assert parse_gpus("0,1,3") == ["0", "1", "3"]
    assert parse_gpus(" 3, 1 ") == ["3", "1"]
    for bad in ("5", "0,4", "0,0", "two", "0", "-1"):
        with pytest.raises(ConfigError, match="gpus"):
            parse_gpus(bad)


def test_gpu_count_from_the_driver_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher counts GPUs through the driver, so it starts its workers without importing torch first."""
    import subprocess
    import sys

    import pipeline.job.launch as launch

    assert launch._driver_gpu_count("libno-such-cuda.so.1") is None  # no driver here: torch is asked, as before
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launch, "_driver_gpu_count", lambda: 2)
    assert parse_gpus("all") == ["0", "1"]
    code = ("import sys; import pipeline.job.launch as l; l._driver_gpu_count = lambda: 2; "
            "assert l.parse_gpus('all') == ['0', '1']; print('torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert got.stdout.strip() == "False"


def test_parse_gpus_within_the_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm gave GPUs 4-7: ids count within them, so no worker lands on a GPU of another job."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert parse_gpus("all") == ["4", "5", "6", "7"]
    assert parse_gpus("2") == ["4", "5"]
    assert parse_gpus("0,3") == ["4", "7"]
    assert parse_gpus("4") == ["4", "5", "6", "7"]
    for bad in ("5", "4,5"):  # physical names are not ids here
        with pytest.raises(ConfigError, match="4 visible"):
            parse_gpus(bad)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")  # UUIDs are passed on as they are
    assert parse_gpus("all") == ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no CUDA device"):
        parse_gpus("all")


def test_gpus_all_without_gpu_is_an_error_not_a_cpu_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    write_jsonl(tmp_path / "in.jsonl", make_docs(3))
    result = invoke(*embed_args([tmp_path / "in.jsonl"], tmp_path / "out", "--gpus", "all"))
    assert result.exit_code == 1 and "no CUDA device is visible" in result.output


# --- claims ---------------------------------------------------------------------------------------------------


def test_claim_is_taken_over_after_the_lease(tmp_path: Path) -> None:
    shard = Shard(0, 0, 0, 10)
    a = Claims(tmp_path, lease_seconds=0.5, worker="a")
    b = Claims(tmp_path, lease_seconds=0.5, worker="b")
    assert a.try_claim(shard) and a.owns(shard)
    assert not b.try_claim(shard), "a live claim was taken"
    time.sleep(0.7)  # a has no heartbeat running: its claim goes stale
    assert b.try_claim(shard) and b.owns(shard) and not a.owns(shard)
    a.release(shard)  # releasing a claim one no longer owns leaves the new owner's file alone
    assert b.owns(shard)
    (tmp_path / "shards" / f"{shard.name}.done.json").write_text("{}")
    b.release(shard)
    assert a.try_claim(shard), "a marker without its part counted as done"
    a.release(shard)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / f"part-{shard.name}.parquet").write_bytes(b"")
    assert not a.try_claim(shard), "a done shard was claimed"


def test_heartbeat_keeps_a_claim_alive(tmp_path: Path) -> None:
    shard = Shard(0, 0, 0, 10)
    with Claims(tmp_path, lease_seconds=1.0, worker="a") as a:
        assert a.try_claim(shard)
        time.sleep(2.0)
        assert not Claims(tmp_path, lease_seconds=1.0, worker="b").try_claim(shard)
    assert not (tmp_path / "shards" / f"{shard.name}.claim").exists(), "leaving did not release the claim"


def test_heartbeat_never_refreshes_a_claim_taken_over(tmp_path: Path) -> None:
    """A worker that stalled past its lease lost its claim to b; when b dies too, c must be able to take the
    shard over: a's heartbeat must not keep b's claim alive."""
    shard = Shard(0, 0, 0, 10)
    with Claims(tmp_path, lease_seconds=1.0, worker="a") as a:
        assert a.try_claim(shard)
        write_json_atomic(a.path(shard), {"shard": 0, "worker": "b", "claimed_at": time.time()})  # b took over
        time.sleep(1.8)  # b is dead: no heartbeat of its own
        assert shard.id not in a.held, "a still holds the claim that b took over"
        assert Claims(tmp_path, lease_seconds=1.0, worker="c").try_claim(shard), "b's claim was kept alive"


def test_claims_of_a_committed_plan_are_removed_and_their_holder_lets_go_quietly(tmp_path: Path, caplog) -> None:
    """A commit removes the claims of done shards (one left by a worker killed after its marker); a live worker
    still holding such a claim, between its marker and its release, drops it without calling it taken over."""
    done, open_ = Shard(0, 0, 0, 10), Shard(1, 0, 10, 20)
    with Claims(tmp_path, lease_seconds=1.0, worker="a") as a:
        assert a.try_claim(done) and a.try_claim(open_)
        (tmp_path / "shards" / f"{done.name}.done.json").write_text("{}")
        assert Claims(tmp_path, worker="b").drop_committed([done, open_]) == 1
        assert not a.path(done).exists() and a.owns(open_), "only the done shard's claim goes"
        time.sleep(0.6)  # one heartbeat
        assert a.held == {open_.id}
    assert "taken over" not in caplog.text


def _claim_of(tmp_path: Path, worker: str = "other", **identity) -> Shard:
    """Shard 0 claimed just now by ``worker`` whose process is ``identity`` (default: this process)."""
    from pipeline.job.claims import process_identity

    shard = Shard(0, 0, 0, 10)
    (tmp_path / "shards").mkdir(parents=True, exist_ok=True)
    write_json_atomic(tmp_path / "shards" / f"{shard.name}.claim",
                      {"shard": 0, "worker": worker, "claimed_at": time.time(), **process_identity(), **identity})
    return shard


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_of_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """Killed with -9 on this host: its pid is free (or taken by a process started later). Its claim is taken over
    at once instead of after the 300 s lease (issue 13, item 12)."""
    me = Claims(tmp_path, lease_seconds=300, worker="me")
    assert me.try_claim(_claim_of(tmp_path, pid=_gone_pid())), "the claim of a dead local process was not taken"
    assert me.owns(Shard(0, 0, 0, 10))
    # the pid now names another process (pid reuse): its start time differs from the one in the claim
    assert Claims(tmp_path, lease_seconds=300, worker="me2").try_claim(_claim_of(tmp_path, started="1"))


@pytest.mark.parametrize("identity", [
    {},  # the claiming process is alive (here: this very process, under another worker name)
    {"pid_ns": "1"},  # another container that shares the host name: its pid 1 is not ours to look at
    {"boot_id": "another-boot"},
    {"host": "another-host"},
    {"started": None},  # written without a process identity (no /proc, an older version)
])
def test_claims_that_may_be_alive_wait_for_the_lease(tmp_path: Path, identity: dict) -> None:
    if identity and "started" not in identity:
        identity = {**identity, "pid": _gone_pid()}  # a pid that is free here, yet that is no proof elsewhere
    shard = _claim_of(tmp_path, **identity)
    assert not Claims(tmp_path, lease_seconds=300, worker="me").try_claim(shard)


def test_waiting_for_a_live_claim_says_so_once(tmp_path: Path, minilm_dir: Path, caplog) -> None:
    """A worker with nothing left but shards claimed by a live worker elsewhere says at WARNING (the console),
    once, which shards, which worker and when the lease runs out."""
    import logging
    import threading

    from pipeline.job.config import make_config
    from pipeline.job.runner import run_job

    write_jsonl(tmp_path / "in.jsonl", make_docs(20))
    cfg = make_config({"input": (str(tmp_path / "in.jsonl"),), "output": str(tmp_path / "out"), "model": MODEL,
                       "device": "cpu", "batch_tokens": 2048, "shard_size": 10, "quiet": True})
    from pipeline.job.plan import prepare

    prepare(cfg)
    _claim_of(tmp_path / "out", worker="elsewhere:42:abc", host="another-host")  # shard 0, alive elsewhere
    stop = threading.Event()

    def stop_after_some_waiting() -> None:  # a SIGTERM, once shard 1 is done and a few rounds of waiting passed
        while not (tmp_path / "out" / "shards" / "000001.done.json").exists() and not stop.wait(0.1):
            pass
        stop.wait(4.0)
        stop.set()

    threading.Thread(target=stop_after_some_waiting, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        summary = run_job(cfg, stop=stop, lease_seconds=30)
    stop.set()
    assert summary.stopped_early and summary.shards_done == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "waiting" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "shards 0 held by elsewhere:42:abc" in warnings[0] and "taken over in" in warnings[0]


# --- workers on one output --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """1,200 short documents in a JSONL file and a Parquet file of 50-row row groups: 24 shards of 50."""
    root = tmp_path_factory.mktemp("scale_corpus") / "corpus"
    docs = make_docs(N_JSONL + N_PARQUET, seed=5, min_words=1, max_words=5)
    write_jsonl(root / "a.jsonl", docs[:N_JSONL])
    write_parquet(root / "b.parquet", docs[N_JSONL:], row_groups=[50] * (N_PARQUET // 50))
    return root, [d["id"] for d in docs]


def job_args(corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return embed_args([corpus_dir], out, "--shard-size", str(SHARD), *extra)


@pytest.fixture(scope="module")
def reference(corpus, minilm_dir, tmp_path_factory):
    """One worker, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("scale_reference") / "out"
    run_ok(*job_args(corpus[0], out))
    return read_vectors(out)


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m pipeline.cli ARGS`` as a real child process, output to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=subprocess_env(), cwd=log.parent)


def kill_when(victim: subprocess.Popen, procs: list[subprocess.Popen], ready: Callable[[], bool],
              logs: list[Path]) -> None:
    """SIGKILL ``victim`` in a state where ``ready()`` holds: it is frozen (SIGSTOP) and asked again first, so that
    it cannot finish the shard it was caught in between the look and the kill."""
    while True:
        wait_until(procs, ready, logs)
        victim.send_signal(signal.SIGSTOP)
        if ready():
            victim.send_signal(signal.SIGKILL)
            return
        victim.send_signal(signal.SIGCONT)


def wait_until(procs: list[subprocess.Popen], ready: Callable[[], bool], logs: list[Path],
               timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"a run ended (exit {proc.returncode}) before the moment to act:\n{log.read_text()}")
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            pytest.fail("timed out waiting:\n" + "\n".join(log.read_text() for log in logs))
        time.sleep(0.02)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def marker_workers(out: Path) -> dict[int, str]:
    """shard id -> the worker that committed it."""
    return {int(m.name.split(".")[0]): read_json(m).get("worker", "") for m in done_markers(out)}


def claims_of(out: Path, prefix: str) -> list[int]:
    """Shards whose claim file names a worker starting with ``prefix``."""
    return [int(c.name.split(".")[0]) for c in (out / "shards").glob("*.claim")
            if read_json(c).get("worker", "").startswith(prefix)]


def check_same_as_one_worker(out: Path, reference, ids: list[str]) -> None:
    table = read_vectors(out)
    assert_ids_once(table, ids)
    assert_same_vectors(table, reference)
    assert len(done_markers(out)) == n_shards(out)
    assert not list((out / "shards").glob("*.claim")), "claims left behind"


def test_two_workers_one_killed_mid_shard_the_other_takes_over(tmp_path, corpus, reference):
    corpus_dir, ids = corpus
    out = tmp_path / "out"
    args = job_args(corpus_dir, out, "--lease-seconds", "3")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = start(args, logs[0]), start(args, logs[1])
    host = socket.gethostname()
    a_name, b_name = f"{host}:{a.pid}:", f"{host}:{b.pid}:"

    seen: dict[str, list[int]] = {}

    def a_is_mid_shard() -> bool:  # what it finds last is what a holds when it is killed (it is frozen then)
        done = marker_workers(out)
        seen["orphaned"] = [s for s in claims_of(out, a_name) if s not in done]
        seen["done"] = list(done)
        return any(w.startswith(a_name) for w in done.values()) and bool(seen["orphaned"])

    try:
        kill_when(a, [a, b], a_is_mid_shard, logs)
        # read at the kill, not after it: b takes a dead process's claims over at once (process_is_gone)
        orphaned = seen["orphaned"]
        assert a.wait(timeout=30) == -signal.SIGKILL
        assert len(seen["done"]) < n_shards(out)
        t_kill = time.monotonic()
        assert b.wait(timeout=120) == 0, logs[1].read_text()
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    print(f"a killed holding shards {orphaned}; b finished {time.monotonic() - t_kill:.1f}s later")
    workers = marker_workers(out)
    assert all(workers[s].startswith(b_name) for s in orphaned), workers
    assert "taking over the claim" in logs[1].read_text()
    check_same_as_one_worker(out, reference, ids)


def test_rerun_after_kill_9_takes_the_dead_workers_claims_at_once(tmp_path, corpus, reference):
    """Killed with -9 mid-shard, then the same command again on the same host with the default 300 s lease: the
    rerun takes the dead worker's claims over at once and finishes (issue 13, item 12)."""
    corpus_dir, ids = corpus
    out = tmp_path / "out"
    args = job_args(corpus_dir, out)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = start(args, logs[0])
    mine = f"{socket.gethostname()}:{a.pid}:"
    procs = [a]
    try:
        kill_when(a, [a], lambda: len(done_markers(out)) >= 2
                  and any(s not in marker_workers(out) for s in claims_of(out, mine)), logs[:1])
        assert a.wait(timeout=30) == -signal.SIGKILL
        orphaned = [s for s in claims_of(out, mine) if s not in marker_workers(out)]
        assert orphaned, "the killed worker held no claim"
        t0 = time.monotonic()
        procs.append(start(args, logs[1]))
        assert procs[1].wait(timeout=150) == 0, logs[1].read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    print(f"a killed holding shards {orphaned}; the rerun finished {time.monotonic() - t0:.1f}s later")
    assert "on this host is gone" in logs[1].read_text()
    check_same_as_one_worker(out, reference, ids)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_while_the_command_starts_exits_75(tmp_path: Path, minilm_dir: Path, workers: str) -> None:
    """SIGTERM in the first moments (here: as soon as the child has imported click, long before ``run`` is
    called) stops the run with 75 like any other, instead of killing it (-15) (issue 13, item 13)."""
    write_jsonl(tmp_path / "in.jsonl", make_docs(30))
    args = embed_args([tmp_path / "in.jsonl"], tmp_path / "out", "--workers", workers)
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env(), cwd=tmp_path)
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:  # -X importtime: a line per module once imported
            if raw.decode(errors="replace").split("|")[-1].strip() == "click":
                proc.send_signal(signal.SIGTERM)
                break
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "\n".join(line for line in rest.decode().splitlines() if not line.startswith("import time"))
    assert proc.returncode == 75, log
    assert "rerun the same command" in log


def test_workers_2_equals_one_worker(tmp_path, corpus, reference):
    corpus_dir, ids = corpus
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start(job_args(corpus_dir, out, "--workers", "2"), log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    check_same_as_one_worker(out, reference, ids)
    pids = {w.split(":")[1] for w in marker_workers(out).values()}
    assert len(pids) == 2, f"shards were committed by {pids}, not by two workers"


def test_sigterm_to_workers_2_then_rerun(tmp_path, corpus, reference):
    corpus_dir, ids = corpus
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    args = job_args(corpus_dir, out, "--workers", "2")
    proc = start(args, log)
    wait_until([proc], lambda: len(done_markers(out)) >= 3, [log])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()
    done = len(done_markers(out))
    print(f"stopped with {done} of {n_shards(out)} shards done")
    assert done < n_shards(out)
    assert not list((out / "shards").glob("*.claim")), "stopped workers kept their claims"
    before = part_mtimes(out)
    rerun = start(args, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert all(part_mtimes(out)[name] == t for name, t in before.items()), "finished shards were redone"
    check_same_as_one_worker(out, reference, ids)


def test_a_result_is_dropped_when_the_claim_was_taken_over(tmp_path, minilm_dir, caplog):
    """Worker a stalls past its lease on shard 0 and another worker takes the claim over: a must not commit its
    (here deliberately wrong) result, must stop refreshing the other worker's claim, and takes the shard back
    once that claim has gone stale: the output is still every id once with the right vectors."""
    import logging

    from pipeline.job.config import make_config
    from pipeline.job.runner import run_job
    from pipeline.model.encoder import Embedder

    docs = make_docs(80, seed=3)
    write_jsonl(tmp_path / "in.jsonl", docs)

    def config(out: Path):
        return make_config({"input": (str(tmp_path / "in.jsonl"),), "output": str(out), "model": MODEL,
                            "device": "cpu", "batch_tokens": 2048, "shard_size": 20, "quiet": True})

    out = tmp_path / "out"
    embedder = Embedder.from_options(config(out).model_options())
    real = embedder.embed_encoded
    calls: list[int] = []

    def stalled_on_first_shard(enc, **kwargs):
        vectors = real(enc, **kwargs)
        calls.append(len(enc))
        if len(calls) == 2:  # the first shard's (the first call embeds the check texts)
            claim = out / "shards" / "000000.claim"
            write_json_atomic(claim, {"shard": 0, "worker": "intruder", "claimed_at": time.time()})
            return -vectors
        return vectors

    embedder.embed_encoded = stalled_on_first_shard
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = run_job(config(out), embedder=embedder, lease_seconds=1)
    assert "dropping this result" in caplog.text
    assert len(calls) == 1 + 5, f"shard 0 was not embedded again: {calls}"
    assert summary.shards_done == 4 and not summary.stopped_early
    embedder.embed_encoded = real
    run_job(config(tmp_path / "clean"), embedder=embedder, lease_seconds=1)
    table = read_vectors(out)
    assert_ids_once(table, [d["id"] for d in docs])
    assert_same_vectors(table, read_vectors(tmp_path / "clean"))


# --- the Slurm job script, with stand-ins for embed-corpus and scontrol ------------------------------------------


FAKE_EMBED = """#!/usr/bin/env bash
echo "$*" > "$FAKE_DIR/args"
s=
trap 'echo USR1 >> "$FAKE_DIR/signals"; [[ -n $s ]] && kill $s; exit 75' USR1
trap 'echo TERM >> "$FAKE_DIR/signals"; [[ -n $s ]] && kill $s; exit 75' TERM
case "$FAKE_MODE" in ok) exit 0 ;; fail) exit 3 ;; esac
sleep 60 &
s=$!
touch "$FAKE_DIR/started"
wait $s
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol"
exit "${FAKE_SCONTROL_RC:-0}"
"""
FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" > "$FAKE_DIR/srun"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""


def run_sbatch_script(tmp_path: Path, mode: str, send: signal.Signals | None = None,
                      **env: str) -> tuple[int, dict[str, str]]:
    """Run embed.sbatch as Slurm would (array task 41_1) with stand-in commands; optionally signal it once the
    stand-in embed-corpus runs. Returns its exit code and what the stand-ins recorded."""
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("embed-corpus", FAKE_EMBED), ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_"))}
    full_env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(fake), FAKE_MODE=mode,
                    SLURM_JOB_ID="42", SLURM_ARRAY_JOB_ID="41", SLURM_ARRAY_TASK_ID="1", SLURM_SUBMIT_DIR=str(tmp_path),
                    EMBED_JOB="job.yaml", EMBED_CORPUS=str(bin_dir / "embed-corpus"))
    full_env.update(env)
    proc = subprocess.Popen(["bash", str(EMBED_SBATCH), "--lease-seconds", "9"], env=full_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        deadline = time.monotonic() + 30
        while not (fake / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.02)
        proc.send_signal(send)
    output, _ = proc.communicate(timeout=60)
    seen = {p.name: p.read_text().strip() for p in fake.iterdir() if p.is_file()}
    seen["output"] = output
    return proc.returncode, seen


def test_sbatch_script_forwards_the_time_limit_signal_and_requeues(tmp_path: Path) -> None:
    rc, seen = run_sbatch_script(tmp_path, "wait", signal.SIGUSR1)
    assert rc == 0, seen["output"]
    assert seen["signals"] == "USR1", "embed-corpus was not asked to stop"
    assert seen["scontrol"] == "requeue 41_1"
    assert "requeued 41_1" in seen["output"]


def test_sbatch_script_stops_on_sigterm_without_requeue(tmp_path: Path) -> None:
    """SIGTERM is scancel (or preemption): the job stops cleanly and must stay cancelled."""
    rc, seen = run_sbatch_script(tmp_path, "wait", signal.SIGTERM)
    assert rc == 75, seen["output"]
    assert seen["signals"] == "USR1", "embed-corpus was not asked to stop (USR1, which srun passes on)"
    assert "scontrol" not in seen and "not requeued" in seen["output"]


def test_sbatch_script_without_requeue_exits_75(tmp_path: Path) -> None:
    rc, seen = run_sbatch_script(tmp_path, "wait", signal.SIGUSR1, FAKE_SCONTROL_RC="1")
    assert rc == 75 and "could not requeue" in seen["output"]


def test_sbatch_script_success_failure_and_arguments(tmp_path: Path) -> None:
    rc, seen = run_sbatch_script(tmp_path / "ok", "ok", EMBED_WORKERS="2")
    assert rc == 0 and "scontrol" not in seen
    assert seen["args"] == "run job.yaml --quiet --workers 2 --device cpu --lease-seconds 9"
    rc, seen = run_sbatch_script(tmp_path / "fail", "fail")
    assert rc == 3 and "scontrol" not in seen and "failed (exit 3)" in seen["output"]
    rc, seen = run_sbatch_script(tmp_path / "gpu", "ok", CUDA_VISIBLE_DEVICES="0,1")
    assert rc == 0 and seen["args"] == "run job.yaml --quiet --gpus all --lease-seconds 9"
    rc, seen = run_sbatch_script(tmp_path / "tasks", "ok", SLURM_NTASKS="4", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert rc == 0 and seen["args"] == "run job.yaml --quiet --lease-seconds 9"  # each task: cuda:SLURM_LOCALID
    assert seen["srun"].startswith("--kill-on-bad-exit=0 --ntasks=4 ")


FAKE_INDEX_CORPUS = """#!/usr/bin/env bash
case "$1" in
    status) echo "{\\"shards_pending\\": ${FAKE_PENDING:-0}}" ;;
    index) echo "$*" > "$FAKE_DIR/index" ;;
esac
"""


def test_index_sbatch_builds_only_a_finished_output(tmp_path: Path) -> None:
    fake = tmp_path / "embed-corpus"
    fake.write_text(FAKE_INDEX_CORPUS)
    fake.chmod(0o755)
    script = REPO / "jobs" / "slurm" / "index.sbatch"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(FAKE_DIR=str(tmp_path), EMBED_CORPUS=str(fake), EMBED_OUTPUT="/data/out", SLURM_JOB_ID="7",
                SLURM_SUBMIT_DIR=str(tmp_path))

    def run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=60)

    done = run(EMBED_INDEX_ARGS="--max-memory 1G --workers 2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "index").read_text().strip() == "index build /data/out --max-memory 1G --workers 2"
    (tmp_path / "index").unlink()
    assert run(EMBED_INDEX_MODE="update").returncode == 0
    assert (tmp_path / "index").read_text().strip() == "index update /data/out"
    (tmp_path / "index").unlink()
    unfinished = run(FAKE_PENDING="3")
    assert unfinished.returncode == 1 and "still has 3 shards to embed" in unfinished.stdout
    assert not (tmp_path / "index").exists()


# --- embed-corpus slurm submit ----------------------------------------------------------------------------------


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"input: [{tmp_path / 'in'}]\noutput: {tmp_path / 'out'}\nmodel: {MODEL}\n")
    return path


def test_slurm_submit_dry_run(job_file: Path, tmp_path: Path) -> None:
    result = invoke("slurm", "submit", job_file, "--nodes", "3", "--gpus-per-node", "4", "--partition", "gpu",
                    "--time", "2:00:00", "--sbatch-arg=--qos=high", "--dry-run")
    assert result.exit_code == 0, result.output
    mkdir, embed, index = result.output.strip().splitlines()
    assert mkdir == f"mkdir -p {tmp_path / 'out' / 'logs' / 'slurm'}"
    for part in ("--array=0-2", "--gpus-per-node=4", "--ntasks-per-node=1", "--partition=gpu", "--time=2:00:00",
                 "--qos=high", f"EMBED_JOB={job_file}", "embed.sbatch"):
        assert part in embed
    assert '--dependency="afterok:${ARRAY_ID%%;*}"' in index and f"EMBED_OUTPUT={tmp_path / 'out'}" in index
    assert "--kill-on-invalid-dep=yes" in index and index.endswith("index.sbatch")
    per_gpu = invoke("slurm", "submit", job_file, "--nodes", "2", "--gpus-per-node", "8", "--per-gpu", "--dry-run")
    assert "--ntasks-per-node=8 --gpus-per-task=1" in per_gpu.output
    bad = invoke("slurm", "submit", job_file, "--nodes", "0", "--dry-run")
    assert bad.exit_code != 0 and "nodes" in bad.output


def test_slurm_submit_queues_the_index_after_the_array(job_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "sbatch").write_text(
        '#!/usr/bin/env bash\necho "${EMBED_JOB:-}|${EMBED_OUTPUT:-}|$*" >> "$CALLS"\n'
        'n=$(wc -l < "$CALLS"); echo "$((1000 + n));cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(calls))
    result = invoke("slurm", "submit", job_file, "--nodes", "2")
    assert result.exit_code == 0, result.output
    first, second = calls.read_text().splitlines()
    assert first.startswith(f"{job_file}||") and "--array=0-1" in first
    # the index job knows the job file: its build takes the `index:` options
    assert second.startswith(f"{job_file}|{tmp_path / 'out'}|--dependency=afterok:1001 ")
    assert "job 1001" in result.output and "index job: 1002" in result.output
    assert (tmp_path / "out" / "logs" / "slurm").is_dir()


# --- the nightly cron script -----------------------------------------------------------------------------------


def nightly(job: Path, *args: str, **env: str) -> subprocess.Popen:
    full_env = subprocess_env()
    full_env.update(EMBED_CORPUS=str(Path(sys.executable).parent / "embed-corpus"), **env)
    return subprocess.Popen(["bash", str(NIGHTLY), str(job), *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_nightly_twice_at_once(tmp_path: Path, minilm_dir: Path) -> None:
    """Skip mode: of two runs started together one embeds and indexes, the other exits 0 at once. Wait mode
    (after a new input file): the second waits, then finds nothing left to embed."""
    docs = make_docs(150, seed=9)
    write_jsonl(tmp_path / "in" / "day1.jsonl", docs[:100])
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: [{tmp_path / 'in'}]\noutput: {out}\nmodel: {MODEL}\nshard-size: 50\n"
                   "batch-tokens: 2048\ndevice: cpu\n")

    runs = [nightly(job), nightly(job)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in runs]
    assert [rc for rc, _ in results] == [0, 0], results
    skipped = [text for _, text in results if "skipped: another run holds" in text]
    assert len(skipped) == 1, results
    assert len(list((out / "logs").glob("run-*.log"))) == 1, "embedding ran twice"
    assert_ids_once(read_vectors(out), [d["id"] for d in docs[:100]])
    assert json.loads((out / "index" / "info.json").read_text())["ntotal"] == 100
    log = (out / "logs" / "nightly.log").read_text()
    assert "index build" in log and log.count(" done\n") == 1

    write_jsonl(tmp_path / "in" / "day2.jsonl", docs[100:])
    before = part_mtimes(out)
    runs = [nightly(job, NIGHTLY_WAIT="300"), nightly(job, NIGHTLY_WAIT="300")]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in runs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert not any("skipped" in text for _, text in results)
    after = part_mtimes(out)
    assert all(after[name] == t for name, t in before.items()), "yesterday's shards were embedded again"
    assert len(after) == len(before) + 1
    assert_ids_once(read_vectors(out), [d["id"] for d in docs])
    log = (out / "logs" / "nightly.log").read_text()
    assert log.count(" done\n") == 3 and "50 vectors added, 150 in all" in log and "0 vectors added, 150 in all" in log
    assert json.loads((out / "index" / "info.json").read_text())["ntotal"] == 150


def test_nightly_rebuilds_with_the_jobs_index_options_and_refuses_another_output(tmp_path: Path,
                                                                                   minilm_dir: Path) -> None:
    """A rebuild (NIGHTLY_REBUILD=always, or one `index update` calls due) ran `index build` with its defaults: the
    job's `index: {factory: ..., metric: l2}` became Flat with inner product, exit 0. And `--output` on the
    script's line sent the run elsewhere while the lock, the log and the index steps used the job file's."""
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(40, seed=9))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: [{tmp_path / 'in'}]\noutput: {out}\nmodel: {MODEL}\nbatch-tokens: 2048\n"
                   "device: cpu\nindex: {factory: 'IVF2,Flat', metric: l2, target-recall: 0.9}\n")
    proc = nightly(job, NIGHTLY_REBUILD="always")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    info = json.loads((out / "index" / "info.json").read_text())
    assert (info["factory"], info["metric"], info["tuning"]["target"]) == ("IVF2,Flat", "l2", 0.9)
    proc = nightly(job, "--output", str(tmp_path / "elsewhere"))
    rc, text = proc.wait(timeout=60), proc.stdout.read()
    assert rc == 2 and "not as --output" in text and not (tmp_path / "elsewhere").exists()
    result = invoke("index", "build", str(out), "--job", str(job), "--metric", "ip")  # a flag given wins
    assert result.exit_code == 0, result.output
    info = json.loads((out / "index" / "info.json").read_text())
    assert (info["factory"], info["metric"]) == ("IVF2,Flat", "ip")


def test_nightly_fails_loudly(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"input: [{tmp_path / 'missing'}]\noutput: {tmp_path / 'out'}\nmodel: {MODEL}\n")
    proc = nightly(job)
    rc, text = proc.wait(timeout=120), proc.stdout.read()
    assert rc == 1 and "FAILED: embed-corpus run exited 1" in text
    assert "FAILED" in (tmp_path / "out" / "logs" / "nightly.log").read_text()
