"""Search and eval end to end: self-retrieval with the packaged model, the job's query framing on a tiny Qwen3,
the JSON shape, reranked search, BEIR-style eval, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import INSTRUCTION, REPO, SENTENCES, brute_force_recall, reference_rerank_scores, subprocess_env

from pipeline.cli.main import main
from pipeline.errors import PipelineError
from pipeline.index.search import Searcher
from pipeline.index.store import build_index
from pipeline.index.update import update_index
from pipeline.job.config import make_config
from pipeline.job.runner import run_job

SAMPLE = REPO / "data" / "sample" / "pydoc.parquet"


def _run(tmp: Path, inputs: list[Path], model: str, **extra) -> Path:
    out = tmp / "out"
    cfg = make_config({"input": tuple(str(p) for p in inputs), "output": str(out), "model": model,
                       "device": "cpu", "batch_tokens": 2048, "quiet": True, **extra})
    run_job(cfg)
    return out


@pytest.fixture(scope="module")
def minilm_job(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> tuple[Path, dict[str, str]]:
    """The sample corpus (or a fallback of real sentences) embedded with MiniLM, with a built index."""
    tmp = tmp_path_factory.mktemp("minilm_search")
    if SAMPLE.exists():
        corpus = SAMPLE
        table = pq.read_table(SAMPLE, columns=["id", "text"])
        texts = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    else:
        corpus = tmp / "corpus.jsonl"
        texts = {f"doc{i}": t for i, t in enumerate(SENTENCES)}
        corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    out = _run(tmp, [corpus], str(minilm_dir), shard_size=25)
    build_index(out)
    return out, texts


@pytest.fixture(scope="module")
def qwen_job(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_dir: Path) -> tuple[Path, dict[str, str]]:
    """A tiny Qwen3 job with Matryoshka dims 32 and a query instruction, with a built index."""
    tmp = tmp_path_factory.mktemp("qwen_search")
    texts = {f"doc{i}": t for i, t in enumerate(SENTENCES)}
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    out = _run(tmp, [corpus], str(tiny_qwen3_dir), dims=32, query_instruction=INSTRUCTION, shard_size=5)
    build_index(out)
    return out, texts


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_noeos_dir: Path) -> Path:
    from pipeline.bench.synthetic import make_qwen3_reranker_dir

    return make_qwen3_reranker_dir(tmp_path_factory.mktemp("reranker"), "tiny",
                                   tokenizer_dir=qwen_tokenizer_noeos_dir, seed=1)


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------------------ retrieval


def test_each_document_finds_itself_at_rank_1(minilm_job: tuple[Path, dict[str, str]]) -> None:
    out, texts = minilm_job
    searcher = Searcher(out)
    ids = list(texts)
    results = searcher.search([texts[i] for i in ids], k=2)
    for doc_id, entry in zip(ids, results, strict=True):
        top = entry["results"][0]
        if top["id"] != doc_id:  # only a document whose embedded (truncated) text is identical may tie with it
            assert entry["results"][1]["id"] == doc_id and top["score"] == pytest.approx(
                entry["results"][1]["score"], abs=1e-5)
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["results"][0]["text"] == texts[results[0]["results"][0]["id"]]


def test_query_embedding_uses_the_jobs_instruction_and_dims(qwen_job: tuple[Path, dict[str, str]],
                                                            tiny_qwen3_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    out, _ = qwen_job
    searcher = Searcher(out, device="cpu")
    query = "Which bear eats bamboo?"
    got = searcher.embed([query])[0]
    assert got.shape == (32,)
    # reference: the Qwen3-Embedding query format, one <|endoftext|>, last token, first 32 dims, L2-normalised
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    model = AutoModel.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()
    ids = tok(f"Instruct: {INSTRUCTION}\nQuery:{query}", add_special_tokens=False)["input_ids"]
    ids = [t for t in ids if t != 151643] + [151643]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1, :32]
    ref = torch.nn.functional.normalize(hidden, dim=0).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    plain = tok(query, add_special_tokens=False)["input_ids"] + [151643]
    with torch.no_grad():
        bare = torch.nn.functional.normalize(model(input_ids=torch.tensor([plain])).last_hidden_state[0, -1, :32],
                                             dim=0).numpy()
    assert not np.allclose(got, bare, atol=1e-3)  # the instruction matters, so the check above has power


# ------------------------------------------------------------------------------------------ CLI


def test_search_json_shape(qwen_job: tuple[Path, dict[str, str]]) -> None:
    out, texts = qwen_job
    res = _cli("search", out, "Which bear eats bamboo?", "-k", "3", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert set(obj) == {"query", "results"} and obj["query"] == "Which bear eats bamboo?"
    assert len(obj["results"]) == 3
    for r in obj["results"]:
        assert set(r) == {"id", "score", "text"} and r["text"] == texts[r["id"]]
        assert isinstance(r["score"], float)
    scores = [r["score"] for r in obj["results"]]
    assert scores == sorted(scores, reverse=True)
    human = _cli("search", out, "coffee", "-k", "2", "--device", "cpu")
    assert human.exit_code == 0 and human.stdout.startswith("query: coffee") and "  1. " in human.output


def test_search_queries_file_writes_jsonl(qwen_job: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out, _ = qwen_job
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in (("a", "coffee"), ("b", "reef"))))
    dest = tmp_path / "results.jsonl"
    res = _cli("search", out, "--queries", qfile, "-k", "4", "--out", dest, "--device", "cpu")
    assert res.exit_code == 0, res.output
    rows = [json.loads(ln) for ln in dest.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == ["a", "b"] and all(len(r["results"]) == 4 for r in rows)
    pfile = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ["x"], "query": ["panda"]}), pfile)
    res = _cli("search", out, "--queries", pfile, "-k", "1", "--device", "cpu")
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[0])["query_id"] == "x"


def test_search_reads_queries_from_stdin_with_the_model_loaded_once(qwen_job: tuple[Path, dict[str, str]],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.job import record

    out, _ = qwen_job
    loads = []
    real = record.query_embedder
    monkeypatch.setattr(record, "query_embedder", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    res = CliRunner().invoke(main, ["search", str(out), "-k", "3", "--json", "--device", "cpu"],
                             input="Which bear eats bamboo?\n\n   \ncoffee\r\nreef", catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [g["query"] for g in got] == ["Which bear eats bamboo?", "coffee", "reef"]  # blank lines skipped
    assert loads == [1]
    expected = Searcher(out, device="cpu").search(["Which bear eats bamboo?", "coffee", "reef"], k=3)
    for g, e in zip(got, expected, strict=True):
        assert [r["id"] for r in g["results"]] == [r["id"] for r in e["results"]]
        np.testing.assert_allclose([r["score"] for r in g["results"]], [r["score"] for r in e["results"]],
                                   atol=1e-6)
    human = CliRunner().invoke(main, ["search", str(out), "-k", "2", "--device", "cpu"], input="coffee\n")
    assert human.exit_code == 0 and human.stdout.startswith("query: coffee") and "  2. " in human.stdout


@pytest.mark.slow
def test_stdin_queries_are_answered_as_they_arrive(qwen_job: tuple[Path, dict[str, str]]) -> None:
    """A real process: the answer to the first line comes back while stdin is still open."""
    import subprocess
    import sys
    import threading

    out, _ = qwen_job
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", str(out), "-k", "2", "--json",
                             "--device", "cpu"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        proc.stdin.write("Which bear eats bamboo?\n")
        proc.stdin.flush()
        reader.join(timeout=120)
        assert lines and lines[0], f"no answer while stdin is open: {proc.stderr.read() if proc.poll() else ''}"
        assert json.loads(lines[0])["query"] == "Which bear eats bamboo?"
        rest, err = proc.communicate("coffee\n", timeout=60)
        assert proc.returncode == 0, err
        assert [json.loads(x)["query"] for x in rest.splitlines()] == ["coffee"]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF2,Flat", "IVF2,SQ8", "IVF2,PQ4x2", "PCA8,Flat"])
def test_mapped_index_answers_as_the_index_read_whole(qwen_job: tuple[Path, dict[str, str]], tmp_path: Path,
                                                      factory: str) -> None:
    """Search maps the index file instead of reading it (start-up); the answers are those of the whole index."""
    from pipeline.index.files import load_index

    copy = tmp_path / "copy"
    shutil.copytree(qwen_job[0], copy)
    build_index(copy, factory=factory)
    queries = Searcher(copy, device="cpu").embed(["Which bear eats bamboo?", "coffee", "a reef", "memory safety"])
    whole, _ = load_index(copy)
    mapped, _ = load_index(copy, mmap=True)
    d1, i1 = whole.search(queries, 6)
    d2, i2 = mapped.search(queries, 6)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_reranked_search_reorders_by_the_reranker(qwen_job: tuple[Path, dict[str, str]], reranker_dir: Path) -> None:
    from pipeline.model.rerank import load_reranker

    out, texts = qwen_job
    query = "Which bear eats bamboo?"
    reranker = load_reranker(str(reranker_dir), device="cpu")
    searcher = Searcher(out, device="cpu")
    entry = searcher.search([query], k=4, reranker=reranker, rerank_top=10)[0]
    # the expected answer, counted without the pipeline's search or reranker: the 10 nearest documents by a
    # NumPy dot product over the stored vectors, scored by the model card's recipe, best 4 first
    from pipeline.index import vectors as vec

    dv = np.concatenate([vec.read_part_vectors(p) for p in vec.complete_parts(out)])
    ids = pq.read_table(out / "index" / searcher.info["files"]["ids"]).column("id").to_pylist()
    nearest = np.argsort(-(dv @ searcher.embed([query])[0]), kind="stable")[:10]
    candidates = [ids[j] for j in nearest]
    ref = reference_rerank_scores(reranker_dir, query, [texts[i] for i in candidates])
    assert np.ptp(ref) > 1e-4  # the scores differ, so the order below has power
    best = np.argsort(-ref, kind="stable")[:4]
    assert [r["id"] for r in entry["results"]] == [candidates[j] for j in best]
    np.testing.assert_allclose([r["rerank_score"] for r in entry["results"]], ref[best], atol=1e-5)
    assert [r["id"] for r in entry["results"]] != candidates[:4]  # reranking changed the first-stage order
    res = _cli("search", out, "panda", "-k", "2", "--json", "--rerank-model", reranker_dir, "--rerank-top", "5",
               "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert all({"score", "rerank_score"} <= set(r) for r in json.loads(res.stdout)["results"])


def test_clear_errors(qwen_job: tuple[Path, dict[str, str]], tmp_path: Path, minilm_dir: Path) -> None:
    out, _ = qwen_job
    no_index = tmp_path / "no_index"
    shutil.copytree(out, no_index, ignore=shutil.ignore_patterns("index"))
    res = _cli("search", no_index, "panda")
    assert res.exit_code == 1 and "error:" in res.output and "index build" in res.output
    res = _cli("search", out, "panda", "--model", minilm_dir)
    assert res.exit_code == 1 and "holds vectors of model" in res.output
    res = _cli("search", out, "   ")
    assert res.exit_code == 1 and "empty query" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": ""}) + "\n")
    res = _cli("search", out, "--queries", bad, "--device", "cpu")
    assert res.exit_code == 1 and "query 2" in res.output and "empty" in res.output
    res = _cli("search", out)  # no query and nothing on stdin
    assert res.exit_code == 1 and "no queries" in res.output
    res = _cli("search", out, "panda", "--queries", bad)
    assert res.exit_code == 1 and "not both" in res.output
    res = _cli("search", out, "panda", "--out", tmp_path / "r.jsonl")
    assert res.exit_code == 1 and "--out goes with --queries" in res.output
    other_dims = tmp_path / "other_dims"
    shutil.copytree(out, other_dims)
    job = json.loads((other_dims / "job.json").read_text())
    job["model"]["dims"] = 16  # as if the job had been rerun with --dims 16 after the index was built
    (other_dims / "job.json").write_text(json.dumps(job))
    res = _cli("search", other_dims, "panda")
    assert res.exit_code == 1 and "dims mismatch" in res.output
    with pytest.raises(PipelineError, match="empty query"):
        Searcher(out, device="cpu").search([""], k=1)
    with pytest.raises(PipelineError, match="empty query"):  # the job's blank rule: it was embedded and searched
        Searcher(out, device="cpu").search(["\u200b\ufeff"], k=1)


def test_index_cli_build_and_update(qwen_job: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(qwen_job[0], copy)
    res = _cli("index", "build", copy, "--factory", "HNSW8", "--max-memory", "64M")
    assert res.exit_code == 0, res.output
    assert "index: HNSW8" in res.output and "recall@1/10/100" in res.output
    info = json.loads((copy / "index" / "info.json").read_text())
    assert info["factory"] == "HNSW8"
    for key, value in brute_force_recall(copy).items():
        assert info[key] == pytest.approx(value, abs=2e-6), key
    res = _cli("index", "update", copy)
    assert res.exit_code == 0 and "up to date" in res.output
    res = _cli("index", "build", tmp_path, "--max-memory", "lots")
    assert res.exit_code == 1 and "error:" in res.output


# ------------------------------------------------------------------------------------------ nightly update, eval


def test_embed_more_then_update_equals_a_full_build(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(SENTENCES[:6])))
    second.write_text("".join(json.dumps({"id": f"b{i}", "text": t}) + "\n" for i, t in enumerate(SENTENCES[6:])))
    grown = tmp_path / "grown"
    kw = {"model": str(tiny_qwen3_dir), "device": "cpu", "quiet": True, "shard_size": 3}
    run_job(make_config({"input": (str(first),), "output": str(grown), **kw}))
    build_index(grown, factory="Flat")
    run_job(make_config({"input": (str(first), str(second)), "output": str(grown), **kw}))  # the nightly run
    info = update_index(grown)
    assert info["added"] == 6 and info["ntotal"] == 12
    full = tmp_path / "full"
    run_job(make_config({"input": (str(first), str(second)), "output": str(full), **kw}))
    build_index(full, factory="Flat")
    q = ["coffee", "a reef in Australia", "memory safety"]
    a = Searcher(grown, device="cpu").search(q, k=5)
    b = Searcher(full, device="cpu").search(q, k=5)
    for x, y in zip(a, b, strict=True):
        assert [r["id"] for r in x["results"]] == [r["id"] for r in y["results"]]
        np.testing.assert_allclose([r["score"] for r in x["results"]], [r["score"] for r in y["results"]],
                                   atol=1e-6)


def test_eval_reports_exact_index_and_reranked_columns(qwen_job: tuple[Path, dict[str, str]], tmp_path: Path,
                                                      reranker_dir: Path) -> None:
    from pipeline.index.evaluate import run_eval
    from pipeline.index.metrics import evaluate

    out, texts = qwen_job
    beir = tmp_path / "toyset"
    (beir / "qrels").mkdir(parents=True)
    queries = {"q1": "Which bear eats bamboo?", "q2": "How do plants make sugar?", "q3": "coffee brewing",
               "q9": "no judgements for this one"}
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    qrels = {"q1": {"doc0": 2, "doc6": 1}, "q2": {"doc1": 1}, "q3": {"doc5": 1, "doc3": 0}}
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, docs in qrels.items()
                                                 for d, r in docs.items()))
    res = _cli("eval", out, "--queries", beir / "queries.jsonl", "--qrels", beir / "qrels", "--device", "cpu",
               "--rerank-model", reranker_dir, "--rerank-top", "5")
    assert res.exit_code == 0, res.output
    assert "nDCG@10".lower() in res.output.lower() and "index+rerank" in res.output
    report = json.loads((out / "eval" / "toyset-test.json").read_text())
    assert report["queries"] == 3 and set(report["columns"]) == {"exact", "index", "index+rerank"}
    assert set(report["columns"]["exact"]) == {"ndcg@10", "recall@10", "recall@100", "mrr@10"}
    assert report["columns"]["exact"] == report["columns"]["index"]  # a flat index is exact
    # the exact column equals the metrics of a brute-force numpy ranking of all documents
    searcher = Searcher(out, device="cpu")
    qv = searcher.embed([queries[q] for q in qrels])
    docs = list(texts)
    from pipeline.index import vectors as vec

    dv = np.concatenate([vec.read_part_vectors(p) for p in vec.complete_parts(out)])
    ids = pq.read_table(out / "index" / searcher.info["files"]["ids"]).column("id").to_pylist()
    run = {q: {ids[j]: float(qv[i] @ dv[j]) for j in range(len(docs))} for i, q in enumerate(qrels)}
    mean, _ = evaluate(qrels, run)
    for m, v in mean.items():
        assert report["columns"]["exact"][m] == pytest.approx(v, abs=1e-5)
    direct = run_eval(out, beir / "queries.jsonl", beir / "qrels" / "test.tsv", name="direct", device="cpu")
    assert direct["columns"]["exact"] == report["columns"]["exact"]


def test_chunk_results_show_their_chunk_text(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    doc = ("The giant panda is a bear native to south central China. It eats bamboo almost exclusively. Pandas are "
           "good climbers. They spend most of the day eating and sleeping in the forests of Sichuan.")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "long", "text": doc}) + "\n")
    out = _run(tmp_path, [corpus], str(tiny_qwen3_dir), long_docs="chunk", chunk_tokens=8, chunk_overlap=2,
               max_length=30)
    build_index(out)
    results = Searcher(out, device="cpu").search(["bamboo"], k=20)[0]["results"]
    assert len(results) > 3 and all(r["id"].startswith("long#") for r in results)
    for r in results:
        assert r["text"] and r["text"].strip() in doc and len(r["text"]) < len(doc)


# ------------------------------------------------------------------------------------------ removed parts, query side


def test_search_and_eval_never_return_a_vanished_part(minilm_job: tuple[Path, dict[str, str]],
                                                      tmp_path: Path) -> None:
    """A part removed the way an incremental run removes it (a new version without it): its documents are never
    returned, before `index update` and after."""
    from pipeline.index import vectors as vec
    from pipeline.index.evaluate import run_eval
    from pipeline.job.versions import publish

    src, texts = minilm_job
    out = tmp_path / "out"
    shutil.copytree(src, out, symlinks=True)
    gone_part = vec.complete_parts(out)[1]
    gone = pq.read_table(gone_part.path, columns=["id"]).column("id").to_pylist()
    publish(out, add=[], drop=[gone_part.shard])
    searcher = Searcher(out, device="cpu")
    queries = [texts[i] for i in gone]
    for stage in ("before update", "after update"):
        results = searcher.search(queries, k=20)
        found = {r["id"] for entry in results for r in entry["results"]}
        assert not found & set(gone), stage
        assert all(len(entry["results"]) == 20 for entry in results)
        beir = tmp_path / stage.replace(" ", "-")
        (beir / "qrels").mkdir(parents=True)
        (beir / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": queries[0]}) + "\n")
        (beir / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\nq\t{gone[0]}\t1\n")
        report = run_eval(out, beir / "queries.jsonl", beir / "qrels", searcher=searcher)
        assert report["columns"]["exact"]["recall@100"] == report["columns"]["index"]["recall@100"] == 0.0
        if stage == "before update":
            info = update_index(out)
            assert info["removed_parts"] == [gone_part.name]
            searcher = Searcher(out, device="cpu")


def test_a_long_lived_searcher_takes_the_next_index_generation(tmp_path: Path, minilm_dir: Path) -> None:
    """`serve` or a stdin search loop across a nightly run and `index update`: the searcher kept the index it
    started with and only filtered it by the new version, so edited and new documents were never found, nor the
    unchanged neighbours of an edited one (45 of 117 in the report), exit 0. It now takes the new generation."""
    from helpers import make_docs, write_jsonl

    corpus = tmp_path / "corpus"
    docs = make_docs(60, seed=3)
    write_jsonl(corpus / "a.jsonl", docs)
    out = _run(tmp_path, [corpus], str(minilm_dir), shard_size=16)
    build_index(out)
    searcher = Searcher(out, device="cpu")  # what `serve OUTPUT` holds for its lifetime
    for i in (0, 16, 32):  # one document of each of three shards edited: their parts are rewritten
        docs[i] = {**docs[i], "text": f"a recipe for rye bread with caraway seeds, number {i}"}
    write_jsonl(corpus / "a.jsonl", [*docs, {"id": "new1", "title": "t", "text": "penguins waddle across ice"}])
    _run(tmp_path, [corpus], str(minilm_dir), shard_size=16)
    update_index(out)
    fresh = Searcher(out, device="cpu")
    for d in [*docs, {"id": "new1", "text": "penguins waddle across ice"}]:
        mine = searcher.search([d["text"]], k=3)[0]["results"]
        assert [r["id"] for r in mine] == [r["id"] for r in fresh.search([d["text"]], k=3)[0]["results"]], d["id"]
        assert d["id"] in [r["id"] for r in mine]


def test_query_side_recall_is_measured_where_the_job_recorded_an_instruction(
        qwen_job: tuple[Path, dict[str, str]], minilm_job: tuple[Path, dict[str, str]]) -> None:
    from pipeline.index import vectors as vec
    from pipeline.index.files import read_info
    from pipeline.index.queryside import QUERY_CHARS, sample_texts
    from pipeline.job.record import read_job_record

    out, _ = qwen_job
    info = read_info(out)
    side = info["query_side"]
    assert side["instruction"] == INSTRUCTION and side["queries"] == len(SENTENCES)
    assert side["text_chars"] == QUERY_CHARS and "query embedder" in side["what"]
    # independently: the same texts, embedded as the searcher embeds queries, exact neighbours by numpy
    parts = vec.complete_parts(out)
    texts = sample_texts(out, read_job_record(out), parts, 1000, np.random.default_rng([0, 7]))
    searcher = Searcher(out, device="cpu")
    qv = searcher.embed(texts)
    dv = np.concatenate([vec.read_part_vectors(p) for p in parts])
    truth = np.argsort(-(qv @ dv.T), axis=1, kind="stable")[:, :10]
    found = searcher.search_vectors(qv, 10)[1]
    expected = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(len(texts))])
    assert side["recall@10"] == pytest.approx(expected, abs=1e-6)
    assert read_info(minilm_job[0]).get("query_side") is None  # MiniLM: no query prompt, nothing to measure


def test_search_and_eval_take_trust_remote_code_from_the_command_line_only(
        qwen_job: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output folder whose job.json asks for the model's own code is refused by search and eval, before any
    model is loaded, unless --trust-remote-code is given: job.json alone must not switch it on."""
    from helpers import ModelGuard

    from pipeline.model.encoder import Embedder

    out, _ = qwen_job
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign, symlinks=True)
    job = json.loads((foreign / "job.json").read_text())
    job["config"]["trust_remote_code"] = True
    (foreign / "job.json").write_text(json.dumps(job))
    guard = ModelGuard(monkeypatch)
    with pytest.raises(PipelineError, match="--trust-remote-code"):
        Searcher(foreign, device="cpu")
    res = _cli("search", foreign, "bamboo", "--device", "cpu")
    assert res.exit_code == 1 and "--trust-remote-code" in res.output
    (tmp_path / "q.jsonl").write_text(json.dumps({"_id": "q1", "text": "bamboo"}) + "\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tdoc0\t1\n")
    res = _cli("eval", foreign, "--queries", tmp_path / "q.jsonl", "--qrels", tmp_path / "qrels.tsv", "--device", "cpu")
    assert res.exit_code == 1 and "--trust-remote-code" in res.output
    assert guard.calls == 0
    monkeypatch.undo()
    seen: list[object] = []
    load = Embedder.load.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Embedder, "load", classmethod(spy))
    res = _cli("search", foreign, "bamboo", "--device", "cpu", "--trust-remote-code")
    assert res.exit_code == 0, res.output
    assert seen == [True]


