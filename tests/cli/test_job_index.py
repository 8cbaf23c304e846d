"""The job's ``index:`` step: a run that completes builds the index, a nightly rerun adds to it; and the Slurm
wiring of the index: one job, or an array of pieces and a merge (``slurm submit --index-pieces``,
``jobs/slurm/index.sbatch``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import MODEL, REPO, invoke, make_docs, run_ok, write_jsonl

import pipeline.index.vectors as vec


def _job(tmp_path, index) -> str:
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", make_docs(40, seed=1))
    job = {"input": [str(corpus)], "output": str(tmp_path / "out"), "model": MODEL, "batch-tokens": 2048,
           "shard-size": 16, "quiet": True, "index": index}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_completed_run_builds_then_updates_the_index(tmp_path, minilm_dir):
    job = _job(tmp_path, {"factory": "HNSW8", "target-recall": 0.9, "recall-k": 100})
    run_ok("run", job)
    info = json.loads((tmp_path / "out" / "index" / "info.json").read_text())
    assert info["ntotal"] == 40 and info["factory"] == "HNSW8" and info["tuning"]["k"] == 100
    # 40 vectors: 39 held-out queries in two sets, each query's neighbours are the 39 others
    x = np.concatenate([vec.read_part_vectors(p) for p in vec.complete_parts(tmp_path / "out")])
    assert (info["recall_queries"]["tune"], info["recall_queries"]["report"]) == (20, 19)
    assert info["tuning"]["neighbours"] == len(x) - 1
    assert info["recall@100"] == pytest.approx(1.0)  # efSearch >= k: a graph of 40 nodes is searched whole
    write_jsonl(tmp_path / "corpus" / "b.jsonl", make_docs(10, seed=2, start=100))
    run_ok("run", job)
    info = json.loads((tmp_path / "out" / "index" / "info.json").read_text())
    assert info["ntotal"] == 50 and info["tuning"]["k"] == 100


def test_no_index_flag_skips_the_step(tmp_path, minilm_dir):
    run_ok("run", _job(tmp_path, {}), "--no-index")
    assert not (tmp_path / "out" / "index").exists()


def test_an_output_with_an_index_has_it_updated_by_every_run(tmp_path, minilm_dir):
    """`run --index` once, then plain reruns: the index was left as it was, and a search after an edit returned
    nothing for the rewritten part's documents (only a warning on stderr), exit 0. Now every run of an output
    that has an index updates it; `--no-index` leaves it."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    docs = make_docs(20, seed=1)
    write_jsonl(corpus / "a.jsonl", docs)
    base = ["run", "--input", str(corpus), "--output", str(out), "--model", MODEL, "--device", "cpu",
            "--batch-tokens", "2048", "--quiet"]
    run_ok(*base, "--index")
    docs[3] = {"id": docs[3]["id"], "text": "zebra zebra zebra orbit lantern"}
    write_jsonl(corpus / "a.jsonl", docs)
    run_ok(*base)
    got = json.loads(run_ok("search", str(out), "zebra zebra zebra orbit lantern", "-k", "3", "--json").output)
    hits = got["results"] if isinstance(got, dict) else got[0]["results"]
    assert hits and hits[0]["id"] == docs[3]["id"]
    generation = json.loads((out / "index" / "info.json").read_text())
    write_jsonl(corpus / "b.jsonl", make_docs(4, seed=2, start=100))
    run_ok(*base, "--no-index")
    assert json.loads((out / "index" / "info.json").read_text()) == generation


def test_unknown_index_option_is_a_config_error(tmp_path):
    result = invoke("run", _job(tmp_path, {"nlist": 12}))
    assert result.exit_code == 2
    assert "index" in result.output and "nlist" in result.output


# --- Slurm: the index as an array of pieces and a merge -----------------------------------------------------------


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"input: [{tmp_path / 'in'}]\noutput: {tmp_path / 'out'}\nmodel: {MODEL}\n")
    return path


