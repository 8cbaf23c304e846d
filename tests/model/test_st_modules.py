"""sentence-transformers models as sentence-transformers itself saves and runs them (the independent reference).

Each model here is built with sentence-transformers' own classes from MiniLM and saved with its own ``save``
(its current file format: ``"pooling_mode": "mean"``, Dense modules with ``model.safetensors`` or
``pytorch_model.bin``); the pipeline's vectors must be ``SentenceTransformer.encode``'s, L2-normalised (and cut
first where ``--dims`` asks). Modules it does not compute are refused by name, never skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, embeddings, invoke, read_vectors, run_ok, write_jsonl
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import modules as models

from pipeline.errors import PipelineError
from pipeline.model.encoder import Embedder
from pipeline.model.identity import loaded_files

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world", "a river, a stone, and a lantern at night"]


def _save(minilm_dir: Path, out: Path, *modules, safe: bool = True) -> SentenceTransformer:
    torch.manual_seed(0)
    model = SentenceTransformer(modules=[models.Transformer(str(minilm_dir), max_seq_length=256), *modules],
                                device="cpu")
    model.save(str(out), safe_serialization=safe)
    return model


def _dense_tanh(minilm_dir: Path, out: Path) -> SentenceTransformer:
    """mean -> Dense(384 -> 64, bias, tanh) -> Normalize: the common Dense head (LaBSE's shape)."""
    return _save(minilm_dir, out, models.Pooling(384, "mean"),
                 models.Dense(384, 64, bias=True, activation_function=torch.nn.Tanh()), models.Normalize())


def _two_dense_after_normalize(minilm_dir: Path, out: Path) -> SentenceTransformer:
    """cls -> Normalize -> Dense(384 -> 32, no bias, identity) -> Dense(32 -> 48, GELU), in pytorch_model.bin:
    the Normalize in the middle changes what the biased layer sees, so order matters."""
    return _save(minilm_dir, out, models.Pooling(384, "cls"), models.Normalize(),
                 models.Dense(384, 32, bias=False, activation_function=torch.nn.Identity()),
                 models.Dense(32, 48, bias=True, activation_function=torch.nn.GELU()), safe=False)


def _plain(minilm_dir: Path, out: Path) -> SentenceTransformer:
    """MiniLM as it is (mean, Normalize), saved again in the current format."""
    return _save(minilm_dir, out, models.Pooling(384, "mean"), models.Normalize())


def _reference(model: SentenceTransformer, texts: list[str], dims: int | None = None) -> np.ndarray:
    vecs = model.encode(texts, convert_to_numpy=True, batch_size=2)[:, :dims]
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


@pytest.mark.parametrize("build", [_dense_tanh, _two_dense_after_normalize, _plain])
@pytest.mark.parametrize("dims", [None, 16])
def test_vectors_are_sentence_transformers_own(tmp_path: Path, minilm_dir: Path, build, dims) -> None:
    model = build(minilm_dir, tmp_path / "model")
    emb = Embedder.load(str(tmp_path / "model"), device="cpu", dims=dims)
    got = emb.embed_texts(TEXTS)
    expected = _reference(model, TEXTS, dims)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("build", [_dense_tanh, _two_dense_after_normalize, _plain])
@pytest.mark.parametrize("dims", [None, 16])
def test_no_normalize_gives_the_models_own_vectors(tmp_path: Path, minilm_dir: Path, build, dims) -> None:
    """``--no-normalize`` leaves out the pipeline's final L2 normalisation, not a Normalize module of the model's:
    sentence-transformers runs every module (``encode(normalize_embeddings=False)`` of a model ending in Normalize
    gives unit vectors) and cuts them to ``truncate_dim`` after. Dropping the module gave vectors of norm ~6.8."""
    model = build(minilm_dir, tmp_path / "model")
    got = Embedder.load(str(tmp_path / "model"), device="cpu", dims=dims, normalize=False).embed_texts(TEXTS)
    expected = model.encode(TEXTS, convert_to_numpy=True, batch_size=2, normalize_embeddings=False)[:, :dims]
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_job_and_its_query_side_use_the_dense_head(tmp_path: Path, minilm_dir: Path) -> None:
    """`run` writes the Dense model's vectors, records its head, and `search` embeds queries through it too."""
    from pipeline.job.record import query_embedder

    model = _dense_tanh(minilm_dir, tmp_path / "model")
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    out = tmp_path / "out"
    run_ok("run", "--input", str(corpus), "--output", str(out), "--model", str(tmp_path / "model"), *FAST, "--index")
    table = read_vectors(out)
    order = [int(i[1:]) for i in table.column("id").to_pylist()]
    np.testing.assert_allclose(embeddings(table), _reference(model, TEXTS)[order], atol=2e-5)
    recorded = json.loads((out / "job.json").read_text())["model"]
    assert (recorded["hidden_size"], recorded["width"], recorded["dims"]) == (384, 64, 64)
    assert recorded["head"] == ["2_Dense: 384 -> 64, Tanh"]
    np.testing.assert_allclose(query_embedder(out).embed_texts(["a lantern"]), _reference(model, ["a lantern"]),
                               atol=2e-5)
    result = invoke("search", str(out), "a lantern at night", "-k", "1", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["results"][0]["id"] == "d2"


def test_dense_weights_are_part_of_the_model_identity(tmp_path: Path, minilm_dir: Path) -> None:
    """Retrained Dense weights under the same model folder: the rerun is refused like any changed weights."""
    from safetensors.torch import load_file, save_file

    _dense_tanh(minilm_dir, tmp_path / "model")
    assert "2_Dense/model.safetensors" in loaded_files(tmp_path / "model")
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    args = ["run", "--input", str(corpus), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "model"),
            *FAST]
    run_ok(*args)
    weights = tmp_path / "model" / "2_Dense" / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v * 1.5 for k, v in state.items()}, str(weights))
    write_jsonl(corpus, [{"id": f"d{i}", "text": t + " (edited)"} for i, t in enumerate(TEXTS)])
    result = invoke(*args)
    assert result.exit_code != 0 and "2_Dense/model.safetensors" in result.output, result.output


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("edit, message", [
    (lambda m: _edit_json(m / "1_Pooling" / "config.json", pooling_mode="max"), "pooling 'max'"),
    (lambda m: _edit_json(m / "1_Pooling" / "config.json", pooling_mode=["cls", "mean"]), "'cls', 'mean'"),
    (lambda m: _edit_json(m / "2_Dense" / "config.json", module_input_name="token_embeddings"), "token_embeddings"),
    (lambda m: _edit_json(m / "2_Dense" / "config.json", activation_function="mymodule.Swish"), "mymodule.Swish"),
    (lambda m: _edit_json(m / "2_Dense" / "config.json", in_features=100), "takes 100 values"),
])
def test_what_is_not_computed_here_is_refused_by_name(tmp_path: Path, minilm_dir: Path, edit, message) -> None:
    _dense_tanh(minilm_dir, tmp_path / "model")
    edit(tmp_path / "model")
    with pytest.raises(PipelineError, match=message):
        Embedder.load(str(tmp_path / "model"), device="cpu")


