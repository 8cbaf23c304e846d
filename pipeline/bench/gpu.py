"""``embed-corpus bench``: GPU throughput of the pipeline against the sentence-transformers policy, in one process.

For a named Qwen3-Embedding size it builds a randomly initialised model of the exact shape on the GPU
(throughput does not depend on the weights' values), generates a corpus of real text (the bundled sample,
re-cut to token lengths drawn lognormal with median 256 and sigma 1, clipped to [8, 8192]), and measures:

1. the matrix-product ceiling of the card (bf16 GEMM TFLOP/s),
2. the sentence-transformers policy: sorted by length, fixed batches of 32, padded, transformers SDPA,
3. the model alone: the pipeline's forward on pre-tokenized input,
4. the full pipeline: ``run_job`` over a Parquet file (read, tokenize, batch, encode, write Parquet),
   with the same model object,

and prints a table of tokens/s, share of the ceiling and ratios, and writes the records as JSON.
Packed vectors are compared with the padded policy's (cosine), as a check that the speed is not bought
with wrong vectors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ST_BATCH = 32


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str, reset: bool = False) -> float:
    import torch

    if not device.startswith("cuda"):
        return 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def gemm_tflops(device: str = "cuda", n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 matrix-product rate of the card (the ceiling)."""
    import torch

    if not device.startswith("cuda"):
        n, iters = 1024, 3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def random_model(size: str, device: str, dtype: str = "bfloat16", seed: int = 0):
    """A ``Qwen3Model`` of an exact Qwen3-Embedding shape with random weights, built directly on ``device``."""
    import torch
    from transformers import Qwen3Model

    from pipeline.bench.synthetic import qwen3_config

    config = qwen3_config(size, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Qwen3Model._from_config(config, dtype=torch_dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)  # its buffers were not materialised
    return model.eval()


def flops_per_token(config) -> float:
    """2 x non-embedding parameters: the dense FLOPs of one token (attention over context added separately)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = config.head_dim
    attn = h * d * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    return 2.0 * layers * (attn + 3 * h * i)


def attention_flops(config, lengths: np.ndarray) -> float:
    """Causal attention FLOPs of sequences of these lengths (QK^T and AV, half the square)."""
    per_layer = 4.0 * config.num_attention_heads * config.head_dim * float((lengths.astype(np.float64) ** 2 / 2).sum())
    return per_layer * config.num_hidden_layers


def make_corpus(tokenizer, n_docs: int, *, median: int = 256, sigma: float = 1.0, lo: int = 8, hi: int = 8192,
                seed: int = 0, source: Path | None = None) -> list[str]:
    """Documents of real text whose token lengths follow a clipped lognormal distribution.

    The bundled sample corpus is tokenized once into a stream; each document is the decoded text of a slice
    of that stream of the drawn length (starting at a random place), so the text is real prose, code and
    multilingual documents, and re-tokenizing it gives about the drawn length.
    """
    import pyarrow.dataset as ds

    rng = np.random.default_rng(seed)
    source = source or Path(__file__).resolve().parents[2] / "data" / "sample"
    texts: list[str] = []
    for path in sorted(source.glob("*")):
        if path.suffix in (".parquet", ".jsonl"):
            fmt = "parquet" if path.suffix == ".parquet" else "json"
            texts += ds.dataset(str(path), format=fmt).to_table(columns=["text"]).column("text").to_pylist()
    if not texts:
        raise RuntimeError(f"no sample text under {source}")
    stream = np.concatenate(
        [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    )
    lengths = np.clip(np.round(rng.lognormal(math.log(median), sigma, n_docs)), lo, hi).astype(np.int64)
    starts = rng.integers(0, max(1, len(stream) - hi), n_docs)
    return tokenizer.batch_decode([stream[s : s + n].tolist() for s, n in zip(starts, lengths, strict=True)])


def st_policy(model, tokenizer, texts: list[str], device: str) -> tuple[float, np.ndarray, int]:
    """The sentence-transformers policy: sort by characters, batches of 32, padded (left), last token.

    Returns:
        ``(seconds, vectors (n, hidden) float32 in input order, real tokens)``.
    """
    import torch

    tokenizer.padding_side = "left"
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    tokens = 0
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), ST_BATCH):
            idx = order[i : i + ST_BATCH]
            batch = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=8192,
                              return_tensors="pt").to(device)
            tokens += int(batch["attention_mask"].sum())
            hidden = model(**batch).last_hidden_state[:, -1]
            out[idx] = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu().numpy()
    sync(device)
    return time.perf_counter() - t0, out, tokens


def run_bench(size: str, *, tokenizer_dir: str, n_docs: int, batch_tokens: int, workdir: Path,
              compile: bool = True, st_docs: int | None = None, long_docs: int = 0, device: str = "cuda",
              dtype: str = "bfloat16", profile: Path | None = None, levers: bool = False,
              reference_docs: int = 32) -> dict[str, Any]:
    """One model size: ceiling, ST policy, model alone, full pipeline. Returns the record.

    The ST policy is slow, so it runs on the first ``st_docs`` documents (lengths are drawn independently, so
    they follow the same distribution); its rate is compared with the pipeline's rate on all documents. The
    first ``reference_docs`` documents are also run one at a time through a float32 copy of the model: how close
    each bf16 path comes to it (cosine) says which is the more exact, not only whether two bf16 paths agree.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from pipeline.job.config import make_config
    from pipeline.job.runner import run_job
    from pipeline.model.encoder import Embedder

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    rec: dict[str, Any] = {"model_size": size, "gpu": gpu, "docs": n_docs,
                           "batch_tokens": batch_tokens, "compile": compile}
    rec["ceiling_tflops"] = round(gemm_tflops(device), 1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.model_max_length = 1 << 30  # the corpus stream is long on purpose
    texts = make_corpus(tok, n_docs)
    model = random_model(size, device, dtype)
    cfg_model = model.config
    emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokenizer_dir), model=f"random:{size}",
                               path=tokenizer_dir, device=device, batch_tokens=batch_tokens, compile=compile,
                               max_length=8192)
    rec["attention_kernel"] = emb.packed.kernel if emb.packed is not None else "padded"
    rec["fp32_residual"] = bool(emb.packed is not None and emb.packed.fp32_residual)
    enc = emb.tokenizer.encode(texts)
    lengths = enc.lengths
    rec["tokens"] = int(lengths.sum())
    rec["mean_tokens"] = round(float(lengths.mean()), 1)
    flops = flops_per_token(cfg_model) * lengths.sum() + attention_flops(cfg_model, lengths)
    rec["flops_per_token"] = round(float(flops / lengths.sum()), 1)

    # warm-up (compiles the packed graphs once, for every length), then the model alone on everything
    t0 = time.perf_counter()
    emb.embed_texts(texts[:256])
    sync(device)
    rec["warmup_s"] = round(time.perf_counter() - t0, 1)
    _peak_gib(device, reset=True)
    t0 = time.perf_counter()
    vec_model = emb.embed_encoded(enc)
    sync(device)
    model_s = time.perf_counter() - t0
    rec["model_tokens_per_s"] = round(rec["tokens"] / model_s)
    rec["model_peak_gib"] = _peak_gib(device)

    # full pipeline through run_job over Parquet, same model object
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"corpus-{size}.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n_docs)], "text": texts}), src, row_group_size=256)
    cfg = make_config({"input": (str(src),), "output": str(workdir / f"out-{size}"), "model": f"random:{size}",
                       "batch_tokens": batch_tokens, "shard_size": max(64, n_docs // 12), "quiet": True,
                       "max_length": 8192, "device": device})
    t0 = time.perf_counter()
    summary = run_job(cfg, overwrite=True, embedder=emb)
    e2e_s = time.perf_counter() - t0
    rec["tokens_per_s"] = round(summary.tokens / e2e_s)
    rec["e2e_seconds"] = round(e2e_s, 2)
    got = ds.dataset(str(workdir / f"out-{size}" / "vectors")).to_table()
    ids = got.column("id").to_pylist()
    vec_e2e = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))[np.argsort([int(i[1:]) for i in ids])]
    rec["e2e_vs_model_min_cosine"] = round(float((vec_e2e * vec_model).sum(1).min()), 5)

    if profile is not None:
        _profile(emb, enc, profile / f"profile-{size}.txt")
    n_st = min(st_docs or n_docs, n_docs)
    vec_st = None
    if st_docs != 0:
        st_s, vec_st, st_tokens = st_policy(model, tok, texts[:n_st], device)
        rec["st_docs"] = n_st
        rec["st_policy_tokens_per_s"] = round(st_tokens / st_s)
        rec["ratio_vs_sentence_transformers"] = round(rec["tokens_per_s"] / rec["st_policy_tokens_per_s"], 2)
        cos = (vec_model[:n_st] * vec_st).sum(1)
        rec["packed_vs_padded_min_cosine"] = round(float(cos.min()), 5)
        rec["packed_vs_padded_mean_cosine"] = round(float(cos.mean()), 6)
    others: dict[str, np.ndarray] = {}
    if levers:
        rec["levers"], others = _levers(model, tokenizer_dir, texts[:n_st], batch_tokens, device, emb, vec_st)
    if reference_docs:
        candidates = {"pipeline": vec_model[:n_st], **others}
        if vec_st is not None:
            candidates["sentence_transformers_policy"] = vec_st
        rec["vs_float32_reference"] = float32_reference(model, enc, reference_docs, candidates)
    ceiling_tok = rec["ceiling_tflops"] * 1e12 / rec["flops_per_token"]
    rec["ceiling_tokens_per_s"] = round(ceiling_tok)
    rec["share_of_ceiling"] = round(rec["tokens_per_s"] / ceiling_tok, 3)
    rec["model_share_of_ceiling"] = round(rec["model_tokens_per_s"] / ceiling_tok, 3)
    rec["e2e_over_model"] = round(rec["tokens_per_s"] / rec["model_tokens_per_s"], 3)

    if long_docs:
        long_texts = make_corpus(tok, long_docs, median=16384, sigma=0.4, lo=8192, hi=32000, seed=1)
        emb_long = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokenizer_dir), model=f"random:{size}",
                                        path=tokenizer_dir, device=device, batch_tokens=max(batch_tokens, 32768),
                                        compile=compile, max_length=32768)
        long_enc = emb_long.tokenizer.encode(long_texts)
        emb_long.embed_texts(long_texts[:1])  # warm-up: two calls, so packs of two lengths (see _model_rate)
        emb_long.embed_texts(long_texts[1:2])
        sync(device)
        _peak_gib(device, reset=True)
        t0 = time.perf_counter()
        emb_long.embed_encoded(long_enc)
        sync(device)
        rec["long_docs"] = long_docs
        rec["long_mean_tokens"] = round(float(long_enc.lengths.mean()))
        rec["long_tokens_per_s"] = round(int(long_enc.lengths.sum()) / (time.perf_counter() - t0))
        rec["long_peak_gib"] = _peak_gib(device)
    del emb, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rec


