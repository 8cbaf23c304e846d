"""Remote backend: embed a job's shards through an OpenAI-compatible ``/v1/embeddings`` server.

``embed-corpus run ... --backend openai --endpoint URL`` puts a ``RemoteEmbedder`` where the local model would be;
planning, shards, claims, resume and the output are the runner's, unchanged.

Input. When the model's tokenizer and config can be read here (``--model`` is a local folder, a ``pkg:`` path or a
hub id in the cache), texts are tokenized and framed exactly as a local run frames them (prompt, special tokens,
Qwen3's single ``<|endoftext|>``, truncation, chunking) and sent as token ids, so the server embeds our sequences
and nothing else. Otherwise the texts (with the job's ``--instruction``) are sent as strings and the server frames
them; token counts are then estimates and over-long texts are the server's to truncate or refuse.

Requests. Sequences are cut into token-budget batches (``--batch-tokens``, counted as the sum of lengths, at most
``MAX_INPUTS`` inputs) and sent ``--concurrency`` at a time from a thread pool, one keep-alive connection per
thread. Connection errors, timeouts, 408/409/425/429 and 5xx are retried with exponential backoff and jitter
(``Retry-After`` honoured). A batch's vectors and its progress are taken once, from its one successful response, so
a retried request is never counted twice. Any other 4xx, or a request still failing after the last retry, raises
``PipelineError``: the shard in hand is not committed, the finished ones are kept, and rerunning the same command
resumes.

Settings without a job-file key are read from the environment: ``EMBED_CORPUS_API_KEY`` (else ``OPENAI_API_KEY``),
``EMBED_CORPUS_HTTP_RETRIES`` (8), ``EMBED_CORPUS_HTTP_BACKOFF`` (0.5 s, doubled per retry),
``EMBED_CORPUS_HTTP_MAX_BACKOFF`` (30 s), ``EMBED_CORPUS_HTTP_TIMEOUT`` (300 s per request) and
``EMBED_CORPUS_ENCODING_FORMAT`` (``float`` or ``base64``).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pipeline.errors import EncodeError, PipelineError
from pipeline.model.encoder import ModelInfo, ModelOptions, format_instruction, resolve_model_path
from pipeline.model.tokens import Encoded, TextTokenizer

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
RETRY_STATUS = frozenset({408, 409, 425, 429})  # and every 5xx
BYTES_PER_TOKEN = 3  # text mode: tokens estimated from UTF-8 bytes (conservative for English, fair for CJK)
PROBE_TEXT = "hello"


class TransientError(Exception):
    """A request that may succeed if sent again (connection error, timeout, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RemoteModelInfo(ModelInfo):
    """``ModelInfo`` plus where the vectors came from; written to ``job.json`` as ``model``.

    In text mode (no tokenizer here) ``model_type`` is ``"unknown"``, ``pooling`` ``"auto"``, ``prefix``/``suffix``
    empty and ``max_length`` the server's if it says (else 0).
    """

    backend: str = "openai"
    endpoint: str = ""
    api_model: str = ""
    input: str = "token_ids"  # or "text"
    server: dict[str, Any] = field(default_factory=dict)


def endpoint_paths(endpoint: str) -> tuple[str, str, str, str]:
    """``(scheme, netloc, embeddings path, models path)`` of a server URL.

    ``http://h:p``, ``http://h:p/v1`` and ``http://h:p/v1/embeddings`` all mean ``/v1/embeddings``; another path
    prefix (``https://h/openai``) gets ``/embeddings`` appended.

    Raises:
        PipelineError: not an http(s) URL.
    """
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PipelineError(f"endpoint: {endpoint!r} is not an http:// or https:// URL")
    path = parts.path.rstrip("/")
    if path.endswith("/embeddings"):
        path = path[: -len("/embeddings")]
    elif not path:
        path = "/v1"
    return parts.scheme, parts.netloc, path + "/embeddings", path + "/models"


def error_message(payload: bytes) -> str:
    """The message of an error response: OpenAI's ``{"error": {"message"}}``, FastAPI's ``detail``, or the text."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload[:300].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("error", "detail", "message"):
            if isinstance(obj.get(key), str):
                return obj[key]
    return json.dumps(obj)[:300]


class HttpClient:
    """A small thread-safe JSON client (stdlib ``http.client``, one keep-alive connection per thread).

    Args:
        endpoint: the server URL (see ``endpoint_paths``).
        api_key: sent as ``Authorization: Bearer``.
        timeout: seconds to connect and to wait for each response.
    """

    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.scheme, self.netloc, self.embeddings_path, self.models_path = endpoint_paths(endpoint)
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "User-Agent": "embed-corpus"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.netloc, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request; ``(status, headers, body bytes)``.

        Raises:
            TransientError: the connection failed or timed out (the caller may retry).
        """
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=self.headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()  # a half-used connection cannot be reused
            raise TransientError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        if resp.will_close:
            self._drop()
        return resp.status, resp.headers, payload


class TextInput:
    """Stands in for the tokenizer when the model's files are not here: texts go to the server as strings.

    ``encode`` returns an ``Encoded`` whose ``texts`` are the prompt + text of each input, whose ``ids`` are empty
    and whose lengths are estimates (UTF-8 bytes / 3), used only to size requests and to report progress.
    """

    def __init__(self, prompt: str = "") -> None:
        self.prompt = prompt
        self.tokenizer = None  # no Hugging Face tokenizer (search.TextSource looks for one)

    def encode(self, texts: list[str]) -> Encoded:
        framed = [self.prompt + t for t in texts] if self.prompt else list(texts)
        lengths = np.fromiter((max(1, -(-len(t.encode("utf-8")) // BYTES_PER_TOKEN)) for t in framed),
                              dtype=np.int64, count=len(framed))
        offsets = np.zeros(len(framed) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        span = np.stack([np.zeros_like(lengths), lengths], axis=1).astype(np.int32).reshape(-1, 2)
        return Encoded(np.zeros(0, dtype=np.int32), offsets, np.arange(len(framed), dtype=np.int64),
                       np.zeros(len(framed), dtype=np.int32), span, np.zeros(len(framed), dtype=bool), texts=framed)


def local_framing(cfg: ModelOptions) -> tuple[TextTokenizer, ModelInfo] | None:
    """The job's tokenizer and model framing from the model's config and tokenizer files alone (no weights).

    The model is built on PyTorch's ``meta`` device (no memory, no weights) and handed to
    ``Embedder.from_loaded``, so prompts, special tokens, max length and pooling come from exactly the code a
    local run uses. Returns None when the files cannot be read here (text mode).

    Raises:
        PipelineError: the files are here but an option does not fit the model (dims, prompt_name, ...).
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model_path(cfg.model)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        hf_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            net = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to read the files means text mode
        log.warning("model %s: no tokenizer/config here (%s); sending text, the server tokenizes", cfg.model,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    from pipeline.model.encoder import Embedder

    try:
        emb = Embedder.from_loaded(
            net.eval(), hf_tok, model=cfg.model, path=path, device="cpu", pooling=cfg.pooling,
            max_length=cfg.max_length, dims=cfg.dims, normalize=cfg.normalize, instruction=cfg.instruction,
            prompt_name=cfg.prompt_name, long_docs=cfg.long_docs, chunk_tokens=cfg.chunk_tokens,
            chunk_overlap=cfg.chunk_overlap, batch_tokens=cfg.batch_tokens, attention="padded", compile=False,
            framing_only=True,
        )
    except ValueError as exc:  # a prompt longer than max_length
        raise PipelineError(f"model {cfg.model!r}: {exc}") from exc
    return emb.tokenizer, emb.info


def _env_number(name: str, default: float, cast: Callable[[str], float] = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError as exc:
        raise PipelineError(f"{name}: {raw!r} is not a number") from exc
    if value < 0:
        raise PipelineError(f"{name}: {raw!r} must not be negative")
    return value


class RemoteEmbedder:
    """The runner's embedder interface (``tokenizer``, ``info``, ``embed_encoded``) over an OpenAI-compatible server.

    Build it with ``from_options`` (which also checks the server and the model); see the module docstring.

    Args:
        endpoint: server URL.
        model: the job's ``--model`` (recorded; the tokenizer's source).
        api_model: the model name sent in requests.
        tokenizer: a ``TextTokenizer`` (token-id input) or ``TextInput`` (text input).
        local: the model framing read here (token-id mode), else None.
        dims: requested Matryoshka dims (sent as ``dimensions``), or None.
        normalize: L2-normalise the vectors received (servers normalise already; this makes sure).
        batch_tokens: tokens per request (sum of sequence lengths).
        concurrency: requests in flight.
        api_key: bearer token.
        max_retries: retries of one request before the job stops.
        backoff: first retry delay in seconds, doubled per retry (with jitter), capped at ``max_backoff``.
        timeout: seconds per request.
        encoding_format: ``float`` or ``base64``.

    Example:
        >>> emb = RemoteEmbedder.from_options(opts, endpoint=URL)                     # doctest: +SKIP
        >>> emb.embed_encoded(emb.tokenizer.encode(["a", "b"])).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(self, endpoint: str, *, model: str, api_model: str, tokenizer: TextTokenizer | TextInput,
                 local: ModelInfo | None, dims: int | None = None, normalize: bool = True, batch_tokens: int = 16384,
                 concurrency: int = 4, api_key: str | None = None, max_retries: int = 8, backoff: float = 0.5,
                 max_backoff: float = 30.0, timeout: float = 300.0, encoding_format: str = "float") -> None:
        if encoding_format not in ("float", "base64"):
            raise PipelineError(f"encoding format: {encoding_format!r} is not float or base64")
        self.endpoint = endpoint
        self.model = model
        self.api_model = api_model
        self.tokenizer = tokenizer
        self.local = local
        self.dims = dims
        self.normalize = normalize
        self.batch_tokens = batch_tokens
        self.concurrency = concurrency
        self.max_retries = int(max_retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.encoding_format = encoding_format
        self.client = HttpClient(endpoint, api_key, timeout)
        self.extra: dict[str, Any] = {}  # fields only an embed-corpus server understands
        self.info: ModelInfo | None = None
        self.requests = 0  # successful requests
        self.usage_tokens = 0  # prompt tokens the server reported for them
        self._count_lock = threading.Lock()
        self._rng = random.Random(0)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="remote")
        self._warned_cut = False

    @property
    def device(self) -> str:
        return "remote"

    @classmethod
    def from_options(cls, cfg: ModelOptions, *, endpoint: str, api_model: str | None = None,
                     concurrency: int = 4) -> RemoteEmbedder:
        """A client of ``endpoint`` for the model and framing of ``cfg``: tokenizer (token ids when the model's
        files are here, else text), server check and a probe request.

        Raises:
            PipelineError: ``--no-normalize``, a model option that does not fit, a server that does not answer or
                does not serve the model, or vectors of another size than the job's.
        """
        if not cfg.normalize:
            raise PipelineError("normalize: an OpenAI-compatible server returns normalised vectors; "
                                "--no-normalize needs --backend local")
        framing = local_framing(cfg)
        if framing is None:
            if cfg.prompt_name is not None:
                raise PipelineError(f"prompt_name: the prompts of {cfg.model!r} cannot be read here; give "
                                    "--instruction, or make the model's files available")
            if cfg.long_docs == "chunk":
                raise PipelineError(f"long_docs: chunking needs the tokenizer of {cfg.model!r} here")
            # the server frames, truncates and pools text its own way: a setting this side cannot apply would be
            # recorded in job.json without being what made the vectors
            if cfg.max_length is not None:
                raise PipelineError(f"max_length: {cfg.model!r} cannot be read here, so texts go to the server "
                                    "whole and it truncates them to its own limit; drop --max-length, or make the "
                                    "model's files available (token ids are then cut here)")
            if cfg.pooling != "auto":
                raise PipelineError(f"pooling: the server pools as its model does; --pooling {cfg.pooling} cannot "
                                    "be applied to vectors it returns")
            tokenizer: TextTokenizer | TextInput = TextInput(
                format_instruction(cfg.instruction) if cfg.instruction is not None else "")
            local = None
        else:
            tokenizer, local = framing
        emb = cls(
            endpoint, model=cfg.model, api_model=api_model or cfg.model, tokenizer=tokenizer,
            local=local, dims=cfg.dims, normalize=cfg.normalize, batch_tokens=cfg.batch_tokens or 16384,
            concurrency=concurrency,
            api_key=os.environ.get("EMBED_CORPUS_API_KEY") or os.environ.get("OPENAI_API_KEY") or None,
            max_retries=int(_env_number("EMBED_CORPUS_HTTP_RETRIES", 8, int)),
            backoff=_env_number("EMBED_CORPUS_HTTP_BACKOFF", 0.5),
            max_backoff=_env_number("EMBED_CORPUS_HTTP_MAX_BACKOFF", 30.0),
            timeout=_env_number("EMBED_CORPUS_HTTP_TIMEOUT", 300.0),
            encoding_format=os.environ.get("EMBED_CORPUS_ENCODING_FORMAT", "float"),
        )
        emb.connect()
        return emb

    # ------------------------------------------------------------------------------------------ server

    def _server_entry(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about ``api_model`` ({} when the server has no such route).

        Raises:
            PipelineError: the server lists models and ``api_model`` is not one of them.
        """
        status, _, payload = self._call(lambda: self.client.request("GET", self.client.models_path), "GET models")
        if status != 200:
            log.info("%s: GET %s answered %d; not checking the model name", self.endpoint, self.client.models_path,
                     status)
            return {}
        try:
            data = json.loads(payload).get("data") or []
            ids = [str(m.get("id")) for m in data if isinstance(m, dict)]
        except (ValueError, AttributeError):
            return {}
        if ids and self.api_model not in ids:
            raise PipelineError(f"{self.endpoint} serves {', '.join(map(repr, ids))}, not {self.api_model!r}: "
                                "pass --api-model NAME")
        return next((m for m in data if isinstance(m, dict) and m.get("id") == self.api_model), {})

    def connect(self) -> None:
        """Check the server and the model name, embed one probe input, and fill ``info``.

        Raises:
            PipelineError: see ``from_options``.
        """
        entry = self._server_entry()
        ours = entry.get("embed_corpus") if isinstance(entry.get("embed_corpus"), dict) else None
        if ours is not None and isinstance(self.tokenizer, TextInput):
            if ours.get("document_prompt"):  # it would put its prompt before the text this side already framed
                raise PipelineError(
                    f"{self.endpoint}: the server frames documents with its own prompt "
                    f"{ours['document_prompt']!r}, and the model's files are not here to send token ids instead: "
                    "serve the model with `embed-corpus serve --model M`, or make the model's files available")
            # an embed-corpus server frames text as a query unless told, and refuses text over its limit unless
            # told to truncate (a local run truncates); a bulk job embeds documents
            self.extra = {"input_type": "document", "truncate": True}
        enc = self.tokenizer.encode([PROBE_TEXT])
        width = self._request(enc, np.arange(1), None).shape[1]
        local = self.local
        expected = self.dims or (local.width if local is not None else width)
        if width < expected or (width > expected and self.dims is None):
            hint = f"; pass --dims {width} if that is intended" if width < expected and self.dims is None else ""
            raise PipelineError(f"{self.endpoint}: the server returns {width}-dim vectors for {self.api_model!r}, "
                                f"the job needs {expected}{hint}")
        self._check_full_width(width, expected)
        server = {k: entry[k] for k in ("id", "owned_by", "created") if k in entry}
        if ours is not None:
            server["embed_corpus"] = ours
            self._compare(ours)
        common = {"backend": "openai", "endpoint": self.endpoint, "api_model": self.api_model, "server": server}
        if local is not None:
            self.info = RemoteModelInfo(**{**{f.name: getattr(local, f.name) for f in fields(local)}, "dims": expected,
                                           "compute_dtype": "remote"},
                                        input="token_ids", **common)
        else:
            assert isinstance(self.tokenizer, TextInput)
            said = ours or {}
            self.info = RemoteModelInfo(
                model=self.model, path="", model_type="unknown", hidden_size=int(said.get("hidden_size", width)),
                width=width,
                dims=expected, pooling=str(said.get("pooling", "auto")), normalize=self.normalize,
                max_length=int(said.get("max_length", 0)), prefix=(), suffix=(), prompt=self.tokenizer.prompt,
                prompts={}, compute_dtype="remote", input="text", **common)
        log.info("remote model %s at %s: %d dims, %s input", self.api_model, self.endpoint, expected,
                 self.info.input)  # type: ignore[attr-defined]

    def _compare(self, ours: dict[str, Any]) -> None:
        """Refuse where an embed-corpus server pools otherwise than the job; warn where its max length is shorter."""
        if self.local is None:
            return
        theirs, mine = ours.get("pooling"), self.local.pooling
        if theirs is not None and theirs != mine:  # its vectors would not be what job.json says made them
            raise PipelineError(f"{self.endpoint}: the server pools {theirs}, the job asks for {mine}: serve the "
                                f"model with the job's pooling, or run with --pooling {theirs}")
        theirs, mine = ours.get("max_length"), self.local.max_length
        if theirs is not None and theirs < mine:  # token ids are cut here; a longer input may be refused there
            log.warning("%s: the server's max_length is %r, the job's is %r", self.endpoint, theirs, mine)

    # ------------------------------------------------------------------------------------------ requests

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.max_backoff, self.backoff * (2**attempt))
        delay = base * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def _call(self, send: Callable[[], tuple[int, Any, bytes]], what: str,
              cancel: threading.Event | None = None) -> tuple[int, Any, bytes]:
        """``send()`` until it gets an answer that is not transient; ``(status, headers, body)``.

        Raises:
            PipelineError: still transient after ``max_retries`` retries, or cancelled.
        """
        last = ""
        for attempt in range(self.max_retries + 1):
            if cancel is not None and cancel.is_set():
                raise PipelineError(f"{what}: cancelled")
            retry_after = None
            try:
                status, headers, payload = send()
            except TransientError as exc:
                last = str(exc)
            else:
                if status not in RETRY_STATUS and status < 500:
                    return status, headers, payload
                last = f"HTTP {status}: {error_message(payload)}"
                try:
                    retry_after = float(headers.get("Retry-After")) if headers.get("Retry-After") else None
                except ValueError:
                    retry_after = None
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            log.warning("%s: %s; retry %d of %d in %.1fs", what, last, attempt + 1, self.max_retries, delay)
            if cancel is not None:
                if cancel.wait(delay):
                    raise PipelineError(f"{what}: cancelled")
            else:
                time.sleep(delay)
        raise PipelineError(
            f"{self.endpoint}: {what} failed {self.max_retries + 1} times, last: {last}. The server keeps failing: "
            "the shard in progress was not written; finished shards are kept, rerun the same command to resume"
        )

    def _request(self, enc: Encoded, idx: np.ndarray, cancel: threading.Event | None) -> np.ndarray:
        """float32 (len(idx), width): the server's vectors for sequences ``idx`` of ``enc``, in that order."""
        if enc.texts is not None:
            inputs: list[Any] = [enc.texts[int(i)] for i in idx]
        else:
            inputs = [enc.sequence(int(i)).tolist() for i in idx]
        body: dict[str, Any] = {"model": self.api_model, "input": inputs, "encoding_format": self.encoding_format,
                                **self.extra}
        if self.dims is not None:
            body["dimensions"] = self.dims
        what = f"a request of {len(idx)} inputs ({int(enc.lengths[idx].sum())} tokens)"
        status, _, payload = self._call(
            lambda: self.client.request("POST", self.client.embeddings_path, body), what, cancel)
        if status != 200:
            hint = " (pass --api-model NAME)" if status == 404 else ""
            raise PipelineError(f"{self.endpoint}: the server refused {what} with HTTP {status}: "
                                f"{error_message(payload)}{hint}")
        vectors, tokens = self._parse(payload, len(idx))
        with self._count_lock:
            self.requests += 1
            self.usage_tokens += tokens
        return vectors

    def _parse(self, payload: bytes, n: int) -> tuple[np.ndarray, int]:
        """Vectors (n, width) float32 in input order, and the prompt tokens of ``usage``.

        Raises:
            PipelineError: the response is not an embeddings response for ``n`` inputs.
        """
        try:
            obj = json.loads(payload)
            rows = sorted(obj["data"], key=lambda d: int(d["index"]))
            if [int(r["index"]) for r in rows] != list(range(n)):
                raise ValueError(f"{len(rows)} embeddings for {n} inputs")
            vecs = [np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") if isinstance(r["embedding"], str)
                    else np.asarray(r["embedding"], dtype=np.float32) for r in rows]
            if len({len(v) for v in vecs}) != 1:
                raise ValueError("embeddings of different lengths")
            tokens = int((obj.get("usage") or {}).get("prompt_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PipelineError(f"{self.endpoint}: not an embeddings response ({exc})") from exc
        return np.stack(vecs).astype(np.float32, copy=False), tokens

    def _check_full_width(self, width: int, dims: int) -> None:
        """A vector wider than the job's dims is cut here only if it is the whole vector of the job's model: a
        server that ignores ``dimensions`` and sends wider vectors than the model's files here give serves
        another model, whose first ``dims`` numbers are not this model's Matryoshka vector."""
        full = self.local.width if self.local is not None else None
        if width != dims and full is not None and width != full:
            raise PipelineError(
                f"{self.endpoint}: the server returns {width}-dim vectors for {self.api_model!r}, but {self.model} "
                f"gives {full} ({dims} with 'dimensions'): it serves another model")

    def _fit(self, vectors: np.ndarray) -> np.ndarray:
        """Cut to the job's dims if the server ignored ``dimensions`` (Matryoshka: first N, then normalise)."""
        dims = self.info.dims if self.info is not None else vectors.shape[1]
        if vectors.shape[1] == dims:
            return vectors
        if vectors.shape[1] < dims or self.dims is None:
            raise PipelineError(f"{self.endpoint}: got {vectors.shape[1]}-dim vectors, the job needs {dims}")
        self._check_full_width(vectors.shape[1], dims)
        if not self._warned_cut:
            log.warning("%s ignores 'dimensions'; cutting its %d-dim vectors to %d here", self.endpoint,
                        vectors.shape[1], dims)
            self._warned_cut = True
        return vectors[:, :dims]

    def embed_encoded(self, enc: Encoded, *, window: int | None = None, on_batch=None) -> np.ndarray:
        """Vectors for every sequence of ``enc``, ``concurrency`` requests at a time.

        Args:
            enc: sequences (token ids, or ``texts`` in text mode).
            window: sequences sorted by length together (default: all).
            on_batch: called with each request's index array once its vectors are in (from this thread).

        Returns:
            float32 (len(enc), dims) in the order of ``enc``, L2-normalised.

        Raises:
            PipelineError: the server refused a request or kept failing (nothing is returned, so nothing is
                written for this shard).
            EncodeError: a non-finite vector (the sequence index is in ``index``).
        """
        from pipeline.model.batching import token_budget_batches

        if self.info is None:
            self.connect()
        out = np.empty((len(enc), self.info.dims), dtype=np.float32)
        batches = token_budget_batches(enc.lengths, self.batch_tokens, window=window, cost="packed",
                                       max_batch=MAX_INPUTS)
        cancel = threading.Event()
        pending: dict[Future, np.ndarray] = {self._pool.submit(self._request, enc, b, cancel): b for b in batches}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    batch = pending.pop(fut)
                    out[batch] = self._fit(fut.result())
                    if on_batch is not None:
                        on_batch(batch)
        except BaseException:
            cancel.set()  # requests not yet sent are dropped, those waiting to retry give up
            for fut in pending:
                fut.cancel()
            wait(pending)
            raise
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise EncodeError(f"the server returned {int(bad.sum())} non-finite vectors, the first for sequence "
                              f"{first}", index=first)
        if self.normalize:  # norms in float64: a float32 sum of squares of large values overflows (to 0 vectors)
            norms = np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True)
            np.divide(out, norms, out=out, where=norms > 0, casting="unsafe")
        return out

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed a list of texts (one vector per text; with chunking, the first chunk's)."""
        enc = self.tokenizer.encode(texts)
        return self.embed_encoded(enc)[np.flatnonzero(enc.chunk == 0)]

    def close(self) -> None:
        """Stop the request threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

