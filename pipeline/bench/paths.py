"""Forward paths side by side, for ``bench``: each lever's rate and vectors, two older choices against the
default (A/B in one repeat), the float32 reference every bf16 path is compared with, and a kernel profile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, Any]:
    """Seconds ``fn()`` takes with the device synchronised before and after, and its value."""
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def token_weighted_mean(lengths: np.ndarray) -> float:
    """Mean sequence length as a token sees it (sum L^2 / sum L): what attention's cost per token follows."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return round(float((lengths**2).sum() / lengths.sum()), 1)


def embedder_on(model, packed, tokenizer_dir: str, device: str, *, batch_tokens: int, max_length: int,
                name: str = "random"):
    """An embedder of ``model`` that runs the packed forward ``packed`` (its fused weights and compiled graphs:
    no second copy), with its own token budget and length limit."""
    from transformers import AutoTokenizer

    from pipeline.model.encoder import Embedder

    emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokenizer_dir), model=name, path=tokenizer_dir,
                               device=device, attention="padded", compile=False, batch_tokens=batch_tokens,
                               max_length=max_length)
    emb.packed = packed
    return emb


def ab(emb, enc, device: str, tokens: int, default_rate: float) -> dict[str, Any]:
    """Model-alone rate of two older choices against the default's rate measured just before, same process."""
    out: dict[str, Any] = {"default_tokens_per_s": round(default_rate)}
    emb.sync_each_batch = True
    try:
        seconds, _ = timed(lambda: emb.embed_encoded(enc), device)
    finally:
        emb.sync_each_batch = False
    out["wait_after_each_batch_tokens_per_s"] = round(tokens / seconds)
    budget = emb.batch_tokens
    emb.batch_tokens = budget // 2
    try:
        seconds, _ = timed(lambda: emb.embed_encoded(enc), device)
    finally:
        emb.batch_tokens = budget
    out[f"batch_tokens_{budget // 2}_tokens_per_s"] = round(tokens / seconds)
    return out


# the default without each change of the packed forward since 2026-12-01 (``PackedDecoder.variant`` options).
# Measured and dropped that day: the residual add of each layer's MLP moved into the next layer's norm pass
# (0.988x, 0.6B; data/benchmarks/h200-0.6b-residual-add-in-norm-pass-2026-12-01.json).
CHANGES = {
    "attention_tiles_before_2026_12_01": {"earlier_tiles": True},
    "qk_norm_rope_in_the_compiled_graph": {"compiled_rope": True},
}


def changes_ab(model, tokenizer_dir: str, default, enc, device: str, repeats: int) -> dict[str, Any]:
    """What each recent change of the packed forward contributes: the model-alone rate of the default and of the
    default without it (``CHANGES``: variants of the default's decoder, sharing its weights and compiled
    graphs), on the same tokens, repeats interleaved (drift hits every variant alike); medians, each variant's
    ratio to the default (``default_speedup``: above 1, the change helps), and its smallest cosine to the
    default's vectors."""
    import statistics

    variants = {"default": default}
    for name, options in CHANGES.items():
        variants[name] = embedder_on(model, default.packed.variant(**options), tokenizer_dir, device,
                                     batch_tokens=default.batch_tokens, max_length=8192)
    tokens = int(enc.lengths.sum())
    vectors = {}
    for name, emb in variants.items():  # warm, and the vectors kept for the comparison
        vectors[name] = emb.embed_encoded(enc)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, emb in variants.items():
            seconds, _ = timed(lambda e=emb: e.embed_encoded(enc), device)
            rates[name].append(tokens / seconds)
    base = statistics.median(rates["default"])
    out: dict[str, Any] = {"tokens": tokens, "repeats": repeats}
    for name, runs in rates.items():
        out[name] = {"tokens_per_s": round(statistics.median(runs)), "runs": [round(r) for r in runs]}
        if name != "default":
            out[name]["default_speedup"] = round(base / statistics.median(runs), 4)
            out[name]["min_cosine_vs_default"] = round(float((vectors[name] * vectors["default"]).sum(1).min()), 6)
    return out


