"""The GPU benchmark's arithmetic and records, checked on the CPU with the tiny Qwen3 shape.

The FLOP formulas are checked against a count made position by position; the record of a whole (tiny) bench
run against the arithmetic its labels state (medians of the runs, ratios, shares of the ceiling, the real
command's timings); and the command timings against done-markers written by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench import command, gpu
from pipeline.bench.synthetic import qwen3_config


def _hand_count(config, lengths: list[int]) -> tuple[float, float]:
    """(FLOPs the vectors need, FLOPs of every layer at every position), counted position by position."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    nq, nkv, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    q, kv, o, mlp = 2 * h * nq * d, 2 * 2 * h * nkv * d, 2 * nq * d * h, 2 * 3 * h * i
    needed = everything = 0.0
    for n in lengths:
        for layer in range(layers):
            for pos in range(n):
                keys = pos + 1  # causal: this position and the ones before it
                full = q + kv + o + mlp + nq * (2 * d * keys + 2 * d * keys)  # projections, QK^T, AV
                everything += full
                if layer < layers - 1 or pos == n - 1:
                    needed += full
                else:
                    needed += kv  # the last layer's keys and values are needed at every position
    return needed, everything


@pytest.mark.parametrize("size", ["tiny", "0.6B", "4B"])
def test_flop_formulas_match_a_count_position_by_position(size):
    config = qwen3_config(size)
    lengths = [5, 1, 17, 3]
    needed, everything = _hand_count(config, lengths)
    arr = np.array(lengths)
    assert gpu.needed_flops(config, arr) == pytest.approx(needed, rel=1e-12)
    assert gpu.all_positions_flops(config, arr) == pytest.approx(everything, rel=1e-12)
    assert gpu.needed_flops(config, arr) < gpu.all_positions_flops(config, arr)


def test_dense_flops_per_token_is_twice_the_matrix_parameters():
    import torch
    from transformers import Qwen3Model

    config = qwen3_config("tiny")
    with torch.device("meta"):
        model = Qwen3Model(config)
    matrix_params = sum(p.numel() for name, p in model.named_parameters()
                        if p.dim() == 2 and "embed_tokens" not in name)
    assert gpu.flops_per_token(config) == 2 * matrix_params