def _model_rate(emb, texts: list[str], device: str) -> tuple[int, np.ndarray]:
    """Model-only tokens/s on pre-tokenized ``texts`` and the vectors. The warm-up runs packs of two lengths,
    so that a compiled forward has made its dynamic-length graph before the clock starts."""
    enc = emb.tokenizer.encode(texts)
    emb.embed_texts(texts[:64])
    emb.embed_texts(texts[64:256])
    sync(device)
    t0 = time.perf_counter()
    vecs = emb.embed_encoded(enc)
    sync(device)
    return round(int(enc.lengths.sum()) / (time.perf_counter() - t0)), vecs


def _levers(model, tokenizer_dir: str, texts: list[str], batch_tokens: int, device: str, default,
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
            rate, vecs = _model_rate(ladder[name](), texts, device)
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


def _profile(emb, enc, path: Path, batches: int = 4) -> None:
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


def table(records: list[dict[str, Any]]) -> str:
    """A short text table of the records."""
    head = (f"{'size':>5} {'e2e tok/s':>10} {'model tok/s':>11} {'ST tok/s':>9} {'x ST':>5} "
            f"{'ceiling':>8} {'e2e/model':>9} {'cos min':>8} {'kernel':>7}")
    lines = [head]
    for r in records:
        lines.append(
            f"{r['model_size']:>5} {r['tokens_per_s']:>10,} {r['model_tokens_per_s']:>11,} "
            f"{r.get('st_policy_tokens_per_s', 0):>9,} {r.get('ratio_vs_sentence_transformers', 0):>5} "
            f"{r['share_of_ceiling']:>8.0%} {r['e2e_over_model']:>9} {r.get('packed_vs_padded_min_cosine', 0):>8} "
            f"{r.get('attention_kernel', '?'):>7}"
        )
        for name, lever in r.get("levers", {}).items():
            if isinstance(lever, dict):
                lines.append(f"  lever {name:<54} " + (
                    f"{lever['tokens_per_s']:>9,} tok/s  cos vs ST >= {lever.get('min_cosine_vs_st_policy', '-')}"
                    f"  vs default >= {lever.get('min_cosine_vs_default', '-')}"
                    if "tokens_per_s" in lever else lever.get("error", "")))
        for name, cos in r.get("vs_float32_reference", {}).items():
            if name != "docs":
                lines.append(f"  vs float32 reference: {name:<54} min {cos['min']:.6f}  mean {cos['mean']:.6f}")
    return "\n".join(lines)


def main(sizes: list[str], tokenizer_dir: str, docs: dict[str, int], batch_tokens: dict[str, int], out: Path,
         compile: bool = True, long_docs: int = 0, st_docs: dict[str, int] | None = None,
         profile: bool = False, levers: bool = False, reference_docs: int = 32,
         device: str = "cuda") -> list[dict[str, Any]]:
    import tempfile

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            rec = run_bench(size, tokenizer_dir=tokenizer_dir, n_docs=docs[size], batch_tokens=batch_tokens[size],
                            workdir=Path(tmp), compile=compile, long_docs=long_docs,
                            st_docs=(st_docs or {}).get(size), profile=out.parent if profile else None,
                            levers=levers, reference_docs=reference_docs, device=device)
            rec["date"] = time.strftime("%Y-%m-%d")
            records.append(rec)
            log.warning("%s", json.dumps(rec))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1) + "\n")
    return records
