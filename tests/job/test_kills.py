"""kill -9 at precise moments of incremental runs (fault points in the code, ``EMBED_CORPUS_FAULT``): after each
kill a reader sees the previous version or the new one whole, never a mix; the rerun then gives exactly what a
run from scratch over the current input gives. Also the windows of ``--overwrite`` and of a part's rename."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import (
    assert_ids_once,
    assert_same_vectors,
    embed_args,
    make_docs,
    read_vectors,
    run_ok,
    subprocess_env,
    write_jsonl,
    write_parquet,
)

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]

SHARD = ("--shard-size", "12", "--lease-seconds", "3")  # a killed worker's claims are taken over soon


def killed_run(args: list[str], point: str, log: Path) -> None:
    """Run the CLI in a child process that kills itself (SIGKILL) at the fault point ``point``."""
    env = subprocess_env()
    env["EMBED_CORPUS_FAULT"] = point
    with open(log, "ab") as f:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=log.parent, timeout=300)
    assert proc.returncode == -9, f"the run never reached {point} (exit {proc.returncode}):\n{log.read_text()}"


def same(a: pa.Table, b: pa.Table) -> bool:
    if a.column("id").to_pylist() != b.column("id").to_pylist():
        return False
    assert_same_vectors(a, b)
    return True


def edit(corpus: Path, step: int) -> None:
    """A different change of the input for each step: edits, deletions, additions, duplicates, a rename."""
    docs = make_docs(48, seed=40 + step)
    if step % 4 == 0:
        docs[step % 48]["text"] = f"edited text number {step}"
        del docs[(step * 7) % 40]
    elif step % 4 == 1:
        docs += [{"id": f"dup{step}", "title": "D", "text": docs[5]["text"]}]  # a text twice
    elif step % 4 == 2:
        docs = docs[:30]
    write_jsonl(corpus / "a.jsonl", docs[:24])
    write_parquet(corpus / "b.parquet", docs[24:])
    extras = sorted(corpus.glob("c*.jsonl"))
    if step % 3 == 0:  # a new third file
        for old in extras:
            old.unlink()
        write_jsonl(corpus / "c.jsonl", make_docs(10, seed=90 + step, start=1000))
    elif extras:  # the third file renamed
        extras[0].rename(corpus / f"c{step}.jsonl")


POINTS = [
    "during-plan", "after-plan-write", "before-part-rename", "after-part-rename", "after-marker", "after-marker@2",
    "before-version-rename", "before-switch", "after-switch", "after-commit", "during-gc",
]


@pytest.mark.parametrize("bucket_rows", [None, 5], ids=["one bucket", "buckets of 5 rows"])
def test_kill_at_every_moment_of_incremental_runs(tmp_path, minilm_dir, bucket_rows, monkeypatch):
    if bucket_rows:  # planning and commits spill to buckets: the same outcome at every kill point
        monkeypatch.setenv("EMBED_CORPUS_BUCKET_ROWS", str(bucket_rows))
        monkeypatch.setattr("pipeline.job.buckets.BUCKET_ROWS", bucket_rows)
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    edit(corpus, 0)
    run_ok(*embed_args([corpus], out, *SHARD))
    run_ok(*embed_args([corpus], out, *SHARD))  # (nothing new)
    log = tmp_path / "runs.log"
    for step, point in enumerate(POINTS, start=1):
        before = read_vectors(out)
        edit(corpus, step)
        expected_out = tmp_path / f"scratch{step}"
        run_ok(*embed_args([corpus], expected_out, *SHARD))
        expected = read_vectors(expected_out)
        if point == "during-gc":  # there must be a version to collect: commit one more first
            run_ok(*embed_args([corpus], out, *SHARD))
            before = read_vectors(out)
            edit(corpus, step + 10)
            run_ok(*embed_args([corpus], expected_out, *SHARD, "--overwrite"))
            expected = read_vectors(expected_out)
        killed_run(embed_args([corpus], out, *SHARD), point, log)
        seen = read_vectors(out)
        assert same(seen, before) or same(seen, expected), f"killed at {point}: a reader sees a mix"
        run_ok(*embed_args([corpus], out, *SHARD))
        after = read_vectors(out)
        assert_ids_once(after, expected.column("id").to_pylist())
        assert same(after, expected), f"killed at {point}, then rerun: not what a run from scratch gives"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["committed"] and os.readlink(out / "vectors").endswith(f"{manifest['target']:06d}/vectors")


def test_overwrite_killed_half_way_leaves_nothing_that_counts(tmp_path, minilm_dir):
    """``--overwrite`` killed after it moved part of the old output aside: the next run without ``--overwrite``
    finds no done-marker without its part and no stale vector; it embeds everything again."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_jsonl(corpus / "a.jsonl", make_docs(30, seed=1))
    run_ok(*embed_args([corpus], out, *SHARD))
    log = tmp_path / "run.log"
    killed_run(embed_args([corpus], out, *SHARD, "--dims", "64", "--overwrite"), "overwrite-moving@2", log)
    assert not (out / "manifest.json").exists()
    run_ok(*embed_args([corpus], out, *SHARD, "--dims", "64"))
    table = read_vectors(out)
    assert_ids_once(table, [d["id"] for d in make_docs(30, seed=1)])
    assert table.column("embedding").type.list_size == 64