def test_command_timings_from_done_markers(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    launched = 1000.0
    # three shards: (start, end, tokens); the first starts 12 s after launch
    for sid, (start, end, tokens) in enumerate([(1012.0, 1014.0, 400), (1013.0, 1016.0, 500), (1016.0, 1020.0, 300)]):
        (shards / f"{sid:06d}.done.json").write_text(json.dumps(
            {"shard": sid, "finished_at": end, "seconds": end - start, "tokens": tokens, "rows": 10,
             "worker": f"w{sid % 2}"}))
    got = command.timings(tmp_path, launched, ended=1021.5)
    assert got["startup_s"] == 12.0
    assert got["steady_s"] == 8.0 and got["steady_tokens_per_s"] == round(1200 / 8)
    assert got["wall_s"] == 21.5 and got["whole_tokens_per_s"] == round(1200 / 21.5)
    assert got["tail_s"] == 1.5 and got["shards"] == 3 and got["docs"] == 30 and got["workers"] == 2


def test_rate_after_each_workers_first_shard():
    cols = list(command.SHARD_LOG_COLUMNS)

    def row(shard, worker, tokens, start, seconds):
        r = dict.fromkeys(cols, 0.0) | {"shard": shard, "worker": worker, "tokens": tokens, "start_s": start,
                                        "seconds": seconds}
        return [r[c] for c in cols]
    # worker 0: first shard ends at 12; then 300 + 100 tokens until 16 -> 100/s; worker 1: 200 tokens in 12 -> 14
    rows = [row(0, 0, 1000, 10.0, 2.0), row(1, 1, 500, 10.5, 1.5), row(2, 0, 300, 11.9, 3.0),
            row(3, 1, 200, 12.0, 2.0), row(4, 0, 100, 15.0, 1.0)]
    assert command.after_first_shard({"columns": cols, "rows": rows}) == 100 + 100
    assert command.after_first_shard({"columns": cols, "rows": rows[:2]}) is None  # one shard per worker
    assert command.after_first_shard({"columns": cols, "rows": rows[:3]}) is None  # worker 1: one shard
    assert command.after_first_shard({"columns": cols, "rows": [rows[0], rows[2], rows[4]]}) == 100
    # one worker: 150 tokens in its first 2 s, 100/s after -> the first shard took 0.5 s beyond that rate
    one = [row(0, 0, 150, 10.0, 2.0), rows[2], rows[4]]
    assert command.first_shard_extra_s({"columns": cols, "rows": one}) == 0.5
    assert command.first_shard_extra_s({"columns": cols, "rows": one[:1]}) is None


@pytest.mark.slow
def test_bench_record_on_the_tiny_shape(tmp_path, qwen_tokenizer_dir):
    rec = gpu.run_bench("tiny", tokenizer_dir=str(qwen_tokenizer_dir), n_docs=24, batch_tokens=None,
                        workdir=tmp_path / "work", st_docs=8, device="cpu", repeats=3, reference_docs=4,
                        run_shard_size=8, logs=tmp_path / "logs", split=(8,), profile=tmp_path, run_docs=32)
    # the profile: batches from across the plan (CPU: no device kernels to share out)
    assert rec["profile"]["batches"] == min(8, rec["profile"]["of_batches"]) and rec["profile"]["tokens"] > 0
    assert (tmp_path / "profile-tiny.txt").exists() and (tmp_path / "profile-tiny.json").exists()
    for key in ("model_size", "gpu", "docs", "tokens", "batch_tokens", "batch_tokens_is_default", "flops_per_token",
                "flops_per_token_all_positions", "ceiling_tflops", "ceiling_tokens_per_s", "model_tokens_per_s",
                "tokens_per_s", "st_policy_tokens_per_s", "ratio_vs_sentence_transformers", "share_of_ceiling",
                "model_share_of_ceiling", "share_of_ceiling_all_positions", "e2e_over_model", "run_tokens_per_s",
                "run_whole_tokens_per_s", "run_over_model", "startup_s_warm", "startup_s_cold", "run_wall_s_warm",
                "run_wall_s_cold", "vs_float32_reference", "labels", "repeats", "shard_size"):
        assert key in rec, key
    assert rec["batch_tokens_is_default"] and rec["batch_tokens"] == 4096  # the CPU default of the padded path
    # each headline figure: its runs (one per repeat) and their median
    for key in ("ceiling_tflops", "model_tokens_per_s", "tokens_per_s", "st_policy_tokens_per_s"):
        runs = rec[f"{key}_runs"]
        assert len(runs) == 3
        assert rec[key] == pytest.approx(float(np.median(runs)), rel=0.01)
        assert rec[f"{key}_spread"] == pytest.approx((max(runs) - min(runs)) / np.median(runs), rel=0.01, abs=1e-3)
    # ratios and shares are the arithmetic the labels state
    assert rec["ratio_vs_sentence_transformers"] == pytest.approx(rec["tokens_per_s"] / rec["st_policy_tokens_per_s"],
                                                                  abs=0.01)
    assert len(rec["ratio_vs_sentence_transformers_runs"]) == 3
    ceiling_tok = rec["ceiling_tflops"] * 1e12 / rec["flops_per_token"]
    assert rec["ceiling_tokens_per_s"] == pytest.approx(ceiling_tok, abs=1)
    assert rec["share_of_ceiling"] == pytest.approx(rec["tokens_per_s"] / ceiling_tok, abs=1e-3)
    assert rec["model_share_of_ceiling"] == pytest.approx(rec["model_tokens_per_s"] / ceiling_tok, abs=1e-3)
    assert rec["share_of_ceiling_all_positions"] == pytest.approx(
        rec["tokens_per_s"] * rec["flops_per_token_all_positions"] / (rec["ceiling_tflops"] * 1e12), abs=1e-3)
    assert rec["e2e_over_model"] == pytest.approx(rec["tokens_per_s"] / rec["model_tokens_per_s"], abs=1e-3)
    # the FLOPs per token are the hand count's, over the corpus the bench tokenized
    assert rec["flops_per_token"] < rec["flops_per_token_all_positions"]
    # the real command: every id once, its vectors those of the model alone, timings that add up
    assert rec["run_over_model"] == pytest.approx(rec["run_tokens_per_s"] / rec["model_tokens_per_s"], abs=1e-3)
    for label in ("cold", "warm"):  # the bench's 24 documents and 8 more (run_docs)
        check = rec[f"run_check_{label}"]
        assert check["ids_once"] and check["rows"] == 32 and check["reference_rows"] == 24
        assert check["min_cosine_vs_reference"] >= 0.99999
        assert 0 < rec[f"startup_s_{label}"] < rec[f"run_wall_s_{label}"]
        assert any("loaded in" in line for line in rec[f"run_log_{label}"])  # where the start-up went
    assert rec["run_whole_tokens_per_s"] == pytest.approx(rec["run_tokens"] / rec["run_wall_s_warm"], rel=0.01)
    assert rec["run_shards"] == 4 and rec["run_docs"] == 32 and rec["run_first_shard_extra_s"] is not None
    # again with the command's own shard sizing (one shard at this size), the same vectors
    assert rec["run_shards_default"] == 1 and rec["run_check_default"]["ids_once"]
    assert rec["run_check_default"]["min_cosine_vs_reference"] >= 0.99999
    assert rec["run_over_model_default_shards"] == pytest.approx(
        rec["run_tokens_per_s_default_shards"] / rec["model_tokens_per_s"], abs=1e-3)
    assert any("model start-up:" in line for line in rec["run_log_warm"])  # each step of the model's start-up
    timing = rec["run_shard_timing_warm"]
    assert set(timing) == {"wait_s", "read_s", "tokenize_s", "write_wait_s"} and timing["tokenize_s"] > 0
    assert rec["vs_float32_reference"]["pipeline"]["min"] >= 0.99999  # float32 on CPU: the same computation
    assert (tmp_path / "logs" / "run-tiny-warm.log").exists()
    split = rec["split"]  # the model alone in one call per 8 documents, with and without tokenizing alongside
    assert split["docs"] == 24 and split["tokens"] == rec["tokens"] and split["one_call_tokens_per_s"] > 0
    assert set(split["ratios_to_one_call"]) == {"calls_of_8_docs", "calls_of_8_docs_tokenizing_alongside"}
    assert rec["run_shard_log_default"]["columns"][0] == "shard" and rec["run_shard_log_default"]["rows"]
    # three shards of the warm run: a rate after the first; one shard with the default sizing: none
    assert rec["run_tokens_per_s_after_first_shard"] > 0
    assert rec["run_tokens_per_s_after_first_shard_default_shards"] is None
    assert gpu.table([rec]).count("\n") >= 3


@pytest.mark.slow
def test_scaling_bench_on_cpu_workers(tmp_path, qwen_tokenizer_dir):
    from pipeline.bench import scale
    from pipeline.job.sink import read_markers

    started = time.time()
    records = scale.scaling("tiny", tokenizer_dir=str(qwen_tokenizer_dir), n_docs=96, shard_size=6,
                            workdir=tmp_path / "work", logs=tmp_path / "logs", devices=[], workers=2, lease_s=3,
                            kill_at=0.25)
    by_launch = {r.get("launch", r.get("skipped")): r for r in records}
    assert len(records) == 3, records
    launch, nodes, kill = records
    for rec in (launch, nodes):
        assert rec["gpus"] == 2 and rec["check"]["ids_once"] and rec["check"]["min_cosine_vs_reference"] >= 0.99999
        assert rec["scaling_efficiency"] == pytest.approx(rec["wall_s_1gpu"] / (2 * rec["wall_s"]), abs=1e-3)
        assert rec["steady_scaling_efficiency"] == pytest.approx(
            rec["tokens_per_s"] / (2 * rec["tokens_per_s_1gpu"]), abs=1e-3)
        assert rec["tokens"] == launch["tokens"] and rec["shards"] == 16
        # where the time went: each worker's start-up steps and end in the record, shard timings summed
        assert sum("model start-up:" in line for line in rec["log"]) == 2
        assert sum("worker done" in line for line in rec["log"]) == 2
        assert rec["shard_timing"]["tokenize_s"] > 0
    assert any("first shard" in line for line in launch["log_1gpu"])
    assert nodes["workers_seen"] == 2, by_launch
    assert launch["one_gpu_check"]["ids_once"]
    if kill.get("skipped"):
        pytest.fail(f"the worker was not killed: {kill}")
    assert kill["bench"] == "kill" and kill["shards_held_when_killed"]
    assert kill["check"]["ids_once"] and kill["check"]["min_cosine_vs_reference"] >= 0.99999
    assert kill["time_lost_s"] == pytest.approx(kill["wall_s"] - kill["undisturbed_wall_s"], abs=0.01)
    # killed once a quarter of the documents were done; what recovery cost beyond the one-GPU rest
    assert kill["kill_at"] == 0.25 and 0 < kill["tokens_done_at_kill"] < kill["tokens"]
    assert kill["killed_after_s"] < kill["expected_wall_s"]
    assert kill["lost_to_recovery_s"] == pytest.approx(kill["wall_s"] - kill["expected_wall_s"], abs=0.01)
    # the separate processes ran as Slurm array tasks 0 and 1 of 2 (their worker names carry it)
    workers = {m["worker"] for m in read_markers(tmp_path / "work" / "scale-tiny-nodes")[0].values()}
    assert {w.rsplit(":", 1)[1] for w in workers} == {"slurm-array0", "slurm-array1"}, workers
    assert kill["wall_s"] < time.time() - started
    assert "taking over" in "".join(p.read_text() for p in (tmp_path / "work").glob("scale-tiny-kill/logs/*.log"))
    assert scale.table(records).count("\n") == 3


@pytest.mark.slow
def test_scaling_bench_in_phases_over_one_workdir(tmp_path, qwen_tokenizer_dir, monkeypatch):
    """A job too long for one call of a lent machine: the one-GPU run in one call, the scaled run in the next,
    over the same work folder; the record is the one a single call makes."""
    from click.testing import CliRunner

    from pipeline.bench import scale
    from pipeline.cli.bench import bench_scale

    work = tmp_path / "work"
    kw = dict(tokenizer_dir=str(qwen_tokenizer_dir), n_docs=48, shard_size=6, workdir=work, logs=tmp_path / "logs",
              devices=[], workers=2, kill=False, nodes=False)
    with pytest.raises(scale.NoOneGpuRun, match="run the 'one' phase first"):
        scale.scaling("tiny", phase="many", **kw)
    assert scale.scaling("tiny", phase="one", note="alone", **kw) == []
    state = json.loads((work / "scale-tiny.json").read_text())
    assert state["one"]["one_gpu_check"]["ids_once"] and state["one"]["note_1gpu"] == "alone"
    assert state["base"]["startup_s_cold"] > 0 and state["base"]["prepare_s"] > 0
    # another job in the same folder is not mistaken for this one
    with pytest.raises(scale.NoOneGpuRun):
        scale.scaling("tiny", phase="many", **dict(kw, n_docs=47))
    (rec,) = scale.scaling("tiny", phase="many", **kw)
    assert rec["gpus"] == 2 and rec["check"]["ids_once"] and rec["check"]["min_cosine_vs_reference"] >= 0.99999
    assert rec["wall_s_1gpu"] == state["one"]["wall_s_1gpu"] and rec["note_1gpu"] == "alone"
    assert rec["scaling_efficiency"] == pytest.approx(rec["wall_s_1gpu"] / (2 * rec["wall_s"]), abs=1e-3)
    assert rec["tokens"] == state["one"]["tokens"] and rec["shards"] == 8
    # each shard's own timing: which worker, when, where its time went
    log = rec["shard_log"]
    assert log["columns"][:2] == ["shard", "worker"] and len(log["rows"]) == 8
    assert sorted(r[0] for r in log["rows"]) == list(range(8)) and {r[1] for r in log["rows"]} <= {0, 1}
    starts = [r[log["columns"].index("start_s")] for r in log["rows"]]
    assert starts == sorted(starts) and 0 < starts[0] < rec["wall_s"]
    assert sum(r[2] for r in log["rows"]) == 48 and len(rec["shard_log_1gpu"]["rows"]) == 8
    # the kill run in a call of its own (test_scaling_bench_on_cpu_workers runs a real one): its time lost is
    # counted against the undisturbed run this folder kept
    against = []
    monkeypatch.setattr(scale, "_kill_run", lambda *args: against.append(args[13]) or {"bench": "kill"})
    assert scale.scaling("tiny", phase="many", **dict(kw, launch=False, kill=True)) == [{"bench": "kill"}]
    assert against == [{"wall_s": rec["wall_s"], "launch": "--workers 2", "gpus": 2,
                        "tokens_per_s": rec["tokens_per_s"]}]
    # the command: the same refusal, as a clear error
    got = CliRunner().invoke(bench_scale, ["--size", "tiny", "--docs", "5", "--shard-size", "1", "--gpus", "0",
                                           "--phase", "many", "--workdir", str(work),
                                           "--tokenizer", str(qwen_tokenizer_dir),
                                           "--out", str(tmp_path / "o.json")])
    assert got.exit_code == 1 and "run the 'one' phase first" in got.output
    # a phase without a work folder would do its work in a temporary one that the next phase never sees
    got = CliRunner().invoke(bench_scale, ["--size", "tiny", "--docs", "5", "--shard-size", "1", "--gpus", "0",
                                           "--phase", "one", "--tokenizer", str(qwen_tokenizer_dir)])
    assert got.exit_code == 2 and "--phase one needs --workdir" in got.output
    monkeypatch.undo()
    # preparing again forgets the one-GPU run (its output may be gone): the many phase refuses until one runs
    assert scale.scaling("tiny", phase="prepare", **kw) == []
    with pytest.raises(scale.NoOneGpuRun):
        scale.scaling("tiny", phase="many", **kw)


def test_gpu_clocks_are_summarised_per_gpu_and_absent_without_nvidia_smi(tmp_path):
    """The sampler reads nvidia-smi's CSV lines (two GPUs here, from a stand-in that prints 70 samples each and
    an unavailable reading), keeps the first and last minute apart, and adds a second block's samples."""
    fake = tmp_path / "nvidia-smi"
    lines = [f"{g}, {1980 if i < 60 else 1755}, {650.5 + g}, {40 + i % 5}" for i in range(70) for g in (0, 1)]
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines + ["0, [N/A], [N/A], 41"]) + "\nEOF\nexec sleep 30\n")
    fake.chmod(0o755)
    clocks = command.GpuClocks(binary=str(fake))
    for _ in range(2):
        with clocks:
            time.sleep(0.3)
    got = clocks.summary()
    assert set(got) == {"0", "1"} and got["0"]["samples"] == 140
    sm = got["1"]["sm_clock_mhz"]
    assert sm["first_minute_median"] == 1980 and sm["max"] == 1980 and sm["min"] == 1755
    assert got["1"]["power_w"] == {"median": 651.5, "max": 651.5} and got["0"]["temperature_c_max"] == 44
    with command.GpuClocks(binary="no-such-nvidia-smi") as none:
        pass
    assert none.summary() is None


