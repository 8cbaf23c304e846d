"""The request batcher: one model-worker thread takes what concurrent requests queued and runs it through the
job's token-budget batcher, so requests share forward passes; a full queue answers 503."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from pipeline.model.tokens import Encoded
from pipeline.serve.limits import ApiError
from pipeline.serve.metrics import Metrics

log = logging.getLogger(__name__)


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


