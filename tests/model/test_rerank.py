"""Rerankers: Qwen3-Reranker yes/no scores equal an independent computation from the model's logits with the
exact prompt; truncation cuts only the pair text; cross-encoders score as the model says."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.model.rerank import CrossEncoderReranker, QwenReranker, load_reranker

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TASK = "Given a web search query, retrieve relevant passages that answer the query"
PAIRS = [
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("Explain gravity", "Gravity is a force that attracts two bodies towards each other. " * 3),
    ("What is the capital of China?", "Paris"),
    ("rust ownership", "Rust guarantees memory safety through ownership and borrowing checked at compile time."),
]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_noeos_dir: Path) -> Path:
    from pipeline.bench.synthetic import make_qwen3_reranker_dir

    return make_qwen3_reranker_dir(tmp_path_factory.mktemp("reranker"), "tiny",
                                   tokenizer_dir=qwen_tokenizer_noeos_dir, seed=3)


def _reference_scores(model_dir: Path, pairs: list[tuple[str, str]], max_length: int = 8192) -> np.ndarray:
    """The Qwen3-Reranker model card's recipe, one pair at a time (no padding at all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
    suffix_ids = tok.encode(SUFFIX, add_special_tokens=False)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    assert (yes, no) == (9693, 2152)
    out = []
    for q, d in pairs:
        body = tok(f"<Instruct>: {TASK}\n<Query>: {q}\n<Document>: {d}", add_special_tokens=False, truncation=True,
                   max_length=max_length - len(prefix_ids) - len(suffix_ids))["input_ids"]
        ids = torch.tensor([prefix_ids + body + suffix_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        pair = torch.stack([logits[no], logits[yes]])
        out.append(torch.softmax(pair.double(), dim=0)[1].item())
    return np.array(out)


def test_qwen_scores_equal_an_independent_computation(reranker_dir: Path) -> None:
    rr = load_reranker(str(reranker_dir), device="cpu", batch_size=3)  # batches with left padding
    assert isinstance(rr, QwenReranker) and rr.kind == "qwen-yes-no"
    got = rr.score_pairs(PAIRS)
    ref = _reference_scores(reranker_dir, PAIRS)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert np.ptp(ref) > 1e-4  # the scores differ between pairs, so the comparison has power
    np.testing.assert_allclose(rr.score(PAIRS[0][0], [PAIRS[0][1], PAIRS[2][1]]), got[[0, 2]], atol=1e-6)


def test_qwen_sequence_is_prefix_pair_suffix_and_only_the_pair_is_truncated(reranker_dir: Path) -> None:
    rr = load_reranker(str(reranker_dir), device="cpu", max_length=80)
    long_doc = "word " * 500
    seq = rr.sequence("query", long_doc)
    assert len(seq) == 80
    assert seq[: len(rr.prefix_ids)] == rr.prefix_ids and seq[-len(rr.suffix_ids):] == rr.suffix_ids
    assert seq[0] == 151644 and 151643 not in seq  # starts with <|im_start|>; no end token appended
    short = rr.sequence("query", "short doc")
    assert len(short) < 80 and short[-len(rr.suffix_ids):] == rr.suffix_ids
    got = rr.score_pairs([("query", long_doc), ("query", "short doc")])
    np.testing.assert_allclose(got, _reference_scores(reranker_dir, [("query", long_doc), ("query", "short doc")],
                                                      max_length=80), atol=1e-5)


def test_instruction_changes_the_prompt(reranker_dir: Path) -> None:
    rr = load_reranker(str(reranker_dir), device="cpu", instruction="Judge code relevance")
    assert rr.tokenizer.decode(rr.sequence("q", "d")).count("<Instruct>: Judge code relevance\n<Query>: q") == 1


def test_cross_encoder_scores_equal_the_model(tmp_path: Path, minilm_dir: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    model_dir = tmp_path / "ce"
    BertForSequenceClassification(config).eval().save_pretrained(model_dir)
    for f in minilm_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    rr = load_reranker(str(model_dir), device="cpu", batch_size=2)
    assert isinstance(rr, CrossEncoderReranker)
    got = rr.score_pairs(PAIRS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = [torch.sigmoid(model(**tok(q, d, return_tensors="pt", truncation=True)).logits[0, 0]).item()
               for q, d in PAIRS]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # a cross-encoder has no task instruction: one given was dropped and the scores were these, silently
    with pytest.raises(PipelineError, match="cross-encoder"):
        load_reranker(str(model_dir), device="cpu", instruction="Find documents about physics")


def test_a_model_that_is_not_a_reranker_is_refused(minilm_dir: Path) -> None:
    with pytest.raises(PipelineError, match="neither a causal LM"):
        load_reranker(str(minilm_dir), device="cpu")
    with pytest.raises(PipelineError, match="cannot load"):
        load_reranker("/nonexistent/reranker", device="cpu")
