"""Start-up and the end of a job: the model loads while the job is planned (bad input still named first),
``--workers``/``--gpus`` children start before the plan and claim nothing until it exists, and a worker claims
at most one shard ahead of the one it is embedding (so few shards are stuck behind it at the end of a job)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import threading
import time

import pytest
from helpers import assert_ids_once, assert_same_vectors, make_docs, read_vectors, write_jsonl

from pipeline.errors import InputError
from pipeline.job.config import make_config
from pipeline.job.runner import _prefetch, load_embedder, loads_during_planning, run_job
from pipeline.job.startup import ModelLoad

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _config(src, out, model, **extra):
    return make_config({"input": (str(src),), "output": str(out), "model": str(model), "device": "cpu",
                        "batch_tokens": 2048, "quiet": True, "shard_size": 8, **extra})


def test_model_load_runs_in_the_background_and_hands_back_its_result_or_error():
    gate = threading.Event()
    load = ModelLoad(lambda: gate.wait(5) and "model")
    assert not load.done()  # started, still waiting: the caller plans meanwhile
    gate.set()
    assert load.result() == "model" and load.done() and load.seconds is not None

    def broken():
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        ModelLoad(broken).result()


def test_which_jobs_load_during_planning(tmp_path):
    base = _config(tmp_path / "in.jsonl", tmp_path / "out", "m")
    assert not loads_during_planning(base)  # CPU: after planning (bad input or nothing to do costs no load)
    assert loads_during_planning(dataclasses.replace(base, device=None))
    assert loads_during_planning(dataclasses.replace(base, device="cuda:1"))
    assert not loads_during_planning(dataclasses.replace(base, device=None, backend="openai", endpoint="http://x/v1"))


def test_run_with_a_model_loaded_during_planning_equals_a_plain_run(tmp_path, tiny_qwen3_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": d["id"], "text": d["text"]} for d in make_docs(30, seed=3)])
    plain = _config(src, tmp_path / "plain", tiny_qwen3_dir)
    run_job(plain)
    overlapped = _config(src, tmp_path / "overlap", tiny_qwen3_dir)
    loading = ModelLoad(lambda: load_embedder(overlapped))
    summary = run_job(overlapped, embedder=loading)
    assert summary.shards_done == 4 and loading.done()
    assert_ids_once(read_vectors(tmp_path / "overlap"), [f"doc{i}" for i in range(30)])
    assert_same_vectors(read_vectors(tmp_path / "plain"), read_vectors(tmp_path / "overlap"))


def test_bad_input_is_reported_even_when_the_model_being_loaded_fails(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "text": ""}])

    def broken():
        time.sleep(0.2)
        raise RuntimeError("the model would have failed too")

    with pytest.raises(InputError, match="in.jsonl"):
        run_job(_config(src, tmp_path / "out", "nowhere"), embedder=ModelLoad(broken))


def test_prefetch_claims_at_most_depth_ahead_of_the_consumer():
    pulled: list[int] = []
    consumed: list[int] = []

    def items():
        for i in range(6):
            pulled.append(i)  # for a job, taking the next item claims a shard
            yield i

    ahead = []
    for item, value in _prefetch(items(), lambda i: i * 10, depth=1):
        time.sleep(0.15)  # embedding: the prefetch thread has all the time it wants to run ahead
        ahead.append(len(pulled) - len(consumed) - 1)  # taken but not yet started, besides this one
        consumed.append(item)
        assert value == item * 10
    assert consumed == list(range(6))
    assert max(ahead) <= 1, ahead


def test_prefetch_hands_a_load_error_to_the_consumer():
    def load(i):
        if i == 2:
            raise ValueError("bad shard")
        return i

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item, _ in _prefetch(iter(range(5)), load, depth=1):
            got.append(item)
    assert got == [0, 1]


def test_workers_wait_for_the_plan_and_a_failed_plan_ends_them(tmp_path, tiny_qwen3_dir):
    from pipeline.job.launch import run_workers

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "text": None}])
    cfg = _config(src, tmp_path / "out", tiny_qwen3_dir)
    with pytest.raises(InputError, match="in.jsonl"):
        run_workers(cfg, workers=2, lease=30)
    assert not mp.active_children()  # the workers started before planning were ended, not left waiting
    assert not list((tmp_path / "out").glob("shards/*.claim"))