def test_pooling_without_the_prompt_is_refused_when_there_is_a_prompt(tmp_path: Path, minilm_dir: Path) -> None:
    """``include_prompt: false`` (INSTRUCTOR-style models): sentence-transformers leaves the prompt's tokens out of
    the mean; taking them in would give other vectors with exit 0, so a prompt with such a model is refused."""
    model = _save(minilm_dir, tmp_path / "model", models.Pooling(384, "mean", include_prompt=False))
    model_dir = tmp_path / "model"
    _edit_json(model_dir / "config_sentence_transformers.json", prompts={"query": "query: ", "document": ""})
    with pytest.raises(PipelineError, match="include_prompt"):
        Embedder.load(str(model_dir), device="cpu", prompt_name="query")
    plain = Embedder.load(str(model_dir), device="cpu", prompt_name="document")  # an empty prompt: same vectors
    np.testing.assert_allclose(plain.embed_texts(TEXTS), _reference(model, TEXTS), atol=2e-5)


def test_serving_such_a_model_refuses_its_prompts_too(tmp_path: Path, minilm_dir: Path) -> None:
    """`serve --model M` frames queries itself (the model's query prompt, a request's instruction): the same
    refusal there, at load for the model's prompts and with a 400 for a request's instruction."""
    from pipeline.serve.limits import ApiError
    from pipeline.serve.service import Service

    model_dir = tmp_path / "model"
    _save(minilm_dir, model_dir, models.Pooling(384, "mean", include_prompt=False))
    _edit_json(model_dir / "config_sentence_transformers.json", prompts={"query": "query: ", "document": ""})
    with pytest.raises(PipelineError, match="include_prompt"):
        Service.load(model=str(model_dir), device="cpu")
    _edit_json(model_dir / "config_sentence_transformers.json", prompts={})
    service = Service.load(model=str(model_dir), device="cpu")
    service.tokenizer_for("")  # no prompt: fine
    with pytest.raises(ApiError, match="include_prompt"):
        service.tokenizer_for("Instruct: find the answer\nQuery:")


