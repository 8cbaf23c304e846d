"""``embed-corpus run`` and ``embed-corpus status``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import config_options, fail, fail_if_full_disk
from pipeline.errors import EXIT_STOPPED, EXIT_STORAGE, PipelineError, StorageError
from pipeline.job.config import ConfigError, JobConfig, build_config
from pipeline.util import exit_code, fast_exit


def _exits_fast(command):
    """``embed-corpus run`` on a GPU ends without the interpreter's teardown once the command is done (its parts,
    markers, version and index are written by then): ~3 s on an H200 that every run's wall time would pay.
    Elsewhere (tests, programs that call the command, CPU runs) the command returns as usual."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from pipeline.cli import RUN_PROCESS

        if not RUN_PROCESS:
            command(*args, **kwargs)
            return
        code = exit_code(command, *args, **kwargs)
        if _cuda_used():
            fast_exit(code)
        raise SystemExit(code)

    return wrapper


def _cuda_used() -> bool:
    torch = sys.modules.get("torch")  # never imported here: only whether the command did
    return torch is not None and torch.cuda.is_initialized()


@click.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@config_options
@click.option("--overwrite", is_flag=True, help="Discard an existing output directory and start over.")
@click.option("--index/--no-index", "build_index", default=None,
              help="Build or update the FAISS index when the run completes (default: as the job file says).")
@click.option("--plan-only", is_flag=True,
              help="Print what a run would do (documents added, changed, deleted, texts to embed) and stop: no "
                   "model is loaded, nothing in OUTPUT changes.")
@_exits_fast
def run(job_file: str | None, overwrite: bool, build_index: bool | None, plan_only: bool, **flags: Any) -> None:
    """Embed a corpus: JOB_FILE (YAML, same keys as the flags) and/or flags; flags win.

    The output follows the input: rerunning the same command resumes an interrupted run, and over an edited
    input embeds only what changed (new and edited documents; deleted ones leave the output). Readers see one
    version at a time (OUTPUT/vectors). SIGTERM/SIGUSR1 finish the current shard and exit
    with code 75; a full disk exits with code 74.
    """
    from pipeline.cli import EARLY_SIGNALS, STOP_SIGNALS
    from pipeline.job.runner import run_job

    try:
        cfg = build_config(job_file, flags)
        if build_index is not None:
            cfg = dataclasses.replace(cfg, index=(cfg.index or {}) if build_index else None)
    except ConfigError as exc:
        fail(str(exc), 2)
        return
    if plan_only:
        _plan_only(cfg, overwrite)
        return
    if cfg.gpus or cfg.workers > 1:
        from pipeline.job.launch import parse_gpus, run_workers

        try:
            code = run_workers(cfg, workers=cfg.workers, gpus=parse_gpus(cfg.gpus) if cfg.gpus else None,
                               lease=cfg.lease_seconds, overwrite=overwrite, signals=EARLY_SIGNALS)
        except StorageError as exc:
            fail(str(exc), EXIT_STORAGE)
            return
        except (PipelineError, ConfigError) as exc:
            fail(str(exc))
            return
        except Exception as exc:
            fail_if_full_disk(exc, cfg.output)
            raise
        if code == EXIT_STOPPED:
            fail("stopped before the end; rerun the same command to resume", EXIT_STOPPED)
        elif code == EXIT_STORAGE:
            fail(f"a worker stopped on a full disk (see above): {StorageError(cfg.output)}", EXIT_STORAGE)
        elif code:
            fail("a worker failed (see above); rerun the same command to finish", code)
        _index_after_run(cfg, build_index is False)
        return
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("pipeline").warning("signal %d: finishing the current shard, then stopping", signum)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    if EARLY_SIGNALS:  # one came while the command was starting (see pipeline/cli/__init__.py)
        on_signal(EARLY_SIGNALS[0], None)
    try:
        from pipeline.job.ranks import device_for_rank

        cfg = dataclasses.replace(cfg, device=device_for_rank(cfg.device))
        summary = run_job(cfg, overwrite=overwrite, stop=stop, lease_seconds=cfg.lease_seconds)
    except StorageError as exc:
        fail(str(exc), EXIT_STORAGE)
        return
    except (PipelineError, ConfigError) as exc:
        fail(str(exc))
        return
    except Exception as exc:
        fail_if_full_disk(exc, cfg.output)
        raise
    if not cfg.quiet:
        click.echo(_summary_line(cfg.output, summary))
    if summary.stopped_early:
        fail("stopped before the end; rerun the same command to resume", EXIT_STOPPED)
    if summary.replaced:
        fail(f"{cfg.output}: another run replaced this run's plan (its input or settings differ), so what this run "
             "was given is not what the output holds: run it again once the other run is done", EXIT_STOPPED)
    _index_after_run(cfg, build_index is False)


