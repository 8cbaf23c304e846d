"""Real Slurm: the project's own ``jobs/slurm/embed.sbatch`` submitted as an array of two CPU tasks over the
bundled sample corpus gives the output of one worker (every id once, the same vectors); a task stopped by its
time-limit signal requeues itself and the requeued run finishes the job.

Needs a cluster that answers ``sinfo`` (CI starts a one-node cluster with ``jobs/slurm/start-local-cluster.sh``);
skipped otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    MODEL,
    REPO,
    assert_ids_once,
    assert_same_vectors,
    done_markers,
    make_docs,
    read_vectors,
    run_ok,
    subprocess_env,
    write_jsonl,
)

SAMPLE = REPO / "data" / "sample"
EMBED_SBATCH = REPO / "jobs" / "slurm" / "embed.sbatch"


def _slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


pytestmark = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.slurm,
    pytest.mark.skipif(not _slurm_answers(), reason="no Slurm cluster answers (see jobs/slurm/start-local-cluster.sh)"),
]


def write_job(path: Path, out: Path) -> Path:
    """The demo job's settings over the sample corpus, in shards of 32 rows (13 shards) for two tasks to share."""
    path.write_text(
        f"input: [{SAMPLE}]\noutput: {out}\nmodel: {MODEL}\n"
        'text-field: "{title} {text}"\nkeep: [title, source, lang]\n'
        "shard-size: 32\nbatch-tokens: 2048\nlease-seconds: 60\n"
    )
    return path


def write_small_job(path: Path, corpus: Path, out: Path) -> Path:
    """600 short generated documents in 24 shards: quick to embed, many shards to stop between."""
    path.write_text(f"input: [{corpus}]\noutput: {out}\nmodel: {MODEL}\nshard-size: 25\nbatch-tokens: 2048\n")
    return path


@pytest.fixture(scope="module")
def reference(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The sample corpus embedded by one worker, in this process."""
    root = tmp_path_factory.mktemp("slurm_reference")
    job = write_job(root / "job.yaml", root / "out")
    run_ok("run", job, "--device", "cpu", "--quiet")
    return read_vectors(root / "out")


@pytest.fixture(scope="module")
def small(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(corpus folder, vectors of one worker) for 600 short documents."""
    root = tmp_path_factory.mktemp("slurm_small")
    write_jsonl(root / "corpus" / "docs.jsonl", make_docs(600, seed=21, min_words=1, max_words=6))
    job = write_small_job(root / "job.yaml", root / "corpus", root / "out")
    run_ok("run", job, "--device", "cpu", "--quiet")
    return root / "corpus", read_vectors(root / "out")


def sbatch_env(job: Path) -> dict[str, str]:
    env = subprocess_env()  # offline, one torch thread per task
    env.update(EMBED_JOB=str(job), EMBED_REPO=str(REPO), EMBED_CORPUS=str(Path(sys.executable).parent / "embed-corpus"))
    return env


def task_logs(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("embed-*.log"))}


def test_sbatch_array_of_two_tasks_equals_one_worker(tmp_path: Path, reference) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    job = write_job(tmp_path / "job.yaml", out)
    cmd = ["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", "--job-name=embed-corpus-test",
           f"--output={logs}/embed-%A_%a.log", str(EMBED_SBATCH)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=sbatch_env(job), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    texts = task_logs(logs)
    print(f"sbatch --wait: exit {proc.returncode} after {seconds:.1f}s, printed {proc.stdout.strip()!r}")
    for name, text in texts.items():
        print(f"--- {name}\n{text}")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{texts}"
    assert len(texts) == 2 and all("embed.sbatch" in t and t.rstrip().endswith("done") for t in texts.values())

    table = read_vectors(out)
    assert_ids_once(table, reference.column("id").to_pylist())
    assert_same_vectors(table, reference)
    workers = [json.loads(m.read_text())["worker"] for m in done_markers(out)]
    ranks = {w.rsplit(":", 1)[-1] for w in workers}
    print(f"shards per task: { {r: sum(w.endswith(r) for w in workers) for r in sorted(ranks)} }")
    assert ranks == {"slurm-array0", "slurm-array1"}, f"both array tasks should have embedded shards: {workers}"
    assert not list((out / "shards").glob("*.claim"))


def test_time_limit_signal_requeues_and_the_requeued_task_finishes(tmp_path: Path, small) -> None:
    """USR1 as Slurm sends it before the time limit (``--signal=B:USR1@120``, here with ``scancel --signal``):
    the task finishes its shard, exits 75, requeues itself, and its next run embeds the rest."""
    corpus, reference = small
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    job = write_small_job(tmp_path / "job.yaml", corpus, out)
    submitted = subprocess.run(["sbatch", "--parsable", "--array=0", "--cpus-per-task=1",
                                "--job-name=embed-corpus-requeue", f"--output={logs}/embed-%A_%a.log",
                                str(EMBED_SBATCH)], env=sbatch_env(job), cwd=tmp_path, capture_output=True,
                               text=True, timeout=60, check=True)
    array_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while len(done_markers(out)) < 1:
        assert time.monotonic() < deadline, task_logs(logs)
        time.sleep(0.1)
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", f"{array_id}_0"], capture_output=True,
                               text=True)
    assert signalled.returncode == 0, signalled.stderr
    while True:  # until the job has left the queue (requeued runs stay in it)
        queue = subprocess.run(["squeue", "-h", "-j", array_id, "-o", "%T"], capture_output=True, text=True)
        if not queue.stdout.strip():
            break
        assert time.monotonic() < deadline, f"still queued: {queue.stdout} {task_logs(logs)}"
        time.sleep(0.5)
    text = "".join(task_logs(logs).values())
    print(text)
    assert "got SIGUSR1" in text and f"requeued {array_id}_0" in text
    assert "restart 1" in text and text.rstrip().endswith("done")
    assert "stop requested" in text, "the first run had finished before the signal"
    table = read_vectors(out)
    assert_ids_once(table, reference.column("id").to_pylist())
    assert_same_vectors(table, reference)


