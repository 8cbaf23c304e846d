"""The Triton packed-attention kernel against an independent reference computation.

Without a GPU the kernel runs in Triton's CPU interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``), in
float32, so its indexing, masking and online softmax are checked to rounding; on a GPU it runs compiled, in bf16.
Shapes: one-token sequences, sequences that end on, before and after a block edge, grouped kv heads, and queries
that are only the last positions of their sequence (the last layer of an embedding model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.packed import pack_arrays

pytest.importorskip("triton")

LENGTHS = np.array([1, 7, 64, 65, 130, 200, 3, 128])


CUDA = torch.cuda.is_available()
DEVICE, DTYPE, TOLERANCE = ("cuda", torch.bfloat16, 3e-2) if CUDA else ("cpu", torch.float32, 1e-5)


@pytest.fixture
def attention(triton_kernels):
    from pipeline.model import attention as module

    return module


def _reference(q, k, v, shift: int, group: int) -> torch.Tensor:
    """Causal attention of one sequence in float64: query i sits at position shift + i."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    keys, queries = torch.arange(k.shape[1], device=q.device), torch.arange(q.shape[1], device=q.device)
    visible = keys[None, :] <= queries[:, None] + shift
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def test_block_table_covers_every_query_once_longest_first(attention):
    table = attention.block_table(LENGTHS, 64)
    seq, start = table
    assert table.dtype == np.int32 and (np.diff(start) <= 0).all()
    covered = sorted((int(s), int(p) + i) for s, p in zip(seq, start, strict=True) for i in range(64)
                     if p + i < LENGTHS[s])
    assert covered == [(s, i) for s, n in enumerate(LENGTHS) for i in range(n)]


@pytest.mark.parametrize(("block_m", "block_n", "fold", "hq"),
                         [(64, 64, 1, 4), (64, 32, 1, 4), (32, 16, 1, 4), (32, 64, 2, 4), (8, 16, 2, 4),
                          (32, 16, 2, 4), (16, 32, 4, 8), (32, 32, 2, 8), (16, 64, 4, 8), (4, 64, 4, 8)])