def split_cost(emb, enc, texts: list[str], device: str, shard_docs: tuple[int, ...], window: int) -> dict[str, Any]:
    """What cutting a job into shards costs the model alone, same process, same tokens: one call over every
    sequence (sorted in windows of ``window`` documents, as the runner sorts) against one call per shard of N
    documents (what the runner makes,
    each ending with a copy of its vectors to the host), and the same calls while the next shard is tokenized in
    a thread (the runner's prefetch, which shares the interpreter with the thread that launches the kernels).

    Returns:
        tokens/s of each way and its ratio to the one call.
    """
    import threading

    from pipeline.model.tokens import Encoded

    n = len(enc)
    tokens = int(enc.lengths.sum())

    def part(a: int, b: int) -> Encoded:
        lo, hi = int(enc.offsets[a]), int(enc.offsets[b])
        return Encoded(ids=enc.ids[lo:hi], offsets=enc.offsets[a : b + 1] - lo, doc=enc.doc[a:b] - enc.doc[a],
                       chunk=enc.chunk[a:b], span=enc.span[a:b], truncated=enc.truncated[a:b])

    seconds, _ = timed(lambda: emb.embed_encoded(enc, window=window), device)
    out: dict[str, Any] = {"docs": n, "tokens": tokens, "sort_window": window,
                           "one_call_tokens_per_s": round(tokens / seconds)}
    for size in shard_docs:
        parts = [part(a, min(a + size, n)) for a in range(0, n, size)]
        seconds, _ = timed(lambda parts=parts: [emb.embed_encoded(p, window=window) for p in parts], device)
        out[f"calls_of_{size}_docs_tokens_per_s"] = round(tokens / seconds)

        def with_tokenizing(parts=parts, size=size) -> None:
            for i, p in enumerate(parts):
                worker = threading.Thread(target=emb.tokenizer.encode, args=(texts[(i + 1) * size : (i + 2) * size],))
                worker.start()
                emb.embed_encoded(p, window=window)
                worker.join()

        seconds, _ = timed(with_tokenizing, device)
        out[f"calls_of_{size}_docs_tokenizing_alongside_tokens_per_s"] = round(tokens / seconds)
    one = out["one_call_tokens_per_s"]
    out["ratios_to_one_call"] = {k.removesuffix("_tokens_per_s"): round(v / one, 3) for k, v in out.items()
                                 if k.startswith("calls_of_")}
    return out


def model_rate(emb, texts: list[str], device: str) -> tuple[int, np.ndarray]:
    """Model-only tokens/s on pre-tokenized ``texts`` and the vectors, after two warm-up batches (a compiled
    forward builds its graph in the first)."""
    enc = emb.tokenizer.encode(texts)
    emb.embed_texts(texts[:64])
    emb.embed_texts(texts[64:256])
    sync(device)
    t0 = time.perf_counter()
    vecs = emb.embed_encoded(enc)
    sync(device)
    return round(int(enc.lengths.sum()) / (time.perf_counter() - t0)), vecs


