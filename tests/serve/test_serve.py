"""``embed-corpus serve``: the official ``openai`` client gets the vectors ``embed-corpus run`` wrote (float, base64,
``dimensions``), the job's query framing on a tiny Qwen3, every kind of bad request gets its 4xx in OpenAI's shape,
200 concurrent requests are all answered (and batched together), ``/search`` and ``/v1/rerank`` answer as an exact
search and the reranker's recipe do, the API key is checked. Servers run in this process on a free loopback port."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    INSTRUCTION,
    MODEL,
    SENTENCES,
    embeddings,
    read_vectors,
    reference_minilm_vector,
    reference_qwen3_vector,
    reference_rerank_scores,
    write_jsonl,
)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pipeline.index.store import build_index  # noqa: E402
from pipeline.job.config import make_config  # noqa: E402
from pipeline.job.runner import run_job  # noqa: E402
from pipeline.model.tokens import Encoded  # noqa: E402
from pipeline.serve.app import ServerThread  # noqa: E402
from pipeline.serve.batcher import Batcher  # noqa: E402
from pipeline.serve.limits import ApiError, ServeOptions  # noqa: E402
from pipeline.serve.service import Service  # noqa: E402


def _job(tmp: Path, model: str, **extra) -> tuple[Path, dict[str, str]]:
    texts = {f"doc{i}": t for i, t in enumerate(SENTENCES)}
    corpus = write_jsonl(tmp / "corpus.jsonl", [{"id": k, "text": v} for k, v in texts.items()])
    out = tmp / "out"
    run_job(make_config({"input": (str(corpus),), "output": str(out), "model": model, "device": "cpu",
                         "batch_tokens": 2048, "quiet": True, "shard_size": 5, **extra}))
    return out, texts


def _vectors(out: Path) -> dict[str, np.ndarray]:
    table = read_vectors(out)
    return dict(zip(table.column("id").to_pylist(), embeddings(table), strict=True))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_noeos_dir: Path) -> Path:
    from pipeline.bench.synthetic import make_qwen3_reranker_dir

    return make_qwen3_reranker_dir(tmp_path_factory.mktemp("reranker"), "tiny", tokenizer_dir=qwen_tokenizer_noeos_dir,
                                   seed=1)


@pytest.fixture(scope="module")
def minilm_job(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> tuple[Path, dict[str, str]]:
    out, texts = _job(tmp_path_factory.mktemp("serve_minilm"), MODEL)
    build_index(out)
    return out, texts


@pytest.fixture(scope="module")
def minilm_server(minilm_job: tuple[Path, dict[str, str]], reranker_dir: Path) -> Iterator[ServerThread]:
    out, _ = minilm_job
    service = Service.load(out, device="cpu", options=ServeOptions(batch_tokens=2048, max_inputs=64),
                           rerank_model=str(reranker_dir))
    with ServerThread(service) as srv:
        yield srv


@pytest.fixture(scope="module")
def qwen_job(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_dir: Path) -> tuple[Path, dict[str, str]]:
    return _job(tmp_path_factory.mktemp("serve_qwen"), str(tiny_qwen3_dir), dims=32, query_instruction=INSTRUCTION)


@pytest.fixture(scope="module")
def qwen_server(qwen_job: tuple[Path, dict[str, str]]) -> Iterator[ServerThread]:
    out, _ = qwen_job
    with ServerThread(Service.load(out, device="cpu", options=ServeOptions(batch_tokens=2048))) as srv:
        yield srv


def _client(srv: ServerThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


# ------------------------------------------------------------------------------------------ the openai client


def test_openai_client_gets_the_vectors_of_the_run(minilm_job, minilm_server: ServerThread) -> None:
    out, texts = minilm_job
    ref = _vectors(out)
    ids = list(texts)
    client = _client(minilm_server)
    expected = np.stack([ref[i] for i in ids])
    n_tokens = dict(zip(read_vectors(out).column("id").to_pylist(), read_vectors(out).column("n_tokens").to_pylist(),
                        strict=True))

    default = client.embeddings.create(input=[texts[i] for i in ids], model=MODEL)  # base64, decoded by the client
    got = np.array([d.embedding for d in default.data], dtype=np.float32)
    assert [d.index for d in default.data] == list(range(len(ids)))
    assert _cos(got, expected).min() >= 0.99999
    assert default.usage.prompt_tokens == default.usage.total_tokens == sum(n_tokens.values())
    assert default.model == MODEL

    floats = client.embeddings.create(input=[texts[i] for i in ids], model=MODEL, encoding_format="float")
    assert _cos(np.array([d.embedding for d in floats.data]), expected).min() >= 0.99999

    b64 = client.embeddings.create(input=texts[ids[0]], model=MODEL, encoding_format="base64")
    raw = b64.data[0].embedding
    assert isinstance(raw, str)
    assert _cos(np.frombuffer(base64.b64decode(raw), dtype="<f4"), expected[0])[0] >= 0.99999

    cut = client.embeddings.create(input=[texts[i] for i in ids], model=MODEL, dimensions=64, encoding_format="float")
    got = np.array([d.embedding for d in cut.data], dtype=np.float32)
    assert got.shape == (len(ids), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # re-normalised
    assert _cos(got, expected[:, :64]).min() >= 0.99999

    models = client.models.list()
    assert [m.id for m in models.data][0] == MODEL


def test_token_ids_and_the_jobs_query_framing(qwen_job, qwen_server: ServerThread, tiny_qwen3_dir: Path) -> None:
    from pipeline.model.encoder import Embedder
    out, texts = qwen_job
    ref = _vectors(out)
    ids = list(texts)[:5]
    client = _client(qwen_server)
    docs = [texts[i] for i in ids]
    expected = np.stack([ref[i] for i in ids])

    # documents framed as the run framed them (text, then the exact token ids the run embedded)
    res = client.embeddings.create(input=docs, model=str(tiny_qwen3_dir), extra_body={"input_type": "document"})
    assert _cos(np.array([d.embedding for d in res.data]), expected).min() >= 0.99999
    doc_embedder = Embedder.load(str(tiny_qwen3_dir), device="cpu", dims=32)
    enc = doc_embedder.tokenizer.encode(docs)
    seqs = [enc.sequence(i).tolist() for i in range(len(enc))]
    assert all(s[-1] == 151643 and s.count(151643) == 1 for s in seqs)  # exactly one <|endoftext|>
    res = client.embeddings.create(input=seqs, model=str(tiny_qwen3_dir))
    assert _cos(np.array([d.embedding for d in res.data]), expected).min() >= 0.99999
    assert res.usage.prompt_tokens == sum(len(s) for s in seqs)

    # queries: the job's recorded instruction by default, or the request's own
    query = "Which bear eats bamboo?"
    res = client.embeddings.create(input=query, model=str(tiny_qwen3_dir))
    job_vec = reference_qwen3_vector(tiny_qwen3_dir, query, instruction=INSTRUCTION, dims=32)  # transformers
    assert len(res.data[0].embedding) == 32
    assert _cos(np.array(res.data[0].embedding), job_vec)[0] >= 0.99999
    other = "Retrieve semantically similar text"
    res = client.embeddings.create(input=query, model=str(tiny_qwen3_dir), extra_body={"instruction": other})
    ref_vec = reference_qwen3_vector(tiny_qwen3_dir, query, instruction=other, dims=32)
    assert _cos(np.array(res.data[0].embedding), ref_vec)[0] >= 0.99999
    assert _cos(ref_vec, job_vec)[0] < 0.9999  # the instruction changes the vector, so the check has power

    with pytest.raises(openai.BadRequestError) as err:  # above the job's 32 dims
        client.embeddings.create(input=query, model=str(tiny_qwen3_dir), dimensions=33)
    assert err.value.body["param"] == "dimensions"


# ------------------------------------------------------------------------------------------ bad requests


LONG = "river stone light paper garden " * 200  # > 256 tokens, MiniLM's maximum


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"input": "", "model": MODEL}, 400, "input", None),
    ({"input": "   "}, 400, "input", None),
    ({"input": []}, 400, "input", None),
    ({"input": ["ok", ""]}, 400, "input", None),
    ({"input": 5}, 400, "input", None),
    ({"input": {"text": "x"}}, 400, "input", None),
    ({"input": ["a", 1]}, 400, "input", None),
    ({"input": [[101, 102], []]}, 400, "input", None),
    ({"input": [[101, "a"]]}, 400, "input", None),
    ({"input": [[101, 10**9]]}, 400, "input", None),
    ({"input": [-1, 5]}, 400, "input", None),
    ({"input": [True, False]}, 400, "input", None),
    ({"input": [[101] * 300]}, 400, "input", "context_length_exceeded"),
    ({"input": LONG}, 400, "input", "context_length_exceeded"),
    ({"input": ["x"] * 65}, 400, "input", None),
    ({}, 400, "input", None),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "model", "model_not_found"),
    ({"input": "x", "model": 7}, 400, "model", None),
    ({"input": "x", "dimensions": 0}, 400, "dimensions", None),
    ({"input": "x", "dimensions": 385}, 400, "dimensions", None),
    ({"input": "x", "dimensions": "8"}, 400, "dimensions", None),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": "x", "input_type": "passage"}, 400, "input_type", None),
    ({"input": "x", "instruction": ""}, 400, "instruction", None),
    ({"input": "x", "truncate": "yes"}, 400, "truncate", None),
    # the batch job's blank rule (these were embedded, 200, where the job rejects the row)
    ({"input": "\u200b"}, 400, "input", None),
    ({"input": ["ok", "\ufeff\x00"]}, 400, "input", None),
    # token ids are embedded as given: a framing asked for with them was dropped, 200
    ({"input": [[101, 102]], "instruction": "Find the passage"}, 400, "instruction", None),
    ({"input": [[101, 102]], "input_type": "query"}, 400, "input_type", None),
])
def test_bad_embedding_requests_get_openai_errors(minilm_server: ServerThread, body, status, param, code) -> None:
    r = httpx.post(minilm_server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert err["code"] == code


def test_malformed_bodies_routes_and_methods(minilm_server: ServerThread) -> None:
    url = minilm_server.url
    for content in (b"not json", b"[1, 2]", b'"text"', b""):
        r = httpx.post(url + "/v1/embeddings", content=content, timeout=30)
        assert r.status_code == 400 and "error" in r.json(), (content, r.text)
    assert httpx.post(url + "/v1/nothing", json={}, timeout=30).status_code == 404
    r = httpx.get(url + "/v1/embeddings", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"]
    # truncation on request embeds the beginning instead of refusing
    r = httpx.post(url + "/v1/embeddings", json={"input": LONG, "truncate": True}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    assert 'status="500"' not in httpx.get(url + "/metrics", timeout=30).text


def test_api_key_is_checked(minilm_server: ServerThread) -> None:
    base = minilm_server.service
    service = Service(base.embedder, ServeOptions(api_key="s3cret"), names=base.names, document_prompt="",
                      query_prompt="")
    with ServerThread(service) as srv:
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong").embeddings.create(input="hello", model=MODEL)
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "hello"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200  # for load balancers
        res = _client(srv, "s3cret").embeddings.create(input="hello", model=MODEL)
        assert len(res.data[0].embedding) == 384
        # the scheme is required (issue 13, item 13): the bare key, or the key under another scheme, is refused
        for header in ("s3cret", "Basic s3cret", "Bearers3cret", "Bearer", "Bearer  wrong"):
            r = httpx.post(srv.url + "/v1/embeddings", json={"input": "hello"}, headers={"Authorization": header},
                           timeout=30)
            assert r.status_code == 401, header
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER   s3cret"):  # RFC 7235: any case
            r = httpx.post(srv.url + "/v1/embeddings", json={"input": "hello"}, headers={"Authorization": header},
                           timeout=30)
            assert r.status_code == 200, header


@pytest.mark.parametrize("depth", [900, 5_000, 100_000])
def test_deeply_nested_bodies_get_a_400(minilm_server: ServerThread, depth: int) -> None:
    """Nested deeper than Python's parser (or its error messages) can walk: a 400, the connection kept, never a 500
    (issue 13, item 5)."""
    with httpx.Client(base_url=minilm_server.url, timeout=30) as client:
        for body in (b"[" * depth + b"]" * depth,
                     b'{"input": "x", "dimensions": ' + b"[" * depth + b"]" * depth + b"}",
                     b'{"input": ' + b"[" * depth + b"]" * depth + b"}"):
            r = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (depth, r.text[:200])
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = client.post("/v1/embeddings", json={"input": "still served"})
        assert r.status_code == 200
    assert 'status="500"' not in httpx.get(minilm_server.url + "/metrics", timeout=30).text


def test_trust_remote_code_comes_from_the_command_line_not_job_json(minilm_job, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A foreign output folder whose job.json asks for trust_remote_code is refused, before any model is loaded,
    unless --trust-remote-code is given (issue 13, item 13)."""
    import shutil

    from helpers import ModelGuard, invoke

    from pipeline.errors import PipelineError

    out, _ = minilm_job
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign)
    job = json.loads((foreign / "job.json").read_text())
    job["config"]["trust_remote_code"] = True
    (foreign / "job.json").write_text(json.dumps(job))
    guard = ModelGuard(monkeypatch)
    with pytest.raises(PipelineError, match="--trust-remote-code"):
        Service.load(foreign, device="cpu")
    result = invoke("serve", foreign, "--device", "cpu")
    assert result.exit_code == 1 and "--trust-remote-code" in result.output and "Traceback" not in result.output
    assert guard.calls == 0
    monkeypatch.undo()
    loaded = []
    from pipeline.model.encoder import Embedder

    real = Embedder.load.__func__

    def record(cls, *args, **kwargs):
        loaded.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Embedder, "load", classmethod(record))
    service = Service.load(foreign, device="cpu", trust_remote_code=True)
    assert loaded == [True] and service.info.dims == 384
    loaded.clear()
    Service.load(out, device="cpu", trust_remote_code=True)  # the flag alone does not switch it on for a job
    assert loaded == [False]


