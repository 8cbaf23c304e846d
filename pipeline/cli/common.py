"""What every command shares: one-line errors with exit codes, and the ``run`` options generated from ``JobConfig``."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from typing import Any

import click

from pipeline.errors import EXIT_ERROR, EXIT_STORAGE, full_disk_error
from pipeline.job.config import JobConfig, field_choices


def fail(message: str, code: int = EXIT_ERROR) -> None:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def fail_if_full_disk(exc: BaseException, path: str | os.PathLike[str] | None = None, *, prefix: str = "") -> None:
    """Exit with one ``error:`` line and code 74 when ``exc`` comes from a full disk or quota (anywhere in its
    chain of causes): the path written (else ``path``), the free space there. Returns otherwise."""
    found = full_disk_error(exc, path)
    if found is not None:
        fail(prefix + str(found), EXIT_STORAGE)


class Group(click.Group):
    """The command group: a full disk in any command ends as one ``error:`` line with exit code 74, not a
    traceback (whichever library raised it: Python, PyArrow, NumPy, faiss)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            fail_if_full_disk(exc)
            raise


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"JobConfig": JobConfig}, vars(sys.modules["pipeline.job.config"]))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def default_text(f: dataclasses.Field) -> str | None:
    """What ``run --help`` shows as a field's ``[default: ...]``: the ``JobConfig`` default, as a flag is written
    (``normalize``, ``no-quiet``); None where the help text already says it in words, or there is none to show."""
    value = f.default
    if value is dataclasses.MISSING or value in ((), "") or "default" in f.metadata.get("help", "").lower():
        return None
    if value is None:
        return "none"
    if isinstance(value, bool):
        name = f.name.replace("_", "-")
        return name if value else f"no-{name}"
    return str(value)


def config_options(func):
    """Decorate a click command with one option per ``JobConfig`` field (defaults None: only given flags
    override the job file; the help shows ``JobConfig``'s defaults)."""
    for f in reversed(dataclasses.fields(JobConfig)):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        tp = _base_type(f.type)
        choices = field_choices(f.name)
        shown = default_text(f)
        if shown is not None:  # as click shows the defaults of the other commands (theirs are real defaults)
            help_text += f"  [default: {shown}]"
        if f.name in ("input", "keep"):
            opt = click.option(flag, f.name, multiple=True, help=help_text + " Repeatable.")
        elif tp is bool:
            opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
        elif choices:
            opt = click.option(flag, f.name, type=click.Choice(choices), default=None, help=help_text)
        elif tp is int:
            opt = click.option(flag, f.name, type=int, default=None, help=help_text)
        else:
            opt = click.option(flag, f.name, type=str, default=None, help=help_text)
        func = opt(func)
    return func
