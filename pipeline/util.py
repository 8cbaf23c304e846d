"""Shared helpers of every layer: atomic JSON writes, file locks, logging set-up. Imports nothing of the pipeline."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, fsync, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a full disk: leave no partial file, and name the file the error is about
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def file_key(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is now (inode, modification time, size; None where it cannot be read): a file written
    by rename, or rewritten, gets another key, so a reader knows when to read it again."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (before a rename publishes it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to the disk (after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path``, held for the ``with`` block (planning, claims, index)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def configure_logging() -> None:
    """Warnings and errors on the console; each run's log file (``OUTPUT/logs/``) has more."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)


class _LogFile(logging.FileHandler):
    """A run's log file that, when it cannot be written (a full disk), says so once and stops, instead of printing
    a traceback on the console for every message (``logging``'s default)."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self.broken = True
        sys.stderr.write(f"warning: the log file {self.baseFilename} cannot be written ({exc.strerror}); "
                         "no more messages go to it\n")


def attach_log_file(out: Path) -> logging.Handler:
    """Log this process's ``pipeline`` messages (INFO and up) to ``OUTPUT/logs/run-<time>-<pid>.log``."""
    folder = out / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("pipeline")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


FAULT_ENV = "EMBED_CORPUS_FAULT"


def fault_point(name: str) -> None:
    """Fault injection for the kill tests: ``EMBED_CORPUS_FAULT=NAME`` kills this process (SIGKILL) right here.

    ``NAME@N`` kills on the N-th time the point is reached (1-based). Costs one dictionary lookup otherwise.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(nth or 1):
        import signal

        logging.getLogger("pipeline").warning("fault point %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_HITS: dict[str, int] = {}


def fast_exit(code: int) -> NoReturn:
    """End this process now with ``code``, without the interpreter's teardown.

    A process that has used a GPU spends seconds there (measured ~3 s on an H200: CUDA, the compiler's worker
    pool, module teardown) after its work is done: a job's wall time, and every worker's, pays it. Only for a
    process whose results are already durable: every file it wrote is closed and renamed (parts, markers,
    versions); the console and the log files are flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def exit_code(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call ``fn`` and return the exit code it would end the process with: 0 when it returns, a ``SystemExit``'s
    code when it raises one (None: 0, a message: 1). Other exceptions propagate."""
    try:
        fn(*args, **kwargs)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that cannot be read: start-up logs
    count from the process's start, imports included, not from when the logging code first ran."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