# ------------------------------------------------------------------------------------------ concurrency


def test_200_concurrent_requests_are_all_answered_and_batched(minilm_job, minilm_server: ServerThread) -> None:
    out, texts = minilm_job
    ref = _vectors(out)
    ids = list(texts)
    metrics_before = minilm_server.service.metrics.totals.copy()

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=minilm_server.url, limits=limits, timeout=60) as client:
            sem = asyncio.Semaphore(200)

            async def one(i: int) -> httpx.Response:
                async with sem:
                    chosen = [ids[(i + j) % len(ids)] for j in range(1 + i % 3)]
                    return await client.post("/v1/embeddings", json={"input": [texts[c] for c in chosen],
                                                                     "encoding_format": "base64"})
            return await asyncio.gather(*(one(i) for i in range(200)))

    t0 = time.perf_counter()
    responses = asyncio.run(fire())
    seconds = time.perf_counter() - t0
    assert [r.status_code for r in responses] == [200] * 200
    for i, r in enumerate(responses):
        chosen = [ids[(i + j) % len(ids)] for j in range(1 + i % 3)]
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
        assert _cos(got, np.stack([ref[c] for c in chosen])).min() >= 0.99999, f"request {i}"
    totals = minilm_server.service.metrics.totals
    groups = totals["forward_groups"] - metrics_before["forward_groups"]
    grouped = totals["grouped_requests"] - metrics_before["grouped_requests"]
    assert grouped == 200
    assert groups < 200, "concurrent requests were never batched together"
    assert seconds < 60


