"""Causal attention over packed sequences as one Triton kernel (flash attention, forward only, GQA native).

Why a kernel of our own: on Hopper, torch's ``varlen_attn`` runs the FlashAttention-2 kernel, and for the
short documents of a typical corpus (median a few hundred tokens) attention is a large share of the time of
the small models (14% of the 0.6B model's FLOPs at a mean of ~440 tokens). This kernel walks only the blocks a
causal document needs, starts the longest query blocks first, and splits each query block's keys into a part
that needs no mask and a diagonal part that does.

Layout: ``q`` (Tq, Hq, D), ``k``/``v`` (Tk, Hkv, D) with ``Hq % Hkv == 0``; sequences back to back as given by
cumulative lengths (int32, n + 1) for queries and keys. The query blocks of the launch come from
``block_table(query lengths, block_m)`` (host side, NumPy; ``block_m`` from ``tiles``), so the kernel needs no
search over the cumulative lengths.
"""

from __future__ import annotations

import math
import os

import numpy as np

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the packed path falls back to torch kernels
    triton = None

# Tiles, measured on an H200 with ``embed-corpus bench-attention`` (data/benchmarks/h200-attention-2026-12-01.json:
# Qwen3 0.6B and 4B heads, lognormal(256, 1) documents in the default packs): a program's tile is 64 query rows,
# made of 64 // fold positions x ``fold`` query heads sharing a kv head (0.6B: 32 x 2, 4B: 16 x 4), against 64 keys
# per step, 4 warps, 3 stages: 1.04x (0.6B) and 1.035x (4B) the unfolded 64 x 64 tiles, ~305 TFLOP/s; 128-row
# tiles, 8 warps, 2 or 4 stages and 128-key steps were all slower. The last layer (one query per sequence) runs
# 16-row tiles of 16 // fold positions: 1.7x (0.6B) and 1.9x (4B) its old 64-row tiles.
TILE_ROWS = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
FOLD = 4  # query heads of one kv head per program, at most (``default_fold``)
LAST_TILE_ROWS = 16
LAST_BLOCK_N = 64


def block_table(lengths: np.ndarray, block_m: int) -> np.ndarray:
    """Query blocks of a pack: int32 (2, nblocks) rows ``(sequence, first query position)``.

    Blocks of ``block_m`` positions (``tiles(...)["block_m"]``), ordered by decreasing first position: a block at
    position ``p`` visits ``p / block_n + 1`` key blocks, so the longest ones start first and the short ones
    fill the tail of the launch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = (lengths + block_m - 1) // block_m
    seq = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    start = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * block_m
    order = np.argsort(-start, kind="stable")
    return np.stack([seq[order], start[order]]).astype(np.int32)


if triton is not None:

    # ``nblocks`` changes with every pack: left unspecialised, so Triton does not compile a variant of the kernel
    # for each of its divisibility classes (by 16, or 1) in the middle of a run.
    @triton.jit(do_not_specialize=["nblocks"])
    def _causal_fwd(Q, K, V, Out, CU_Q, CU_K, BLOCKS, nblocks, qk_scale,
                    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                    GROUP: tl.constexpr, FOLD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        # A program: BLOCK_M query positions of one sequence x FOLD query heads that share a kv head, as one tile
        # of BLOCK_M * FOLD rows (position-major: a position's heads are adjacent in memory), so each key/value
        # block loaded serves FOLD heads and the causal diagonal is BLOCK_M positions wide, not the tile height.
        pid = tl.program_id(0)
        head0 = tl.program_id(1) * FOLD
        seq = tl.load(BLOCKS + pid)
        start_m = tl.load(BLOCKS + nblocks + pid)
        q_first = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_first
        k_first = tl.load(CU_K + seq)
        k_len = tl.load(CU_K + seq + 1) - k_first
        shift = k_len - q_len  # queries are the last q_len positions of their sequence
        q_first = q_first.to(tl.int64)
        k_first = k_first.to(tl.int64)
        kv_head = head0 // GROUP

        offs_r = tl.arange(0, BLOCK_M * FOLD)
        pos = start_m + offs_r // FOLD
        heads = head0 + offs_r % FOLD
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = pos[:, None] < q_len
        q = tl.load(Q + (q_first + pos[:, None]) * s_qt + heads[:, None] * s_qh + offs_d[None, :], mask=rows,
                    other=0.0)
        k_base = K + k_first * s_kt + kv_head * s_kh
        v_base = V + k_first * s_vt + kv_head * s_vh

        m_i = tl.full([BLOCK_M * FOLD], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M * FOLD], tl.float32)
        acc = tl.zeros([BLOCK_M * FOLD, HEAD_DIM], tl.float32)
        # key blocks wholly at or before the block's first query position: every pair is visible, no mask
        open_end = ((start_m + shift) // BLOCK_N) * BLOCK_N
        for start_n in range(0, open_end, BLOCK_N):
            cols = start_n + offs_n
            k = tl.load(k_base + cols[:, None] * s_kt + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * s_vt + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        # the diagonal: causal mask, and the sequence's end
        end_n = tl.minimum(start_m + shift + BLOCK_M, k_len)
        for start_n in range(open_end, end_n, BLOCK_N):
            cols = start_n + offs_n
            valid = cols < k_len
            k = tl.load(k_base + cols[:, None] * s_kt + offs_d[None, :], mask=valid[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            qk = tl.where((pos[:, None] + shift >= cols[None, :]) & valid[None, :], qk, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * s_vt + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + (q_first + pos[:, None]) * s_ot + heads[:, None] * s_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=rows)


def tiles(group: int, *, last: bool = False, fold: int | None = None) -> dict[str, int]:
    """The tile settings ``causal_packed`` runs with for ``group`` query heads per kv head: the causal layers',
    or (``last``) the last layer's, whose queries are one position per sequence. ``block_m`` is what
    ``block_table`` needs."""
    fold = default_fold(group) if fold is None else fold
    rows, block_n = (LAST_TILE_ROWS, LAST_BLOCK_N) if last else (TILE_ROWS, BLOCK_N)
    return {"block_m": max(rows // fold, 1), "block_n": block_n, "fold": fold, "num_warps": NUM_WARPS,
            "num_stages": NUM_STAGES}


def default_fold(group: int) -> int:
    """Query heads per program by default: the largest power of two dividing ``group`` up to ``FOLD``."""
    fold = 1
    while fold < FOLD and group % (2 * fold) == 0:
        fold *= 2
    return fold


def available() -> bool:
    """Whether the Triton kernel can run here (Triton importable; the caller checks for a CUDA device)."""
    return triton is not None


def interpreted() -> bool:
    """Whether Triton runs kernels in its NumPy interpreter (``TRITON_INTERPRET=1`` when this module was
    imported): then the kernel runs on CPU tensors too, slowly, which is how CPU tests check it."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def supports_head_dim(d: int) -> bool:
    """Head sizes the kernel takes: powers of two from 16 (Triton's smallest matrix-product dimension)."""
    return d >= 16 and d & (d - 1) == 0 and d <= 256


