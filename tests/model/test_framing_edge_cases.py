"""Model-path inputs that gave wrong vectors with exit 0 (each test fails on the code before its fix).

1. A sentence-transformers model whose ``modules.json`` has a ``Dense`` module after pooling (EmbeddingGemma,
   LaBSE, stella, sentence-t5, ...): the Dense projection is silently skipped, so every vector is the pooled
   hidden state (wrong values, wrong size) instead of the model's output.
2. ``--long-docs chunk`` with a document-side prompt (``--instruction``, ``--prompt-name``): the prompt's last
   token and the document's first word tokenize as ONE token (Qwen BPE: ``":The"``), so cutting
   ``len(prompt_ids)`` tokens off the front of ``tokenize(prompt + text)`` drops the document's first word from
   every chunked document.
3. Truncation of long texts tokenizes a character prefix (``_content_ids_capped``); trailing ``<|endoftext|>``
   strings are stripped from that prefix only when they sit at its very end, so a long text that ends with
   them gets many 151643s (and ``truncated=True``) where the same content in a short text gets exactly one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline.model.encoder import Embedder, format_instruction
from pipeline.model.tokens import SequenceFormat, TextTokenizer

ENDOFTEXT_ID = 151643


# --- 1. sentence-transformers Dense module ---------------------------------------------------------------------


def _minilm_with_dense(src: Path, dst: Path, out_features: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of MiniLM whose pipeline is Transformer -> Pooling(mean) -> Dense(384 -> out, identity) ->
    Normalize, laid out as sentence-transformers saves it (``2_Dense/config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    dst.mkdir()
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        elif entry.name != "modules.json":
            os.symlink(entry, target)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, 384, generator=gen) / 20
    bias = torch.randn(out_features, generator=gen) / 20
    (dst / "2_Dense").mkdir()
    (dst / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 384, "out_features": out_features, "bias": True,
        "activation_function": "torch.nn.modules.linear.Identity"}))
    save_file({"linear.weight": weight, "linear.bias": bias}, str(dst / "2_Dense" / "model.safetensors"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (dst / "modules.json").write_text(json.dumps(modules))
    return weight, bias


def test_sentence_transformers_dense_module_is_not_skipped(tmp_path: Path, minilm_dir: Path) -> None:
    """What sentence-transformers computes: mean pool -> Dense -> normalise. The pipeline must give those vectors,
    or refuse the model; it must not write the pooled hidden states as if they were the model's output."""
    model_dir = tmp_path / "minilm-dense"
    weight, bias = _minilm_with_dense(minilm_dir, model_dir)
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world"]

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    net = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=256)
            pooled = net(**enc).last_hidden_state[0].mean(0)
            v = weight @ pooled + bias
            expected.append((v / v.norm()).numpy())
    expected = np.stack(expected)

    got = Embedder.load(str(model_dir), device="cpu").embed_texts(texts)
    assert got.shape == expected.shape, f"Dense module skipped: {got.shape[1]}-dim vectors, the model makes " \
                                        f"{expected.shape[1]}"
    assert np.allclose(got, expected, atol=1e-4)


def test_a_dense_module_sets_the_width_of_a_servers_vectors(tmp_path: Path, minilm_dir: Path) -> None:
    """With `--backend openai` the server computes the model's modules; the framing read here (no weights) knows
    the vectors are the Dense module's 128 values, not the 384 hidden ones."""
    from pipeline.model.encoder import ModelOptions
    from pipeline.model.remote import local_framing

    model_dir = tmp_path / "minilm-dense"
    _minilm_with_dense(minilm_dir, model_dir)
    tok, info = local_framing(ModelOptions(model=str(model_dir)))
    assert info.pooling == "mean" and tok.encode(["hello"]).lengths[0] > 1
    assert (info.hidden_size, info.width, info.dims) == (384, 128, 128)


# --- 2. chunking with a document-side prompt drops the first word ---------------------------------------------