def _enc_of(lengths: list[int], fill: int = 1) -> Encoded:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = len(lengths)
    return Encoded(np.full(int(offsets[-1]), fill, dtype=np.int32), offsets, np.arange(n), np.zeros(n, np.int32),
                   np.zeros((n, 2), np.int32), np.zeros(n, bool))


def test_batcher_groups_requests_and_isolates_a_failing_one() -> None:
    sizes: list[int] = []

    def embed(enc: Encoded) -> np.ndarray:
        sizes.append(len(enc))
        if (enc.ids == 13).any():
            raise RuntimeError("bad input")
        return np.repeat(enc.lengths[:, None].astype(np.float32), 2, axis=1)

    batcher = Batcher(embed, batch_tokens=1000, max_wait=1.0)
    batcher.start()
    try:
        for _ in range(3):  # three requests on their way: the worker waits for them to form one group
            batcher.announce()
        futs = [batcher.submit(_enc_of([2, 3]), announced=True), batcher.submit(_enc_of([4], fill=13), announced=True),
                batcher.submit(_enc_of([5]), announced=True)]
        np.testing.assert_array_equal(futs[0].result(5)[:, 0], [2, 3])
        with pytest.raises(RuntimeError):
            futs[1].result(5)
        np.testing.assert_array_equal(futs[2].result(5)[:, 0], [5])
        assert sizes == [4, 2, 1, 1]  # tried as one group, then one by one to find the failing request
        t0 = time.perf_counter()
        assert batcher.submit(_enc_of([7])).result(5)[0, 0] == 7  # the worker lives on
        assert time.perf_counter() - t0 < 0.5  # a lone request does not wait for company
    finally:
        batcher.stop()