def test_kill_between_a_part_rename_and_its_marker(tmp_path, minilm_dir):
    """The part is in place but its shard is not marked done: the rerun redoes that shard only, and no id is
    written twice."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    docs = make_docs(60, seed=2)
    write_jsonl(corpus / "a.jsonl", docs)
    log = tmp_path / "run.log"
    killed_run(embed_args([corpus], out, *SHARD), "after-part-rename@3", log)
    markers = sorted((out / "shards").glob("*.done.json"))
    parts = sorted(p for p in (out / "parts").glob("part-*.parquet") if not p.name.endswith(".docs.parquet"))
    assert len(parts) == len(markers) + 1 == 3
    assert not (out / "vectors").exists()
    run_ok(*embed_args([corpus], out, *SHARD))
    table = read_vectors(out)
    assert_ids_once(table, [d["id"] for d in docs])
    scratch = tmp_path / "scratch"
    run_ok(*embed_args([corpus], scratch, *SHARD))
    assert same(table, read_vectors(scratch))


def test_kill_between_a_marker_and_the_claim_release_leaves_no_claim(tmp_path, minilm_dir):
    """The shard is marked done but its claim is still there, held by a dead worker: the rerun, which never
    claims that shard again, removes the claim once the version is committed; the finished output has none."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    docs = make_docs(40, seed=4)
    write_jsonl(corpus / "a.jsonl", docs)
    killed_run(embed_args([corpus], out, *SHARD), "after-marker@2", tmp_path / "run.log")
    assert len(list((out / "shards").glob("*.done.json"))) == 2
    assert (out / "shards" / "000001.done.json").exists() and (out / "shards" / "000001.claim").exists()
    run_ok(*embed_args([corpus], out, *SHARD))
    assert_ids_once(read_vectors(out), [d["id"] for d in docs])
    assert not list((out / "shards").glob("*.claim")), "a claim of a done shard is left behind"


