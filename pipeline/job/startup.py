"""Start-up: the job's model is loaded (and its compiled forward warmed up) in a background thread while the
job is planned, so that a run's first shard starts as soon as both are ready, not after one and then the other.

Loading is mostly file reads, host-to-device copies and compilation (which release the GIL or run in other
processes), planning mostly Arrow scans: the two overlap well. A load that fails is reported when the runner
asks for the model, after planning: bad input is still named first. A load that is no longer needed (nothing
was pending) is left to finish in its daemon thread and dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.util import process_age

log = logging.getLogger(__name__)


class ModelLoad:
    """A model being loaded in a daemon thread; ``result()`` waits for it.

    Args:
        load: called once, in the thread, to load the model (for a job: ``runner.load_embedder(cfg)``).
    """

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._value: Any = None
        self._error: BaseException | None = None
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._work, name="load-model", daemon=True)
        self._thread.start()
        self.process_age = process_age()  # when the load started, counted from the process's start

    def _work(self) -> None:
        try:
            self._value = self._load()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - self.started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        """The loaded model; raises what the load raised."""
        waited = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - waited
        if self._error is not None:
            raise self._error
        log.info("model ready %.1fs after the load started (%.1fs of it waited for after planning)%s",
                 self.seconds or 0.0, waited,
                 "" if self.process_age is None else f"; the load started {self.process_age:.1f}s after the "
                 "process did")
        return self._value
