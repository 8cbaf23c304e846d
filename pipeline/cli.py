"""Command line: ``embed-corpus run | status``. Thin: it parses, calls, and reports errors as one line.

The options of ``run`` are generated from ``JobConfig``'s fields, so flags and job-file keys cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import types
import typing
from typing import Any

import click

from pipeline.config import ConfigError, JobConfig, field_choices, load_job_file, make_config
from pipeline.errors import PipelineError

EXIT_ERROR = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal with work left; rerun the same command to resume


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"JobConfig": JobConfig}, vars(sys.modules["pipeline.config"]))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def config_options(func):
    """Decorate a click command with one option per ``JobConfig`` field (defaults None: only given flags
    override the job file)."""
    for f in reversed(dataclasses.fields(JobConfig)):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        tp = _base_type(f.type)
        choices = field_choices(f.name)
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


def build_config(job_file: str | None, flags: dict[str, Any]) -> JobConfig:
    """Job file values, overridden by the flags that were given."""
    values: dict[str, Any] = load_job_file(job_file) if job_file else {}
    for name, value in flags.items():
        if value is None or (name in ("input", "keep") and not value):
            continue
        values[name] = value
    return make_config(values)


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="embed-corpus")
def main() -> None:
    """embed-corpus: turn Parquet/JSONL corpora into embedding vectors, resumably."""
    configure_logging()


def configure_logging() -> None:
    """Warnings and errors on the console; each run's log file (``OUTPUT/logs/``) has more."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)


@main.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@config_options
@click.option("--overwrite", is_flag=True, help="Discard an existing output directory and start over.")
@click.option("--index/--no-index", "build_index", default=None,
              help="Build or update the FAISS index when the run completes (default: as the job file says).")
def run(job_file: str | None, overwrite: bool, build_index: bool | None, **flags: Any) -> None:
    """Embed a corpus: JOB_FILE (YAML, same keys as the flags) and/or flags; flags win.

    Rerunning the same command resumes: finished shards are kept, unfinished ones redone, new input files
    embedded. SIGTERM/SIGUSR1 finish the current shard and exit with code 75.
    """
    from pipeline.runner import run_job

    try:
        cfg = build_config(job_file, flags)
        if build_index is not None:
            cfg = dataclasses.replace(cfg, index=(cfg.index or {}) if build_index else None)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    if cfg.gpus or cfg.workers > 1:
        from pipeline.launch import parse_gpus, run_workers

        try:
            code = run_workers(cfg, workers=cfg.workers, gpus=parse_gpus(cfg.gpus) if cfg.gpus else None,
                               lease=cfg.lease_seconds, overwrite=overwrite)
        except (PipelineError, ConfigError) as exc:
            _fail(str(exc))
            return
        if code == EXIT_STOPPED:
            _fail("stopped before the end; rerun the same command to resume", EXIT_STOPPED)
        elif code:
            _fail("a worker failed (see above); rerun the same command to finish", code)
        _index_after_run(cfg)
        return
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("pipeline").warning("signal %d: finishing the current shard, then stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    try:
        from pipeline.launch import device_for_rank

        cfg = dataclasses.replace(cfg, device=device_for_rank(cfg.device))
        summary = run_job(cfg, overwrite=overwrite, stop=stop, lease_seconds=cfg.lease_seconds)
    except (PipelineError, ConfigError) as exc:
        _fail(str(exc))
        return
    if not cfg.quiet:
        click.echo(
            f"{cfg.output}: {summary.shards_done} shards embedded now ({summary.docs:,} documents, "
            f"{summary.tokens:,} tokens in {summary.seconds:.1f}s: {summary.docs_per_s:,.1f} docs/s, "
            f"{summary.tokens_per_s:,.0f} tokens/s)"
        )
    if summary.stopped_early:
        _fail("stopped before the end; rerun the same command to resume", EXIT_STOPPED)
    _index_after_run(cfg)


def _index_after_run(cfg: JobConfig) -> None:
    """The job's ``index:`` step: build the index, or add the new parts to it (nightly)."""
    if cfg.index is None:
        return
    from pipeline.index import ensure_index

    try:
        info = ensure_index(cfg.output, **cfg.index)
    except PipelineError as exc:
        _fail(f"index: {exc}")
        return
    if not cfg.quiet:
        recall = info.get("recall@10")
        click.echo(f"{cfg.output}/index: {info.get('factory')}, {info.get('ntotal'):,} vectors"
                   + (f", recall@10 {recall:.3f}" if recall is not None else ""))
    if info.get("rebuild_due"):
        logging.getLogger("pipeline").warning("index: a rebuild is due (%s): embed-corpus index build %s",
                                              "; ".join(info.get("rebuild_reasons", [])), cfg.output)


@main.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: str, as_json: bool) -> None:
    """Shards done / pending / failed, documents, tokens, throughput and ETA of OUTPUT."""
    from pipeline.status import job_status

    try:
        st = job_status(output)
    except PipelineError as exc:
        _fail(str(exc))
        return
    click.echo(json.dumps(st.to_dict(), indent=1) if as_json else "\n".join(st.lines()))


