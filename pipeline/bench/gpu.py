"""``embed-corpus bench``: GPU throughput of the pipeline against the sentence-transformers policy, in one process.

For a named Qwen3-Embedding size it builds a randomly initialised model of the exact shape on the GPU
(throughput does not depend on the weights' values), generates a corpus of real text (the bundled sample,
re-cut to token lengths drawn lognormal with median 256 and sigma 1, clipped to [8, 8192]), and measures,
repeated and interleaved (medians, with every run and the spread in the record):

1. the matrix-product ceiling of the card (bf16 GEMM TFLOP/s),
2. the model alone: the pipeline's forward on pre-tokenized input,
3. the pipeline: ``run_job`` over a Parquet file (read, tokenize, batch, encode, write Parquet), same model,
4. the sentence-transformers policy: sorted by length, fixed batches of 32, padded, transformers SDPA,
5. documents of 8K-32K tokens;

then the real command (``command.py``: ``embed-corpus run`` in a subprocess, model saved to a folder, cold and
warm compile cache) and every path's vectors against a float32 copy of the model. Shares of the ceiling count
the FLOPs the vectors need (``needed_flops``). Every key of the record is explained in ``LABELS``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import paths
from pipeline.bench.paths import sync, timed

log = logging.getLogger(__name__)

ST_BATCH = 32


def _peak_gib(device: str, reset: bool = False) -> float:
    import torch

    if not device.startswith("cuda"):
        return 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def gemm_tflops(device: str = "cuda", n: int = 8192, iters: int = 100) -> float:
    """Measured bf16 matrix-product rate of the card (the ceiling); on CPU a small float32 one (smoke runs)."""
    import torch

    dtype = torch.bfloat16
    if not device.startswith("cuda"):
        n, iters, dtype = 256, 3, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
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


def layer_flops(config) -> dict[str, float]:
    """Matrix-product FLOPs per token of one decoder layer's parts: ``q``, ``kv`` (k and v), ``o``, ``mlp``."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    return {"q": 2.0 * h * config.num_attention_heads * d, "kv": 2.0 * h * 2 * config.num_key_value_heads * d,
            "o": 2.0 * config.num_attention_heads * d * h, "mlp": 2.0 * 3 * h * i}


def flops_per_token(config) -> float:
    """2 x non-embedding parameters: the dense FLOPs of one token through every layer (attention over context
    is counted separately)."""
    return config.num_hidden_layers * sum(layer_flops(config).values())


def attention_flops(config, lengths: np.ndarray) -> float:
    """Causal attention FLOPs of sequences of these lengths in every layer: query ``i`` (1-based) meets ``i``
    keys, 2 x head size FLOPs each for QK^T and again for AV."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lengths = np.asarray(lengths, dtype=np.float64)
    pairs = float((lengths * (lengths + 1) / 2).sum())
    return 4.0 * config.num_attention_heads * d * pairs * config.num_hidden_layers


def needed_flops(config, lengths: np.ndarray) -> float:
    """Matrix-product FLOPs the vectors need (what the pipeline computes): every layer but the last for every
    token; the last layer's k/v projections for every token, and its q projection, attention, output projection
    and MLP only at each sequence's last (pooled) position. Norms, rotary and activations are not counted."""
    parts = layer_flops(config)
    lengths = np.asarray(lengths, dtype=np.float64)
    tokens, n = float(lengths.sum()), len(lengths)
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    body = (config.num_hidden_layers - 1) * sum(parts.values()) * tokens
    body += attention_flops(config, lengths) * (config.num_hidden_layers - 1) / config.num_hidden_layers
    last = parts["kv"] * tokens + (parts["q"] + parts["o"] + parts["mlp"]) * n
    last += 4.0 * config.num_attention_heads * d * tokens  # one query per sequence over all its keys
    return body + last


def all_positions_flops(config, lengths: np.ndarray) -> float:
    """FLOPs of the whole model at every position (the count of a language model's forward; more than the
    vectors need, since the last layer runs only at pooled positions here)."""
    return flops_per_token(config) * float(np.asarray(lengths).sum()) + attention_flops(config, lengths)