def causal_packed(q, k, v, cu_q, cu_k, blocks, scale: float, *, block_m: int, block_n: int = BLOCK_N,
                  fold: int = 1, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES):
    """Causal attention within each packed sequence; queries may be the last few positions of their sequence.

    With ``cu_q == cu_k`` this is ordinary causal self-attention. With fewer queries than keys (the last layer
    of an embedding model needs only each sequence's last position), query ``i`` of a sequence sits at position
    ``k_len - q_len + i`` and sees the keys up to it.

    Args:
        q: (Tq, Hq, D) bf16/fp16 on CUDA, last dimension contiguous (other strides free: views of a fused
            q/k/v projection work as they are).
        k, v: (Tk, Hkv, D), same dtype; ``Hq % Hkv == 0``.
        cu_q, cu_k: int32 (n + 1,) on the device: cumulative query and key counts per sequence.
        blocks: int32 (2, nblocks) on the device, ``block_table(query lengths, block_m)``.
        scale: softmax scale (``D ** -0.5`` for Qwen3).
        block_m, block_n: query positions and keys per step of a program (``tiles`` gives the measured ones);
            ``blocks`` must have been made with the same ``block_m``.
        fold: query heads of one kv head per program (a power of two dividing ``Hq / Hkv``); a program's tile
            is ``block_m * fold`` rows, at least 16.

    Returns:
        (Tq, Hq, D) contiguous, dtype of ``q``.
    """
    import torch

    if triton is None:
        raise RuntimeError("the Triton attention kernel needs the triton package")
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or not supports_head_dim(d) or q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"unsupported attention shapes q {tuple(q.shape)} k {tuple(k.shape)} (strides {q.stride()})")
    group = hq // hkv
    if fold < 1 or fold & (fold - 1) or group % fold:
        raise ValueError(f"fold {fold} must be a power of two dividing the {group} query heads per kv head")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 1 or size & (size - 1):
            raise ValueError(f"{name} ({size}) must be a power of two")
    if block_m * fold < 16 or block_n < 16:
        raise ValueError(f"tiles of {block_m * fold} x {block_n}: Triton's matrix products need at least 16 x 16")
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    nblocks = blocks.shape[1]
    if nblocks == 0:
        return out
    _causal_fwd[(nblocks, hq // fold)](
        q, k, v, out, cu_q, cu_k, blocks, nblocks, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=group, FOLD=fold, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
