"""The job's ``index:`` step: a run that completes builds the index, a nightly rerun adds to it."""

from __future__ import annotations

import json

import yaml
from helpers import MODEL, invoke, make_docs, run_ok, write_jsonl


def _job(tmp_path, index) -> str:
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", make_docs(40, seed=1))
    job = {"input": [str(corpus)], "output": str(tmp_path / "out"), "model": MODEL, "batch-tokens": 2048,
           "shard-size": 16, "quiet": True, "index": index}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_completed_run_builds_then_updates_the_index(tmp_path, minilm_dir):
    job = _job(tmp_path, {"factory": "Flat", "target-recall": 0.9})
    run_ok("run", job)
    info = json.loads((tmp_path / "out" / "index" / "info.json").read_text())
    assert info["ntotal"] == 40 and info["factory"] == "Flat"
    assert any("recall" in k for k in info)
    write_jsonl(tmp_path / "corpus" / "b.jsonl", make_docs(10, seed=2, start=100))
    run_ok("run", job)
    info = json.loads((tmp_path / "out" / "index" / "info.json").read_text())
    assert info["ntotal"] == 50


def test_no_index_flag_skips_the_step(tmp_path, minilm_dir):
    run_ok("run", _job(tmp_path, {}), "--no-index")
    assert not (tmp_path / "out" / "index").exists()


def test_unknown_index_option_is_a_config_error(tmp_path):
    result = invoke("run", _job(tmp_path, {"nlist": 12}))
    assert result.exit_code == 2
    assert "index" in result.output and "nlist" in result.output
