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
    # starting over with it is allowed, and its record replaces the old one: the first forward is now the stranger
    run_ok(*embed_args([corpus], out, "--shard-size", "4", "--overwrite"))
    monkeypatch.setattr(Embedder, "embed_encoded", real)
    write_jsonl(corpus, make_docs(13, seed=21))
    again = invoke(*embed_args([corpus], out, "--shard-size", "4"))
    assert again.exit_code != 0 and "embeds the check texts differently" in again.output, again.output


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


def test_workers_with_other_models_on_a_first_run(tmp_path, tiny_qwen3_dir, qwen_tokenizer_dir, caplog):
    """Two workers of one job's first run, on nodes with different copies of one model path: no vector exists yet
    for the file digests to compare. The first to start records the check texts; another model is refused while
    the first holds a claim, and where it came before any claim (its record replaced) the first worker is refused
    at its next part instead. With vectors kept, a different model is always refused."""
    import logging

    from pipeline.bench.synthetic import make_qwen3_embedding_dir

    other_dir = make_qwen3_embedding_dir(tmp_path / "other", "tiny", tokenizer_dir=qwen_tokenizer_dir,
                                         append_eos=True, seed=1)  # the same shapes, other weights
    out, fp = tmp_path / "out", "f" * 64
    first, other = Embedder.load(str(tiny_qwen3_dir), device="cpu"), Embedder.load(str(other_dir), device="cpu")
    a = canary.check_canary(out, fp, first, has_vectors=False, lease_s=30)
    claim = out / "shards" / "000000.claim"
    claim.parent.mkdir(parents=True)
    claim.write_text("{}")  # the first worker's live claim
    with pytest.raises(ManifestMismatch, match=r"cosine -?\d\.\d+.*another worker of this job, still running"):
        canary.check_canary(out, fp, other, has_vectors=False, lease_s=30)
    canary.still_current(a)
    claim.unlink()  # the other worker came before the first one's first claim: the record is replaced ...
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        b = canary.check_canary(out, fp, other, has_vectors=False, lease_s=30)
    assert "recorded anew" in caplog.text
    with pytest.raises(ManifestMismatch, match="record changed while this worker ran"):
        canary.still_current(a)  # ... and the first worker writes no part
    canary.still_current(b)
    with pytest.raises(ManifestMismatch, match="--overwrite"):
        canary.check_canary(out, fp, first, has_vectors=True, lease_s=30)
    assert canary.check_canary(out, fp, Embedder.load(str(other_dir), device="cpu"), True, 30).digest == b.digest
    # other settings (another fingerprint) have their own record; an output made before records: a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        canary.check_canary(out, "e" * 64, first, has_vectors=True, lease_s=30)
    assert "could not be compared" in caplog.text
    # a record that cannot be read is named, not a traceback
    canary.canary_path(out, fp).write_bytes(b"not an array")
    with pytest.raises(ManifestMismatch, match="cannot be read"):
        canary.check_canary(out, fp, first, has_vectors=True, lease_s=30)
    assert not list((out / canary.FOLDER).glob(".*"))  # no temporary file left


def test_a_record_replaced_mid_run_stops_the_worker_before_its_part(tmp_path, minilm_dir):
    """The worker accepted the record; another worker with another model replaced it before any vector was kept:
    this worker's first part is not written (``still_current`` in the commit), so the two models never mix."""
    from pipeline.job.config import make_config
    from pipeline.job.runner import run_job

    corpus = write_jsonl(tmp_path / "in.jsonl", make_docs(12, seed=5))
    cfg = make_config({"input": (str(corpus),), "output": str(tmp_path / "out"), "model": str(minilm_dir),
                       "device": "cpu", "batch_tokens": 2048, "shard_size": 4, "quiet": True})
    embedder = Embedder.from_options(cfg.model_options())
    real = embedder.embed_encoded
    calls: list[int] = []

    def replaced_during_first_shard(enc, **kw):
        vectors = real(enc, **kw)
        calls.append(1)
        if len(calls) == 2:  # the first shard (the first call embeds the check texts)
            (record,) = (tmp_path / "out" / canary.FOLDER).glob("*.npy")
            np.save(record, -np.load(record))
        return vectors

    embedder.embed_encoded = replaced_during_first_shard
    with pytest.raises(ManifestMismatch, match="record changed while this worker ran"):
        run_job(cfg, embedder=embedder)
    assert not done_markers(tmp_path / "out") and not list((tmp_path / "out" / "parts").glob("part-*"))


