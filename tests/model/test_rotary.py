"""The q/k norm + rope Triton kernel against transformers' own Qwen3 code for the same step.

Without a GPU the kernel runs in Triton's CPU interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``) in
float32; on a GPU compiled, in bf16. The reference is transformers' ``Qwen3RMSNorm`` and ``apply_rotary_pos_emb``
(not the project's compiled path), on cos/sin from the model's own rotary module.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE, DTYPE, TOLERANCE = ("cuda", torch.bfloat16, 2e-2) if CUDA else ("cpu", torch.float32, 1e-5)


@pytest.fixture
def rotary(triton_kernels):
    from pipeline.model import rotary as module

    return module


@torch.no_grad()
def _reference(qkv, q_w, k_w, cos, sin, n_q, n_kv, d, eps):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    t = qkv.shape[0]
    q, k, v = qkv[:, : (n_q + 2 * n_kv) * d].split([n_q * d, n_kv * d, n_kv * d], dim=1)
    q, k = q.reshape(t, n_q, d), k.reshape(t, n_kv, d)
    if q_w is not None:
        norms = []
        for w in (q_w, k_w):
            norm = Qwen3RMSNorm(d, eps=eps).to(qkv.device, qkv.dtype)
            norm.weight.data.copy_(w)
            norms.append(norm)
        q, k = norms[0](q), norms[1](k)
    # transformers' layout: (batch, heads, T, D), cos/sin (batch, T, D)
    q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    return q[0].transpose(0, 1), k[0].transpose(0, 1), v.reshape(t, n_kv, d)


def _cos_sin(positions, d):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    rope = Qwen3RotaryEmbedding(Qwen3Config(head_dim=d, hidden_size=4 * d, num_attention_heads=4)).to(DEVICE)
    x = torch.zeros(1, device=DEVICE, dtype=DTYPE)
    cos, sin = rope(x, positions[None].to(DEVICE))
    return cos[0], sin[0]


@pytest.mark.parametrize(("t", "n_q", "n_kv", "d", "norm", "block_t"),
                         [(77, 4, 2, 32, True, 32), (5, 2, 2, 64, True, 16), (130, 8, 2, 16, False, 32),
                          (1, 4, 1, 32, True, 32), (64, 6, 3, 32, True, 64)])
def test_kernel_equals_transformers(rotary, t, n_q, n_kv, d, norm, block_t):
    gen = torch.Generator().manual_seed(t + n_q + d)
    width = (n_q + 2 * n_kv) * d
    qkv = (torch.randn(t, width, generator=gen) * 3).to(DEVICE, DTYPE)
    weights = (torch.rand(2, d, generator=gen) + 0.5).to(DEVICE, DTYPE) if norm else None
    positions = torch.randint(0, 5000, (t,), generator=gen)
    cos, sin = _cos_sin(positions, d)
    ref = _reference(qkv.clone(), *(weights if norm else (None, None)), cos, sin, n_q, n_kv, d, 1e-6)
    before_v = qkv[:, (n_q + n_kv) * d :].clone()
    q, k, v = rotary.qk_norm_rope_(qkv, weights, cos, sin, n_q, n_kv, d, 1e-6, block_t=block_t)
    assert q.shape == (t, n_q, d) and k.shape == (t, n_kv, d) and v.shape == (t, n_kv, d)
    assert q.data_ptr() == qkv.data_ptr()  # in place: views of the projection's output
    for got, want in zip((q, k), ref[:2], strict=True):
        assert float((got.float() - want.float()).abs().max()) <= TOLERANCE * float(want.abs().max())
    assert torch.equal(qkv[:, (n_q + n_kv) * d :], before_v)  # the values are left alone
    assert not torch.equal(q, qkv.new_zeros(q.shape))


def test_kernel_launches_in_pieces_past_the_grid_limit(rotary, monkeypatch):
    """Packs of more token blocks than a launch's second grid dimension holds run as several launches."""
    monkeypatch.setattr(rotary, "MAX_GRID_Y", 2)
    t, n_q, n_kv, d = 150, 2, 1, 16
    qkv = torch.randn(t, (n_q + 2 * n_kv) * d, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    weights = torch.ones(2, d, device=DEVICE, dtype=DTYPE)
    cos, sin = _cos_sin(torch.arange(t), d)
    ref = _reference(qkv.clone(), weights[0], weights[1], cos, sin, n_q, n_kv, d, 1e-6)
    q, k, _ = rotary.qk_norm_rope_(qkv, weights, cos, sin, n_q, n_kv, d, 1e-6, block_t=16)
    assert float((q.float() - ref[0].float()).abs().max()) <= TOLERANCE * float(ref[0].abs().max())
    assert float((k.float() - ref[1].float()).abs().max()) <= TOLERANCE * float(ref[1].abs().max())


def test_kernel_rejects_what_it_cannot_run(rotary):
    qkv = torch.zeros(4, 4 * 24, device=DEVICE, dtype=DTYPE)
    cos = torch.zeros(4, 24, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="unsupported"):  # head size 24
        rotary.qk_norm_rope_(qkv, None, cos, cos, 2, 1, 24, 1e-6)
    qkv = torch.zeros(4, 3 * 32, device=DEVICE, dtype=DTYPE)
    cos = torch.zeros(4, 32, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="do not hold"):  # 2 + 2 x 1 heads need 4 x 32 columns
        rotary.qk_norm_rope_(qkv, None, cos, cos, 2, 1, 32, 1e-6)


def test_decoder_uses_the_kernel_with_triton_attention_and_equals_the_compiled_path(rotary, tiny_qwen3_dir):
    """The decoder runs the rope kernel where its Triton attention runs; the variant without it (the graph's
    own q/k norms and rope, eager here) gives the same vectors."""
    import numpy as np
    from transformers import AutoModel

    from pipeline.model.packed import PackedDecoder, pack_arrays

    model = AutoModel.from_pretrained(str(tiny_qwen3_dir), dtype=DTYPE).to(DEVICE).eval()
    dec = PackedDecoder(model, kernel="triton")
    assert dec.rope_kernel and not PackedDecoder(model, kernel="sdpa").rope_kernel
    without = dec.variant(compiled_rope=True)
    assert not without.rope_kernel and dec.rope_kernel
    lens = np.array([3, 40, 1, 17])
    positions, cu = pack_arrays(lens)
    ids = torch.arange(int(cu[-1]), device=DEVICE) * 7919 % 1000 + 10
    out = []
    for d in (dec, without):
        layout = tuple(torch.from_numpy(a).to(DEVICE) for a in d.host_layout(lens))
        out.append(d.forward(ids, torch.from_numpy(positions).to(DEVICE), torch.from_numpy(cu).to(DEVICE),
                             int(lens.max()), layout).float())
    cos = torch.nn.functional.cosine_similarity(out[0], out[1], dim=-1)
    assert float(cos.min()) >= (0.999 if CUDA else 0.99999)