def _changes(counts: dict[str, int]) -> str:
    return (f"{counts.get('added', 0):,} added, {counts.get('changed', 0):,} changed, {counts.get('deleted', 0):,} "
            f"deleted, {counts.get('unchanged', 0):,} unchanged; texts: {counts.get('embedded', 0):,} to embed, "
            f"{counts.get('reused', 0):,} reused, {counts.get('deduplicated', 0):,} deduplicated")


def _summary_line(output: str, summary: Any) -> str:
    c = summary.counts
    if summary.nothing_new:
        return f"{output}: nothing new: version {summary.version} is live ({c.get('docs', 0):,} documents)"
    head = (f"{output}: version {summary.version} is live ({c.get('docs', 0):,} documents: {_changes(c)})"
            if summary.committed else f"{output}: version {summary.version} is live; the run is not complete")
    return (f"{head}\nthis run: {summary.shards_done} shards ({summary.docs:,} documents written, "
            f"{summary.tokens:,} tokens embedded in {summary.seconds:.1f}s: {summary.tokens_per_s:,.0f} tokens/s)")


def _plan_only(cfg: JobConfig, overwrite: bool) -> None:
    from pipeline.job.plan import prepare

    try:
        manifest = prepare(cfg, overwrite=False, dry_run=True) if not overwrite else None
    except (PipelineError, ConfigError) as exc:
        fail(str(exc))
        return
    if manifest is None:
        click.echo("--plan-only --overwrite: the whole input would be embedded again")
        return
    kinds: dict[str, int] = {}
    for s in manifest.shards:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    state = "already committed: nothing new" if manifest.committed else f"would make version {manifest.target}"
    click.echo(f"{cfg.output}: {state} ({manifest.corpus_docs:,} documents)\n"
               f"changes: {_changes(manifest.counts)}, {manifest.counts.get('rejected', 0):,} rows rejected\n"
               f"shards: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'}")


def _index_after_run(cfg: JobConfig, no_index: bool = False) -> None:
    """The job's ``index:`` step: build the index, or add the new parts to it (nightly). An output that has an
    index gets it updated whatever the job says, unless ``--no-index``: its searches would otherwise miss every
    document of the parts this run rewrote until an ``index update``, exit 0."""
    from pipeline.index.files import INFO, index_dir
    from pipeline.index.store import ensure_index

    if no_index or (cfg.index is None and not (index_dir(cfg.output) / INFO).exists()):
        return
    try:
        info = ensure_index(cfg.output, **(cfg.index or {}))
    except StorageError as exc:
        fail(f"index: {exc}", EXIT_STORAGE)
        return
    except PipelineError as exc:
        fail(f"index: {exc}")
        return
    except Exception as exc:
        fail_if_full_disk(exc, Path(cfg.output) / "index", prefix="index: ")
        raise
    if not cfg.quiet:
        recall = info.get("recall@10")
        click.echo(f"{cfg.output}/index: {info.get('factory')}, {info.get('ntotal'):,} vectors"
                   + (f", recall@10 {recall:.3f}" if recall is not None else ""))
    if info.get("rebuild_due"):
        logging.getLogger("pipeline").warning("index: a rebuild is due (%s): embed-corpus index build %s",
                                              "; ".join(info.get("rebuild_reasons", [])), cfg.output)


@click.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: str, as_json: bool) -> None:
    """Shards done / pending / failed, documents, tokens, throughput and ETA of OUTPUT."""
    from pipeline.job.status import job_status

    try:
        st = job_status(output)
    except PipelineError as exc:
        fail(str(exc))
        return
    click.echo(json.dumps(st.to_dict(), indent=1) if as_json else "\n".join(st.lines()))