def test_the_query_side_with_another_forward_is_refused(tmp_path, minilm_dir, monkeypatch):
    """`search`/`serve` in a process whose libraries compute another forward than the run's (same model files):
    its queries would not match the vectors, silently. The query embedder now embeds the check texts with the
    job's document framing and refuses, naming the versions the run used."""
    from pipeline.errors import PipelineError
    from pipeline.job.record import query_embedder

    _, out, _ = _night_two(tmp_path)
    query_embedder(out)  # the same forward: fine
    run_ok("index", "build", str(out))
    real = Embedder.embed_encoded
    monkeypatch.setattr(Embedder, "embed_encoded", lambda self, enc, **kw: np.roll(real(self, enc, **kw), 1, axis=1))
    with pytest.raises(PipelineError, match="embeds the check texts differently.*The run used embed-corpus"):
        query_embedder(out)
    got = invoke("search", str(out), "river stone", "-k", "3")
    assert got.exit_code != 0 and "check texts" in got.output, got.output


def test_the_query_side_of_a_chunked_job_frames_the_check_texts_as_the_run(tmp_path, minilm_dir):
    """`--long-docs chunk` with a max length shorter than the check texts: the run embedded their first chunks,
    the query side truncated them (cosine 0.954) and refused to search, blaming the library versions."""
    from pipeline.job.record import query_embedder

    out = tmp_path / "out"
    write_jsonl(tmp_path / "c" / "a.jsonl", make_docs(20, seed=1))
    run_ok(*embed_args([tmp_path / "c"], out, "--long-docs", "chunk", "--max-length", "16", "--chunk-tokens", "12",
                       "--chunk-overlap", "3"))
    query_embedder(out, device="cpu")


def test_an_output_made_before_records_is_checked_against_its_kept_vectors(tmp_path, minilm_dir, monkeypatch,
                                                                            caplog):
    """An output whose vectors were made before check texts were recorded: its next run would have taken whatever
    model answers now as the reference. Now kept documents whose input is unchanged are embedded again first."""
    import logging
    import shutil

    kept, edited = make_docs(12, seed=22, prefix="a"), make_docs(12, seed=23, prefix="b")
    write_jsonl(tmp_path / "in" / "a.jsonl", kept)
    write_jsonl(tmp_path / "in" / "b.jsonl", edited)
    out = tmp_path / "out"
    args = embed_args([tmp_path / "in"], out, "--shard-size", "4")
    run_ok(*args)
    shutil.rmtree(out / canary.FOLDER)  # as an output made before the records
    edited[0] = {**edited[0], "text": "edited after the first night"}
    write_jsonl(tmp_path / "in" / "b.jsonl", edited)
    real = Embedder.embed_encoded
    monkeypatch.setattr(Embedder, "embed_encoded", lambda self, enc, **kw: np.roll(real(self, enc, **kw), 1, axis=1))
    got = invoke(*args)
    assert got.exit_code != 0 and "documents the output kept differently from their vectors" in got.output, \
        got.output
    assert live_version(out) == 1 and not list((out / canary.FOLDER).glob("*.npy"))  # no record of the stranger
    monkeypatch.setattr(Embedder, "embed_encoded", real)
    run_ok(*args)
    assert live_version(out) == 2 and len(list((out / canary.FOLDER).glob("*.npy"))) == 1
    log = "".join(p.read_text() for p in (out / "logs").glob("run-*.log"))
    assert f"check texts recorded; {canary.SAMPLE} kept documents embed as their vectors" in log
    # where no kept document's input is unchanged, the record is made with a warning
    shutil.rmtree(out / canary.FOLDER)
    for name, docs in (("a", kept), ("b", edited)):
        docs[1] = {**docs[1], "text": f"edited after the second night ({name})"}
        write_jsonl(tmp_path / "in" / f"{name}.jsonl", docs)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        run_ok(*args)
    assert "could not be compared with it" in caplog.text