def test_batcher_refuses_when_full_and_runs_one_text_per_forward() -> None:
    release = threading.Event()
    batcher = Batcher(lambda enc: release.wait(5) and np.ones((len(enc), 1), np.float32), max_queue=3)
    batcher.start()
    try:
        first = batcher.submit(_enc_of([1]))
        deadline = time.monotonic() + 5
        while batcher.depth() and time.monotonic() < deadline:  # the worker holds the first one
            time.sleep(0.001)
        waiting = [batcher.submit(_enc_of([1])) for _ in range(3)]
        with pytest.raises(ApiError) as err:
            batcher.submit(_enc_of([1]))
        assert err.value.status == 503 and err.value.headers.get("Retry-After")
        release.set()
        assert all(f.result(5).shape == (1, 1) for f in [first, *waiting])
    finally:
        batcher.stop()
    calls: list[int] = []
    one = Batcher(lambda enc: calls.append(len(enc)) or np.ones((len(enc), 1), np.float32), max_batch=1)
    one.start()
    try:
        assert one.submit(_enc_of([1, 2, 3])).result(5).shape == (3, 1)
        assert calls == [1, 1, 1]  # one text per forward pass
    finally:
        one.stop()


# ------------------------------------------------------------------------------------------ search and rerank


def test_search_answers_as_an_exact_search_and_the_reranker_recipe(minilm_job, minilm_server: ServerThread,
                                                                    minilm_dir: Path, reranker_dir: Path) -> None:
    """``/search`` against an answer counted without the pipeline: the query embedded by transformers, a NumPy
    dot product over the stored vectors, and the model card's reranker recipe on the candidates."""
    out, texts = minilm_job
    query = "Which bear eats bamboo?"
    stored = _vectors(out)
    ids = sorted(stored)
    scores = np.stack([stored[i] for i in ids]) @ reference_minilm_vector(minilm_dir, query)
    nearest = np.argsort(-scores, kind="stable")
    r = httpx.post(minilm_server.url + "/search", json={"query": query, "k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["id"] for x in got["results"]] == [ids[j] for j in nearest[:3]]
    np.testing.assert_allclose([x["score"] for x in got["results"]], scores[nearest[:3]], atol=1e-5)
    assert [x["text"] for x in got["results"]] == [texts[x["id"]] for x in got["results"]]

    candidates = [ids[j] for j in nearest[:6]]
    ref = reference_rerank_scores(reranker_dir, query, [texts[c] for c in candidates])
    best = np.argsort(-ref, kind="stable")[:3]
    r = httpx.post(minilm_server.url + "/search", json={"query": query, "k": 3, "rerank": True, "rerank_top": 6},
                   timeout=60)
    got = r.json()
    assert [x["id"] for x in got["results"]] == [candidates[j] for j in best]
    np.testing.assert_allclose([x["rerank_score"] for x in got["results"]], ref[best], atol=1e-5)

    many = httpx.post(minilm_server.url + "/search", json={"query": [query, "coffee"], "k": 2}, timeout=60).json()
    assert [e["query"] for e in many["data"]] == [query, "coffee"]
    for body, status in (({"query": ""}, 400), ({"query": "\u2060\u200d"}, 400), ({"query": "x", "k": 0}, 400),
                         ({"query": 3}, 400), ({}, 400),
                         ({"query": "x", "rerank": "yes"}, 400)):
        r = httpx.post(minilm_server.url + "/search", json=body, timeout=30)
        assert r.status_code == status and r.json()["error"]["message"], (body, r.text)


def test_search_without_an_index_is_a_404(qwen_server: ServerThread) -> None:
    r = httpx.post(qwen_server.url + "/search", json={"query": "x"}, timeout=30)
    assert r.status_code == 404 and "index" in r.json()["error"]["message"]
    r = httpx.post(qwen_server.url + "/v1/rerank", json={"query": "x", "documents": ["a"]}, timeout=30)
    assert r.status_code == 404 and "rerank" in r.json()["error"]["message"]


def test_rerank_scores_equal_the_model_card_recipe(minilm_server: ServerThread, reranker_dir: Path) -> None:
    query, docs = "Which bear eats bamboo?", SENTENCES[:5]
    expected = reference_rerank_scores(reranker_dir, query, docs)
    assert np.ptp(expected) > 1e-4  # the scores differ, so the order checked below has power
    r = httpx.post(minilm_server.url + "/v1/rerank", json={"query": query, "documents": docs, "top_n": 3}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    order = np.argsort(-expected, kind="stable")[:3]
    assert [x["index"] for x in results] == order.tolist()
    np.testing.assert_allclose([x["relevance_score"] for x in results], expected[order], atol=1e-5)
    assert results[0]["document"]["text"] == docs[order[0]]
    r = httpx.post(minilm_server.url + "/v1/rerank", json={"query": query, "documents": [{"text": d} for d in docs],
                                                           "return_documents": False}, timeout=60)
    assert len(r.json()["results"]) == 5 and "document" not in r.json()["results"][0]
    for body, status in (({"query": query, "documents": []}, 400), ({"documents": docs}, 400),
                         ({"query": query, "documents": [1]}, 400),
                         ({"query": query, "documents": docs, "top_n": 0}, 400),
                         ({"query": query, "documents": docs, "model": "other"}, 404)):
        r = httpx.post(minilm_server.url + "/v1/rerank", json=body, timeout=30)
        assert r.status_code == status and r.json()["error"]["message"], (body, r.text)


def test_models_health_and_metrics(minilm_server: ServerThread, reranker_dir: Path) -> None:
    url = minilm_server.url
    models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == MODEL and models[0]["embed_corpus"]["dims"] == 384
    assert models[0]["embed_corpus"]["search"] is True
    assert models[1]["id"] == str(reranker_dir) and models[1]["embed_corpus"]["task"] == "rerank"
    health = httpx.get(url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["search"] and health["rerank"]
    httpx.post(url + "/v1/embeddings", json={"input": ["a b c"]}, timeout=30)
    text = httpx.get(url + "/metrics", timeout=30).text
    assert 'embed_corpus_requests_total{endpoint="/v1/embeddings",status="200"}' in text
    assert "embed_corpus_request_seconds_bucket" in text and "embed_corpus_tokens_total" in text
    assert "embed_corpus_queue_depth" in text


def test_a_cross_encoder_reranker_refuses_an_instruction(minilm_job, minilm_dir: Path, tmp_path: Path) -> None:
    """A cross-encoder takes no task instruction: `/v1/rerank` with one answered 200 with the scores of none."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    ce = tmp_path / "ce"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)
                                  ).eval().save_pretrained(ce)
    for f in minilm_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, ce / f.name)
    service = Service.load(minilm_job[0], device="cpu", options=ServeOptions(batch_tokens=2048), rerank_model=str(ce))
    with ServerThread(service) as srv:
        body = {"query": "Which bear eats bamboo?", "documents": SENTENCES[:3]}
        assert httpx.post(srv.url + "/v1/rerank", json=body, timeout=60).status_code == 200
        r = httpx.post(srv.url + "/v1/rerank", json={**body, "instruction": "Find documents about physics"},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "instruction", r.text


def test_a_server_refuses_once_the_job_embeds_queries_otherwise(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    """`serve OUTPUT` kept embedding queries with what it loaded after a rerun changed the job's query side (here
    the query instruction; the same for a model replaced with --overwrite): 200 with vectors a fresh search would
    not make. Now 503, saying to restart it."""
    out, _ = _job(tmp_path, str(tiny_qwen3_dir), query_instruction="Old task")
    build_index(out)
    with ServerThread(Service.load(out, device="cpu", options=ServeOptions(batch_tokens=2048))) as srv:
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "bamboo"}, timeout=30).status_code == 200
        _job(tmp_path, str(tiny_qwen3_dir), query_instruction="New task")
        for route, body in (("/v1/embeddings", {"input": "bamboo"}), ("/search", {"query": "bamboo"})):
            r = httpx.post(srv.url + route, json=body, timeout=30)
            assert r.status_code == 503 and "start it again" in r.json()["error"]["message"], r.text
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 503
