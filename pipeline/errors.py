"""Errors that the CLI reports as one clear line (no traceback) with a non-zero exit code."""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal with work left; rerun the same command to resume


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


def where(fmt: str, row: int) -> str:
    """How a row is named in messages: JSONL rows are 1-based line numbers, table rows 0-based rows."""
    return f"line {row + 1}" if fmt == "jsonl" else f"row {row}"
