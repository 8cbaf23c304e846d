"""The ``embed-corpus`` command line: job files and flags, help, the output schema, chunking, and job.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from helpers import (
    DIMS,
    MODEL,
    REPO,
    WORDS,
    assert_ids_once,
    assert_same_vectors,
    embed_args,
    embeddings,
    invoke,
    make_docs,
    read_vectors,
    run_ok,
    subprocess_env,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: see conftest


LONG_WORDS = 300  # well over MiniLM's 256-token limit


@pytest.fixture(scope="module")
def hf_minilm(minilm_dir):
    """The packaged MiniLM loaded directly with transformers, for independent reference vectors."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()

    def embed_ids(ids: list[int]) -> np.ndarray:
        """Mean-pooled, normalised vector of one framed sequence (as sentence-transformers computes it)."""
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        vec = hidden.mean(0)
        return (vec / vec.norm()).numpy()

    return tok, embed_ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    """30 short documents and one longer than the model's limit."""
    root = tmp_path_factory.mktemp("cli_corpus") / "corpus"
    docs = make_docs(30, seed=21)
    docs.append({"id": "long", "title": "Long", "text": " ".join((WORDS * 20)[:LONG_WORDS])})
    write_jsonl(root / "c.jsonl", docs)
    return root, docs


@pytest.fixture(scope="module")
def default_run(corpus, minilm_dir, tmp_path_factory) -> Path:
    """The corpus embedded with default settings (float32, all dims)."""
    out = tmp_path_factory.mktemp("cli_default") / "out"
    run_ok(*embed_args([corpus[0]], out))
    return out


# ------------------------------------------------------------------------------------------ help and entry


def test_help():
    result = run_ok("--help")
    assert "run" in result.output and "status" in result.output
    result = run_ok("run", "--help")
    for flag in ("--input", "--output", "--model", "--text-field", "--id-field", "--dims", "--max-length",
                 "--batch-tokens", "--shard-size", "--instruction", "--dtype", "--device", "--keep",
                 "--on-bad-record", "--long-docs", "--chunk-tokens", "--chunk-overlap", "--overwrite"):
        assert flag in result.output, flag
    assert "--json" in run_ok("status", "--help").output


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512"),
    ({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}, None),  # torch's newer name: left to it alone
])
def test_allocator_setting_defaults_to_expandable_segments_unless_the_user_set_one(monkeypatch, env, expected):
    import os

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_ok("status", "--help")  # the group's set-up runs before any sub-command
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected


def test_console_script_entry_point():
    exe = shutil.which("embed-corpus", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the embed-corpus console script is not installed next to this interpreter")
    done = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 0 and "--batch-tokens" in done.stdout


def test_flags_are_validated_with_the_key_named(tmp_path):
    base = ["run", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", MODEL]
    for extra, needle in [(["--dims", "0"], "dims"), (["--chunk-tokens", "16", "--chunk-overlap", "16"],
                                                      "chunk_overlap"), (["--shard-size", "-3"], "shard_size")]:
        result = invoke(*base, *extra)
        assert result.exit_code == 2 and needle in result.output, result.output
    result = invoke("run", "--output", str(tmp_path / "o"), "--model", MODEL)
    assert result.exit_code == 2 and "input" in result.output
    result = invoke(*base, "--dtype", "int8")
    assert result.exit_code == 2 and "int8" in result.output


# ---------------------------------------------------------------------------------------------- job files


def write_job(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_job_file_keys_with_dashes_or_underscores_and_flags_win(tmp_path, minilm_dir, monkeypatch):
    docs = make_docs(32, seed=22)
    write_jsonl(tmp_path / "corpus" / "c.jsonl", docs)
    monkeypatch.chdir(tmp_path)  # relative paths in a job file are taken from the current directory
    job = write_job(tmp_path / "job.yaml", {
        "input": "corpus",  # a string or a list
        "output": "out",
        "model": MODEL,
        "shard-size": 8,
        "batch_tokens": 2048,
        "text-field": "{title} {text}",
        "max_length": 48,
        "device": "cpu",
        "quiet": True,
    })
    run_ok("run", job)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["plan"]["shard_size"] == 8 and len(manifest["shards"]) == 4
    assert manifest["settings"]["text_field"] == "{title} {text}"
    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert record["config"]["batch_tokens"] == 2048 and record["model"]["max_length"] == 48
    assert_ids_once(read_vectors(tmp_path / "out"), [d["id"] for d in docs])

    # flags override the job file
    run_ok("run", job, "--output", "out2", "--dims", "64", "--shard-size", "20", "--text-field", "text")
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert manifest["plan"]["shard_size"] == 20 and manifest["settings"]["text_field"] == "text"
    assert embeddings(read_vectors(tmp_path / "out2")).shape == (len(docs), 64)


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"bach-size": 3}, ["unknown key", "bach-size"]),
        ({"dims": "many"}, ["dims", "many"]),
        ({"long-docs": "sometimes"}, ["long_docs", "sometimes"]),
        ({"chunk_overlap": 600}, ["chunk_overlap"]),
        # YAML read `text-field: {body}` as a mapping: a traceback, exit 1; `id-field: [id]` named no key
        ({"text-field": {"body": None}}, ["text-field", "quote a template"]),
        ({"id-field": ["id"]}, ["id-field", "must be a string"]),
    ],
)
def test_bad_job_file_is_a_clear_error(tmp_path, values, needles):
    job = write_job(tmp_path / "job.yaml", {"input": str(tmp_path), "output": str(tmp_path / "o"), "model": MODEL,
                                            **values})
    result = invoke("run", job)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output


