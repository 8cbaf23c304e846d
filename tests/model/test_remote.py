"""``embed-corpus run --backend openai`` against the project's own ``serve`` (a real subprocess on a loopback port):
the output equals a local run (token-id input, text input, ``--dims``); 429, 5xx and dropped connections are retried
and counted once; a server that keeps failing stops the job with nothing lost, and a rerun finishes it; a 4xx is not
retried; the server killed and restarted mid-job: the job resumes and every id is there once."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import (
    MODEL,
    assert_ids_once,
    assert_same_vectors,
    done_markers,
    embed_args,
    make_docs,
    read_vectors,
    run_ok,
    subprocess_env,
    write_jsonl,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.job.config import make_config  # noqa: E402
from pipeline.job.runner import RunSummary, run_job  # noqa: E402
from pipeline.model.remote import endpoint_paths  # noqa: E402

N_DOCS = 160


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``embed-corpus serve --model MINILM`` as a child process on a fixed loopback port (restartable)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model", MODEL, "--port", str(self.port), "--device",
             "cpu", "--batch-tokens", "2048"], env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: "
                                     f"{(self.log_dir / f'serve-{self.starts}.log').read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("serve did not become healthy in 90s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp_path_factory.mktemp("serve_logs"))
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("remote_corpus") / "docs.jsonl", make_docs(N_DOCS, seed=7))


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, corpus: Path, minilm_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("remote_local") / "out"
    run_ok(*embed_args([corpus], out, "--shard-size", "10"))
    return out


@pytest.fixture()
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_CORPUS_HTTP_BACKOFF", "0.01")
    monkeypatch.setenv("EMBED_CORPUS_HTTP_MAX_BACKOFF", "0.05")
    monkeypatch.setenv("EMBED_CORPUS_HTTP_RETRIES", "4")


def _cfg(corpus: Path, out: Path, endpoint: str, **extra) -> object:
    return make_config({"input": (str(corpus),), "output": str(out), "model": MODEL, "backend": "openai",
                        "endpoint": endpoint, "batch_tokens": 2048, "quiet": True, "shard_size": 5, **extra})


def _job_record(out: Path) -> dict:
    return json.loads((out / "job.json").read_text())


def _tokens(out: Path) -> int:
    return int(sum(pq.read_table(out / "vectors").column("n_tokens").to_pylist()))


# ------------------------------------------------------------------------------------------ equal to a local run


def test_remote_run_equals_local_run(tmp_path: Path, corpus: Path, local: Path, server: ServeProcess) -> None:
    out = tmp_path / "remote"
    run_ok(*embed_args([corpus], out, "--shard-size", "10", "--backend", "openai", "--endpoint", server.url,
                       "--concurrency", "3"))
    remote, ref = read_vectors(out), read_vectors(local)
    assert_ids_once(remote, ref.column("id").to_pylist())
    assert_same_vectors(remote, ref)
    assert remote.column("n_tokens").to_pylist() == ref.column("n_tokens").to_pylist()
    model = _job_record(out)["model"]
    assert (model["backend"], model["endpoint"], model["api_model"], model["input"]) == (
        "openai", server.url, MODEL, "token_ids")
    assert model["server"]["owned_by"] == "embed-corpus" and model["dims"] == 384


def test_text_input_and_dims(tmp_path: Path, corpus: Path, local: Path, server: ServeProcess) -> None:
    """No tokenizer here (a hub id that cannot be read offline): texts are sent and the server frames them."""
    out = tmp_path / "text"
    args = embed_args([corpus], out, "--backend", "openai", "--endpoint", server.url + "/v1/embeddings",
                      "--api-model", MODEL)
    args[args.index(MODEL)] = "nowhere-org/not-a-local-model"
    run_ok(*args)
    assert _job_record(out)["model"]["input"] == "text"
    assert_same_vectors(read_vectors(out), read_vectors(local))

    local64, remote64 = tmp_path / "local64", tmp_path / "remote64"
    run_ok(*embed_args([corpus], local64, "--dims", "64"))
    run_ok(*embed_args([corpus], remote64, "--dims", "64", "--backend", "openai", "--endpoint", server.url))
    assert read_vectors(remote64).column("embedding").type.list_size == 64
    assert_same_vectors(read_vectors(remote64), read_vectors(local64))


def test_settings_a_server_would_not_apply_are_refused(tmp_path: Path, corpus: Path, server: ServeProcess) -> None:
    """Text mode (no model files here) sent texts whole and took the server's pooling, so `--max-length 16` (min
    cosine 0.627) and `--pooling cls` (0.519) were recorded in job.json without making the vectors, exit 0; in
    token-id mode an embed-corpus server that pools otherwise only got a warning (0.373). All refused now."""
    text = {"model": "nowhere-org/not-a-local-model", "api_model": MODEL}
    with pytest.raises(PipelineError, match="max_length"):
        run_job(_cfg(corpus, tmp_path / "a", server.url, max_length=16, **text))
    with pytest.raises(PipelineError, match="pooling"):
        run_job(_cfg(corpus, tmp_path / "b", server.url, pooling="cls", **text))
    with pytest.raises(PipelineError, match="the server pools mean, the job asks for cls"):
        run_job(_cfg(corpus, tmp_path / "c", server.url, pooling="cls"))
    assert not any(done_markers(tmp_path / d) for d in "abc")


def test_text_mode_against_a_server_with_its_own_document_prompt(tmp_path: Path, corpus: Path,
                                                                 server: ServeProcess) -> None:
    """`serve OUTPUT` of a job with a document prompt puts it before every document: in text mode this side had
    framed them already (the prompt twice, cosine 0.687), or recorded none (0.014). Refused. And a text over the
    server's limit goes with "truncate" (it was answered 400, where a local run truncates)."""
    from pipeline.serve.app import ServerThread
    from pipeline.serve.limits import ServeOptions
    from pipeline.serve.service import Service

    served = tmp_path / "served"
    run_ok(*embed_args([corpus], served, "--instruction", "Find the passage"))
    text = {"model": "nowhere-org/not-a-local-model", "api_model": MODEL}
    service = Service.load(output=served, device="cpu", options=ServeOptions(batch_tokens=2048))
    with ServerThread(service) as srv:
        with pytest.raises(PipelineError, match="its own prompt"):
            run_job(_cfg(corpus, tmp_path / "a", srv.url, **text))
    long = write_jsonl(tmp_path / "long" / "docs.jsonl", [{"id": "long", "text": "river stone light " * 400}])
    run_job(_cfg(long, tmp_path / "b", server.url, **text))
    run_ok(*embed_args([long], tmp_path / "c"))
    assert_same_vectors(read_vectors(tmp_path / "b"), read_vectors(tmp_path / "c"))


