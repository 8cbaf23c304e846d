"""A job's throughput against a plain loop of fixed batches of 32 over the same documents (``bench-job``, CPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.bench.gpu import sync


def plain_loop(emb, texts: list[str], batch: int = 32) -> tuple[float, int]:
    """The naive baseline: input order, fixed batches of ``batch`` texts, padded, through the same model and
    pooling. Returns ``(seconds, real tokens)``."""
    import torch

    from pipeline.model.encoder import finish, pool

    hf_tok, info = emb.tokenizer.tokenizer, emb.info
    hf_tok.padding_side = "right"
    dev = torch.device(emb.device)
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = hf_tok([emb.tokenizer.prompt + t for t in texts[i : i + batch]], padding=True, truncation=True,
                         max_length=info.max_length, return_tensors="pt").to(dev)
            mask = enc["attention_mask"]
            tokens += int(mask.sum())
            hidden = emb.model(**enc).last_hidden_state
            finish(pool(hidden, mask, mask.sum(1), info.pooling), info.dims, info.normalize).cpu()
    sync(emb.device)
    return time.perf_counter() - t0, tokens


def job_vs_plain(job_file: str, workdir: Path) -> dict[str, Any]:
    """A job's own throughput against the plain fixed-batch-32 loop over the same documents, in one process.

    The model is loaded once and shared; both timings exclude loading it. The job runs into a fresh output
    under ``workdir`` (planning, reading, tokenizing, writing included).
    """
    import dataclasses

    from pipeline.job.config import build_config
    from pipeline.job.manifest import load_manifest
    from pipeline.job.records import FieldSpec
    from pipeline.job.runner import read_shard, run_job
    from pipeline.model.encoder import Embedder

    cfg = build_config(job_file, {})
    cfg = dataclasses.replace(cfg, output=str(workdir / "job"), quiet=True)
    emb = Embedder.from_options(cfg.model_options())
    t0 = time.perf_counter()
    summary = run_job(cfg, overwrite=True, embedder=emb)
    job_s = time.perf_counter() - t0
    manifest = load_manifest(cfg.output)
    spec = FieldSpec.of(cfg)
    embed = [s for s in manifest.shards if s.kind == "embed"]
    texts = [t for s in embed for t in read_shard(manifest, s, spec).column("text").to_pylist()]
    plain_s, plain_tokens = plain_loop(emb, texts)
    rec = {
        "job": job_file, "device": emb.device, "docs": summary.docs, "tokens": summary.tokens,
        "job_seconds": round(job_s, 2), "job_docs_per_s": round(summary.docs / job_s, 1),
        "job_tokens_per_s": round(summary.tokens / job_s), "plain_seconds": round(plain_s, 2),
        "plain_docs_per_s": round(len(texts) / plain_s, 1), "plain_tokens_per_s": round(plain_tokens / plain_s),
    }
    rec["speedup"] = round(plain_s / job_s, 2)
    return rec