@pytest.mark.parametrize("prompt", [format_instruction("Retrieve semantically similar text"), "passage: "])
def test_chunked_document_with_prompt_keeps_its_first_word(qwen_tokenizer_dir: Path, prompt: str) -> None:
    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    fmt = SequenceFormat((), (ENDOFTEXT_ID,), 64, strip_suffix=True)
    tok = TextTokenizer(hf, fmt, prompt=prompt, long_docs="chunk", chunk_tokens=12, chunk_overlap=0)
    text = "The quick brown fox jumps over the lazy dog. " * 20  # far over max_length: chunked
    enc = tok.encode([text])
    assert len(enc) > 1  # premise: the document was chunked
    first = enc.sequence(0).tolist()
    assert first[-1] == ENDOFTEXT_ID
    content = hf.decode(first[len(tok.prompt_ids) : -1])
    assert content.lstrip().startswith("The quick"), f"chunk 0 embeds {content!r}: the first word is lost"
    # the chunks together cover the whole document, from its first token
    assert int(enc.span[0, 0]) == 0
    body = hf.decode([t for i in range(len(enc)) for t in enc.sequence(i).tolist()[len(tok.prompt_ids) : -1]])
    assert body.lstrip().startswith("The quick brown fox")


@pytest.mark.parametrize("prompt", [format_instruction("Retrieve semantically similar text"), "passage: "])
def test_a_short_document_with_prompt_spans_its_own_tokens_when_chunking(qwen_tokenizer_dir: Path, prompt: str) -> None:
    """``token_start``/``token_end`` are the text's own token span: a document short enough to be one chunk
    counted the prompt's tokens in it (its long neighbours did not), exit 0."""
    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    fmt = SequenceFormat((), (ENDOFTEXT_ID,), 64, strip_suffix=True)
    tok = TextTokenizer(hf, fmt, prompt=prompt, long_docs="chunk", chunk_tokens=12, chunk_overlap=0)
    short = "hello world, this is short"
    enc = tok.encode([short, "The quick brown fox jumps over the lazy dog. " * 20])
    own = len(hf(short, add_special_tokens=False)["input_ids"])
    assert enc.span[0].tolist() == [0, own]
    assert enc.span[len(enc) - 1, 1] == len(hf("The quick brown fox jumps over the lazy dog. " * 20,
                                               add_special_tokens=False)["input_ids"])


# --- 3. trailing <|endoftext|> strings of a long text ------------------------------------------------------------


