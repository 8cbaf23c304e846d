"""Sizing and early checks from the model's ``config.json`` alone (no weights): shard size by work, and the settings
that can be checked before anything is planned or loaded (dims, max length, a model that does not exist).

A shard is the unit of progress and of resume: it should take about a minute on the device, whatever the
corpus. Its size is set in bytes of text: the model's forward cost per token (2 x its parameters, from
``config.json``) against the device's usable rate (a GPU's bf16 rate, or a measured rate of the CPU's cores)
gives tokens per second, and a token is about 4 bytes of text.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.job.config import JobConfig

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4
MIN_SHARD_BYTES, MAX_SHARD_BYTES = 256 << 10, 256 << 20
CPU_FLOPS_PER_CORE = 60e9  # usable fp32 rate of a core through torch (MiniLM: 6.6k tokens/s on 2 = ~70 GFLOP/s each)
GPU_FLOPS = 3.5e14  # usable bf16 rate of a current data-centre GPU (an H100/H200 reaches ~75% of 790 TFLOP/s)
REMOTE_TOKENS_PER_S = 20_000  # an OpenAI-compatible server, per request in flight


def model_config(cfg: JobConfig) -> dict[str, Any] | None:
    """The model's ``config.json`` as a dict, without loading weights (None when it cannot be read here).

    Raises:
        PipelineError: a local model folder or ``pkg:`` path without a config.json.
    """
    from pipeline.model.encoder import resolve_model_path

    path = resolve_model_path(cfg.model)
    local = Path(path)
    if local.is_dir():
        try:
            return json.loads((local / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise PipelineError(f"model {cfg.model!r}: {local} has no readable config.json ({exc})") from exc
    if cfg.model.startswith((".", "/", "~")):
        raise PipelineError(f"model {cfg.model!r}: no such folder")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code).to_dict()
    except Exception as exc:  # noqa: BLE001 - offline, private, misspelled: said once, then loading says more
        if cfg.backend == "openai":
            return None
        raise PipelineError(f"model {cfg.model!r}: cannot read its config.json ({str(exc).splitlines()[0]})") from exc


def check_model_settings(cfg: JobConfig, config: dict[str, Any] | None) -> None:
    """Settings that do not fit the model, found from its config before any work.

    Raises:
        PipelineError: ``--dims`` above the model's size.
    """
    if not config:
        return
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    if cfg.dims is not None and hidden:
        from pipeline.model.encoder import output_width

        width = output_width(cfg.model, int(hidden))  # a Dense module after the pooling sets the vectors' size
        if cfg.dims > width:
            raise PipelineError(f"dims: {cfg.dims} is larger than the model's {width} dimensions ({cfg.model})")
    limit = config.get("max_position_embeddings")
    if cfg.max_length is not None and limit and cfg.max_length > int(limit):
        log.warning("max_length %d is above the model's %d positions: it is cut to %d", cfg.max_length, limit, limit)


def flops_per_token(config: dict[str, Any]) -> float:
    """About 2 x the non-embedding parameters of a transformer from its config (attention over short texts aside)."""
    h = int(config.get("hidden_size") or config.get("d_model") or 768)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 12)
    inter = int(config.get("intermediate_size") or 4 * h)
    heads = int(config.get("num_attention_heads") or max(1, h // 64))
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    attn = h * head_dim * (heads + 2 * kv) + heads * head_dim * h
    gated = config.get("model_type", "") in ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3")
    mlp = (3 if gated else 2) * h * inter
    return 2.0 * layers * (attn + mlp)


def shard_bytes(cfg: JobConfig, seconds: float) -> int:
    """Bytes of text a shard should hold so that it takes about ``seconds`` on the job's device."""
    try:
        config = model_config(cfg) if cfg.model else None
    except PipelineError as exc:  # sized as a BERT-base model; loading the model will say what is wrong
        log.info("shard size: %s", exc)
        config = None
    if cfg.backend == "openai":
        rate = REMOTE_TOKENS_PER_S * cfg.concurrency
    else:
        fpt = flops_per_token(config or {})
        device = cfg.device or ("cuda" if cfg.gpus else _default_device())
        flops = GPU_FLOPS if device.startswith("cuda") else CPU_FLOPS_PER_CORE * _cpus(cfg)
        rate = flops / fpt
    size = int(rate * seconds * BYTES_PER_TOKEN)
    return max(MIN_SHARD_BYTES, min(MAX_SHARD_BYTES, size))


def _cpus(cfg: JobConfig) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n // max(1, cfg.workers))


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
