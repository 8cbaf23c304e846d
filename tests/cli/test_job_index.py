"""The job's ``index:`` step: a run that completes builds the index, a nightly rerun adds to it."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import MODEL, brute_force_recall, invoke, make_docs, run_ok, write_jsonl


def _job(tmp_path, index) -> str:
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", make_docs(40, seed=1))
    job = {"input": [str(corpus)], "output": str(tmp_path / "out"), "model": MODEL, "batch-tokens": 2048,
           "shard-size": 16, "quiet": True, "index": index}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_completed_run_builds_then_updates_the_index(tmp_path, minilm_dir):
    # Searching 16 PCA dimensions of 384 misses neighbours, so the recorded recall is below 1 and its agreement
    # with a count made here has power (exact distances in the reduced space: no ties to order either way).
    job = _job(tmp_path, {"factory": "PCA16,Flat", "target-recall": 0.9})
    run_ok("run", job)
    out = tmp_path / "out"
    info = json.loads((out / "index" / "info.json").read_text())
    assert info["ntotal"] == 40 and info["factory"] == "PCA16,Flat"
    counted = brute_force_recall(out)
    for key, value in counted.items():
        assert info[key] == pytest.approx(value, abs=2e-6), key
    assert counted["recall@10"] < 0.99
    write_jsonl(tmp_path / "corpus" / "b.jsonl", make_docs(10, seed=2, start=100))
    run_ok("run", job)
    info = json.loads((out / "index" / "info.json").read_text())
    assert info["ntotal"] == 50
    for key, value in brute_force_recall(out).items():  # re-measured after the nightly update
        assert info[key] == pytest.approx(value, abs=2e-6), key


def test_no_index_flag_skips_the_step(tmp_path, minilm_dir):
    run_ok("run", _job(tmp_path, {}), "--no-index")
    assert not (tmp_path / "out" / "index").exists()


def test_unknown_index_option_is_a_config_error(tmp_path):
    result = invoke("run", _job(tmp_path, {"nlist": 12}))
    assert result.exit_code == 2
    assert "index" in result.output and "nlist" in result.output