def test_trailing_endoftext_strings_stripped_whatever_the_text_length(qwen_tokenizer_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    tok = TextTokenizer(hf, SequenceFormat((), (ENDOFTEXT_ID,), 16, strip_suffix=True))
    short = tok.encode(["hi" + "<|endoftext|>" * 3])
    long = tok.encode(["hi" + "<|endoftext|>" * 40])
    assert short.sequence(0).tolist() == [6023, ENDOFTEXT_ID]
    assert long.sequence(0).tolist() == short.sequence(0).tolist(), \
        f"{long.sequence(0).tolist().count(ENDOFTEXT_ID)} end tokens (exactly one expected)"
    assert not long.truncated[0]



def test_a_shard_tokenized_in_calls_of_a_few_texts_gets_one_calls_ids(qwen_tokenizer_dir: Path) -> None:
    """Texts go to the tokenizer TOKENIZE_CALL at a time (shorter holds of the interpreter lock): the ids of
    every text, on both sides of each call's edge, are those of one call over all of them."""
    from pipeline.model.tokens import TOKENIZE_CALL

    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    tok = TextTokenizer(hf, SequenceFormat((), (ENDOFTEXT_ID,), 64, strip_suffix=True))
    texts = [f"document {i}: " + "word " * (i % 7) + "<|endoftext|>" * (i % 2) for i in range(2 * TOKENIZE_CALL + 3)]
    enc = tok.encode(texts)
    whole = hf(texts, add_special_tokens=False)["input_ids"]
    assert len(enc) == len(texts)
    for i, ids in enumerate(whole):
        while ids and ids[-1] == ENDOFTEXT_ID:
            ids.pop()
        assert enc.sequence(i).tolist() == ids + [ENDOFTEXT_ID], i


# --- 4. truncation reads a prefix of a long text: it must give the whole text's first tokens --------------------

PIECES = [
    "the release notes list every file", "量子力学是描述微观粒子运动规律的物理学分支", "end.\nNext", "end. \n\n  Then",
    "don't stop", "3.14159265358979", "\t\tindented", "a" * 300, "0123456789abcdef" * 9,  # a digest of 144 characters
    "Donaudampfschifffahrtsgesellschaftskapitän" * 4, "word  \r\n", "<|endoftext|>", "    ", "émigré café", "🙂🙂",
    *("".join(np.random.default_rng(s).choice(list("abcdefghijklmnopqrstuvwxyz"), 400)) for s in range(3)),
]


def _long_text(rng: np.random.Generator, chars: int) -> str:
    out = []
    while sum(map(len, out)) < chars:
        piece = PIECES[rng.integers(len(PIECES))]
        out.append(piece + ("" if rng.random() < 0.3 else " "))
    return "".join(out)


@pytest.mark.parametrize("tokenizer", ["minilm", "qwen"])
def test_truncated_tokens_are_the_whole_texts_first_tokens(tokenizer: str, minilm_dir: Path,
                                                          qwen_tokenizer_dir: Path) -> None:
    """A text far over max_length is tokenized from a prefix (the whole of a 10 MB document would be slow); its
    tokens must be those of the whole text cut to max_length. A cut inside a word changed them: WordPiece's one
    [UNK] for a 144-character digest became word pieces of its first 90 (cosine 0.9958 to the model's vector),
    and Qwen's BPE changed the last three tokens of a run of letters."""
    hf = AutoTokenizer.from_pretrained(str(minilm_dir if tokenizer == "minilm" else qwen_tokenizer_dir))
    hf.model_max_length = 1 << 30
    if tokenizer == "qwen":
        fmt = SequenceFormat((), (ENDOFTEXT_ID,), 48, strip_suffix=True)
    else:
        fmt = SequenceFormat((hf.cls_token_id,), (hf.sep_token_id,), 48)
    tok = TextTokenizer(hf, fmt)
    rng = np.random.default_rng(7)
    texts = [_long_text(rng, int(rng.integers(600, 2400))) for _ in range(300)]
    got = tok.encode(texts)
    for i, text in enumerate(texts):
        whole = hf(text, add_special_tokens=False)["input_ids"]
        if fmt.strip_suffix:
            while whole and whole[-1] == ENDOFTEXT_ID:
                whole.pop()
        expected = list(fmt.prefix) + whole[: fmt.max_content] + list(fmt.suffix)
        assert got.sequence(i).tolist() == expected, f"text {i}: {text[:200]!r}..."
        assert bool(got.truncated[i]) == (len(whole) > fmt.max_content)


# --- 5. --max-length above the model's sentence-transformers default ------------------------------------------


def test_max_length_above_the_sentence_transformers_default_is_honoured(minilm_dir: Path) -> None:
    """MiniLM's sentence_bert_config says 256 of its 512 positions (Qwen3-Embedding: 8192 of 32768). An asked
    --max-length 400 was cut to 256 without a word; now it is what embeds, up to the positions."""
    text = " ".join(["river stone light paper garden"] * 100)
    assert Embedder.load(str(minilm_dir), device="cpu").info.max_length == 256
    emb = Embedder.load(str(minilm_dir), device="cpu", max_length=400)
    assert emb.info.max_length == 400 and int(emb.tokenizer.encode([text]).lengths[0]) == 400
    assert Embedder.load(str(minilm_dir), device="cpu", max_length=4000).info.max_length == 512
