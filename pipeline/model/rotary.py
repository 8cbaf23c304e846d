"""Per-head RMS norm and rotary position embedding of q and k, in place in the fused q/k/v projection's output,
as one Triton kernel.

Why a kernel of our own: Inductor's fused kernel for this step (Qwen3's q/k norms, then rope) ran at ~0.85 TB/s on
an H200 in the 0.6B model (a fifth of the card's bandwidth; 17.6% of the model's device time,
data/benchmarks/h200-profile-0.6b-2026-12-01.txt), although the same code compiled for the 4B reached ~2.6 TB/s.
The step reads and writes each q and k row once; this kernel does exactly that and nothing else, whatever
Inductor's heuristics pick for the pack sizes it saw when it compiled.

Layout: ``qkv`` (T, S) with the row of token ``t`` holding ``n_q`` query heads, then ``n_kv`` key heads, then the
values, each ``D`` wide (``S >= (n_q + n_kv) * D``, last dimension contiguous); ``cos``/``sin`` (T, D) as the
model's rotary module returns them. A program normalises and rotates ``BLOCK_T`` tokens of one head; heads vary
fastest over the launch, so a token block's cos/sin rows are read from L2 by all its heads.
"""

from __future__ import annotations

from pipeline.model.attention import triton

if triton is not None:
    import triton.language as tl

BLOCK_T = 32
NUM_WARPS = 4
MAX_GRID_Y = 65535


if triton is not None:

    @triton.jit(do_not_specialize=["T"])
    def _qk_norm_rope(QKV, COS, SIN, W, T, s_t, s_c, eps, N_Q: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_T: tl.constexpr, NORM: tl.constexpr):
        head = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, HALF)
        live = rows[:, None] < T
        rows = rows.to(tl.int64)
        at = QKV + rows[:, None] * s_t + head * (2 * HALF) + cols[None, :]
        lo = tl.load(at, mask=live, other=0.0).to(tl.float32)
        hi = tl.load(at + HALF, mask=live, other=0.0).to(tl.float32)
        if NORM:
            # Qwen3RMSNorm's steps: statistics in float32, the normalised value rounded to the stream's dtype,
            # then scaled by the weight (query heads: W's first row, key heads: its second); the scaling and the
            # rotation stay in float32 and are rounded once, at the store (transformers rounds after each step)
            rstd = tl.rsqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / (2 * HALF) + eps)
            w = W + (head >= N_Q).to(tl.int32) * (2 * HALF) + cols
            w_lo = tl.load(w).to(tl.float32)[None, :]
            w_hi = tl.load(w + HALF).to(tl.float32)[None, :]
            lo = (lo * rstd[:, None]).to(QKV.dtype.element_ty).to(tl.float32) * w_lo
            hi = (hi * rstd[:, None]).to(QKV.dtype.element_ty).to(tl.float32) * w_hi
        trig = rows[:, None] * s_c + cols[None, :]
        cos_lo = tl.load(COS + trig, mask=live, other=0.0).to(tl.float32)
        cos_hi = tl.load(COS + trig + HALF, mask=live, other=0.0).to(tl.float32)
        sin_lo = tl.load(SIN + trig, mask=live, other=0.0).to(tl.float32)
        sin_hi = tl.load(SIN + trig + HALF, mask=live, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[HALF:], x[:HALF])
        tl.store(at, (lo * cos_lo - hi * sin_lo).to(QKV.dtype.element_ty), mask=live)
        tl.store(at + HALF, (hi * cos_hi + lo * sin_hi).to(QKV.dtype.element_ty), mask=live)


def supports_head_dim(d: int) -> bool:
    """Head sizes the kernel takes: even powers of two from 16 (each half is one block of columns)."""
    return 16 <= d <= 512 and d & (d - 1) == 0


def qk_norm_rope_(qkv, weights, cos, sin, n_q: int, n_kv: int, head_dim: int, eps: float, *,
                  block_t: int = BLOCK_T, num_warps: int = NUM_WARPS):
    """Normalise (per head, RMS) and rotate the query and key heads of ``qkv`` in place.

    Args:
        qkv: (T, S) CUDA tensor (or CPU under the interpreter), last dimension contiguous: per token ``n_q``
            query heads, ``n_kv`` key heads, then anything (the values), each head ``head_dim`` wide.
        weights: (2, head_dim), the q norm's weight then the k norm's; None for models without q/k norms
            (Qwen2): rope only.
        cos, sin: (T, head_dim), last dimension contiguous.
        eps: the norms' epsilon.

    Returns:
        ``(q, k, v)`` views of ``qkv``: (T, n_q, head_dim), (T, n_kv, head_dim), (T, n_kv, head_dim).
    """
    t = qkv.shape[0]
    if not supports_head_dim(head_dim) or qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"unsupported q/k rope shapes: qkv {tuple(qkv.shape)} strides {qkv.stride()}, "
                         f"head size {head_dim}")
    if qkv.shape[1] < (n_q + 2 * n_kv) * head_dim or cos.shape != (t, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"qkv {tuple(qkv.shape)} and cos {tuple(cos.shape)} do not hold {n_q} + 2 x {n_kv} heads "
                         f"of {head_dim}")
    if cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    if triton is None:
        raise RuntimeError("the q/k rope kernel needs the triton package")
    norm = weights is not None
    step = MAX_GRID_Y * block_t  # a launch's second grid dimension holds at most 65,535 token blocks
    for a in range(0, t, step):
        b = min(a + step, t)
        _qk_norm_rope[(n_q + n_kv, triton.cdiv(b - a, block_t))](
            qkv[a:b], cos[a:b], sin[a:b], weights if norm else cos, b - a, qkv.stride(0), cos.stride(0), eps,
            N_Q=n_q, HALF=head_dim // 2, BLOCK_T=block_t, NORM=norm, num_warps=num_warps,
        )
    q, k, v = qkv[:, : (n_q + 2 * n_kv) * head_dim].split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=1)
    return q.view(t, n_q, head_dim), k.view(t, n_kv, head_dim), v.view(t, n_kv, head_dim)

