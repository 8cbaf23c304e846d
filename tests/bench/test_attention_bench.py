"""``bench-attention``'s arithmetic and record, on the CPU (the kernel in Triton's interpreter, float32)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench import kernels


def test_causal_flops_count_every_visible_pair():
    lengths = np.array([1, 5, 64, 130])
    pairs = sum(sum(pos + 1 for pos in range(n)) for n in lengths)  # query pos sees keys 0..pos
    assert kernels.causal_flops(lengths, heads=3, head_dim=8) == 3 * pairs * (2 * 8 + 2 * 8)


def test_candidates_that_do_not_fit_the_shape_are_left_out():
    assert kernels._valid((16, 64, 4, 4, 3), group=4) and not kernels._valid((16, 64, 4, 4, 3), group=2)
    assert not kernels._valid((8, 64, 1, 4, 3), group=2)  # an 8-row tile: below Triton's 16
    assert all(c[0] * c[2] >= 16 for c in kernels.CANDIDATES + kernels.LAST_CANDIDATES)
    assert kernels.CANDIDATES[0] == kernels.LAST_CANDIDATES[0]  # both tables start at the same default


def test_sweep_record_on_the_cpu():
    pytest.importorskip("triton")
    from pipeline.model import attention

    if not attention.interpreted():
        pytest.skip("Triton's interpreter is off")
    rec = kernels.sweep("0.6B", 3, 256, repeats=2, device="cpu", max_length=80,
                        candidates=((64, 64, 1, 4, 3), (32, 32, 2, 4, 3), (16, 64, 4, 4, 3)),
                        last_candidates=((64, 64, 1, 4, 3), (8, 64, 2, 4, 3)))
    assert (rec["heads"], rec["kv_heads"], rec["head_dim"]) == (16, 8, 128)
    assert set(rec["causal"]) == {"m64_n64_fold1_w4_s3", "m32_n32_fold2_w4_s3"}  # fold 4 > 2 heads per kv head
    first, other = rec["causal"]["m64_n64_fold1_w4_s3"], rec["causal"]["m32_n32_fold2_w4_s3"]
    assert other["max_abs_diff_vs_first"] < 1e-4  # same attention, other tiles
    assert other["speed_vs_first"] == pytest.approx(first["seconds"] / other["seconds"], rel=0.01)
    assert rec["last_layer"]["m8_n64_fold2_w4_s3"]["max_abs_diff_vs_first"] < 1e-4
    assert "m8_n64_fold2_w4_s3" in kernels.table(rec)


def test_profiled_batches_are_spread_over_the_plan():
    from pipeline.bench.paths import spread_batches

    assert spread_batches(100, 5).tolist() == [0, 25, 50, 74, 99]  # not the first five: the longest documents
    assert spread_batches(3, 8).tolist() == [0, 1, 2]


def test_kernel_time_is_shared_by_kind_without_host_stalls():
    from pipeline.bench.paths import kernel_shares

    got = kernel_shares([("_causal_fwd", 300.0), ("nvjet_sm90_tst_256x160", 500.0), ("Command Buffer Full", 900.0),
                         ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", 60.0), ("_qk_norm_rope", 40.0),
                         ("triton_poi_fused_mul_silu_split_1", 50.0), ("triton_poi_fused_add_2", 50.0)])
    assert got == {"kernel_ms": 1.0, "shares": {"matmul": 0.5, "attention": 0.3, "norm_rotary": 0.1,
                                                "silu_mul": 0.05, "other": 0.05}}


def test_changes_ab_measures_the_default_against_each_change_undone(tiny_qwen3_dir, monkeypatch):
    pytest.importorskip("triton")
    import statistics

    from pipeline.bench import paths
    from pipeline.model import attention
    from pipeline.model.encoder import Embedder

    if not attention.interpreted():
        pytest.skip("runs on the GPU through bench; on the CPU through Triton's interpreter")
    emb = Embedder.load(str(tiny_qwen3_dir), device="cpu", attention="packed", packed_options={"kernel": "triton"},
                        compute_dtype="float32", compile=False)
    enc = emb.tokenizer.encode(["Hello world", "a " * 90, "short", "def f(x):\n    return x\n" * 5])
    launched = set()  # (rows per program, heads per program) of every kernel launch
    kernel = attention.causal_packed

    def spy(*args, **kwargs):
        launched.add((kwargs["block_m"], kwargs["fold"]))
        return kernel(*args, **kwargs)
    monkeypatch.setattr(attention, "causal_packed", spy)
    out = paths.changes_ab(emb.model, str(tiny_qwen3_dir), emb, enc.subset([3, 1, 2]), "cpu", repeats=2)
    assert out["tokens"] == int(enc.lengths[[3, 1, 2]].sum()) and out["repeats"] == 2
    assert set(out) == {"tokens", "repeats", "default", *paths.CHANGES}
    # the default's tiles (2 heads x 32 positions; the last layer 2 x 8) and the earlier ones (1 x 64) both ran
    assert launched == {(32, 2), (8, 2), (64, 1)}
    base = statistics.median(out["default"]["runs"])
    for name in paths.CHANGES:
        r = out[name]
        assert len(r["runs"]) == 2
        # (the runs are rounded to whole tokens/s, a few hundred here)
        assert r["default_speedup"] == pytest.approx(base / statistics.median(r["runs"]), rel=0.02)
        assert r["min_cosine_vs_default"] > 0.99999  # same model, same numbers in float32: only the schedule differs
    assert emb.packed._tiles["fold"] == 2  # the default's decoder is left as it was


def test_encoded_subset_is_the_chosen_sequences_in_order(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    from pipeline.model.tokens import SequenceFormat, TextTokenizer

    tok = TextTokenizer(AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir)), SequenceFormat((), (), 64))
    enc = tok.encode(["one two", "three", "four five six seven"])
    sub = enc.subset([2, 0])
    assert [sub.sequence(i).tolist() for i in range(2)] == [enc.sequence(2).tolist(), enc.sequence(0).tolist()]
    assert sub.doc.tolist() == [0, 1] and sub.lengths.tolist() == enc.lengths[[2, 0]].tolist()


def test_bench_attention_is_a_command():
    from click.testing import CliRunner

    from pipeline.cli.main import main

    got = CliRunner().invoke(main, ["bench-attention", "--help"])
    assert got.exit_code == 0 and "tile choices" in got.output
