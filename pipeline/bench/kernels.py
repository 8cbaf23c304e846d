"""``embed-corpus bench-attention``: the packed-attention kernel's tile choices side by side on a GPU.

Packs are cut from document lengths drawn as ``bench`` draws them (lognormal, median 256, sigma 1, clipped to
[8, 8192]) under the model's token budget, longest first as the runner cuts them, with the attention shapes of
a Qwen3 size (query heads, kv heads, head size) and queries/keys/values as strided views of one fused
projection, as the model gives them. Every configuration runs every pack once per repeat, the repeats
interleaved across configurations (drift hits all alike); the figure is the median. Each configuration's
output and time are compared with the first candidate's (the tiles used before 2026-12-01), so a faster tile
that computes something else shows; the record also names the tiles the model runs now (``default``). The
last layer (one query per sequence, its last position) is measured on its own.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

# (block_m, block_n, fold, num_warps, num_stages); the first is the tile used before 2026-12-01 (one query head
# per program, 64 x 64), which every other is compared with
CANDIDATES: tuple[tuple[int, int, int, int, int], ...] = (
    (64, 64, 1, 4, 3), (64, 64, 1, 4, 2), (64, 64, 1, 4, 4), (128, 64, 1, 8, 3), (64, 128, 1, 4, 2),
    (64, 32, 1, 4, 3), (32, 64, 1, 4, 3), (32, 32, 1, 4, 3),
    (32, 64, 2, 4, 3), (32, 32, 2, 4, 3), (64, 64, 2, 4, 3), (64, 64, 2, 8, 3), (32, 128, 2, 4, 2),
    (64, 32, 2, 4, 3), (16, 64, 4, 4, 3), (32, 64, 4, 8, 3), (16, 128, 4, 4, 2), (16, 32, 4, 4, 3),
)
# the last layer: one query row per sequence, so the tile height is wasted but for ``fold`` heads
LAST_CANDIDATES: tuple[tuple[int, int, int, int, int], ...] = (
    (64, 64, 1, 4, 3), (16, 64, 1, 4, 3), (16, 128, 1, 4, 3), (8, 64, 2, 4, 3), (8, 128, 2, 4, 3),
    (4, 64, 4, 4, 3), (4, 128, 4, 4, 3),
)


def causal_flops(lengths: np.ndarray, heads: int, head_dim: int) -> float:
    """Matrix-product FLOPs of causal attention: ``L (L + 1) / 2`` visible pairs per sequence and head, each
    ``2 D`` for the scores and ``2 D`` for the weighted values."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(2.0 * head_dim * heads * (lengths * (lengths + 1)).sum())


def _valid(cfg: tuple[int, ...], group: int) -> bool:
    block_m, block_n, fold, _, _ = cfg
    return group % fold == 0 and block_m * fold >= 16 and block_n >= 16


