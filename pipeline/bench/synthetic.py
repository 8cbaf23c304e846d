"""Synthetic stand-ins for the Qwen3-Embedding and Qwen3-Reranker checkpoints.

No model weights can be downloaded where this project runs, so tests and benchmarks build model directories
that look exactly like the published ones, with random weights:

* the tokenizer is the real Qwen BPE (``qwen_tokenizer.py``);
* the model is a randomly initialised ``Qwen3Model`` (embedding) or ``Qwen3ForCausalLM`` (reranker) of the
  published shape (or a ``tiny`` one for tests), saved with ``save_pretrained`` in safetensors;
* the sentence-transformers files (``modules.json``, ``1_Pooling/config.json``,
  ``config_sentence_transformers.json``) declare last-token pooling and the query/document prompts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.bench.qwen_tokenizer import ENDOFTEXT_ID, install_tokenizer

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"

_COMMON_SHAPE: dict[str, Any] = {
    "head_dim": 128,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}

QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "0.6B": {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 3072,
        "vocab_size": 151669,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        **_COMMON_SHAPE,
    },
    "4B": {
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 9728,
        "vocab_size": 151665,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
        **_COMMON_SHAPE,
    },
    "8B": {
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 12288,
        "vocab_size": 151665,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        **_COMMON_SHAPE,
    },
    # For tests: small enough to run in milliseconds on a CPU, the real vocabulary so that the real
    # tokenizer's ids (special tokens included) are valid inputs. A larger init range than the published
    # 0.02 keeps the last-token state sensitive to the whole context, so that tests comparing vectors
    # have the power to tell a wrong input sequence from the right one.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 151669,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "head_dim": 16,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.2,
    },
}




def qwen3_config(size: str = "tiny", *, dtype: str = "float32", causal_lm: bool = False) -> Any:
    """A ``transformers.Qwen3Config`` of one of ``QWEN3_SHAPES``.

    Args:
        size: A key of ``QWEN3_SHAPES``.
        dtype: The dtype the config declares (and the weights are saved in).
        causal_lm: Declare ``Qwen3ForCausalLM`` (reranker) instead of ``Qwen3Model`` (embedding).

    Returns:
        The config.

    Raises:
        ValueError: Unknown size.
    """
    from transformers import Qwen3Config

    if size not in QWEN3_SHAPES:
        raise ValueError(f"unknown Qwen3 size {size!r}; known: {', '.join(QWEN3_SHAPES)}")
    shape = dict(QWEN3_SHAPES[size])
    rope_theta = shape.pop("rope_theta")
    layers = shape["num_hidden_layers"]
    return Qwen3Config(
        **shape,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        max_window_layers=layers,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID if not causal_lm else 151645,
        pad_token_id=None,
        use_cache=True,
        dtype=dtype,
        architectures=["Qwen3ForCausalLM" if causal_lm else "Qwen3Model"],
    )


def _random_model(config: Any, model_cls: Any, seed: int, dtype: str) -> Any:
    """Build ``model_cls(config)`` without paying for the default initialisation, then fill it randomly.

    The module is created on the meta device (no memory, no init), materialised uninitialised on the CPU
    in the target dtype, and every parameter is filled from a seeded generator: normal(0, init_range) for
    projections and embeddings, ones for RMSNorm weights. Same seed and shape -> the same weights.
    Non-persistent buffers (rotary ``inv_freq``) stay uninitialised: the model is only meant to be saved,
    and ``from_pretrained`` recomputes them.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = model_cls._from_config(config, dtype=torch_dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std = float(config.initializer_range)
    with torch.no_grad():
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=True):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dim() >= 2:
                # Fill in float32 then cast: bf16/fp16 normal_ from a generator is not supported everywhere.
                chunk = torch.empty(param.shape, dtype=torch.float32)
                chunk.normal_(0.0, std, generator=gen)
                param.copy_(chunk)
                del chunk
            else:
                param.zero_()
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sentence_transformers_files(out: Path, hidden_size: int) -> None:
    _write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "prompts": {"query": QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "model_type": "SentenceTransformer",
        },
    )
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": 8192, "do_lower_case": False})


def _fresh_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_qwen3_embedding_dir(
    out_dir: str | os.PathLike[str],
    size: str = "tiny",
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    append_eos: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a directory that looks like a Qwen3-Embedding checkpoint, with random weights.

    Contents: ``config.json`` + ``model.safetensors`` of a ``Qwen3Model`` (keys without a ``model.``
    prefix, as published), the tokenizer files, and the sentence-transformers files declaring last-token
    pooling and the query/document prompts.

    Args:
        out_dir: Directory to write (created if missing).
        size: A key of ``QWEN3_SHAPES`` ("tiny" for tests, "0.6B"/"4B"/"8B" for benchmarks).
        tokenizer_dir: Copy the tokenizer from here (as built by ``build_qwen_tokenizer``) instead of
            converting it again; its EOS behaviour must match ``append_eos``.
        append_eos: Whether the tokenizer appends ``<|endoftext|>`` itself (recent files) or not (older).
        seed: Seed of the random weights.
        dtype: Weight dtype: "float32", "bfloat16" or "float16".

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import Qwen3Model

    config = qwen3_config(size, dtype=dtype)
    model = _random_model(config, Qwen3Model, seed, dtype)
    return save_embedding_dir(model, out_dir, tokenizer_dir=tokenizer_dir, append_eos=append_eos)


def save_embedding_dir(model: Any, out_dir: str | os.PathLike[str], *,
                       tokenizer_dir: str | os.PathLike[str] | None = None, append_eos: bool = True) -> Path:
    """Save a ``Qwen3Model`` already in memory (any device) as a Qwen3-Embedding checkpoint folder: weights in
    safetensors, the tokenizer, and the sentence-transformers files (last-token pooling, prompts).

    Save before building a packed forward on the model: that fuses the projection weights into shared tensors.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = _fresh_dir(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    install_tokenizer(out, tokenizer_dir, append_eos)
    _write_sentence_transformers_files(out, model.config.hidden_size)
    return out


def make_qwen3_reranker_dir(
    out_dir: str | os.PathLike[str],
    size: str = "tiny",
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a directory that looks like a Qwen3-Reranker checkpoint, with random weights.

    A ``Qwen3ForCausalLM`` of the given shape (its ``lm_head`` tied to the embeddings where the shape says
    so) and a tokenizer that appends nothing, as the reranker's prompt format needs.

    Args:
        out_dir: Directory to write (created if missing).
        size: A key of ``QWEN3_SHAPES``.
        tokenizer_dir: Copy the tokenizer from here; it must append nothing.
        seed: Seed of the random weights.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import Qwen3ForCausalLM

    out = _fresh_dir(out_dir)
    config = qwen3_config(size, dtype="float32", causal_lm=True)
    model = _random_model(config, Qwen3ForCausalLM, seed, "float32")
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    install_tokenizer(out, tokenizer_dir, append_eos=False)
    return out