@main.command()
@click.option("--size", "sizes", multiple=True, default=("4B", "0.6B"), show_default=True,
              type=click.Choice(["0.6B", "4B", "8B", "tiny"]), help="Qwen3-Embedding shapes to measure. Repeatable.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(), default=None,
              help="Qwen tokenizer folder (default: built from dashscope's qwen.tiktoken, or --tiktoken).")
@click.option("--tiktoken", type=click.Path(exists=True, dir_okay=False), default=None,
              help="qwen.tiktoken file to build the tokenizer from.")
@click.option("--docs", type=int, default=None, help="Documents per size (default 4000 for 4B/8B, 16000 for 0.6B).")
@click.option("--st-docs", type=int, default=None,
              help="Documents for the sentence-transformers policy (default 1500 for 4B/8B, 3000 for 0.6B).")
@click.option("--profile", is_flag=True, help="Also write a kernel-time table per size next to --out.")
@click.option("--levers", is_flag=True, help="Also measure the model alone padded, packed eager and compiled.")
@click.option("--batch-tokens", type=int, default=None, help="Packed tokens per forward (default 32768; 0.6B 65536).")
@click.option("--long-docs", type=int, default=0, help="Also measure this many documents of 8K-32K tokens.")
@click.option("--compile/--no-compile", default=True, show_default=True)
@click.option("--reference-docs", type=int, default=32, show_default=True,
              help="Documents also run one at a time through a float32 copy of the model (0: none).")
@click.option("--device", default="cuda", show_default=True, help="cuda (the figures) or cpu (a smoke run).")
@click.option("--out", "out_path", type=click.Path(), default="bench.json", show_default=True)
def bench(sizes: tuple[str, ...], tokenizer_dir: str | None, tiktoken: str | None, docs: int | None,
          st_docs: int | None, profile: bool, levers: bool, batch_tokens: int | None, long_docs: int, compile: bool,
          reference_docs: int, device: str, out_path: str) -> None:
    """GPU throughput: the pipeline vs the sentence-transformers policy, on random Qwen3 weights."""
    import tempfile
    from pathlib import Path

    from pipeline import bench as bench_mod
    from pipeline.synthetic import build_qwen_tokenizer

    if tokenizer_dir is None or not Path(tokenizer_dir).exists():
        target = Path(tokenizer_dir or tempfile.mkdtemp(prefix="qwen-tok-"))
        tokenizer_dir = str(build_qwen_tokenizer(target, append_eos=True, tiktoken_path=tiktoken))
    small = ("0.6B", "tiny")
    n_docs = {s: docs or (16000 if s in small else 4000) for s in sizes}
    n_st = {s: st_docs or (3000 if s in small else 1500) for s in sizes}
    budget = {s: batch_tokens or (65536 if s in small else 32768) for s in sizes}
    records = bench_mod.main(list(sizes), tokenizer_dir, n_docs, budget, Path(out_path), compile=compile,
                             long_docs=long_docs, st_docs=n_st, profile=profile, levers=levers,
                             reference_docs=reference_docs, device=device)
    click.echo(bench_mod.table(records))
    click.echo(f"results: {out_path}")


from pipeline.cli_index import eval_cmd, index, search  # noqa: E402

main.add_command(index)
main.add_command(search)
main.add_command(eval_cmd, "eval")


@main.command("bench-job")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
def bench_job(job_file: str) -> None:
    """A job's throughput against a plain loop with fixed batches of 32 over the same documents."""
    import tempfile
    from pathlib import Path

    from pipeline.bench import job_vs_plain

    with tempfile.TemporaryDirectory() as tmp:
        rec = job_vs_plain(job_file, Path(tmp))
    click.echo(json.dumps(rec, indent=1))
    click.echo(f"job: {rec['job_docs_per_s']} docs/s, {rec['job_tokens_per_s']:,} tokens/s | plain batch-32 loop: "
               f"{rec['plain_docs_per_s']} docs/s, {rec['plain_tokens_per_s']:,} tokens/s | "
               f"{rec['speedup']}x less time")


from pipeline.slurm import slurm  # noqa: E402

main.add_command(slurm)

from pipeline.serve import serve  # noqa: E402

main.add_command(serve)


if __name__ == "__main__":
    main()