def sweep(size: str, n_docs: int, batch_tokens: int, *, repeats: int = 5, device: str = "cuda", seed: int = 0,
          candidates=CANDIDATES, last_candidates=LAST_CANDIDATES, max_length: int = 8192) -> dict[str, Any]:
    """Each tile configuration's time over the same packs, and its ratio to the first one.

    Returns:
        A record: shapes, pack statistics, and per configuration TFLOP/s, seconds, ratio to the first
        configuration, largest difference from its output; the same for the last layer; torch's varlen
        FlashAttention-2 on the same packs where this torch has it.
    """
    import torch

    from pipeline.bench.gpu import lognormal_lengths
    from pipeline.bench.paths import timed, token_weighted_mean
    from pipeline.bench.synthetic import QWEN3_SHAPES
    from pipeline.model import attention
    from pipeline.model.batching import token_budget_batches
    from pipeline.model.packed import _varlen, pack_arrays, varlen_attention

    shape = QWEN3_SHAPES[size]
    hq, hkv, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    group = hq // hkv
    lengths = lognormal_lengths(np.random.default_rng(seed), n_docs, hi=max_length)
    packs = [lengths[b] for b in token_budget_batches(lengths, batch_tokens, cost="packed")]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    longest = max(int(p.sum()) for p in packs)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # float32: Triton's CPU interpreter
    qkv = (torch.randn(longest, hq + 2 * hkv, d, generator=gen) * 2).to(device, dtype)
    scale = d**-0.5

    def layouts(block_m: int, last: bool) -> list[tuple]:
        out = []
        for p in packs:
            _, cu = pack_arrays(p)
            t = int(cu[-1])
            q, k, v = qkv[:t].split([hq, hkv, hkv], dim=1)
            cu_k = torch.from_numpy(cu).to(device)
            if last:
                q = q[cu_k[1:].long() - 1].contiguous()
                cu_q = torch.arange(len(p) + 1, dtype=torch.int32, device=device)
                table = attention.block_table(np.ones(len(p), dtype=np.int64), block_m)
            else:
                cu_q, table = cu_k, attention.block_table(p, block_m)
            out.append((q, k, v, cu_q, cu_k, torch.from_numpy(table).to(device)))
        return out

    def run_all(cfg, items) -> list:
        block_m, block_n, fold, warps, stages = cfg
        return [attention.causal_packed(*item, scale, block_m=block_m, block_n=block_n, fold=fold,
                                        num_warps=warps, num_stages=stages) for item in items]

    def measure(configs, last: bool, flops: float) -> dict[str, Any]:
        configs = [c for c in configs if _valid(c, group)]
        items = {c[0]: layouts(c[0], last) for c in configs}
        reference = None
        results: dict[tuple, dict[str, Any]] = {}
        for cfg in configs:  # compile, check against the first
            try:
                outs = run_all(cfg, items[cfg[0]])
            except Exception as exc:  # noqa: BLE001 - a tile this GPU cannot build is reported, not fatal
                results[cfg] = {"error": repr(exc)[:200]}
                continue
            if cfg == configs[0]:
                reference = outs
            diff = None if reference is None else round(max(
                float((a.float() - b.float()).abs().max()) for a, b in zip(outs, reference, strict=True)), 5)
            results[cfg] = {"max_abs_diff_vs_first": diff, "times": []}
        for _ in range(repeats):
            for cfg in configs:
                if "error" not in results[cfg]:
                    results[cfg]["times"].append(timed(lambda c=cfg: run_all(c, items[c[0]]), device)[0])
        first = results[configs[0]]
        base = statistics.median(first["times"]) if "error" not in first else None
        out: dict[str, Any] = {}
        for cfg, r in results.items():
            name = "m{}_n{}_fold{}_w{}_s{}".format(*cfg)
            if "error" in r:
                out[name] = r
                continue
            seconds = statistics.median(r.pop("times"))
            out[name] = {"seconds": round(seconds, 6), "tflops": round(flops / seconds / 1e12, 1),
                         "speed_vs_first": round(base / seconds, 3) if base else None, **r}
        return out

    all_lengths = np.concatenate(packs)
    rec: dict[str, Any] = {
        "size": size, "heads": hq, "kv_heads": hkv, "head_dim": d, "docs": n_docs, "packs": len(packs),
        "batch_tokens": batch_tokens, "tokens": int(all_lengths.sum()),
        "token_weighted_mean_length": token_weighted_mean(all_lengths),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "triton": getattr(attention.triton, "__version__", None),
        "default": attention.tiles(group), "default_last_layer": attention.tiles(group, last=True),
    }
    flops = causal_flops(all_lengths, hq, d)
    rec["causal"] = measure(candidates, False, flops)
    rec["last_layer"] = measure(last_candidates, True, 4.0 * d * hq * float(all_lengths.sum()))
    if device.startswith("cuda") and _varlen() is not None:
        items = [(q, k, v, cu_q, cu_k, int(cu_q.diff().max()), int(cu_k.diff().max()))
                 for q, k, v, cu_q, cu_k, _ in layouts(64, False)]  # longest lengths read before the timing

        def fa2():
            for item in items:
                varlen_attention(*item, scale)
        try:
            fa2()
            times = [timed(fa2, device)[0] for _ in range(repeats)]
            rec["torch_varlen_fa2_tflops"] = round(flops / statistics.median(times) / 1e12, 1)
        except Exception as exc:  # noqa: BLE001
            rec["torch_varlen_fa2_error"] = repr(exc)[:200]
    return rec


def table(rec: dict[str, Any]) -> str:
    lines = [f"{rec['size']}: {rec['packs']} packs of <= {rec['batch_tokens']} tokens, {rec['tokens']} tokens, "
             f"token-weighted mean length {rec['token_weighted_mean_length']}"
             + (f"; torch varlen FA2 {rec['torch_varlen_fa2_tflops']} TFLOP/s" if "torch_varlen_fa2_tflops" in rec
                else f"; torch varlen FA2: {rec['torch_varlen_fa2_error']}" if "torch_varlen_fa2_error" in rec
                else "")]
    for part in ("causal", "last_layer"):
        lines.append(f"  {part}: config  TFLOP/s  speed vs first  max |diff|")
        for name, r in sorted(rec[part].items(), key=lambda kv: -(kv[1].get("speed_vs_first") or 0)):
            if "error" in r:
                lines.append(f"    {name:26s} error {r['error'][:80]}")
            else:
                speed = f"{r['speed_vs_first']:6.3f}" if r["speed_vs_first"] else "     -"
                diff = r["max_abs_diff_vs_first"]
                lines.append(f"    {name:26s} {r['tflops']:7.1f}  {speed}  "
                             + (f"{diff:.4f}" if diff is not None else "-"))
    return "\n".join(lines)