def test_unreadable_job_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("input: [unclosed\n")
    result = invoke("run", tmp_path / "bad.yaml")
    assert result.exit_code == 2 and "bad.yaml" in result.output
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    result = invoke("run", tmp_path / "list.yaml")
    assert result.exit_code == 2 and "mapping" in result.output


def test_shipped_job_files_are_valid(tmp_path, monkeypatch):
    """Every shipped job file goes through the validation a run does (keys, values, the index options), its
    inputs exist (run from the repository root, as the README does) and a packaged model resolves."""
    from pipeline.job.config import build_config
    from pipeline.model.encoder import resolve_model_path

    monkeypatch.chdir(REPO)
    jobs = sorted((REPO / "jobs").rglob("*.yaml"))
    assert {j.name for j in jobs} >= {"demo.yaml", "qwen3-embedding-4b.yaml"}
    for job in jobs:
        flags = {}  # input and output filled in where the file leaves them to the command line
        values = yaml.safe_load(job.read_text()) or {}
        if not (values.get("input") or values.get("inputs")):
            flags["input"] = (str(tmp_path),)
        if not values.get("output"):
            flags["output"] = str(tmp_path / job.stem)
        cfg = build_config(str(job), flags)  # raises ConfigError on a bad key or value
        for path in cfg.input:
            assert Path(path).exists(), f"{job.name}: input {path} does not exist"
        if cfg.model.startswith("pkg:"):
            assert Path(resolve_model_path(cfg.model), "config.json").is_file(), f"{job.name}: {cfg.model}"
    demo = build_config(str(REPO / "jobs" / "demo.yaml"), {})
    assert demo.model == MODEL and demo.index == {} and demo.text_field == "{title} {text}"


# ------------------------------------------------------------------------------------------ output schema


def test_output_schema_and_vectors(tmp_path, corpus, hf_minilm):
    corpus_dir, docs = corpus
    out = tmp_path / "out"
    run_ok(*embed_args([corpus_dir], out, "--max-length", "32", "--keep", "title"))
    table = read_vectors(out)
    schema = table.schema
    assert schema.field("id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), DIMS)
    assert schema.field("n_tokens").type == pa.int32()
    assert schema.field("truncated").type == pa.bool_()
    assert schema.field("title").type == pa.string()
    assert_ids_once(table, [d["id"] for d in docs])

    tok, embed_ids = hf_minilm
    by_id = {d["id"]: d for d in docs}
    vecs = embeddings(table)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    for row, doc_id in enumerate(table.column("id").to_pylist()):
        content = tok(by_id[doc_id]["text"], add_special_tokens=False)["input_ids"]
        ids = [tok.cls_token_id, *content[:30], tok.sep_token_id]
        assert table.column("n_tokens")[row].as_py() == len(ids)
        assert table.column("truncated")[row].as_py() == (len(content) > 30)
        assert table.column("title")[row].as_py() == by_id[doc_id]["title"]
        ref = embed_ids(ids)
        assert float(vecs[row] @ ref) >= 0.99999, doc_id
    assert table.filter(table.column("truncated")).column("id").to_pylist() == ["long"]


def test_float16_output(tmp_path, corpus, default_run):
    corpus_dir, docs = corpus
    run_ok(*embed_args([corpus_dir], tmp_path / "f16", "--dtype", "float16"))
    table = read_vectors(tmp_path / "f16")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), DIMS)
    assert_same_vectors(table, read_vectors(default_run), min_cos=0.9999)


def test_dims_cut_renormalise_and_job_record(tmp_path, corpus, default_run):
    corpus_dir, docs = corpus
    out = tmp_path / "cut"
    run_ok(*embed_args([corpus_dir], out, "--dims", "96"))
    full, cut = embeddings(read_vectors(default_run)), embeddings(read_vectors(out))
    assert cut.shape == (len(docs), 96)
    want = full[:, :96] / np.linalg.norm(full[:, :96], axis=1, keepdims=True)
    assert np.allclose(cut, want, atol=1e-5)

    # job.json says how the vectors were made, so that queries can be embedded the same way
    record = json.loads((out / "job.json").read_text())
    model = record["model"]
    assert model["model"] == MODEL and model["dims"] == 96 and model["pooling"] == "mean"
    assert model["prompt"] == "" and model["normalize"] is True and model["max_length"] == 256
    assert model["prefix"] and model["suffix"]  # [CLS] ... [SEP]
    assert record["config"]["model"] == MODEL and record["config"]["dims"] == 96
    assert record["fingerprint"] == json.loads((out / "manifest.json").read_text())["fingerprint"]