def lognormal_lengths(rng: np.random.Generator, n: int, *, median: int = 256, sigma: float = 1.0, lo: int = 8,
                      hi: int = 8192) -> np.ndarray:
    """Token lengths drawn lognormal(log median, sigma), rounded and clipped to [lo, hi] (int64)."""
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(np.int64)


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
    lengths = lognormal_lengths(rng, n_docs, median=median, sigma=sigma, lo=lo, hi=hi)
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


LABELS = {
    "model_tokens_per_s": "model alone: the pipeline's forward on pre-tokenized documents, in the bench process, "
                          "after the compiled warm-up (median of the repeats)",
    "tokens_per_s": "pipeline in the bench process (run_job: Parquet in, tokenizer, batching, forward, Parquet "
                    "out) with the model already loaded and warmed up, tokens over run_job's whole time: planning, "
                    "the first shard read and tokenized before the GPU starts, and the last write and the commit "
                    "are in it (median of the repeats); split: the model alone per shard's worth of documents",
    "run_tokens_per_s": "the real command (embed-corpus run in a subprocess, model folder on disk, Parquet in), "
                        "steady state: tokens over the span from the first shard's start to the last shard's end "
                        "(warm compile cache)",
    "run_tokens_per_s_after_first_shard": "the same runs' steady rate from the end of each worker's first shard "
                                          "(command.after_first_shard: the first pass over real packs of a "
                                          "process is slower); _default_shards likewise; run_first_shard_extra_s"
                                          "(_default): the first shard's seconds beyond its tokens at that rate",
    "run_docs": "documents of the command's runs: the bench's (their vectors checked against the model alone's: "
                "run_check_*.reference_rows) and, where more than docs, more drawn the same way (seed 2), so that "
                "the command runs long enough to show its steady state",
    "run_tokens_per_s_default_shards": "the real command again (warm cache) without --shard-size: the shard "
                                       "sizing a user gets (about a minute of work per shard, the last ones "
                                       "shorter), run_shards_default shards; its steady rate",
    "gpu_clocks_model_alone": "nvidia-smi once a second while the model alone ran (every repeat): SM clock, "
                              "power, temperature per GPU; run_gpu_clocks_*: the same while each command ran",
    "run_shard_timing_warm": "sums over the run's shards (done-markers): wait_s the model idle waiting for the "
                             "next shard's rows and tokens, read_s and tokenize_s the prefetch thread's work, "
                             "write_wait_s waiting for the previous part's write; _default, _cold likewise; "
                             "run_shard_log_default: the same per shard (command.SHARD_LOG_COLUMNS)",
    "run_whole_tokens_per_s": "the real command, tokens over its whole wall time from process start to exit, for "
                              "run_docs documents (warm compile cache); _cold: empty compile cache",
    "startup_s_warm": "the real command, process start to its first shard's start (imports, planning, model load "
                      "straight to the GPU, compiled warm-up, first shard read and tokenized); compile cache "
                      "filled by the cold run; _cold: empty compile cache; model files in the page cache in both",
    "st_policy_tokens_per_s": "sentence-transformers policy on st_docs documents: sorted by characters, batches "
                              "of 32, padded, transformers SDPA, same bf16 model object, tokenization timed",
    "share_of_ceiling": "tokens_per_s x flops_per_token / ceiling: flops_per_token counts the matrix products "
                        "the vectors need (the last layer only at pooled positions)",
    "share_of_ceiling_all_positions": "the same rate against the FLOPs of the model at every position (the "
                                      "count earlier records used; overstates the share)",
    "ceiling_tflops": "bf16 8192^3 matrix products through torch on this card, median of one per repeat",
    "batch_tokens": "packed tokens per forward in every figure of the record (the default where "
                    "batch_tokens_is_default)",
    "_runs": "each repeat's value, in order; the repeats interleave model alone, pipeline, ST policy and long "
             "documents in one process",
}


