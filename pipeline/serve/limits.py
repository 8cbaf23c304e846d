"""Limits and auth of the server: OpenAI-shaped errors, request field checks, the ``serve`` options, bearer keys."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 30000
MAX_BODY = 32 << 20  # bytes of one request body
LOOPBACK = ("127.0.0.1", "localhost", "::1")



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


def check_bearer(api_key: str | None, authorization: str | None) -> None:
    """Raises ``ApiError`` 401 unless ``authorization`` is ``Bearer API_KEY`` (when a key is set).

    The scheme is required (case-insensitive, RFC 7235): the bare key, or the key under another scheme, is refused.
    """
    if not api_key:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