def levers(model, tokenizer_dir: str, texts: list[str], batch_tokens: int, device: str, default,
            vec_st: np.ndarray | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Model-only tokens/s of each forward path on the same texts, from the padded policy to the default, one
    lever added at a time: what each contributes; with each path's min cosine against the sentence-transformers
    policy.

    Returns:
        ``(rates and cosines, {name: vectors} of the bf16-residual and padded paths)``.
    """
    import torch
    from transformers import AutoTokenizer

    from pipeline.model.encoder import Embedder

    def make(attention: str, budget: int, compile: bool, **options):
        return Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokenizer_dir), model="random",
                                    path=tokenizer_dir, device=device, batch_tokens=budget, attention=attention,
                                    compile=compile, max_length=8192, packed_options=options)

    bf16 = {"fp32_residual": False}
    ladder = {
        "padded_budget_16k_sdpa": lambda: make("padded", 16384, False),
        "packed_varlen_eager_bf16_residual": lambda: make("packed", batch_tokens, False, kernel="varlen", **bf16),
        "packed_varlen_compiled_all_dims_dynamic_bf16_residual": lambda: make(
            "packed", batch_tokens, True, kernel="varlen", all_dims_dynamic=True, **bf16),
        "packed_triton_compiled_all_dims_dynamic_bf16_residual": lambda: make(
            "packed", batch_tokens, True, kernel="triton", all_dims_dynamic=True, **bf16),
        "packed_triton_compiled_bf16_residual": lambda: make("packed", batch_tokens, True, kernel="triton", **bf16),
        "default": lambda: default,
        "default_budget_x2": lambda: make("packed", 2 * batch_tokens, True),
        # the default's numerics with the pack laid out padded for SDPA: what packing alone changes
        "default_numerics_padded_layout_sdpa": lambda: make("packed", batch_tokens, False, kernel="sdpa"),
    }
    out: dict[str, Any] = {"default_is": "packed {} {}, {} residual".format(
        default.packed.kernel, "compiled" if default.packed.compiled else "eager",
        "fp32" if default.packed.fp32_residual else "bf16") if default.packed is not None else "padded"}
    vectors: dict[str, np.ndarray] = {}
    reference = {"st_policy": vec_st}
    for name in ("default", *(n for n in ladder if n != "default")):  # the default first: others compare to it
        torch._dynamo.reset()  # compiled code is cached per function: each lever compiles its own
        try:
            rate, vecs = model_rate(ladder[name](), texts, device)
        except Exception as exc:  # noqa: BLE001 - a lever this machine cannot run is reported, not fatal
            out[name] = {"error": repr(exc)[:300]}
            continue
        out[name] = {"tokens_per_s": rate}
        for other, ref in reference.items():
            if ref is not None and name != other:
                out[name][f"min_cosine_vs_{other}"] = round(float((vecs * ref).sum(1).min()), 5)
        if name == "default":
            reference["default"] = vecs
        if name.endswith("bf16_residual") or name.startswith("padded"):
            vectors[name] = vecs
    torch._dynamo.reset()
    out = {k: out[k] for k in ("default_is", *ladder) if k in out}
    return out, vectors


def float32_reference(model, enc, n: int, candidates: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Cosine of each candidate's first ``n`` vectors against a float32 copy of ``model`` run one sequence at
    a time (no padding, no packing, transformers' own forward, last token after the final norm)."""
    import copy

    import torch

    ref_model = copy.deepcopy(model).float()
    dev = next(ref_model.parameters()).device
    n = min(n, len(enc))
    ref = np.empty((n, model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for i in range(n):
            ids = torch.from_numpy(enc.sequence(i).astype(np.int64)).to(dev)[None]
            hidden = ref_model(input_ids=ids).last_hidden_state[0, -1]
            ref[i] = torch.nn.functional.normalize(hidden, dim=-1).cpu().numpy()
    del ref_model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out = {}
    for name, vecs in candidates.items():
        cos = (vecs[:n] * ref).sum(1)
        out[name] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}
    out["docs"] = {"min": n, "mean": n}
    return out


# kernel names -> what they do (first match wins); the rest is "other"
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("causal_fwd", "flash", "fmha", "attn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_")),
    ("norm_rotary", ("rsqrt", "norm_rope")),
    ("silu_mul", ("silu",)),
    ("copy_memset", ("memset", "memcpy", "copy")),
)
NOT_KERNELS = ("command buffer full",)  # a host-side stall the profiler lists among device events


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_shares(kernels: list[tuple[str, float]]) -> dict[str, Any]:
    """Device time per kind of kernel: ``kernels`` as (name, microseconds); host-side entries left out."""
    totals: dict[str, float] = {}
    for name, us in kernels:
        if name.lower() in NOT_KERNELS:
            continue
        totals[kernel_kind(name)] = totals.get(kernel_kind(name), 0.0) + us
    whole = sum(totals.values())
    return {"kernel_ms": round(whole / 1e3, 3),
            "shares": {k: round(v / whole, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])} if whole
            else {}}


def spread_batches(n: int, k: int) -> np.ndarray:
    """``k`` batch numbers spread evenly over ``n`` (the plan runs longest first: the first ones are not typical)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))


def profile_kernels(emb, enc, path: Path, batches: int = 8) -> dict[str, Any]:
    """Kernel time of a few packed batches spread over the plan (torch.profiler), written as a table, with the
    device time per kind of kernel (``kernel_shares``) returned and written next to it as JSON.

    The plan cuts the longest sequences first, so its first batches are the most attention-heavy of the run; the
    batches profiled are taken evenly from the whole plan, and their token-weighted mean length is reported with
    the corpus's for comparison."""
    import json

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    plan = emb.plan_batches(enc.lengths)
    chosen = spread_batches(len(plan), batches)
    idx = np.concatenate([plan[i] for i in chosen])
    sub = enc.subset(idx)
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        emb.embed_encoded(sub)
        if cuda:
            torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]

    out = {"batches": len(chosen), "of_batches": len(plan), "tokens": int(sub.offsets[-1]),
           "token_weighted_mean_length": token_weighted_mean(enc.lengths[idx]),
           "corpus_token_weighted_mean_length": token_weighted_mean(enc.lengths), **kernel_shares(kernels)}
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    return out
