"""Probe (GPU): the q/k norm + rope step of one layer, Inductor's compiled kernel against ``rotary.qk_norm_rope_``.

For the Qwen3 0.6B and 4B layer shapes on a pack of the default token budget's size (positions of lognormal
documents): the whole pre-attention step both ways (norm, fused projection, q/k norms, rope), the step's q/k part
alone both ways, and the kernel's block size and warps. Times by ``triton.testing.do_bench`` (median ms), the
bytes each way must move, and the largest difference between the two paths' q and k. Prints one JSON line.

    python3 jobs/probe_rope.py [SIZE ...]
"""

import json
import sys

import numpy as np
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
from triton.testing import do_bench

from pipeline.bench.gpu import lognormal_lengths
from pipeline.bench.synthetic import qwen3_config
from pipeline.model import rotary
from pipeline.model.packed import _pre_attention, _project_qkv, _qk_norm_rotate, pack_arrays

TOKENS = {"0.6B": 64_000, "4B": 30_000}


def probe(size: str) -> dict:
    cfg = qwen3_config(size, dtype="bfloat16")
    n_q, n_kv, d, hidden, eps = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                                 cfg.rms_norm_eps)
    dev, bf = "cuda", torch.bfloat16
    lengths = []
    for n in lognormal_lengths(np.random.default_rng(1), 10_000):
        if sum(lengths) + n > TOKENS[size]:
            break
        lengths.append(int(n))
    positions, _ = pack_arrays(np.array(lengths))
    t = len(positions)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(t, hidden, device=dev, generator=gen)
    ln = torch.rand(hidden, device=dev, generator=gen).to(bf) + 0.5
    w = (torch.randn((n_q + 2 * n_kv) * d, hidden, device=dev, generator=gen) * hidden**-0.5).to(bf)
    qk_w = (torch.rand(2, d, device=dev, generator=gen) + 0.5).to(bf)
    cos, sin = Qwen3RotaryEmbedding(cfg).to(dev)(x.to(bf), torch.from_numpy(positions).to(dev)[None])
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    for z in (x, cos, sin):
        torch._dynamo.maybe_mark_dynamic(z, 0)
    pre = torch.compile(_pre_attention)
    project = torch.compile(_project_qkv)
    part = torch.compile(_qk_norm_rotate)
    qkv0 = project(x, ln, w, None, eps)
    torch._dynamo.maybe_mark_dynamic(qkv0, 0)

    def ours():
        return rotary.qk_norm_rope_(project(x, ln, w, None, eps), qk_w, cos, sin, n_q, n_kv, d, eps)

    def theirs():
        return pre(x, ln, w, None, qk_w[0], qk_w[1], cos, sin, n_q, n_kv, d, eps)

    a, b = theirs(), ours()
    diff = max(float((p.float() - q.float()).abs().max()) for p, q in zip(a[:2], b[:2], strict=True))
    qk_bytes = t * (n_q + n_kv) * d * 2 * 2  # bf16 rows read and written once
    out = {"size": size, "tokens": t, "sequences": len(lengths), "qk_bytes": qk_bytes,
           "max_abs_diff_q_k": diff, "max_abs_q": float(a[0].float().abs().max())}
    out["pre_inductor_ms"] = do_bench(theirs, warmup=25, rep=200)
    out["pre_kernel_ms"] = do_bench(ours, warmup=25, rep=200)
    out["project_alone_ms"] = do_bench(lambda: project(x, ln, w, None, eps), warmup=25, rep=200)
    out["qk_part_inductor_ms"] = do_bench(lambda: part(qkv0, qk_w[0], qk_w[1], cos, sin, n_q, n_kv, d, eps),
                                          warmup=25, rep=200)
    sweep = {}
    for block_t in (8, 16, 32, 64, 128):
        for warps in (1, 2, 4, 8):
            if block_t * d // 2 < 32 * warps:  # fewer columns than threads
                continue
            ms = do_bench(lambda bt=block_t, nw=warps: rotary.qk_norm_rope_(qkv0, qk_w, cos, sin, n_q, n_kv, d, eps,
                                                                             block_t=bt, num_warps=nw),
                          warmup=25, rep=200)
            sweep[f"{block_t}x{warps}"] = {"ms": round(ms, 4), "tb_per_s": round(qk_bytes / ms / 1e9, 2)}
    out["kernel_sweep"] = sweep
    out["kernel_default"] = f"{rotary.BLOCK_T}x{rotary.NUM_WARPS}"
    out["qk_part_inductor_tb_per_s"] = round(qk_bytes / out["qk_part_inductor_ms"] / 1e9, 2)
    for key in ("pre_inductor_ms", "pre_kernel_ms", "project_alone_ms", "qk_part_inductor_ms"):
        out[key] = round(out[key], 4)
    out["pre_speedup"] = round(out["pre_inductor_ms"] / out["pre_kernel_ms"], 3)
    return out


if __name__ == "__main__":
    for s in sys.argv[1:] or ["0.6B", "4B"]:
        print(json.dumps(probe(s)), flush=True)