def test_a_rerun_with_another_query_instruction_is_recorded_and_followed(tmp_path: Path, tiny_qwen3_dir: Path
                                                                          ) -> None:
    """A rerun with nothing new to embed never rewrote job.json: its --query-instruction was dropped and search
    kept the old one, exit 0. Now it is recorded at once; a searcher opened before refuses to go on (its query
    embedder frames queries the old way) and a new one embeds as an output made with the new instruction does."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(SENTENCES)))
    out = _run(tmp_path / "a", [corpus], str(tiny_qwen3_dir), query_instruction="Old task")
    build_index(out)
    before = Searcher(out)
    _run(tmp_path / "a", [corpus], str(tiny_qwen3_dir), query_instruction="New task")  # nothing new to embed
    assert json.loads((out / "job.json").read_text())["config"]["query_instruction"] == "New task"
    with pytest.raises(PipelineError, match="changed since this process loaded its query embedder"):
        before.follow_live_version()
    fresh = _run(tmp_path / "b", [corpus], str(tiny_qwen3_dir), query_instruction="New task")
    build_index(fresh)
    query = "Which bear eats bamboo?"
    np.testing.assert_allclose(Searcher(out).embed([query]), Searcher(fresh).embed([query]), atol=1e-6)


def test_chunk_text_is_the_documents_own_characters(tmp_path: Path, minilm_dir: Path) -> None:
    """An uncased tokenizer's decoding lowercases and strips accents: a chunk's text was shown (and handed to the
    reranker) as "emile zola etait un ecrivain francais" for "Émile Zola était un écrivain français"."""
    doc = " ".join(f"Émile Zola était un écrivain français, né à Paris; livre numéro {i}." for i in range(12))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "fr", "text": doc}) + "\n")
    out = _run(tmp_path, [corpus], str(minilm_dir), long_docs="chunk", chunk_tokens=32, chunk_overlap=0)
    build_index(out)
    results = Searcher(out, device="cpu").search(["Zola"], k=20)[0]["results"]
    assert len(results) > 2
    for r in results:
        assert r["text"].strip() and r["text"] in doc and "é" in r["text"], r["text"]