def test_endpoint_forms() -> None:
    assert endpoint_paths("http://h:1")[2:] == ("/v1/embeddings", "/v1/models")
    assert endpoint_paths("http://h:1/v1/")[2:] == ("/v1/embeddings", "/v1/models")
    assert endpoint_paths("https://h/v1/embeddings")[2:] == ("/v1/embeddings", "/v1/models")
    assert endpoint_paths("https://h/openai")[2:] == ("/openai/embeddings", "/openai/models")
    with pytest.raises(PipelineError):
        endpoint_paths("ftp://h")


# ------------------------------------------------------------------------------------------ failures


class FlakyProxy:
    """A loopback proxy in front of the real server; ``plan(n)`` answers the n-th POST: None forwards it, an int
    answers that HTTP status, ``"drop"`` closes the connection without an answer. ``rewrite`` changes the answers
    to forwarded POSTs (a server whose model changed)."""

    def __init__(self, upstream: str, plan: Callable[[int], int | str | None],
                 rewrite: Callable[[bytes], bytes] | None = None) -> None:
        self.upstream = upstream
        self.plan = plan
        self.rewrite = rewrite
        self.posts = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str, body: bytes | None) -> None:
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, payload = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                if method == "POST" and status == 200 and proxy.rewrite is not None:
                    payload = proxy.rewrite(payload)
                self._send(status, payload)

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._forward("GET", None)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    n = proxy.posts
                    proxy.posts += 1
                action = proxy.plan(n)
                if action == "drop":
                    self.close_connection = True
                    return
                if isinstance(action, int):
                    err = json.dumps({"error": {"message": f"planned {action}", "type": "server_error"}}).encode()
                    self._send(action, err, {"Retry-After": "0"})
                    return
                with proxy.lock:
                    proxy.forwarded += 1
                self._forward("POST", body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_429_5xx_and_dropped_connections_are_retried_and_counted_once(
        tmp_path: Path, corpus: Path, local: Path, server: ServeProcess, fast_retries: None) -> None:
    faults = [429, "drop", 503, 500, "drop"]
    # every other POST fails, so every request (the probe included) fails at least once before it succeeds
    with FlakyProxy(server.url, lambda n: faults[(n // 2) % len(faults)] if n % 2 == 0 else None) as proxy:
        out = tmp_path / "out"
        summary: RunSummary = run_job(_cfg(corpus, out, proxy.url, concurrency=3))
    remote, ref = read_vectors(out), read_vectors(local)
    assert_ids_once(remote, ref.column("id").to_pylist())
    assert_same_vectors(remote, ref)
    assert proxy.posts - proxy.forwarded >= proxy.forwarded - 1  # the faults did happen
    assert summary.docs == N_DOCS and summary.tokens == _tokens(local)  # progress counted once per request
    stats = [json.loads(p.read_text()) for p in done_markers(out)]
    assert sum(s["rows"] for s in stats) == N_DOCS


def test_a_server_that_keeps_failing_stops_the_job_and_loses_nothing(
        tmp_path: Path, corpus: Path, local: Path, server: ServeProcess, fast_retries: None) -> None:
    out = tmp_path / "out"
    # the probe, the check texts and 5 shards, then 500s
    with FlakyProxy(server.url, lambda n: None if n < 7 else 500) as proxy:
        with pytest.raises(PipelineError, match="keeps failing.*rerun the same command"):
            run_job(_cfg(corpus, out, proxy.url, concurrency=1))
    done = done_markers(out)
    parts = sorted(p for p in (out / "parts").glob("part-*.parquet") if not p.name.endswith(".docs.parquet"))
    assert len(done) == 5 and len(parts) == 5  # the failing shard was not written
    assert not list((out / "parts").glob(".*tmp*"))
    assert not (out / "vectors").exists()  # readers see no version until the job is complete
    summary = run_job(_cfg(corpus, out, server.url))  # the same job, the server is back
    assert summary.shards_done == N_DOCS // 5 - 5
    remote = read_vectors(out)
    assert_ids_once(remote, read_vectors(local).column("id").to_pylist())
    assert_same_vectors(remote, read_vectors(local))


def _reversed_vectors(payload: bytes) -> bytes:
    """Each embedding's components in reverse order: the same norms, other directions (another model)."""
    import base64

    body = json.loads(payload)
    for item in body.get("data", []):
        v = item["embedding"]
        if isinstance(v, str):
            item["embedding"] = base64.b64encode(np.frombuffer(base64.b64decode(v), "<f4")[::-1].tobytes()).decode()
        else:
            item["embedding"] = v[::-1]
    return json.dumps(body).encode()


def test_a_server_whose_model_changed_is_refused_not_mixed(tmp_path: Path, corpus: Path,
                                                           server: ServeProcess) -> None:
    """The nightly run embeds through a server whose model was replaced under the same name: the job's files
    digest sees nothing (the model is remote), and the edited document's vector came from the other model while
    the rest were kept, exit 0. Now the check texts refuse the run before it writes a vector."""
    from pipeline.errors import ManifestMismatch
    from pipeline.job.versions import live_version

    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    mine = write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    out = tmp_path / "out"
    run_job(_cfg(mine, out, server.url))
    before = read_vectors(out)
    docs[5] = {**docs[5], "text": "edited after the server's model changed"}
    write_jsonl(mine, docs)
    with FlakyProxy(server.url, lambda n: None, rewrite=_reversed_vectors) as proxy:
        with pytest.raises(ManifestMismatch, match="embeds the check texts differently"):
            run_job(_cfg(mine, out, proxy.url))
        assert proxy.forwarded >= 1
    assert live_version(out) == 1 and read_vectors(out).equals(before)


def _rewrite_vectors(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[bytes], bytes]:
    def rewrite(payload: bytes) -> bytes:
        body = json.loads(payload)
        for item in body["data"]:
            item["embedding"] = change(np.asarray(item["embedding"], dtype=np.float64)).tolist()
        return json.dumps(body).encode()
    return rewrite


def test_a_wider_server_that_ignores_dimensions_is_refused_not_cut(tmp_path: Path, corpus: Path,
                                                                   server: ServeProcess) -> None:
    """`--dims 64` through a server that ignores `dimensions` and serves a wider model (here: 128 numbers, not
    MiniLM's 384): the first 64 were kept as this model's Matryoshka vectors, exit 0. Refused now."""
    wider = _rewrite_vectors(lambda v: np.concatenate([v[::-1], v]))
    with FlakyProxy(server.url, lambda n: None, rewrite=wider) as proxy:
        with pytest.raises(PipelineError, match="serves another model"):
            run_job(_cfg(corpus, tmp_path / "out", proxy.url, dims=64))
    assert not done_markers(tmp_path / "out")


def test_large_vectors_are_normalised_not_zeroed(tmp_path: Path, corpus: Path, local: Path,
                                                 server: ServeProcess) -> None:
    """A server whose vectors are large (unnormalised, 1e25 each): their float32 norms overflowed and every vector
    was written as zeros, exit 0. Norms are taken in float64."""
    with FlakyProxy(server.url, lambda n: None, rewrite=_rewrite_vectors(lambda v: v * 1e25)) as proxy:
        run_job(_cfg(corpus, tmp_path / "out", proxy.url))
    assert_same_vectors(read_vectors(tmp_path / "out"), read_vectors(local))


def test_a_4xx_is_not_retried_and_a_wrong_model_is_named(
        tmp_path: Path, corpus: Path, server: ServeProcess, fast_retries: None) -> None:
    with FlakyProxy(server.url, lambda n: None if n == 0 else 400) as proxy:
        with pytest.raises(PipelineError, match="HTTP 400: planned 400"):
            run_job(_cfg(corpus, tmp_path / "a", proxy.url))
        assert proxy.posts == 2  # the probe, then one refused request: no retry
    with pytest.raises(PipelineError, match="pass --api-model"):
        run_job(_cfg(corpus, tmp_path / "b", server.url, api_model="text-embedding-3-small"))
    with pytest.raises(PipelineError, match="failed 5 times"):  # nothing listening
        run_job(_cfg(corpus, tmp_path / "c", f"http://127.0.0.1:{_free_port()}"))
    assert not done_markers(tmp_path / "c")


def test_api_key_from_the_environment(tmp_path: Path, corpus: Path, local: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.serve.app import ServerThread
    from pipeline.serve.limits import ServeOptions
    from pipeline.serve.service import Service

    monkeypatch.delenv("EMBED_CORPUS_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    service = Service.load(model=MODEL, device="cpu", options=ServeOptions(api_key="k3y", batch_tokens=2048))
    with ServerThread(service) as srv:
        with pytest.raises(PipelineError, match="HTTP 401"):
            run_job(_cfg(corpus, tmp_path / "a", srv.url))
        monkeypatch.setenv("OPENAI_API_KEY", "k3y")
        run_job(_cfg(corpus, tmp_path / "b", srv.url))
    assert_same_vectors(read_vectors(tmp_path / "b"), read_vectors(local))


# ------------------------------------------------------------------------------------------ kill and restart


def test_server_killed_and_restarted_mid_job(tmp_path: Path, corpus: Path, local: Path, server: ServeProcess,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_CORPUS_HTTP_BACKOFF", "0.2")
    monkeypatch.setenv("EMBED_CORPUS_HTTP_MAX_BACKOFF", "2")
    monkeypatch.setenv("EMBED_CORPUS_HTTP_RETRIES", "30")
    out = tmp_path / "out"
    result: dict[str, object] = {}

    def job() -> None:
        try:
            result["summary"] = run_job(_cfg(corpus, out, server.url, shard_size=2, concurrency=2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    total = N_DOCS // 2
    deadline = time.monotonic() + 60
    while len(done_markers(out)) < 3 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    server.kill()
    at_kill = len(done_markers(out))
    assert 3 <= at_kill < total, f"{at_kill} of {total} shards were done when the server was killed"
    time.sleep(1.0)  # the job is now retrying against a closed port
    assert thread.is_alive()
    server.start()
    thread.join(120)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    remote, ref = read_vectors(out), read_vectors(local)
    assert_ids_once(remote, ref.column("id").to_pylist())
    assert_same_vectors(remote, ref)
    assert len(done_markers(out)) == total
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "retry" in logs
    assert result["summary"].tokens == _tokens(local)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(remote.column("n_tokens").to_numpy(), ref.column("n_tokens").to_numpy())
