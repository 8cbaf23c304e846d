"""Shards taken over from a worker that is still alive: its lease ran out while it was paused (a long GC, SIGSTOP, a
stalled filesystem), or the taker runs with a shorter ``--lease-seconds`` than its own."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from helpers import MODEL, assert_ids_once, make_docs, read_vectors, write_jsonl

from pipeline.job.claims import Claims
from pipeline.job.manifest import Shard


def test_late_write_of_a_taken_over_shard_keeps_the_output_updatable(tmp_path: Path, minilm_dir: Path) -> None:
    """Worker A passes its ``owns()`` check for shard 0, then stalls before writing, its heartbeats stopped with it
    (a paused process); B takes the shard over, writes it, finishes the plan and commits; A's write lands between
    B's version switch and its garbage collection. A's file replaced B's in the pool, so no version linked the
    pool's file: garbage collection deleted the live part's pool copy and document index, exit 0, and every later
    run of the output failed."""
    from pipeline.job import claims, runner, versions
    from pipeline.job.config import make_config
    from pipeline.job.runner import run_job
    from pipeline.model.encoder import Embedder

    docs = make_docs(80, seed=3)
    write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"

    def config():
        return make_config({"input": (str(tmp_path / "in.jsonl"),), "output": str(out), "model": MODEL,
                            "device": "cpu", "batch_tokens": 2048, "shard_size": 20, "quiet": True})

    ea = Embedder.from_options(config().model_options())
    eb = Embedder.from_options(config().model_options())
    real_write, real_fault, real_json = runner.write_part, versions.fault_point, claims.write_json_atomic
    b_switched, a_wrote = threading.Event(), threading.Event()
    paused: list[str] = []  # A's worker name while it is paused

    def write_part(o, part, table, d):
        if not paused and part == 0:  # worker A, its owns() check passed: it stalls here
            paused.append(json.loads((out / "shards" / "000000.claim").read_text())["worker"])
            threading.Thread(target=lambda: run_job(config(), embedder=eb, lease_seconds=1), daemon=True).start()
            assert b_switched.wait(120), "worker B never committed"
            try:
                return real_write(o, part, table, d)  # A's late write, while B commits
            finally:
                a_wrote.set()
        return real_write(o, part, table, d)

    def write_json_atomic(path, body, *args, **kwargs):
        if paused and not a_wrote.is_set() and body.get("worker") == paused[0] and "beat_at" in body:
            return None  # a paused process does not beat
        return real_json(path, body, *args, **kwargs)

    def fault_point(name):
        if name == "after-switch" and not a_wrote.is_set():
            b_switched.set()
            a_wrote.wait(60)
        real_fault(name)

    try:
        runner.write_part, versions.fault_point, claims.write_json_atomic = write_part, fault_point, write_json_atomic
        summary = run_job(config(), embedder=ea, lease_seconds=1)  # worker A
    finally:
        runner.write_part, versions.fault_point, claims.write_json_atomic = real_write, real_fault, real_json
    assert summary.committed  # exit 0
    assert_ids_once(read_vectors(out), [d["id"] for d in docs])
    assert (out / "parts" / "part-000000.parquet").exists(), "the live part 0 was collected from parts/"
    assert (out / "parts" / "part-000000.docs.parquet").exists()
    more = docs + make_docs(1, seed=9, prefix="new")
    write_jsonl(tmp_path / "in.jsonl", more)
    run_job(config(), embedder=ea, lease_seconds=300)  # the nightly run
    assert_ids_once(read_vectors(out), [d["id"] for d in more])


def test_a_claim_is_taken_over_only_after_its_holders_own_lease(tmp_path: Path) -> None:
    """A worker judged others' claims by its own ``--lease-seconds``: one started with 2 s took the live claim of
    a worker with 600 s (which beats every 15 s), whose work was then dropped or written late (above)."""
    shard = Shard(0, 0, 0, 10)
    with Claims(tmp_path, lease_seconds=600, worker="a") as a:
        assert a.try_claim(shard)
        time.sleep(2.5)
        b = Claims(tmp_path, lease_seconds=2, worker="b")
        assert not b.try_claim(shard) and a.owns(shard)