def test_kernel_equals_reference(attention, block_m, block_n, fold, hq):
    gen = torch.Generator().manual_seed(block_m + block_n + fold)
    hkv, d = 2, 32
    _, cu = pack_arrays(LENGTHS)
    qkv = torch.randn(int(cu[-1]), hq + 2 * hkv, d, generator=gen).to(DEVICE, DTYPE)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)  # strided views, as the fused projection gives them
    cu_t = _dev(cu)
    out = attention.causal_packed(q, k, v, cu_t, cu_t, _dev(attention.block_table(LENGTHS, block_m)), d**-0.5,
                                  block_m=block_m, block_n=block_n, fold=fold)
    ref = torch.cat([_reference(q[a:b], k[a:b], v[a:b], 0, hq // hkv) for a, b in zip(cu[:-1], cu[1:], strict=True)])
    assert out.shape == (int(cu[-1]), hq, d) and out.dtype == DTYPE
    assert float((out.double() - ref).abs().max()) < TOLERANCE

    # the last few positions of each sequence only, against the same keys
    n_q = np.minimum(LENGTHS, [1, 2, 3, 1, 5, 1, 2, 64])
    _, cu_q = pack_arrays(n_q)
    rows = _dev(np.concatenate([np.arange(b - n, b) for b, n in zip(cu[1:], n_q, strict=True)]))
    tail = attention.causal_packed(q[rows].contiguous(), k, v, _dev(cu_q), cu_t,
                                   _dev(attention.block_table(n_q, block_m)), d**-0.5, block_m=block_m, block_n=block_n,
                                   fold=fold)
    assert float((tail.double() - ref[rows]).abs().max()) < TOLERANCE


def _dev(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).to(DEVICE)


def test_kernel_rejects_what_it_cannot_run(attention):
    x = torch.zeros(4, 2, 32, device=DEVICE, dtype=DTYPE)
    cu = _dev(np.array([0, 4], dtype=np.int32))
    blocks = _dev(attention.block_table(np.array([4]), 64))
    with pytest.raises(ValueError, match="fold 4 must"):  # 2 query heads per kv head
        attention.causal_packed(x, x[:, :1], x[:, :1], cu, cu, blocks, 1.0, block_m=16, fold=4)
    with pytest.raises(ValueError, match="power of two"):
        attention.causal_packed(x, x, x, cu, cu, blocks, 1.0, block_m=48)
    with pytest.raises(ValueError, match="at least 16"):
        attention.causal_packed(x, x, x, cu, cu, blocks, 1.0, block_m=8, fold=1)
    with pytest.raises(ValueError, match="unsupported"):  # 3 heads over 2 kv heads
        attention.causal_packed(x[:, :1].expand(4, 3, 32), x, x, cu, cu, blocks, 1.0, block_m=64)
    with pytest.raises(ValueError, match="unsupported"):  # head size 24
        attention.causal_packed(x[..., :24], x[..., :24], x[..., :24], cu, cu, blocks, 1.0, block_m=64)


def test_tiles_keep_the_tile_height_whatever_the_fold(attention):
    assert attention.tiles(2) == {"block_m": 32, "block_n": 64, "fold": 2, "num_warps": 4, "num_stages": 3}
    assert attention.tiles(4)["block_m"] == 16 and attention.tiles(4)["fold"] == 4
    assert attention.tiles(3)["block_m"] == 64 and attention.tiles(3)["fold"] == 1  # no power of two divides 3
    assert attention.tiles(4, fold=1)["block_m"] == 64
    assert attention.tiles(2, last=True)["block_m"] == 8 and attention.tiles(8, last=True)["block_m"] == 4


@pytest.mark.parametrize("lengths", [[1, 1, 1], [1], [5, 1, 40]])
def test_packed_decoder_with_the_kernel_on_one_token_sequences(attention, tiny_qwen3_dir, lengths):
    """Packs whose longest sequence is one token: the causal layers' tables and tiles, not the last layer's."""
    from transformers import AutoModel

    from pipeline.model.packed import PackedDecoder

    dtype = torch.bfloat16 if CUDA else torch.float32
    model = AutoModel.from_pretrained(str(tiny_qwen3_dir), dtype=dtype).to(DEVICE).eval()
    lens = np.array(lengths)
    positions, cu = pack_arrays(lens)
    ids = torch.arange(int(cu[-1]), device=DEVICE) * 7919 % 1000 + 10
    out = {}
    for kernel in ("triton", "sdpa"):
        dec = PackedDecoder(model, kernel=kernel)
        layout = tuple(_dev(a) for a in dec.host_layout(lens))
        out[kernel] = dec.forward(ids, _dev(positions), _dev(cu), int(lens.max()), layout).float()
    cos = torch.nn.functional.cosine_similarity(out["triton"], out["sdpa"], dim=-1)
    assert out["triton"].shape == (len(lengths), model.config.hidden_size)
    assert float(cos.min()) >= (0.999 if CUDA else 0.99999)


def test_default_fold_is_the_largest_power_of_two_dividing_the_group(attention, monkeypatch):
    monkeypatch.setattr(attention, "FOLD", 4)
    assert [attention.default_fold(g) for g in (1, 2, 3, 4, 6, 8, 7)] == [1, 2, 1, 4, 2, 4, 1]


@pytest.mark.parametrize("options", [{}, {"earlier_tiles": True}])
def test_packed_decoder_with_the_kernel_equals_padded_model(attention, tiny_qwen3_dir, options):
    """The default tiles (two query heads per program, the last layer's 16-row tiles) and the earlier ones."""
    from pipeline.model.encoder import Embedder

    texts = ["Hello world", "short", "a " * 150, "def f(x):\n    return x * 2\n" * 12, "x"]
    dtype = "bfloat16" if CUDA else "float32"
    padded = Embedder.load(str(tiny_qwen3_dir), device=DEVICE, attention="padded", compute_dtype=dtype)
    packed = Embedder.load(str(tiny_qwen3_dir), device=DEVICE, attention="packed", compute_dtype=dtype, compile=False,
                           packed_options={"kernel": "triton", **options})
    assert packed.packed.kernel == "triton"
    earlier = options.get("earlier_tiles", False)
    assert packed.packed._tiles["fold"] == (1 if earlier else 2)
    assert packed.packed._last_tiles["block_m"] == (64 if earlier else 8)
    assert packed.packed.variant(earlier_tiles=not earlier)._tiles["fold"] == (2 if earlier else 1)
    a, b = padded.embed_texts(texts), packed.embed_texts(texts)
    assert (a * b).sum(1).min() >= (0.999 if CUDA else 0.99999)
    assert (a[0] * a[1]).sum() < 0.99  # the comparison has power: different texts differ