def test_do_lower_case_lowercases_before_a_cased_tokenizer(tmp_path: Path, minilm_dir: Path) -> None:
    """``do_lower_case`` in sentence_bert_config.json: sentence-transformers lowercases the text whatever the
    tokenizer does; with a cased tokenizer the vectors differ if that is skipped."""
    import shutil

    cased = tmp_path / "cased"
    shutil.copytree(minilm_dir, cased)
    tokenizer = json.loads((cased / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (cased / "tokenizer.json").write_text(json.dumps(tokenizer))
    _edit_json(cased / "tokenizer_config.json", do_lower_case=False)
    _edit_json(cased / "sentence_bert_config.json", do_lower_case=True)  # as sentence-transformers 2.x wrote it
    model = SentenceTransformer(str(cased), device="cpu")  # reads the flag and lowercases (its current version too)
    texts = ["The QUICK Brown Fox", "Hello World"]
    got = Embedder.load(str(cased), device="cpu").embed_texts(texts)
    np.testing.assert_allclose(got, _reference(model, texts), atol=2e-5)
    _edit_json(cased / "sentence_bert_config.json", do_lower_case=False)
    as_cased = Embedder.load(str(cased), device="cpu").embed_texts(texts)
    assert ((got * as_cased).sum(1) < 0.99).any(), "the tokenizer lowercases anyway: this test proves nothing"


def test_dims_are_checked_against_the_dense_output_before_planning(tmp_path: Path, minilm_dir: Path) -> None:
    """A Dense module that widens the vectors (384 -> 512, as EmbeddingGemma's 768 -> 3072 does): `--dims 448`
    fits it, though not the hidden size the early check looked at; `--dims 600` is refused before planning."""
    model = _save(minilm_dir, tmp_path / "model", models.Pooling(384, "mean"),
                  models.Dense(384, 512, bias=True, activation_function=torch.nn.Identity()))
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    args = ["run", "--input", str(corpus), "--model", str(tmp_path / "model"), *FAST]
    refused = invoke(*args, "--output", str(tmp_path / "refused"), "--dims", "600")
    assert refused.exit_code != 0 and "larger than the model's 512" in refused.output, refused.output
    assert not (tmp_path / "refused" / "manifest.json").exists()
    run_ok(*args, "--output", str(tmp_path / "out"), "--dims", "448")
    table = read_vectors(tmp_path / "out")
    order = [int(i[1:]) for i in table.column("id").to_pylist()]
    np.testing.assert_allclose(embeddings(table), _reference(model, TEXTS, 448)[order], atol=2e-5)


def test_embeddinggemma_shape_bidirectional_gemma3_with_two_dense_modules(tmp_path: Path,
                                                                          qwen_tokenizer_noeos_dir: Path) -> None:
    """EmbeddingGemma's layout at a tiny size: a Gemma3 text model attending both ways (with a sliding window
    shorter than the texts), mean pooling, Dense 64 -> 256 -> 64 without bias, Normalize; padded batches of texts
    of different lengths give sentence-transformers' vectors."""
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_noeos_dir))
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                           sliding_window=8, use_bidirectional_attention=True, pad_token_id=tok.pad_token_id or 0)
    torch.manual_seed(0)
    base = tmp_path / "gemma"
    Gemma3TextModel(cfg).eval().save_pretrained(base)
    tok.save_pretrained(base)
    model = SentenceTransformer(modules=[
        models.Transformer(str(base), max_seq_length=256), models.Pooling(64, "mean"),
        models.Dense(64, 256, bias=False, activation_function=torch.nn.Identity()),
        models.Dense(256, 64, bias=False, activation_function=torch.nn.Identity()), models.Normalize()],
        device="cpu")
    model.save(str(tmp_path / "model"))
    texts = ["The quick brown fox jumps over the lazy dog and keeps running far away " * 2, "Hello",
             "a b c d e f g h i j k"]
    emb = Embedder.load(str(tmp_path / "model"), device="cpu")
    assert (emb.info.pooling, emb.info.width) == ("mean", 64)
    np.testing.assert_allclose(emb.embed_texts(texts), _reference(model, texts), atol=2e-5)


def test_a_dense_module_overwritten_in_place_leaves_a_loaded_head_alone(tmp_path: Path, minilm_dir: Path) -> None:
    """The Dense head's weights are read with safetensors' ``load_file``, whose tensors are views of the file's
    memory map: a new revision copied over it (``cp``) changed a running server's head, and its vectors."""
    import shutil

    _dense_tanh(minilm_dir, tmp_path / "model")
    emb = Embedder.load(str(tmp_path / "model"), device="cpu")
    before = emb.embed_texts(TEXTS)
    torch.manual_seed(1)  # the same shapes, other weights
    (tmp_path / "revision").mkdir()
    models.Dense(384, 64, bias=True, activation_function=torch.nn.Tanh()).save(str(tmp_path / "revision"))
    dense = tmp_path / "model" / "2_Dense" / "model.safetensors"
    shutil.copyfile(tmp_path / "revision" / "model.safetensors", dense)
    assert np.array_equal(emb.embed_texts(TEXTS), before)
    assert not np.allclose(Embedder.load(str(tmp_path / "model"), device="cpu").embed_texts(TEXTS), before, atol=1e-3)


def test_a_model_that_names_no_pooling_gets_a_warning_naming_the_guess(tmp_path: Path, minilm_dir: Path,
                                                                        caplog) -> None:
    """Without a sentence-transformers Pooling config the pooling is a guess from the architecture (mean for an
    encoder, last token for a decoder); a wrong guess gives other vectors and no error, so it is said."""
    import logging
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(minilm_dir, bare, ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    with caplog.at_level(logging.WARNING, logger="pipeline.model.encoder"):
        Embedder.load(str(bare), device="cpu")
    assert "names no pooling" in caplog.text and "mean pooling" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.model.encoder"):
        Embedder.load(str(minilm_dir), device="cpu")
    assert "names no pooling" not in caplog.text
