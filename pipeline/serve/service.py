"""The service: everything the routes need, without HTTP (model, tokenizers, batcher, index, reranker, limits)."""

from __future__ import annotations

import base64
import copy
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.job.record import JobWatch
from pipeline.job.records import is_blank
from pipeline.model.encoder import check_prompt
from pipeline.model.tokens import Encoded, TextTokenizer
from pipeline.serve.batcher import Batcher
from pipeline.serve.limits import ApiError, ServeOptions, _bad, _get_bool, _get_int, _get_text, _is_int, check_bearer
from pipeline.serve.metrics import Metrics

if TYPE_CHECKING:
    from pipeline.index.search import Searcher
    from pipeline.model.encoder import Embedder
    from pipeline.model.rerank import Reranker

log = logging.getLogger(__name__)

INSTRUCTION_CACHE = 32  # per-request instructions whose tokenizers are kept


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
        self._job_watch = JobWatch(output, job) if output is not None and job else None
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
             options: ServeOptions | None = None, rerank_model: str | None = None,
             trust_remote_code: bool = False) -> Service:
        """Load the model (a job's query embedder, or ``model``), OUTPUT's index if any, and the reranker.

        Args:
            trust_remote_code: allow the models' own Python code (the ``--trust-remote-code`` flag); a job that
                was made with it is refused without it, whatever its ``job.json`` says.

        Raises:
            PipelineError: neither or both of ``output`` and ``model``, no ``job.json``, a model that cannot load,
                a job that needs ``trust_remote_code`` without it.
        """
        from pipeline.job.record import query_embedder, read_job_record
        from pipeline.model.encoder import Embedder, format_instruction

        options = options or ServeOptions()
        if (output is None) == (model is None):
            raise PipelineError("give a job's OUTPUT directory or --model M (one of them)")
        job: dict[str, Any] | None = None
        searcher, search_error = None, "no index: serve a job's OUTPUT (with an index) to search"
        try:
            if output is not None:
                job = read_job_record(output)
                embedder = query_embedder(output, device=device, batch_tokens=options.batch_tokens,
                                          trust_remote_code=trust_remote_code)
                document_prompt = str(job["model"].get("prompt", ""))
                query_prompt = embedder.info.prompt
                name = str(job["config"]["model"])
            else:
                assert model is not None
                embedder = Embedder.load(model, device=device, batch_tokens=options.batch_tokens,
                                         trust_remote_code=trust_remote_code)
                document_prompt = embedder.info.prompt
                query_prompt = embedder.info.prompts.get("query", document_prompt)
                name = model
        except ValueError as exc:  # a prompt longer than max_length
            raise PipelineError(str(exc)) from exc
        if options.instruction is not None:
            query_prompt = format_instruction(options.instruction)
        for prompt in (document_prompt, query_prompt):
            check_prompt(embedder.info, prompt)
        if output is not None:
            from pipeline.index.search import Searcher

            try:
                searcher, search_error = Searcher(output, embedder=embedder), None
            except PipelineError as exc:
                search_error = f"search is not available: {exc}"
                log.warning("%s", search_error)
        reranker = None
        if rerank_model:
            from pipeline.model.rerank import load_reranker

            reranker = load_reranker(rerank_model, device=device, instruction=options.rerank_instruction,
                                     trust_remote_code=trust_remote_code)
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
        check_bearer(self.options.api_key, authorization)

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
            check_prompt(self.embedder.info, prompt)
            tok = TextTokenizer(self.hf_tokenizer, self.fmt, prompt=prompt)
        except (ValueError, PipelineError) as exc:
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
                if is_blank(t):  # the batch job's rule: whitespace, control or zero-width characters only
                    raise _bad(f"'input[{i}]' is empty: give some text" if count > 1 or isinstance(raw, list)
                               else "'input' is empty: give some text", "input")
        if token_ids is not None:
            for name in ("instruction", "input_type"):
                if body.get(name) is not None:
                    raise _bad(f"'{name}' applies to text input: token ids are embedded exactly as given (frame "
                               "them as the model's documents or queries are framed, or send the text)", name)
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
        from pipeline.model.encoder import format_instruction

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
            if is_blank(q):
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
        with self._search_lock:  # the text source's cache and the reranker are not thread-safe
            # a run committed since: leave out what it deleted, on the shared searcher, before the copy
            self.searcher.follow_live_version()
            searcher = copy.copy(self.searcher)  # shares the index, id map and text source
            searcher.embed = lambda _queries: vectors  # the vectors came through the batcher
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
        if instruction is not None and getattr(self.reranker, "instruction", None) is None:
            raise _bad("this reranker is a cross-encoder: it takes no 'instruction' (that is for Qwen3-Reranker "
                       "models)", "instruction")
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

    def check_job(self) -> None:
        """Refuse to embed for ``serve OUTPUT`` once the job's record says to embed queries otherwise (a rerun with
        another model, other model files, another query instruction): 503 until the server is started again.

        Raises:
            ApiError: 503.
        """
        if self._job_watch is not None and self._job_watch.changed():
            raise ApiError(503, self._job_watch.message(), code="job_changed")

    def health(self) -> tuple[int, dict[str, Any]]:
        if self._job_watch is not None and self._job_watch.changed():
            return 503, {"status": self._job_watch.message(), "model": self.names[0]}
        ok = self.batcher.alive
        return (200 if ok else 503), {"status": "ok" if ok else "model worker stopped", "model": self.names[0],
                                      "queued": self.batcher.depth(), "search": self.searcher is not None,
                                      "rerank": self.reranker is not None}

    def metrics_text(self) -> str:
        return self.metrics.render({"queue_depth": self.batcher.depth(),
                                    "uptime_seconds": time.time() - self.started})


