"""The command line (``embed-corpus``): parses, calls the pipeline, reports errors as one line. Nothing imports it."""

import os
import signal
import sys

# ``embed-corpus run`` stops on SIGTERM/SIGUSR1 with exit code 75. Importing the commands takes a while (click, NumPy,
# PyArrow...), and a signal in that time would kill the process (-15) before ``run`` installs its handler: so when this
# process is ``embed-corpus run`` (console script or ``python -m pipeline.cli``), signals are recorded from here on, and
# ``run`` acts on them once it starts. Other commands, and programs that import this package, are not affected.
EARLY_SIGNALS: list[int] = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _command_args() -> list[str] | None:
    """The arguments after the program, when this process is the ``embed-corpus`` command; else None."""
    orig = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(orig[:-1]):
        if arg == "-m" and orig[i + 1] in ("pipeline.cli", "pipeline.cli.__main__"):
            return orig[i + 2:]
    if os.path.basename(sys.argv[0]) in ("embed-corpus", "embed-corpus.exe"):
        return sys.argv[1:]
    return None


def _record(signum: int, _frame: object) -> None:
    EARLY_SIGNALS.append(signum)


_args = _command_args()
# This process is ``embed-corpus run`` itself (not a test or a program calling the commands).
RUN_PROCESS = _args is not None and next((a for a in _args if not a.startswith("-")), None) == "run"
if RUN_PROCESS:
    for _sig in STOP_SIGNALS:
        signal.signal(_sig, _record)

from pipeline.cli.main import main  # noqa: E402 - after the signal handlers, on purpose

__all__ = ["EARLY_SIGNALS", "RUN_PROCESS", "STOP_SIGNALS", "main"]
