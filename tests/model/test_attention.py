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
def attention():
    from pipeline.model import attention as module

    if not (CUDA or module.interpreted()):
        pytest.skip("no GPU and Triton's interpreter is off (TRITON_INTERPRET was not set before triton loaded)")
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


@pytest.mark.parametrize(("block_m", "block_n"), [(64, 64), (64, 32), (32, 16)])
def test_kernel_equals_reference(attention, block_m, block_n):
    gen = torch.Generator().manual_seed(block_m + block_n)
    hq, hkv, d = 4, 2, 32
    _, cu = pack_arrays(LENGTHS)
    qkv = torch.randn(int(cu[-1]), hq + 2 * hkv, d, generator=gen).to(DEVICE, DTYPE)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)  # strided views, as the fused projection gives them
    cu_t = _dev(cu)
    out = attention.causal_packed(q, k, v, cu_t, cu_t, _dev(attention.block_table(LENGTHS, block_m)), d**-0.5,
                                  block_m=block_m, block_n=block_n)
    ref = torch.cat([_reference(q[a:b], k[a:b], v[a:b], 0, hq // hkv) for a, b in zip(cu[:-1], cu[1:], strict=True)])
    assert out.shape == (int(cu[-1]), hq, d) and out.dtype == DTYPE
    assert float((out.double() - ref).abs().max()) < TOLERANCE

    # the last few positions of each sequence only, against the same keys
    n_q = np.minimum(LENGTHS, [1, 2, 3, 1, 5, 1, 2, 64])
    _, cu_q = pack_arrays(n_q)
    rows = _dev(np.concatenate([np.arange(b - n, b) for b, n in zip(cu[1:], n_q, strict=True)]))
    tail = attention.causal_packed(q[rows].contiguous(), k, v, _dev(cu_q), cu_t,
                                   _dev(attention.block_table(n_q, block_m)), d**-0.5, block_m=block_m, block_n=block_n)
    assert float((tail.double() - ref[rows]).abs().max()) < TOLERANCE


def _dev(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).to(DEVICE)


def test_kernel_rejects_what_it_cannot_run(attention):
    x = torch.zeros(4, 2, 32, device=DEVICE, dtype=DTYPE)
    cu = _dev(np.array([0, 4], dtype=np.int32))
    blocks = _dev(attention.block_table(np.array([4]), 64))
    with pytest.raises(ValueError, match="multiple"):
        attention.causal_packed(x, x, x, cu, cu, blocks, 1.0, block_m=32, block_n=64)
    with pytest.raises(ValueError, match="unsupported"):
        attention.causal_packed(x[:, :1].expand(4, 3, 32), x, x, cu, cu, blocks, 1.0)  # 3 heads over 2 kv heads
    with pytest.raises(ValueError, match="unsupported"):
        attention.causal_packed(x[..., :24], x[..., :24], x[..., :24], cu, cu, blocks, 1.0)  # head size 24


def test_packed_decoder_with_the_kernel_equals_padded_model(attention, tiny_qwen3_dir):
    from pipeline.model.encoder import Embedder

    texts = ["Hello world", "short", "a " * 150, "def f(x):\n    return x * 2\n" * 12, "x"]
    dtype = "bfloat16" if CUDA else "float32"
    padded = Embedder.load(str(tiny_qwen3_dir), device=DEVICE, attention="padded", compute_dtype=dtype)
    packed = Embedder.load(str(tiny_qwen3_dir), device=DEVICE, attention="packed", packed_options={"kernel": "triton"},
                           compute_dtype=dtype, compile=False)
    assert packed.packed.kernel == "triton"
    a, b = padded.embed_texts(texts), packed.embed_texts(texts)
    assert (a * b).sum(1).min() >= (0.999 if CUDA else 0.99999)
    assert (a[0] * a[1]).sum() < 0.99  # the comparison has power: different texts differ