@pytest.fixture(autouse=True)
def _no_leftover_jobs() -> Iterator[None]:
    yield
    names = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.splitlines()
    for line in names:
        job_id, _, name = line.partition(" ")
        if name.startswith("embed-corpus-"):
            subprocess.run(["scancel", job_id.split("_")[0]], capture_output=True)


INDEX_SBATCH = REPO / "jobs" / "slurm" / "index.sbatch"


def test_index_array_of_pieces_then_merge_equals_a_local_build(tmp_path: Path, small) -> None:
    """``jobs/slurm/index.sbatch`` as ``slurm submit --index-pieces 2`` queues it: an array of two piece tasks (the
    first to start trains, the other waits and reuses it), then the merge with afterok on the array; the index
    equals one built locally in one process."""
    import numpy as np

    from pipeline.index.files import load_index
    from pipeline.index.store import build_index

    corpus, _ = small
    out, ref, logs = tmp_path / "out", tmp_path / "ref", tmp_path / "logs"
    logs.mkdir()
    run_ok("run", write_small_job(tmp_path / "job.yaml", corpus, out), "--device", "cpu", "--quiet")
    shutil.copytree(out, ref)
    args = "--factory IVF16,Flat --lists disk"
    env = {**sbatch_env(tmp_path / "job.yaml"), "EMBED_OUTPUT": str(out), "EMBED_INDEX_ARGS": args,
           "EMBED_INDEX_PIECES": "2"}
    pieces = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1",
                             "--job-name=embed-corpus-index-pieces", f"--output={logs}/index-%A_%a.log",
                             str(INDEX_SBATCH)], env={**env, "EMBED_INDEX_STEP": "piece"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=True)
    array_id = pieces.stdout.strip().split(";")[0]
    merge = subprocess.run(["sbatch", "--wait", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes",
                            "--cpus-per-task=1", "--job-name=embed-corpus-index-merge",
                            f"--output={logs}/merge-%j.log", str(INDEX_SBATCH)],
                           env={**env, "EMBED_INDEX_STEP": "merge"}, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    texts = {p.name: p.read_text() for p in sorted(logs.iterdir())}
    for name, text in texts.items():
        print(f"--- {name}\n{text}")
    assert merge.returncode == 0, texts
    assert sorted(n for n, t in texts.items() if " --piece " in t and t.rstrip().endswith("done")) == [
        f"index-{array_id}_0.log", f"index-{array_id}_1.log"]
    assert any(" --merge" in t and t.rstrip().endswith("done") for n, t in texts.items() if n.startswith("merge-"))
    info = json.loads((out / "index" / "info.json").read_text())
    assert info["pieces"] == 2 and info["on_disk"] and len(info["steps"]["pieces"]) == 2
    local = build_index(ref, factory="IVF16,Flat", lists="disk")
    q = np.concatenate([v for v in read_vectors(ref).column("embedding").to_numpy(zero_copy_only=False)[:20]])
    q = q.reshape(20, -1).astype("float32")
    (a, _), (b, _) = load_index(out), load_index(ref)
    np.testing.assert_array_equal(a.search(q, 10)[1], b.search(q, 10)[1])
    assert info["recall@10"] == local["recall@10"]
