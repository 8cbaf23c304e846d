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


def profile_kernels(emb, enc, path: Path, batches: int = 4) -> None:
    """Kernel time of a few packed batches (torch.profiler), written as a table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.model.tokens import Encoded

    idx = np.concatenate(emb.plan_batches(enc.lengths)[:batches])
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(enc.lengths[idx], out=offsets[1:])
    sub = Encoded(np.concatenate([enc.sequence(int(i)) for i in idx]), offsets, np.arange(len(idx)),
                  enc.chunk[idx], enc.span[idx], enc.truncated[idx])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        emb.embed_encoded(sub)
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