def test_chunked_long_documents(tmp_path, corpus, hf_minilm):
    corpus_dir, docs = corpus
    out = tmp_path / "out"
    run_ok(*embed_args([corpus_dir], out, "--long-docs", "chunk", "--chunk-tokens", "64", "--chunk-overlap", "16"))
    table = read_vectors(out)
    for name, typ in [("doc_id", pa.string()), ("chunk", pa.int32()), ("token_start", pa.int32()),
                      ("token_end", pa.int32())]:
        assert table.schema.field(name).type == typ
    assert_ids_once(table, [f"{d['id']}#0" for d in docs[:-1]] + [f"long#{k}" for k in range(
        sum(1 for d in table.column("doc_id").to_pylist() if d == "long"))])

    tok, embed_ids = hf_minilm
    body = tok(docs[-1]["text"], add_special_tokens=False)["input_ids"]
    assert len(body) > 254
    long = table.filter(pa.compute.equal(table.column("doc_id"), "long")).sort_by("chunk")
    chunks = long.column("chunk").to_pylist()
    starts, ends = long.column("token_start").to_pylist(), long.column("token_end").to_pylist()
    assert len(chunks) >= 5 and chunks == list(range(len(chunks)))
    assert starts == [48 * k for k in range(len(chunks))]
    assert all(e - s <= 64 for s, e in zip(starts, ends, strict=True))
    assert all(e_prev - s_next == 16 for e_prev, s_next in zip(ends, starts[1:], strict=False))  # overlapping
    assert ends[-1] == len(body) and ends[-2] < len(body)  # the chunks cover the document, and no more
    assert long.column("n_tokens").to_pylist() == [e - s + 2 for s, e in zip(starts, ends, strict=True)]
    assert not any(long.column("truncated").to_pylist())
    # each chunk's vector is the model's vector of exactly that span of tokens
    vecs = embeddings(long)
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        ref = embed_ids([tok.cls_token_id, *body[s:e], tok.sep_token_id])
        assert float(vecs[k] @ ref) >= 0.99999, k
    # short documents are one chunk covering all of their tokens
    short = table.filter(pa.compute.not_equal(table.column("doc_id"), "long"))
    assert set(short.column("chunk").to_pylist()) == {0}
    assert all(s == 0 for s in short.column("token_start").to_pylist())


def test_job_record_keeps_the_instruction(tmp_path, corpus):
    corpus_dir, _ = corpus
    out = tmp_path / "out"
    run_ok(*embed_args([corpus_dir], out, "--instruction", "Find the passage"))
    record = json.loads((out / "job.json").read_text())
    assert record["model"]["prompt"] == "Instruct: Find the passage\nQuery:"
    assert record["config"]["instruction"] == "Find the passage"


@pytest.mark.parametrize("cuda", [True, False])
def test_run_on_a_gpu_ends_without_teardown_and_keeps_its_exit_code(tmp_path, monkeypatch, cuda):
    """``embed-corpus run`` in its own process on a GPU ends through ``fast_exit`` with the command's exit code
    (0, or a failure's), once all is written; without CUDA, or called from a program, it returns as before."""
    import pipeline.cli
    import pipeline.cli.run as run_cli

    ended: list[int] = []

    def fake_exit(code: int) -> None:
        ended.append(code)
        raise SystemExit(code)  # what the process would exit with

    monkeypatch.setattr(run_cli, "fast_exit", fake_exit)
    monkeypatch.setattr(run_cli, "_cuda_used", lambda: cuda)
    corpus = tmp_path / "in.jsonl"
    write_jsonl(corpus, make_docs(3))
    missing = ("run", "--input", str(tmp_path / "missing.jsonl"), "--model", "x", "--output")
    monkeypatch.setattr(pipeline.cli, "RUN_PROCESS", False)  # a program calling the command: no fast exit
    assert invoke(*missing, str(tmp_path / "o0")).exit_code == 1 and ended == []
    monkeypatch.setattr(pipeline.cli, "RUN_PROCESS", True)
    bad = invoke(*missing, str(tmp_path / "o1"))
    assert bad.exit_code == 1 and "error: model 'x'" in bad.output
    assert ended == ([1] if cuda else [])
    ok = invoke(*embed_args([corpus], tmp_path / "o2"))
    assert ok.exit_code == 0 and read_vectors(tmp_path / "o2").num_rows == 3
    assert ended == ([1, 0] if cuda else [])


def test_exit_code_of_a_call():
    from pipeline.util import exit_code

    def ends(code):
        raise SystemExit(code)

    assert exit_code(lambda: None) == 0
    assert [exit_code(ends, c) for c in (None, 0, 75, 74, "a message")] == [0, 0, 75, 74, 1]
    with pytest.raises(ValueError):
        exit_code(int, "not a number")  # other errors are not exit codes
