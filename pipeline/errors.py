"""Errors that the CLI reports as one clear line (no traceback) with a non-zero exit code."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

EXIT_ERROR = 1
EXIT_STORAGE = 74  # EX_IOERR: the disk (or the quota) is full; free some space and rerun the same command
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal with work left; rerun the same command to resume

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(e) for e in FULL_ERRNOS)  # "No space left on device", "Disk quota exceeded"


class PipelineError(Exception):
    """Base of every error the user can act on."""


class InputError(PipelineError):
    """Bad input: a missing file or field, an unreadable file, a bad record. The message names file, row, field."""


class ManifestMismatch(PipelineError):
    """The output directory was planned with other inputs or settings."""


class EncodeError(PipelineError):
    """The model produced something that must not be written (a non-finite vector); ``index`` is the sequence."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class StorageError(PipelineError):
    """A write failed because the disk or the quota is full (ENOSPC/EDQUOT). Nothing finished is lost: free some
    space and rerun. The message names the path, the free space there and, where known, the space needed."""

    def __init__(self, path: str | Path, *, quota: bool = False, needed: int | None = None) -> None:
        self.path = str(path)
        self.quota = quota
        self.needed = needed
        free = free_bytes(path)
        what = "the disk quota is exceeded" if quota else "no space left on the device"
        parts = [f"{human_bytes(free)} free there" if free is not None else "free space unknown"]
        if needed is not None:
            parts.append(f"about {human_bytes(needed)} needed")
        super().__init__(f"{what} writing {self.path} ({', '.join(parts)}). Nothing finished is lost: free some "
                         "space (or raise the quota) and rerun the same command.")


def where(fmt: str, row: int) -> str:
    """How a row is named in messages: JSONL rows are 1-based line numbers, table rows 0-based rows."""
    return f"line {row + 1}" if fmt == "jsonl" else f"row {row}"


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the filesystem of ``path`` (its nearest existing folder); None if unknown."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def full_disk_error(exc: BaseException, fallback: str | Path | None = None) -> StorageError | None:
    """The ``StorageError`` behind ``exc`` when a full disk or quota caused it (anywhere in its chain of causes),
    else None. The path is the one the OS names, else one in the message (faiss writes it there), else
    ``fallback`` (the folder being written, e.g. the output directory)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StorageError):
            return cur
        code = getattr(cur, "errno", None) if isinstance(cur, OSError) else None
        text = str(cur)
        if code in FULL_ERRNOS or any(t in text for t in _FULL_TEXTS):
            quota = code == errno.EDQUOT or _FULL_TEXTS[1] in text
            path = getattr(cur, "filename", None) if isinstance(cur, OSError) else None
            if path is None:
                found = re.search(r"(?:in|to|file) (/[^\s:'\"]+)", text)
                path = found.group(1) if found else None
            return StorageError(path or fallback or Path.cwd(), quota=quota)
        cur = cur.__cause__ or cur.__context__
    return None


def raise_if_full(exc: BaseException, path: str | Path, *, needed: int | None = None) -> None:
    """Raise a ``StorageError`` naming ``path`` (and ``needed`` bytes) when ``exc`` comes from a full disk."""
    found = full_disk_error(exc, path)
    if found is not None:
        raise StorageError(path, quota=found.quota, needed=needed) from exc
