"""The packed (padding-free) Qwen3 forward equals the padded reference; layouts and framing are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_ids_once, assert_same_vectors, read_vectors, run_ok, write_jsonl

from pipeline.model.encoder import Embedder
from pipeline.model.packed import pack_arrays, padded_layout, spaced_counts

TEXTS = [
    "Hello world",
    "这是一个测试句子，用于检查多语言的处理。",
    "def f(x):\n    return x * 2\n" * 30,
    "short",
    "Une phrase en français, avec des accents : é, è, à.",
    "a " * 400,
    "x",
    "The quick brown fox jumps over the lazy dog. " * 12,
]


def test_pack_arrays_positions_restart_per_sequence():
    positions, cu = pack_arrays(np.array([3, 1, 2]))
    assert cu.tolist() == [0, 3, 4, 6]
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]


def test_padded_layout_round_trips_every_packed_row():
    lengths = np.array([5, 2, 4, 1])
    gather, scatter, mask = padded_layout(lengths)
    total = int(lengths.sum())
    assert mask.sum() == total and mask.shape == (4, 5)
    assert sorted(scatter.tolist()) == scatter.tolist() and len(scatter) == total
    # a real padded slot reads exactly the packed row it is scattered back to
    assert gather[scatter].tolist() == list(range(total))
    assert (gather >= 0).all() and (gather < total).all()


@pytest.fixture(scope="module")
def embedders(tiny_qwen3_dir):
    torch.manual_seed(0)
    padded = Embedder.load(str(tiny_qwen3_dir), device="cpu", attention="padded", batch_tokens=2048)
    packed = Embedder.load(str(tiny_qwen3_dir), device="cpu", attention="packed", batch_tokens=2048)
    return padded, packed


def test_packed_equals_padded_fp32(embedders):
    padded, packed = embedders
    assert packed.attention == "packed" and padded.attention == "padded"
    a, b = padded.embed_texts(TEXTS), packed.embed_texts(TEXTS)
    cos = (a * b).sum(1)
    assert cos.min() >= 0.99999, cos
    # and the test can fail: different texts give clearly different vectors
    assert (a[0] * a[1]).sum() < 0.99


def test_a_bidirectional_qwen_is_never_packed(tmp_path, tiny_qwen3_dir):
    """``"is_causal": false`` in config.json: transformers attends both ways, the packed forward only backwards
    (cosine 0.905 to the model's vectors). It is refused where asked for and the padded path gives the model's."""
    import json
    import shutil

    from pipeline.errors import PipelineError
    from pipeline.model.packed import supports_packing

    folder = tmp_path / "bidirectional"
    shutil.copytree(tiny_qwen3_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_causal": False}))
    padded = Embedder.load(str(folder), device="cpu", attention="padded")
    assert not supports_packing(padded.model)
    with pytest.raises(PipelineError, match="attention: packed"):
        Embedder.load(str(folder), device="cpu", attention="packed")
    causal = Embedder.load(str(tiny_qwen3_dir), device="cpu", attention="padded").embed_texts(TEXTS)
    assert ((padded.embed_texts(TEXTS) * causal).sum(1) < 0.9999).any(), "the flag changed nothing: no test"


def test_packed_batches_are_cut_by_tokens_not_count(embedders):
    _, packed = embedders
    enc = packed.tokenizer.encode(TEXTS * 20)
    batches = packed.plan_batches(enc.lengths)
    assert len(batches) > 1
    for batch in batches:
        assert enc.lengths[batch].sum() <= packed.batch_tokens or len(batch) == 1


def test_run_with_packed_attention_equals_padded_run(tmp_path, tiny_qwen3_dir):
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS * 3)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    outs = {}
    for attention in ("padded", "packed"):
        out = tmp_path / attention
        run_ok(*_args(src, out, tiny_qwen3_dir, "--attention", attention, "--dims", "32"))
        outs[attention] = read_vectors(out)
    assert_ids_once(outs["packed"], [d["id"] for d in docs])
    assert_same_vectors(outs["padded"], outs["packed"])


def _args(src, out, model, *extra):
    return ["run", "--input", str(src), "--output", str(out), "--model", str(model), "--device", "cpu",
            "--quiet", "--batch-tokens", "2048", *extra]


def test_text_ending_in_the_end_token_gets_exactly_one(embedders):
    padded, _ = embedders
    enc = padded.tokenizer.encode(["hello<|endoftext|>", "hello"])
    assert enc.sequence(0).tolist() == enc.sequence(1).tolist()
    assert enc.sequence(0)[-1] == 151643 and enc.sequence(0)[-2] != 151643


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["triton", "varlen"])
@pytest.mark.parametrize("fp32_residual", [True, False])
def test_packed_equals_padded_bf16_on_gpu(tiny_qwen3_dir, kernel, fp32_residual):
    padded = Embedder.load(str(tiny_qwen3_dir), device="cuda", attention="padded", compute_dtype="bfloat16")
    packed = Embedder.load(str(tiny_qwen3_dir), device="cuda", attention="packed", compute_dtype="bfloat16",
                           compile=False, packed_options={"kernel": kernel, "fp32_residual": fp32_residual})
    assert packed.packed.kernel == kernel
    cos = (padded.embed_texts(TEXTS) * packed.embed_texts(TEXTS)).sum(1)
    assert cos.min() >= 0.999, cos


def test_staging_off_cuda_hands_the_arrays_over_as_they_are():
    from pipeline.model.encoder import HostStaging

    arrays = (np.arange(5), np.ones((2, 3), dtype=bool), np.int64(7) * np.ones(()), np.arange(9)[::2])
    sent = HostStaging().send(torch.device("cpu"), *arrays)
    for a, t in zip(arrays, sent, strict=True):
        assert t.shape == a.shape and np.array_equal(t.numpy(), a)
    assert np.shares_memory(sent[0].numpy(), arrays[0])  # no copy where none is needed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staging_sends_each_array_as_it_is_through_reused_buffers():
    """A pack's arrays arrive with their dtypes, shapes and contents while the device is still busy with earlier
    work (each copy queued behind a sleeping kernel, so a buffer written again before its copy ran would show),
    also when the buffers come round again and when a larger pack makes one grow."""
    from pipeline.model.encoder import HostStaging

    staging, dev = HostStaging(), torch.device("cuda")
    rng = np.random.default_rng(0)
    kept = []
    for turn in range(3 * HostStaging.SLOTS):
        n = 10 + turn * 20_000  # past the first buffer size after a few turns
        arrays = (rng.integers(0, 1 << 40, n), rng.integers(0, 99, (2, n // 7 + 1)).astype(np.int32),
                  np.zeros(0, dtype=np.int64), rng.random((3, 5)) < 0.5, np.arange(n + 1, dtype=np.int32)[::2],
                  np.int64(turn) * np.ones(()))
        torch.cuda._sleep(50_000_000)  # ~25 ms of device time ahead of this copy
        sent = staging.send(dev, *arrays)
        kept.append((arrays, sent))
    torch.cuda.synchronize()
    for arrays, sent in kept:
        for a, t in zip(arrays, sent, strict=True):
            assert t.device.type == "cuda" and t.shape == a.shape and np.array_equal(t.cpu().numpy(), a)
    assert all(t.data_ptr() % HostStaging.ALIGN == 0 for t in sent if t.numel())


def test_auto_kernel_is_the_fastest_this_machine_runs(tiny_qwen3_dir):
    from pipeline.model import attention

    emb = Embedder.load(str(tiny_qwen3_dir), device="cpu", attention="packed")
    assert emb.packed.kernel == "sdpa"  # Triton's interpreter is for tests that name it
    if torch.cuda.is_available():
        gpu = Embedder.load(str(tiny_qwen3_dir), device="cuda", attention="packed", compute_dtype="bfloat16",
                            compile=False)
        assert gpu.packed.kernel == ("triton" if attention.available() else "varlen")


def test_default_token_budget_by_path_and_model_size():
    from pipeline.model.encoder import default_batch_tokens

    assert default_batch_tokens("packed", "cuda", 1024) == 65536  # Qwen3-Embedding-0.6B
    assert default_batch_tokens("packed", "cuda", 2560) == 32768  # 4B
    assert default_batch_tokens("padded", "cuda", 1024) == 16384
    assert default_batch_tokens("padded", "cpu", 64) == 4096


def test_warmup_runs_one_pack_and_leaves_the_vectors_alone(embedders):
    _, packed = embedders
    before = packed.embed_texts(TEXTS)
    assert packed.packed.warmup() > 0
    assert np.array_equal(before, packed.embed_texts(TEXTS))


def test_spaced_counts_cover_one_to_the_budget_about_two_percent_apart():
    counts = spaced_counts(65536)
    assert counts[:50] == list(range(1, 51)) and counts[-1] == 65536
    assert all(b > a for a, b in zip(counts, counts[1:], strict=False))
    gaps = [b / a for a, b in zip(counts[50:], counts[51:-1], strict=False)]
    assert max(gaps) < 1.04 and sum(gaps) / len(gaps) < 1.021 and len(counts) < 450
    assert spaced_counts(1) == [1] and spaced_counts(3) == [1, 2, 3]


def test_warm_products_runs_nothing_off_cuda(embedders):
    _, packed = embedders
    assert packed.packed.warm_products(4096) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_warm_products_runs_every_count_and_leaves_the_vectors_alone(tiny_qwen3_dir):
    emb = Embedder.load(str(tiny_qwen3_dir), device="cuda", compile=False)
    before = emb.embed_texts(TEXTS)
    assert emb.packed.warm_products(3000) == len(spaced_counts(3000))
    assert np.array_equal(before, emb.embed_texts(TEXTS))


def _float32_reference(tiny_qwen3_dir):
    """The float32 padded CPU path (itself checked against transformers' own forward in test_qwen_reference)."""
    return Embedder.load(str(tiny_qwen3_dir), device="cpu", attention="padded")


LONG_TEXTS = TEXTS + ["word " * n for n in (3, 40, 130, 257, 600, 1100)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_default_gpu_path_against_the_float32_reference(tiny_qwen3_dir):
    """What ``embed-corpus run`` uses on a GPU: packed, Triton attention, torch.compile, bf16 weights, float32
    residual stream; against float32, and no worse than the same path uncompiled."""
    default = Embedder.load(str(tiny_qwen3_dir), device="cuda")
    assert default.packed is not None and default.packed.compiled and default.packed.kernel == "triton"
    assert default.info.compute_dtype == "bfloat16" and default.packed.fp32_residual
    eager = Embedder.load(str(tiny_qwen3_dir), device="cuda", compile=False)
    ref = _float32_reference(tiny_qwen3_dir).embed_texts(LONG_TEXTS)
    compiled = (default.embed_texts(LONG_TEXTS) * ref).sum(1)
    uncompiled = (eager.embed_texts(LONG_TEXTS) * ref).sum(1)
    assert compiled.min() >= 0.995, compiled
    assert compiled.min() >= uncompiled.min() - 1e-3, (compiled, uncompiled)
    assert (ref[0] * ref[1]).sum() < 0.99  # the comparison has power


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_default_builds_its_graph_at_load_and_never_again(tiny_qwen3_dir):
    """The warm-up at load compiles the one graph every pack length uses: packs of many lengths later (small
    budget: many packs) add no graph, and give the float32 reference's vectors."""
    from torch._dynamo.utils import counters

    emb = Embedder.load(str(tiny_qwen3_dir), device="cuda", batch_tokens=300)
    graphs = counters["stats"]["unique_graphs"]
    enc = emb.tokenizer.encode(LONG_TEXTS * 3)
    assert len(emb.plan_batches(enc.lengths)) > 5
    got = emb.embed_encoded(enc)
    assert counters["stats"]["unique_graphs"] == graphs, "a pack of a new length compiled again"
    ref = _float32_reference(tiny_qwen3_dir).embed_encoded(enc)
    assert (got * ref).sum(1).min() >= 0.995


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_default_real_command_on_gpu(tmp_path, tiny_qwen3_dir):
    """``embed-corpus run`` on the GPU with every default: every id once, vectors of the float32 reference."""
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(LONG_TEXTS * 4)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    run_ok("run", "--input", str(src), "--output", str(tmp_path / "out"), "--model", str(tiny_qwen3_dir),
           "--quiet", "--shard-size", "10")
    got = read_vectors(tmp_path / "out")
    assert_ids_once(got, [d["id"] for d in docs])
    ref = _float32_reference(tiny_qwen3_dir).embed_texts([d["text"] for d in docs])
    by_id = dict(zip(got.column("id").to_pylist(), np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
                     strict=True))
    cos = np.array([(by_id[d["id"]] * ref[i]).sum() for i, d in enumerate(docs)])
    assert cos.min() >= 0.995, cos


def test_model_load_puts_off_scikit_learn_before_transformers_model_classes_are_imported(tiny_qwen3_dir):
    """``Embedder.load`` runs the scikit-learn shortcut before it imports ``AutoModel``: transformers 5.17 imports
    the generation code (and with it scikit-learn) as ``AutoModel``'s module loads, so the shortcut after that
    import did nothing (the H200 image's import step still spent 1.5 s in scikit-learn)."""
    import subprocess
    import sys

    from helpers import subprocess_env

    code = f"""
import sys
from pipeline.model import encoder
calls = []
real = encoder.import_generation_code_lazily
def spy():
    calls.append("transformers.models.auto.auto_factory" in sys.modules)
    real()
encoder.import_generation_code_lazily = spy
encoder.Embedder.load({str(tiny_qwen3_dir)!r}, device="cpu", attention="padded")
assert calls == [False], calls
print("ok")
"""
    got = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr[-2000:]


def test_generation_code_is_imported_without_scikit_learn_and_still_finds_it_when_used():
    """The start-up shortcut (``import_generation_code_lazily``): loading a model class imports no scikit-learn,
    and transformers' assisted decoding still sees it installed and gets its real ``roc_curve`` on first use."""
    import subprocess
    import sys

    from helpers import subprocess_env

    code = """
import sys
from pipeline.model.encoder import import_generation_code_lazily
import_generation_code_lazily()
from transformers import Qwen3Model  # the model classes import the generation code
import transformers.modeling_utils
assert "sklearn" not in sys.modules, "scikit-learn was imported at start-up"
from transformers.generation import candidate_generator as cg
assert cg.is_sklearn_available()
fpr, tpr, thresholds = cg.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
assert "sklearn" in sys.modules and list(tpr)[-1] == 1.0
print("ok")
"""
    pytest.importorskip("sklearn")
    got = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr[-2000:]