def test_scale_phases_are_the_commands_choices():
    from pipeline.bench import scale
    from pipeline.cli.bench import bench_scale

    (phase,) = [p for p in bench_scale.params if p.name == "phase"]
    assert tuple(phase.type.choices) == scale.PHASES


def test_per_size_options_are_parsed_and_checked():
    import click

    from pipeline.cli.bench import _per_size

    assert _per_size(("4B=100", "0.6B=7"), ("4B", "0.6B"), "--docs") == {"4B": 100, "0.6B": 7}
    assert _per_size(("9",), ("4B", "0.6B"), "--docs") == {"4B": 9, "0.6B": 9}
    assert _per_size(("0.6B=7",), ("4B", "0.6B"), "--docs", {"4B": 1, "0.6B": 2}) == {"4B": 1, "0.6B": 7}
    with pytest.raises(click.BadParameter, match="no value for 0.6B"):
        _per_size(("4B=100",), ("4B", "0.6B"), "--docs")
    with pytest.raises(click.BadParameter, match="SIZE=N"):
        _per_size(("4B:100",), ("4B",), "--docs")


def test_records_file_holds_only_what_the_bench_wrote(tmp_path, monkeypatch):
    """``main`` writes the records of this run, one per size, and nothing else (no hand-merged keys)."""
    calls = []

    def fake(size, **kwargs):
        calls.append((size, kwargs["repeats"], kwargs["run_command"]))
        return {"model_size": size, "tokens_per_s": 1}

    monkeypatch.setattr(gpu, "run_bench", fake)
    out = tmp_path / "r" / "bench.json"
    recs = gpu.main(["4B", "0.6B"], "tok", {"4B": 1, "0.6B": 2}, {"4B": None, "0.6B": None}, out, repeats=3)
    assert json.loads(Path(out).read_text()) == recs == [{"model_size": "4B", "tokens_per_s": 1},
                                                         {"model_size": "0.6B", "tokens_per_s": 1}]
    assert calls == [("4B", 3, True), ("0.6B", 3, True)]