def test_stale_temporary_part_of_a_dead_worker_is_cleaned(tmp_path, minilm_dir):
    """A full-size temporary part left by a kill in the rename window (this host, dead pid) is removed by the
    next run at once, not after the lease."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_jsonl(corpus / "a.jsonl", make_docs(20, seed=3))
    log = tmp_path / "run.log"
    killed_run(embed_args([corpus], out, *SHARD), "before-part-rename", log)
    temps = list((out / "parts").glob(".part-*.tmp-*"))
    assert temps, "the kill left no temporary part"
    run_ok(*embed_args([corpus], out, *SHARD))
    assert not list((out / "parts").glob(".part-*.tmp-*"))


def test_a_commit_in_a_process_that_did_not_plan_opens_its_buckets(tmp_path, minilm_dir):
    """A run killed just before its version is renamed into place, rerun in a process that only commits (same
    input: no planning) under a limit of 512 open files: the commit raises the limit its 512 buckets need
    instead of failing with "Too many open files" on every rerun."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_jsonl(corpus / "a.jsonl", make_docs(600, seed=8, max_words=4))
    args = [str(a) for a in embed_args([corpus], out, "--shard-size", "300")]
    env = {**subprocess_env(), "EMBED_CORPUS_BUCKET_ROWS": "1", "EMBED_CORPUS_FAULT": "before-version-rename"}
    log = tmp_path / "runs.log"
    with open(log, "ab") as f:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == -9, log.read_text()
    assert json.loads((out / "manifest.json").read_text())["plan"]["bucket_bits"] == 9
    del env["EMBED_CORPUS_FAULT"]
    script = 'ulimit -Sn 512 && exec "$0" -m pipeline.cli "$@"'
    proc = subprocess.run(["bash", "-c", script, sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_ids_once(read_vectors(out), [f"doc{i}" for i in range(600)])


def _shard_ids(out: Path) -> set[int]:
    return {s["id"] for s in json.loads((out / "manifest.json").read_text())["shards"]}


def test_shard_and_part_ids_are_never_used_twice(tmp_path, minilm_dir):
    """A worker of an earlier plan may still be writing when a new plan is made (--overwrite, or new settings
    before any vector): had the new plan numbered its shards from 0 again, that worker's part and marker would
    stand for the new plan's shard of the same id. Ids go on from the highest any plan of the output used."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_jsonl(corpus / "a.jsonl", make_docs(40, seed=5))
    run_ok(*embed_args([corpus], out, *SHARD))
    first = _shard_ids(out)
    run_ok(*embed_args([corpus], out, *SHARD, "--dims", "64", "--overwrite"))
    second = _shard_ids(out)
    assert min(second) > max(first), (first, second)
    # a run with new settings killed before its first vector, holding a claim; then other settings again
    killed_run(embed_args([corpus], out, *SHARD, "--dims", "32", "--overwrite"), "before-part-rename",
               tmp_path / "run.log")
    claimed = {int(p.name.split(".")[0]) for p in (out / "shards").glob("*.claim")}
    assert claimed and min(claimed) > max(second)
    run_ok(*embed_args([corpus], out, *SHARD, "--dims", "16"))
    assert min(_shard_ids(out)) > max(claimed)
    assert_ids_once(read_vectors(out), [d["id"] for d in make_docs(40, seed=5)])


SLOW_EMBED = """
import os, sys, time
from pathlib import Path
from pipeline.model.encoder import Embedder
real, calls = Embedder.embed_encoded, []
def slow(self, enc, **kw):
    calls.append(1)
    if len(calls) == 2:  # the first shard (call 1 embeds the check texts)
        Path(os.environ["SLOW_FLAG"]).write_text("x")
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    return real(self, enc, **kw)
Embedder.embed_encoded = slow
from pipeline.cli import main
sys.argv = ["embed-corpus", *sys.argv[1:]]
main()
"""


def test_a_run_with_new_settings_while_the_first_embeds_its_first_shard(tmp_path, minilm_dir):
    """Run A (`--max-length 8`) is on its first shard, no vector written; run B with the corrected settings is
    accepted on the same output and plans anew. A's shards kept their claims under B's plan (same ids), A's
    parts were committed as B's: 16 of 64 documents with A's vectors, both exit 0. Now B's ids are new: A's work
    is dropped, A says its plan was replaced (exit 75), and B's output is what a run with its settings gives."""
    import time

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_jsonl(corpus / "a.jsonl", make_docs(64, seed=1, min_words=20, max_words=30))
    script, flag = tmp_path / "slow_embed.py", tmp_path / "slow.flag"
    script.write_text(SLOW_EMBED)
    env = {**subprocess_env(), "SLOW_FLAG": str(flag), "SLOW_SECONDS": "8"}
    log_a = tmp_path / "a.log"
    with open(log_a, "wb") as f:
        a = subprocess.Popen([sys.executable, str(script), *embed_args([corpus], out, "--shard-size", "8",
                                                                        "--max-length", "8", "--lease-seconds", "3")],
                             stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert a.poll() is None and time.monotonic() < deadline, log_a.read_text()
            time.sleep(0.05)
        run_ok(*embed_args([corpus], out, "--shard-size", "8", "--lease-seconds", "3"))
        assert a.wait(timeout=120) == 75, log_a.read_text()
    finally:
        if a.poll() is None:
            a.kill()
    assert "replaced" in log_a.read_text()
    scratch = tmp_path / "scratch"
    run_ok(*embed_args([corpus], scratch, "--shard-size", "8"))
    assert same(read_vectors(out), read_vectors(scratch))


def test_status_says_stopped_when_no_worker_is_at_it(tmp_path, minilm_dir, monkeypatch):
    """`status` said "in progress" with an ETA after the run's worker was killed (or failed), and kept saying it:
    a claim of a process of this machine that is gone is not in flight, and a plan no worker has touched for a
    lease is stopped."""
    import pipeline.job.status as status_mod

    corpus = write_jsonl(tmp_path / "corpus" / "c.jsonl", make_docs(60, seed=3))
    out = tmp_path / "out"
    killed_run(embed_args([corpus], out, "--shard-size", "12"), "before-part-rename", tmp_path / "run.log")
    st = json.loads(run_ok("status", out, "--json").output)
    assert st["idle_seconds"] is not None and st["eta_seconds"] is None and st["docs_in_flight"] == 0
    assert "stopped (makes version 1)" in run_ok("status", out).output
    run_ok(*embed_args([corpus], out, "--shard-size", "12"))
    st = json.loads(run_ok("status", out, "--json").output)
    assert st["plan_committed"] and st["idle_seconds"] is None
    # a plan no worker has touched for a lease (a run that failed and left no claim)
    write_jsonl(tmp_path / "corpus" / "d.jsonl", make_docs(30, seed=4, prefix="more"))
    killed_run(embed_args([corpus.parent], out, "--shard-size", "12"), "after-plan-write", tmp_path / "run2.log")
    assert "in progress (makes version 2)" in run_ok("status", out).output  # within a lease: it may be starting
    monkeypatch.setattr(status_mod, "IDLE_AFTER", 0)
    assert "stopped (makes version 2)" in run_ok("status", out).output
