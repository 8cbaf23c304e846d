"""Check texts (``job/canary.py``): a model that embeds differently from the one an output was started with is
refused before it writes a vector, where file digests cannot see the change (a server's model, the libraries that
run the forward, another node's copy of the model on a first run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import done_markers, embed_args, embeddings, invoke, make_docs, read_vectors, run_ok, write_jsonl

from pipeline.errors import ManifestMismatch
from pipeline.job import canary
from pipeline.job.versions import live_version
from pipeline.model.encoder import Embedder

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _night_two(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    docs = make_docs(12, seed=21)
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    out = tmp_path / "out"
    run_ok(*embed_args([corpus], out, "--shard-size", "4"))
    assert len(list((out / canary.FOLDER).glob("*.npy"))) == 1
    docs[3] = {**docs[3], "text": "a text edited after the first night"}
    write_jsonl(corpus, docs)
    return corpus, out, docs


def test_a_forward_that_changed_with_the_same_files_is_refused_not_mixed(tmp_path, minilm_dir, monkeypatch):
    """The same model files, but the forward computes other vectors (a torch or transformers upgrade, a server's
    model swapped under the same name): the file digests agree, so the nightly run kept yesterday's vectors for
    eleven documents beside one of the new forward's, exit 0. Now the run is refused before any vector."""
    corpus, out, _ = _night_two(tmp_path)
    before = read_vectors(out)
    real = Embedder.embed_encoded

    def other_forward(self, enc, **kw):
        v = real(self, enc, **kw)
        return np.roll(v, 1, axis=1)  # the same norms, other directions

    monkeypatch.setattr(Embedder, "embed_encoded", other_forward)
    got = invoke(*embed_args([corpus], out, "--shard-size", "4"))
    assert got.exit_code != 0, got.output
    assert "embeds the check texts differently" in got.output and "--overwrite" in got.output, got.output
    assert live_version(out) == 1 and not done_markers(out)  # nothing of the new plan was written
    assert read_vectors(out).equals(before)
    # starting over with it is allowed, and its record replaces the old one
    run_ok(*embed_args([corpus], out, "--shard-size", "4", "--overwrite"))
    monkeypatch.setattr(Embedder, "embed_encoded", real)
    refused = invoke(*embed_args([corpus], tmp_path / "elsewhere", "--shard-size", "4"))
    assert refused.exit_code == 0  # another output: its own record


def test_the_same_model_again_passes_and_edits_are_embedded(tmp_path, minilm_dir):
    corpus, out, docs = _night_two(tmp_path)

    def by_id() -> dict[str, np.ndarray]:
        t = read_vectors(out)
        return dict(zip(t.column("id").to_pylist(), embeddings(t), strict=True))

    before = by_id()
    run_ok(*embed_args([corpus], out, "--shard-size", "4"))
    after = by_id()
    assert live_version(out) == 2 and after.keys() == before.keys()
    assert [k for k in after if not np.allclose(after[k], before[k])] == [docs[3]["id"]]
    log = "".join(p.read_text() for p in (out / "logs").glob("run-*.log"))
    assert "check texts: cosine" in log


def test_a_worker_with_another_copy_of_the_model_is_refused_before_any_vector(tmp_path, minilm_dir,
                                                                                 tiny_qwen3_dir):
    """Two workers of one job's first run, on nodes with different models under one path: no vector exists yet,
    so nothing recorded could tell them apart; the first to start records the check texts, the other is refused."""
    out = tmp_path / "out"
    first = Embedder.load(str(minilm_dir), device="cpu")
    assert canary.check_canary(out, "f" * 64, first, has_vectors=False) is None
    with pytest.raises(ManifestMismatch, match="another worker of this job runs another copy"):
        canary.check_canary(out, "f" * 64, Embedder.load(str(tiny_qwen3_dir), device="cpu"), has_vectors=False)
    assert canary.check_canary(out, "f" * 64, first, has_vectors=True) > 0.99999
    # other settings (another fingerprint) have their own record
    assert canary.check_canary(out, "e" * 64, Embedder.load(str(tiny_qwen3_dir), device="cpu"), False) is None
    assert not list((out / canary.FOLDER).glob(".*"))  # no temporary file left