def _summary(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    med = float(np.median(arr))
    return {"median": med, "runs": [round(float(v)) if v >= 100 else float(f"{v:.4g}") for v in arr],
            "spread": round(float(arr.max() - arr.min()) / med, 4) if med else None}


def long_embedder(model, emb, tokenizer_dir: str, device: str):
    """An embedder for documents up to 32K tokens that runs ``emb``'s forward (its compiled graphs and its one set
    of fused weights, so peak memory stays the pipeline's), with a budget of at least 32K tokens."""
    return paths.embedder_on(model, emb.packed, tokenizer_dir, device, batch_tokens=max(emb.batch_tokens, 32768),
                             max_length=32768, name=emb.info.model)


def _graphs() -> int:
    """Graphs torch.compile has built in this process so far (a rise inside a timed region is a recompile)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - an internal counter: report nothing rather than fail
        return -1


def run_bench(size: str, *, tokenizer_dir: str, n_docs: int, batch_tokens: int | None, workdir: Path,
              compile: bool = True, st_docs: int | None = None, long_docs: int = 0, device: str = "cuda",
              dtype: str | None = None, profile: Path | None = None, levers: bool = False,
              reference_docs: int = 32, repeats: int = 3, run_command: bool = True,
              run_shard_size: int | None = None, ab: bool = True, logs: Path | None = None,
              split: tuple[int, ...] = (), run_docs: int | None = None) -> dict[str, Any]:
    """One model size, every figure from this one process. Returns the record (keys explained in ``LABELS``).

    Repeated ``repeats`` times, interleaved: the card's ceiling, the model alone, the pipeline (``run_job``),
    the sentence-transformers policy on the first ``st_docs`` documents, and (``long_docs``) 8K-32K-token
    documents; each figure is the median with every run and the spread recorded. Then the real command in a
    subprocess (``run_command``): a cold start (empty compile cache) and a warm one, over a Parquet file of the
    same documents, with ``run_docs - n_docs`` more drawn the same way (so that the command runs long enough to
    show its steady state: the bench's corpus is a few seconds of work), in shards of ``run_shard_size`` rows
    (default: a quarter of ``n_docs``). ``ab``: in the middle repeat,
    the model alone with the old wait on the device after every batch, and with half the token budget (what
    those two choices are worth). The first ``reference_docs`` documents also run one at a time through a
    float32 copy of the model: how close each bf16 path comes to it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from pipeline.bench import command
    from pipeline.bench.synthetic import save_embedding_dir
    from pipeline.job.config import make_config
    from pipeline.job.runner import run_job
    from pipeline.model.caches import compile_cache_dir
    from pipeline.model.encoder import Embedder

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    rec: dict[str, Any] = {"model_size": size, "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "docs": n_docs,
                           "compile": compile, "repeats": repeats, "torch": torch.__version__}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.model_max_length = 1 << 30  # the corpus stream is long on purpose
    texts = make_corpus(tok, n_docs)
    model = random_model(size, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    cfg_model = model.config
    model_dir = None
    if run_command:  # saved before the packed forward fuses the projections into shared tensors
        model_dir = save_embedding_dir(model, workdir / f"model-{size}", tokenizer_dir=tokenizer_dir)
    emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokenizer_dir), model=f"random:{size}",
                               path=tokenizer_dir, device=device, batch_tokens=batch_tokens, compile=compile,
                               max_length=8192)
    rec["batch_tokens"] = emb.batch_tokens
    rec["batch_tokens_is_default"] = batch_tokens is None
    rec["attention_kernel"] = emb.packed.kernel if emb.packed is not None else "padded"
    rec["fp32_residual"] = bool(emb.packed is not None and emb.packed.fp32_residual)
    enc = emb.tokenizer.encode(texts)
    lengths = enc.lengths
    rec["tokens"] = int(lengths.sum())
    rec["mean_tokens"] = round(float(lengths.mean()), 1)
    rec["flops_per_token"] = round(needed_flops(cfg_model, lengths) / rec["tokens"], 1)
    rec["flops_per_token_all_positions"] = round(all_positions_flops(cfg_model, lengths) / rec["tokens"], 1)
    rec["flops_counted"] = "matrix products the vectors need: every layer but the last at every token; the last " \
                           "layer's k/v at every token, its q, attention, o and MLP at pooled positions only"

    # compiled warm-up (one small pack: the graph every pack length uses), then a real batch as a second check
    t0 = time.perf_counter()
    if emb.packed is not None and emb.packed.compiled:
        emb.packed.warmup()
        emb.packed.warm_products(emb.batch_tokens)
    emb.embed_texts(texts[:64])
    sync(device)
    rec["warmup_s"] = round(time.perf_counter() - t0, 1)

    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"corpus-{size}.parquet"
    ids = [f"d{i}" for i in range(n_docs)]
    pq.write_table(pa.table({"id": ids, "text": texts}), src, row_group_size=256)
    shard_size = run_shard_size or max(64, -(-n_docs // 4))
    rec["shard_size"] = shard_size
    cfg = make_config({"input": (str(src),), "output": str(workdir / f"out-{size}"), "model": f"random:{size}",
                       "batch_tokens": emb.batch_tokens, "shard_size": shard_size, "quiet": True,
                       "max_length": 8192, "device": device})
    n_st = min(st_docs or n_docs, n_docs) if st_docs != 0 else 0
    long_enc = emb_long = None
    if long_docs:
        long_texts = make_corpus(tok, long_docs, median=16384, sigma=0.4, lo=8192, hi=32000, seed=1)
        emb_long = long_embedder(model, emb, tokenizer_dir, device)
        long_enc = emb_long.tokenizer.encode(long_texts)
        emb_long.embed_texts(long_texts[:1])  # the same compiled graphs; the kernel at long lengths
        rec["long_docs"] = long_docs
        rec["long_mean_tokens"] = round(float(long_enc.lengths.mean()))
        rec["long_batch_tokens"] = emb_long.batch_tokens
    runs: dict[str, list[float]] = {k: [] for k in ("ceiling_tflops", "model_tokens_per_s", "tokens_per_s",
                                                    "st_policy_tokens_per_s", "long_tokens_per_s")}
    vec_model = vec_st = None
    _peak_gib(device, reset=True)
    graphs_before = _graphs()
    model_clocks = command.GpuClocks()
    for r in range(repeats):
        runs["ceiling_tflops"].append(gemm_tflops(device))
        with model_clocks:
            seconds, vecs = timed(lambda: emb.embed_encoded(enc), device)
        runs["model_tokens_per_s"].append(rec["tokens"] / seconds)
        vec_model = vecs if vec_model is None else vec_model
        if r == 0:
            rec["model_peak_gib"] = _peak_gib(device)
        seconds, summary = timed(lambda: run_job(cfg, overwrite=True, embedder=emb), device)
        runs["tokens_per_s"].append(summary.tokens / seconds)
        if r == 0:
            got_ids, got = command.read_output(Path(cfg.output))
            order = np.argsort([int(i[1:]) for i in got_ids])
            rec["e2e_vs_model_min_cosine"] = round(float((got[order] * vec_model).sum(1).min()), 5)
        if n_st:
            st_s, vecs, st_tokens = st_policy(model, tok, texts[:n_st], device)
            runs["st_policy_tokens_per_s"].append(st_tokens / st_s)
            vec_st = vecs if vec_st is None else vec_st
        if long_enc is not None:
            _peak_gib(device, reset=True)
            seconds, _ = timed(lambda: emb_long.embed_encoded(long_enc), device)
            runs["long_tokens_per_s"].append(int(long_enc.lengths.sum()) / seconds)
            rec["long_peak_gib"] = _peak_gib(device)
        if ab and r == repeats // 2 and emb.packed is not None:
            rec["ab"] = paths.ab(emb, enc, device, rec["tokens"], runs["model_tokens_per_s"][-1])
    rec["recompiles_in_timed_region"] = _graphs() - graphs_before if graphs_before >= 0 else None
    if ab and emb.packed is not None and emb.packed.kernel == "triton":
        half = np.arange(max(1, len(enc.lengths) // 2))
        rec["changes"] = paths.changes_ab(model, tokenizer_dir, emb, enc.subset(half), device, max(repeats, 3))
    rec["gpu_clocks_model_alone"] = model_clocks.summary()
    for key, values in runs.items():
        if values:
            s = _summary(values)
            rec[key] = round(s["median"], 1 if s["median"] >= 10 else 4) if key == "ceiling_tflops" \
                else round(s["median"])
            rec[f"{key}_runs"] = s["runs"]
            rec[f"{key}_spread"] = s["spread"]
    if n_st:
        rec["st_docs"] = n_st
        ratios = [a / b for a, b in zip(runs["tokens_per_s"], runs["st_policy_tokens_per_s"], strict=True)]
        rec["ratio_vs_sentence_transformers"] = round(rec["tokens_per_s"] / rec["st_policy_tokens_per_s"], 2)
        rec["ratio_vs_sentence_transformers_runs"] = [round(x, 2) for x in ratios]
        cos = (vec_model[:n_st] * vec_st).sum(1)
        rec["packed_vs_padded_min_cosine"] = round(float(cos.min()), 5)
        rec["packed_vs_padded_mean_cosine"] = round(float(cos.mean()), 6)
    if long_enc is not None:
        rec["long_share_of_ceiling"] = round(
            rec["long_tokens_per_s"] * needed_flops(cfg_model, long_enc.lengths) / int(long_enc.lengths.sum())
            / (rec["ceiling_tflops"] * 1e12), 3)
    if split:
        rec["split"] = paths.split_cost(emb, enc, texts, device, split, cfg.sort_window)
    if profile is not None:
        rec["profile"] = paths.profile_kernels(emb, enc, profile / f"profile-{size}.txt")
    others: dict[str, np.ndarray] = {}
    if levers:
        rec["levers"], others = paths.levers(model, tokenizer_dir, texts[:n_st or n_docs], emb.batch_tokens, device,
                                             emb, vec_st)
    if reference_docs:
        candidates = {"pipeline": vec_model, **others}
        if vec_st is not None:
            candidates["sentence_transformers_policy"] = vec_st
        rec["vs_float32_reference"] = paths.float32_reference(model, enc, reference_docs, candidates)
    ceiling_tok = rec["ceiling_tflops"] * 1e12 / rec["flops_per_token"]
    rec["ceiling_tokens_per_s"] = round(ceiling_tok)
    rec["share_of_ceiling"] = round(rec["tokens_per_s"] / ceiling_tok, 3)
    rec["model_share_of_ceiling"] = round(rec["model_tokens_per_s"] / ceiling_tok, 3)
    rec["share_of_ceiling_all_positions"] = round(
        rec["tokens_per_s"] * rec["flops_per_token_all_positions"] / (rec["ceiling_tflops"] * 1e12), 3)
    rec["e2e_over_model"] = round(rec["tokens_per_s"] / rec["model_tokens_per_s"], 3)
    emb = emb_long = None  # free the packed forwards' memory before the command runs
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    if model_dir is not None:
        run_src, run_ids = src, ids
        if run_docs and run_docs > n_docs:  # the bench's documents first: the model alone's vectors check them
            run_ids = ids + [f"d{i}" for i in range(n_docs, run_docs)]
            run_src = workdir / f"run-corpus-{size}.parquet"
            more = make_corpus(tok, run_docs - n_docs, seed=2)
            pq.write_table(pa.table({"id": run_ids, "text": texts + more}), run_src, row_group_size=256)
        rec.update(_measure_command(size, model_dir, run_src, workdir, shard_size, device, logs or workdir / "logs",
                                    dict(zip(ids, vec_model, strict=True)), run_ids))
        rec["run_over_model"] = round(rec["run_tokens_per_s"] / rec["model_tokens_per_s"], 3)
        rec["run_over_pipeline"] = round(rec["run_tokens_per_s"] / rec["tokens_per_s"], 3)
        rec["run_over_model_default_shards"] = round(rec["run_tokens_per_s_default_shards"]
                                                     / rec["model_tokens_per_s"], 3)
        for key in ("", "_default_shards"):
            rate = rec.get(f"run_tokens_per_s_after_first_shard{key}")
            if rate:
                rec[f"run_after_first_shard_over_model{key}"] = round(rate / rec["model_tokens_per_s"], 3)
        rec["compile_cache_default"] = str(compile_cache_dir())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    rec["labels"] = LABELS
    return rec


def _measure_command(size: str, model_dir: Path, src: Path, workdir: Path, shard_size: int, device: str,
                     logs: Path, reference: dict[str, np.ndarray], ids: list[str]) -> dict[str, Any]:
    """``embed-corpus run`` in a subprocess, cold (empty compile cache) then warm (the cache the cold run filled)."""
    import shutil

    from pipeline.bench import command

    cache = workdir / f"compile-cache-{size}"
    shutil.rmtree(cache, ignore_errors=True)
    devices = None
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        visible = [v for v in (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if v.strip()]
        devices = visible[index] if visible else str(index)
    extra = () if device.startswith("cuda") else ("--device", "cpu")
    out: dict[str, Any] = {"run_shard_size": shard_size}
    for label in ("cold", "warm", "default"):
        output = workdir / f"run-{size}-{label}"
        shutil.rmtree(output, ignore_errors=True)
        rows = None if label == "default" else shard_size  # default: the command's own shard sizing
        got = command.measure(command.run_args([src], output, model_dir, shard_size=rows, extra=extra),
                              command.command_env(compile_cache=cache, devices=devices, trace_recompiles=True),
                              output, logs / f"run-{size}-{label}.log")
        check = command.compare_outputs(output, reference, ids)
        if label == "default":
            out.update(run_tokens_per_s_default_shards=got["steady_tokens_per_s"], run_shards_default=got["shards"],
                       startup_s_default=got["startup_s"], run_wall_s_default=got["wall_s"],
                       run_tail_s_default=got["tail_s"], run_check_default=check,
                       run_shard_timing_default=got["shard_timing"], run_shard_log_default=got["shard_log"],
                       run_gpu_clocks_default=got["gpu_clocks"],
                       run_tokens_per_s_after_first_shard_default_shards=command.after_first_shard(got["shard_log"]),
                       run_first_shard_extra_s_default=command.first_shard_extra_s(got["shard_log"]))
            continue
        if label == "warm":
            out["run_tokens_per_s_after_first_shard"] = command.after_first_shard(got["shard_log"])
            out["run_first_shard_extra_s"] = command.first_shard_extra_s(got["shard_log"])
        out[f"run_shard_timing_{label}"] = got["shard_timing"]
        out[f"run_gpu_clocks_{label}"] = got["gpu_clocks"]
        out[f"startup_s_{label}"] = got["startup_s"]
        out[f"run_wall_s_{label}"] = got["wall_s"]
        out[f"run_steady_s_{label}"] = got["steady_s"]
        out[f"run_tail_s_{label}"] = got["tail_s"]
        out["run_tokens_per_s" if label == "warm" else "run_tokens_per_s_cold"] = got["steady_tokens_per_s"]
        out["run_whole_tokens_per_s" if label == "warm" else "run_whole_tokens_per_s_cold"] = \
            got["whole_tokens_per_s"]
        out[f"run_check_{label}"] = check
        out[f"run_log_{label}"] = got["log"]
        out["run_docs"], out["run_tokens"], out["run_shards"] = got["docs"], got["tokens"], got["shards"]
    return out


def _pm(rec: dict[str, Any], key: str) -> str:
    """``median ±half-range%`` of a repeated figure."""
    if key not in rec:
        return "-"
    spread = rec.get(f"{key}_spread")
    return f"{rec[key]:,}" + (f" ±{spread / 2:.1%}" if spread else "")


def table(records: list[dict[str, Any]]) -> str:
    """A short text table of the records: medians with half their range, the real command, accuracy."""
    lines = []
    for r in records:
        lines.append(
            f"{r['model_size']} on {r['gpu']}, {r['docs']:,} docs ({r['tokens']:,} tokens), batch_tokens "
            f"{r['batch_tokens']}{' (default)' if r.get('batch_tokens_is_default') else ''}, {r['repeats']} repeats; "
            f"ceiling {_pm(r, 'ceiling_tflops')} TFLOP/s -> {r['ceiling_tokens_per_s']:,} tok/s")
        lines.append(f"  model alone {_pm(r, 'model_tokens_per_s')} tok/s ({r['model_share_of_ceiling']:.1%} of "
                     f"ceiling) | pipeline steady {_pm(r, 'tokens_per_s')} ({r['share_of_ceiling']:.1%}; "
                     f"{r['share_of_ceiling_all_positions']:.1%} counting every position) | ST policy "
                     f"{_pm(r, 'st_policy_tokens_per_s')} -> x{r.get('ratio_vs_sentence_transformers', '-')} "
                     f"{r.get('ratio_vs_sentence_transformers_runs', '')}")
        if "run_tokens_per_s" in r:
            lines.append(
                f"  embed-corpus run ({r['run_docs']:,} docs, shards of {r['run_shard_size']}): steady "
                f"{r['run_tokens_per_s']:,} tok/s ({r['run_over_model']} of model alone), whole command "
                f"{r['run_whole_tokens_per_s']:,} tok/s in {r['run_wall_s_warm']} s; start-up warm "
                f"{r['startup_s_warm']} s, cold {r['startup_s_cold']} s (cold: {r['run_tokens_per_s_cold']:,} "
                f"steady, {r['run_whole_tokens_per_s_cold']:,} whole); ids once "
                f"{r['run_check_warm']['ids_once']}, min cos vs model alone "
                f"{r['run_check_warm']['min_cosine_vs_reference']}")
            lines.append(
                f"  embed-corpus run, default shard sizing ({r['run_shards_default']} shards): steady "
                f"{r['run_tokens_per_s_default_shards']:,} tok/s ({r['run_over_model_default_shards']} of model "
                f"alone), {r['run_wall_s_default']} s in all; ids once {r['run_check_default']['ids_once']}")
            if r.get("run_after_first_shard_over_model_default_shards"):
                lines.append(
                    f"  embed-corpus run, after each worker's first shard: "
                    f"{r.get('run_tokens_per_s_after_first_shard') or '-'} tok/s "
                    f"({r.get('run_after_first_shard_over_model', '-')}), default shard sizing "
                    f"{r['run_tokens_per_s_after_first_shard_default_shards']:,} tok/s "
                    f"({r['run_after_first_shard_over_model_default_shards']} of model alone); the first shard's "
                    f"extra seconds {r.get('run_first_shard_extra_s')} / {r.get('run_first_shard_extra_s_default')}")
        if "long_tokens_per_s" in r:
            lines.append(f"  8K-32K docs {_pm(r, 'long_tokens_per_s')} tok/s ({r['long_share_of_ceiling']:.1%})")
        if "ab" in r:
            lines.append(f"  same repeat, model alone: {r['ab']}")
        if "split" in r:
            lines.append(f"  model alone, one call {r['split']['one_call_tokens_per_s']:,} tok/s; per shard: "
                         f"{r['split']['ratios_to_one_call']}")
        lines.append(f"  recompiles in the timed region: {r.get('recompiles_in_timed_region')}")
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


def main(sizes: list[str], tokenizer_dir: str, docs: dict[str, int], batch_tokens: dict[str, int | None],
         out: Path, compile: bool = True, long_docs: int = 0, st_docs: dict[str, int] | None = None,
         profile: bool = False, levers: bool = False, reference_docs: int = 32, device: str = "cuda",
         repeats: int = 3, run_command: bool = True, run_shard_size: int | None = None, ab: bool = True,
         logs: Path | None = None, split: tuple[int, ...] = (),
         run_docs: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Every size in turn, in this process; the records file is rewritten after each size (all records of
    this run, nothing merged from elsewhere)."""
    import tempfile

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            rec = run_bench(size, tokenizer_dir=tokenizer_dir, n_docs=docs[size], batch_tokens=batch_tokens[size],
                            workdir=Path(tmp), compile=compile, long_docs=long_docs,
                            st_docs=(st_docs or {}).get(size), profile=out.parent if profile else None,
                            levers=levers, reference_docs=reference_docs, device=device, repeats=repeats,
                            run_command=run_command, run_shard_size=run_shard_size, ab=ab,
                            logs=logs or out.parent / "logs", split=split, run_docs=(run_docs or {}).get(size))
            records.append(rec)
            log.warning("%s", json.dumps(rec))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1) + "\n")
    return records