def test_slurm_submit_queues_index_pieces_then_a_merge(job_file: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dry = invoke("slurm", "submit", job_file, "--nodes", "2", "--index-pieces", "4", "--index-args",
                 "--max-memory 8G --recall-k 100", "--dry-run")
    assert dry.exit_code == 0, dry.output
    mkdir, embed, pieces, merge = dry.output.strip().splitlines()
    assert pieces.startswith("INDEX_ID=$(") and '--dependency="afterok:${ARRAY_ID%%;*}"' in pieces
    for part in ("--array=0-3", "EMBED_INDEX_STEP=piece", "EMBED_INDEX_PIECES=4", "index-%A_%a.log",
                 "EMBED_INDEX_ARGS='--max-memory 8G --recall-k 100'"):
        assert part in pieces, part
    assert '--dependency="afterok:${INDEX_ID%%;*}"' in merge and "EMBED_INDEX_STEP=merge" in merge
    assert "--array" not in merge and merge.endswith("index.sbatch")
    bad = invoke("slurm", "submit", job_file, "--index-pieces", "2", "--index-mode", "update", "--dry-run")
    assert bad.exit_code != 0 and "index_pieces" in bad.output

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "sbatch").write_text(
        '#!/usr/bin/env bash\necho "${EMBED_INDEX_STEP:-}|${EMBED_INDEX_PIECES:-}|$*" >> "$CALLS"\n'
        'n=$(wc -l < "$CALLS"); echo "$((1000 + n));cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(calls))
    result = invoke("slurm", "submit", job_file, "--nodes", "2", "--index-pieces", "3")
    assert result.exit_code == 0, result.output
    embed_call, piece_call, merge_call = calls.read_text().splitlines()
    assert embed_call.startswith("||") and "--array=0-1" in embed_call
    assert piece_call.startswith("piece|3|--dependency=afterok:1001 ") and "--array=0-2" in piece_call
    assert merge_call.startswith("merge|3|--dependency=afterok:1002 ")
    assert "index pieces: array job 1002 (3 tasks)" in result.output and "merge: job 1003" in result.output


FAKE_INDEX_CORPUS = """#!/usr/bin/env bash
case "$1" in
    status) echo "{\\"shards_pending\\": 0}" ;;
    index) echo "$*" > "$FAKE_DIR/index" ;;
esac
"""


def test_index_sbatch_runs_a_piece_per_array_task_and_the_merge(tmp_path: Path) -> None:
    fake = tmp_path / "embed-corpus"
    fake.write_text(FAKE_INDEX_CORPUS)
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(FAKE_DIR=str(tmp_path), EMBED_CORPUS=str(fake), EMBED_OUTPUT="/data/out", SLURM_JOB_ID="7",
                SLURM_SUBMIT_DIR=str(tmp_path), EMBED_INDEX_ARGS="--max-memory 1G")

    def run(**env: str) -> tuple[int, str, str]:
        (tmp_path / "index").unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(REPO / "jobs" / "slurm" / "index.sbatch")], env={**base, **env},
                              capture_output=True, text=True, timeout=60)
        called = (tmp_path / "index").read_text().strip() if (tmp_path / "index").exists() else ""
        return proc.returncode, called, proc.stdout + proc.stderr

    rc, called, _ = run(EMBED_INDEX_STEP="piece", EMBED_INDEX_PIECES="4", SLURM_ARRAY_TASK_ID="2")
    assert rc == 0 and called == "index build /data/out --pieces 4 --piece 2 --max-memory 1G"
    rc, called, _ = run(EMBED_INDEX_STEP="merge", EMBED_INDEX_PIECES="4")
    assert rc == 0 and called == "index build /data/out --pieces 4 --merge --max-memory 1G"
    rc, called, _ = run()
    assert rc == 0 and called == "index build /data/out --max-memory 1G"
    for env, said in (({"EMBED_INDEX_STEP": "piece", "EMBED_INDEX_PIECES": "4"}, "runs as an array task"),
                      ({"EMBED_INDEX_STEP": "merge"}, "needs EMBED_INDEX_PIECES"),
                      ({"EMBED_INDEX_STEP": "piece", "EMBED_INDEX_PIECES": "2", "SLURM_ARRAY_TASK_ID": "0",
                        "EMBED_INDEX_MODE": "update"}, "only a build is made in pieces"),
                      ({"EMBED_INDEX_STEP": "both"}, "use all, piece or merge")):
        rc, called, output = run(**env)
        assert rc == 2 and not called and said in output, (env, output)
