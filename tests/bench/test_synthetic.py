"""The synthetic Qwen3 stand-ins are faithful: real tokenizer ids, Qwen3 special tokens, both EOS flavours,
and model directories that load like the published checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM, Qwen3Model

from pipeline.bench import qwen_tokenizer
from pipeline.bench.qwen_tokenizer import (
    ENDOFTEXT_ID,
    QWEN3_SPECIAL_TOKEN_IDS,
    QWEN3_SPECIAL_TOKENS,
    QWEN_TIKTOKEN_SHA256,
    bytes_to_unicode,
    convert_qwen_tiktoken,
    file_sha256,
    find_qwen_tiktoken,
)
from pipeline.bench.synthetic import (
    QUERY_PROMPT,
    QWEN3_SHAPES,
    make_qwen3_embedding_dir,
    make_qwen3_reranker_dir,
    qwen3_config,
)

KNOWN_IDS = [("Hello world", [9707, 1879]), ("yes", [9693]), ("no", [2152])]

QWEN3_TABLE = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]  # fmt: skip


@pytest.fixture(scope="module")
def tok_eos(qwen_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def tok_noeos(qwen_tokenizer_noeos_dir: Path):
    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_noeos_dir))


# --- conversion ----------------------------------------------------------------------------------------------


def test_tiktoken_file_is_the_qwen_vocabulary() -> None:
    assert file_sha256(find_qwen_tiktoken()) == QWEN_TIKTOKEN_SHA256


def test_missing_dashscope_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qwen_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="dashscope"):
        find_qwen_tiktoken()


def test_bytes_to_unicode_is_a_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "\u0120"  # 'Ġ'


def test_every_merge_joins_two_lower_ranked_tokens() -> None:
    vocab, merges = convert_qwen_tiktoken()
    assert len(vocab) == 151643
    assert len(merges) == 151643 - 256
    assert sorted(vocab.values()) == list(range(151643))
    previous = -1
    for left, right in merges:
        merged = vocab[left + right]
        assert vocab[left] < merged and vocab[right] < merged
        assert merged > previous  # listed in rank order
        previous = merged


# --- tokenizer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tok_eos", "tok_noeos"])
@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS)
def test_known_ids(request: pytest.FixtureRequest, which: str, text: str, ids: list[int]) -> None:
    tok = request.getfixturevalue(which)
    assert tok(text, add_special_tokens=False).input_ids == ids


@pytest.mark.parametrize("which", ["tok_eos", "tok_noeos"])
def test_special_token_ids(request: pytest.FixtureRequest, which: str) -> None:
    tok = request.getfixturevalue(which)
    assert [t for t, _ in QWEN3_SPECIAL_TOKENS] == QWEN3_TABLE
    for i, token in enumerate(QWEN3_TABLE):
        assert tok.convert_tokens_to_ids(token) == 151643 + i == QWEN3_SPECIAL_TOKEN_IDS[token]
        assert tok.convert_ids_to_tokens(151643 + i) == token
    assert len(tok) == 151669
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.padding_side == "left"
    assert tok.model_max_length == 32768


@pytest.mark.parametrize("which", ["tok_eos", "tok_noeos"])
def test_special_tokens_in_text_are_single_tokens(request: pytest.FixtureRequest, which: str) -> None:
    tok = request.getfixturevalue(which)
    ids = tok("<|im_start|>user\nyes<|im_end|><think>\n\n</think>", add_special_tokens=False).input_ids
    assert ids[0] == 151644
    assert 9693 in ids
    assert ids[ids.index(9693) + 1 : ids.index(9693) + 3] == [151645, 151667]
    assert ids[-1] == 151668


def test_append_eos_on(tok_eos) -> None:
    assert tok_eos("Hello world").input_ids == [9707, 1879, ENDOFTEXT_ID]
    assert tok_eos("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok_eos(["yes", "no"]).input_ids == [[9693, ENDOFTEXT_ID], [2152, ENDOFTEXT_ID]]
    # Truncation keeps room for the appended token: content is cut to max_length - 1.
    assert tok_eos("Hello world Hello world", truncation=True, max_length=3).input_ids == [9707, 1879, ENDOFTEXT_ID]
    # Left padding with the pad token, which is the same id as the appended one: only the mask tells them apart.
    batch = tok_eos(["yes", "Hello world"], padding=True)
    assert batch.input_ids == [[ENDOFTEXT_ID, 9693, ENDOFTEXT_ID], [9707, 1879, ENDOFTEXT_ID]]
    assert batch.attention_mask == [[0, 1, 1], [1, 1, 1]]


def test_append_eos_off(tok_noeos) -> None:
    assert tok_noeos("Hello world").input_ids == [9707, 1879]
    assert tok_noeos(["yes", "no"]).input_ids == [[9693], [2152]]
    batch = tok_noeos(["yes", "Hello world"], padding=True)
    assert batch.input_ids == [[ENDOFTEXT_ID, 9693], [9707, 1879]]
    assert batch.attention_mask == [[0, 1], [1, 1]]


@pytest.mark.parametrize("which", ["tok_eos", "tok_noeos"])
def test_decode_round_trip(request: pytest.FixtureRequest, which: str) -> None:
    tok = request.getfixturevalue(which)
    text = "Grüße, 世界! def f(x):\n\treturn x ** 2  # 😀 Здравствуйте مرحبا"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_matches_tiktoken(tok_noeos) -> None:
    """Cross-check against tiktoken itself, the reference implementation of this vocabulary's BPE (tiktoken is
    in the test extra, so CI runs it; skipped only where the test extra is not installed)."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is in the test extra: bash jobs/setup.sh test")
    import base64

    ranks = {}
    with open(find_qwen_tiktoken(), "rb") as fh:
        for line in fh:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    pattern = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
        r"""|\s+(?!\S)|\s+"""
    )
    enc = tiktoken.Encoding("qwen-check", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    tok = tok_noeos
    texts = [
        "Hello world", "  indented\n\n\tcode()", "量子力学是物理学的一个分支。", "Ünïcödé café 123456",
        "😀😃👍🏽 emoji", "don't won't I'll we've", "https://example.com/a?b=c&d=e#f", "1,234.56e-7",
    ]  # fmt: skip
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == enc.encode_ordinary(text), text


# --- model directories ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "appends"), [("tiny_qwen3_dir", True), ("tiny_qwen3_noeos_dir", False)])
def test_embedding_dir_loads_like_a_checkpoint(request: pytest.FixtureRequest, which: str, appends: bool) -> None:
    model_dir: Path = request.getfixturevalue(which)
    model = AutoModel.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert isinstance(model, Qwen3Model)
    shape = QWEN3_SHAPES["tiny"]
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        shape["hidden_size"],
        shape["num_hidden_layers"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
    )
    assert cfg.vocab_size == 151669 and cfg.head_dim == 16
    assert tok("Hello world").input_ids == [9707, 1879] + ([ENDOFTEXT_ID] if appends else [])
    with torch.no_grad():
        out = model(torch.tensor([[9707, 1879, ENDOFTEXT_ID]])).last_hidden_state
    assert out.shape == (1, 3, shape["hidden_size"]) and torch.isfinite(out).all()

    # Published layout: safetensors keys without a "model." prefix.
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "embed_tokens.weight" in keys and "norm.weight" in keys
    assert not any(k.startswith("model.") for k in keys)

    # The sentence-transformers files.
    modules = json.loads((model_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules][:2] == ["Transformer", "Pooling"]
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True
    assert pooling["word_embedding_dimension"] == shape["hidden_size"]
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_lasttoken")
    st = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
        "document": "",
    }
    assert st["prompts"]["query"] == QUERY_PROMPT
    assert st["default_prompt_name"] is None
    assert st["similarity_fn_name"] == "cosine"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    dirs = [
        make_qwen3_embedding_dir(tmp_path / name, tokenizer_dir=qwen_tokenizer_dir, seed=seed)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    weights = []
    for d in dirs:
        with safe_open(str(d / "model.safetensors"), "pt") as fh:
            weights.append(fh.get_tensor("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_tokenizer_dir_must_match_append_eos(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="appends"):
        make_qwen3_embedding_dir(tmp_path / "x", tokenizer_dir=qwen_tokenizer_dir, append_eos=False)


def test_bfloat16_dir(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    d = make_qwen3_embedding_dir(tmp_path / "bf16", tokenizer_dir=qwen_tokenizer_dir, dtype="bfloat16")
    model = AutoModel.from_pretrained(str(d))
    assert model.dtype == torch.bfloat16


def test_reranker_dir(tmp_path: Path, qwen_tokenizer_noeos_dir: Path, qwen_tokenizer_dir: Path) -> None:
    d = make_qwen3_reranker_dir(tmp_path / "rr", tokenizer_dir=qwen_tokenizer_noeos_dir)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    assert isinstance(model, Qwen3ForCausalLM)
    assert tok("yes").input_ids == [9693] and tok("no").input_ids == [2152]
    with torch.no_grad():
        logits = model(torch.tensor([[9707, 1879]])).logits
    assert logits.shape == (1, 2, 151669) and torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        make_qwen3_reranker_dir(tmp_path / "bad", tokenizer_dir=qwen_tokenizer_dir)


@pytest.mark.parametrize(
    ("size", "non_embedding_b", "embedding_rows"),
    [("0.6B", 0.44, 151669), ("4B", 3.63, 151665), ("8B", 6.95, 151665)],
)
def test_published_shapes(size: str, non_embedding_b: float, embedding_rows: int) -> None:
    """The shapes give the published non-embedding parameter counts (built on the meta device: no memory)."""
    config = qwen3_config(size)
    with torch.device("meta"):
        model = Qwen3Model(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    assert model.embed_tokens.weight.shape == (embedding_rows, config.hidden_size)
    assert abs((total - embedding) / 1e9 - non_embedding_b) < 0.01
    assert config.head_dim == 128 and config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is (size != "8B")
