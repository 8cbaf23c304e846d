"""A model name whose files changed between runs: the job refuses to mix its vectors, and the query side refuses
to embed queries with it (``model/identity.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, invoke, make_docs, run_ok, write_jsonl

from pipeline.errors import PipelineError
from pipeline.model import identity
from pipeline.model.identity import changed_files, file_digest, model_files

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "model.safetensors":
            (dst / entry.name).symlink_to(entry)
    shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    return dst


def _update_weights(model: Path) -> None:
    """A new revision of the model in place: the word embeddings trained further."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if "word_embeddings" in k)
    gen = torch.Generator().manual_seed(0)
    weights[name] = weights[name] + 0.5 * weights[name].std() * torch.randn(weights[name].shape, generator=gen)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})


def _run_args(corpus: Path, out: Path, model: Path) -> list[str]:
    return ["run", "--input", str(corpus), "--output", str(out), "--model", str(model), *FAST]


def test_a_model_updated_in_place_is_refused_not_mixed(tmp_path, minilm_dir):
    """`--model /models/current` whose weights changed between two nightly runs: the rerun kept yesterday's vectors
    for unchanged documents beside the new model's for the edited one (min cosine 0.959 to a fresh run), exit 0.
    Now it is refused, naming the file, and nothing is committed; the query side refuses the same way."""
    from pipeline.job.record import query_embedder
    from pipeline.job.versions import live_version

    model = _model_copy(minilm_dir, tmp_path / "models" / "current")
    docs = make_docs(8, seed=14)
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    out = tmp_path / "out"
    run_ok(*_run_args(corpus, out, model))
    query_embedder(out)  # the same files: fine

    _update_weights(model)
    docs[0] = {**docs[0], "text": "an edited text after the model update"}
    write_jsonl(corpus, docs)
    result = invoke(*_run_args(corpus, out, model))
    assert result.exit_code != 0 and "model.safetensors" in result.output and "changed" in result.output, \
        result.output
    assert live_version(out) == 1
    with pytest.raises(PipelineError, match="model.safetensors"):
        query_embedder(out)
    # what the message offers: --overwrite embeds everything with the new model
    run_ok(*_run_args(corpus, out, model), "--overwrite")


def test_kept_vectors_framed_otherwise_are_refused_not_mixed(tmp_path, minilm_dir):
    """The same settings and model files frame texts otherwise under this version than the record says (here: an
    older version cut --max-length 400 to MiniLM's 256; this one embeds 400 tokens): a rerun that would add
    400-token vectors beside 256-token ones is refused, naming what differs."""
    import json

    docs = make_docs(6, seed=15)
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    out = tmp_path / "out"
    args = [*_run_args(corpus, out, minilm_dir), "--max-length", "400"]
    run_ok(*args)
    record = json.loads((out / "job.json").read_text())
    assert record["model"]["max_length"] == 400
    record["model"]["max_length"] = 256  # what the older version recorded for the same settings
    (out / "job.json").write_text(json.dumps(record))
    write_jsonl(corpus, [*docs, {"id": "new", "title": "T", "text": "one more document"}])
    result = invoke(*args)
    assert result.exit_code != 0 and "max_length 256 -> 400" in result.output, result.output
    run_ok(*args, "--overwrite")


def test_the_same_model_copied_elsewhere_is_the_same_model(tmp_path, minilm_dir):
    a = model_files(str(minilm_dir))
    copy = _model_copy(minilm_dir, tmp_path / "copy")
    assert a and a == model_files(str(copy)) and {"model.safetensors", "config.json", "1_Pooling/config.json"} <= set(a)
    # other tools' files beside it are not this model's: an export, checkpoints, a .bin where safetensors load
    (copy / "onnx").mkdir()
    (copy / "onnx" / "model.onnx").write_bytes(b"onnx")
    (copy / "checkpoint-100").mkdir()
    (copy / "checkpoint-100" / "model.safetensors").write_bytes(b"x")
    (copy / "pytorch_model.bin").write_bytes(b"bin")
    (copy / "README.md").write_text("notes")
    (copy / "loop").symlink_to(copy)  # a link back to the folder is not followed
    assert model_files(str(copy)) == a
    (copy / "tokenizer_config.json").unlink()
    shutil.copyfile(minilm_dir / "tokenizer_config.json", copy / "tokenizer_config.json")
    assert model_files(str(copy)) == a  # the same bytes
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    assert changed_files(a, model_files(str(copy))) == ["tokenizer_config.json"]


def test_a_large_file_is_sampled_and_a_change_anywhere_in_it_is_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "FULL_BYTES", 1 << 16)
    monkeypatch.setattr(identity, "EDGE_BYTES", 1 << 10)
    monkeypatch.setattr(identity, "SAMPLES", 16)
    monkeypatch.setattr(identity, "SAMPLE_BYTES", 1 << 10)
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.tobytes())
    before = file_digest(path)
    changed = 0
    # any change spanning 1/SAMPLES of the file is seen, wherever it is (here 2/16: one region at a time)
    for at in np.linspace(0, len(data) - 1, 64).astype(int):
        edited = data.copy()
        edited[max(0, at - (1 << 16)) : at + (1 << 16)] ^= 1
        path.write_bytes(edited.tobytes())
        changed += file_digest(path) != before
    assert changed == 64
    path.write_bytes(data.tobytes())
    assert file_digest(path) == before
    assert changed_files({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]


def test_a_checkpoint_overwritten_in_place_leaves_a_loaded_embedder_alone(tmp_path, minilm_dir):
    """transformers memory-maps a safetensors checkpoint and keeps a CPU tensor of its stored dtype as the map: a
    new revision written over the same file changed the weights of a running server or CPU job under it, after
    its digests were checked, and its vectors with them (exit 0). The loaded weights are the process's own."""
    from pipeline.model.encoder import Embedder

    model = _model_copy(minilm_dir, tmp_path / "model")
    texts = ["a first document", "and another one"]
    emb = Embedder.load(str(model), device="cpu")
    before = emb.embed_texts(texts)
    revision = _model_copy(minilm_dir, tmp_path / "revision")
    _update_weights(revision)
    weights = model / "model.safetensors"
    inode = weights.stat().st_ino
    shutil.copyfile(revision / "model.safetensors", weights)  # as `cp` writes it: over the same file
    assert weights.stat().st_ino == inode
    assert np.array_equal(emb.embed_texts(texts), before)
    fresh = Embedder.load(str(model), device="cpu").embed_texts(texts)
    assert not np.allclose(fresh, before, atol=1e-3)  # the overwrite did change what a load reads