def test_long_document_embedder_shares_the_packed_forward(tiny_qwen3_dir, qwen_tokenizer_dir):
    """The bench's 8K-32K path runs the same packed forward (no second copy of the fused weights) and gives the
    same vectors, with framing up to 32K tokens."""
    from transformers import AutoModel

    from pipeline.model.encoder import Embedder

    model = AutoModel.from_pretrained(str(tiny_qwen3_dir)).eval()
    emb = Embedder.from_loaded(model, _tokenizer(qwen_tokenizer_dir), model="tiny", path=str(qwen_tokenizer_dir),
                               device="cpu", attention="packed", batch_tokens=2048, max_length=8192)
    fused = emb.packed.layers[0].qkv.data_ptr()
    long = gpu.long_embedder(model, emb, str(qwen_tokenizer_dir), "cpu")
    assert long.packed is emb.packed and long.batch_tokens == 32768 and long.info.max_length == 32768
    assert model.layers[0].self_attn.q_proj.weight.data_ptr() == fused  # still a view of the one fused tensor
    texts = ["a short one", "word " * 300, "def f(x):\n    return x\n" * 40]
    assert np.allclose(long.embed_texts(texts), emb.embed_texts(texts), atol=1e-6)
    assert long.plan_batches(np.array([9000, 20000]))  # packed cost: both fit one 32K budget
    assert len(long.plan_batches(np.array([9000, 20000]))) == 1


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
