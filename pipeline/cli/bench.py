"""``embed-corpus bench`` (GPU throughput on random Qwen3 weights) and ``embed-corpus bench-job``."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--size", "sizes", multiple=True, default=("4B", "0.6B"), show_default=True,
              type=click.Choice(["0.6B", "4B", "8B", "tiny"]), help="Qwen3-Embedding shapes to measure. Repeatable.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(), default=None,
              help="Qwen tokenizer folder (default: built from dashscope's qwen.tiktoken, or --tiktoken).")
@click.option("--tiktoken", type=click.Path(exists=True, dir_okay=False), default=None,
              help="qwen.tiktoken file to build the tokenizer from.")
@click.option("--docs", "docs_spec", multiple=True,
              help="Documents: N for every size, or SIZE=N (repeatable). Default 4000 for 4B/8B, 16000 for 0.6B.")
@click.option("--st-docs", "st_spec", multiple=True,
              help="Documents of the sentence-transformers policy: N or SIZE=N (repeatable; 0: skip it). "
                   "Default 1500 for 4B/8B, 3000 for 0.6B.")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Repeats of the headline measurements, interleaved in this process (median and spread).")
@click.option("--run/--no-run", "run_command", default=True, show_default=True,
              help="Also time the real command (embed-corpus run in a subprocess, cold and warm compile cache).")
@click.option("--run-shard-size", type=int, default=None,
              help="Rows per shard of the pipeline and command runs (default: a quarter of --docs).")
@click.option("--run-docs", "run_spec", multiple=True,
              help="Documents of the command's runs: N or SIZE=N (repeatable), --docs's and more drawn the same "
                   "way, so that the command runs long enough for a steady state (default: --docs).")
@click.option("--ab/--no-ab", default=True, show_default=True,
              help="Also time the model alone waiting on the device after each batch, and at half the budget; and "
                   "the default against each recent change undone (bench.paths.CHANGES).")
@click.option("--profile", is_flag=True, help="Also write a kernel-time table per size next to --out.")
@click.option("--levers", is_flag=True, help="Also measure the model alone padded, packed eager and compiled.")
@click.option("--split", "split_docs", type=int, multiple=True,
              help="Also measure the model alone in one call per N documents (a shard's worth), with and without "
                   "the next one tokenized alongside, against one call. Repeatable.")
@click.option("--batch-tokens", type=int, default=None,
              help="Packed tokens per forward (default: the pipeline's default for the model).")
@click.option("--long-docs", type=int, default=0, help="Also measure this many documents of 8K-32K tokens.")
@click.option("--compile/--no-compile", default=True, show_default=True)
@click.option("--reference-docs", type=int, default=32, show_default=True,
              help="Documents also run one at a time through a float32 copy of the model (0: none).")
@click.option("--device", default="cuda", show_default=True, help="cuda (the figures) or cpu (a smoke run).")
@click.option("--out", "out_path", type=click.Path(), default="bench.json", show_default=True)
def bench(sizes: tuple[str, ...], tokenizer_dir: str | None, tiktoken: str | None, docs_spec: tuple[str, ...],
          st_spec: tuple[str, ...], repeats: int, run_command: bool, run_shard_size: int | None,
          run_spec: tuple[str, ...], ab: bool,
          profile: bool, levers: bool, split_docs: tuple[int, ...], batch_tokens: int | None, long_docs: int,
          compile: bool, reference_docs: int, device: str, out_path: str) -> None:
    """GPU throughput: the pipeline vs the sentence-transformers policy, on random Qwen3 weights."""
    from pathlib import Path

    from pipeline.bench import gpu as bench_mod

    tokenizer_dir = _tokenizer(tokenizer_dir, tiktoken)
    small = ("0.6B", "tiny")
    n_docs = _per_size(docs_spec, sizes, "--docs", {s: 16000 if s in small else 4000 for s in sizes})
    n_st = _per_size(st_spec, sizes, "--st-docs", {s: 3000 if s in small else 1500 for s in sizes})
    run_docs = _per_size(run_spec, sizes, "--run-docs", n_docs)
    budget = {s: batch_tokens for s in sizes}
    records = bench_mod.main(list(sizes), tokenizer_dir, n_docs, budget, Path(out_path), compile=compile,
                             long_docs=long_docs, st_docs=n_st, profile=profile, levers=levers,
                             reference_docs=reference_docs, device=device, repeats=repeats, run_command=run_command,
                             run_shard_size=run_shard_size, ab=ab, split=split_docs, run_docs=run_docs)
    click.echo(bench_mod.table(records))
    click.echo(f"results: {out_path}")


@click.command("bench-attention")
@click.option("--size", "sizes", multiple=True, default=("0.6B", "4B"), show_default=True,
              type=click.Choice(["0.6B", "4B", "8B"]), help="Qwen3 attention shapes to measure. Repeatable.")
@click.option("--docs", type=int, default=4000, show_default=True, help="Documents drawn per size.")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--out", "out_path", type=click.Path(), default="bench-attention.json", show_default=True)
def bench_attention(sizes: tuple[str, ...], docs: int, repeats: int, out_path: str) -> None:
    """The packed-attention kernel's tile choices on this GPU, against the default, on the bench's packs."""
    from pathlib import Path

    from pipeline.bench import kernels
    from pipeline.bench.synthetic import QWEN3_SHAPES
    from pipeline.model.encoder import default_batch_tokens

    records = []
    for size in sizes:
        budget = default_batch_tokens("packed", "cuda", QWEN3_SHAPES[size]["hidden_size"])
        rec = kernels.sweep(size, docs, budget, repeats=repeats)
        records.append(rec)
        click.echo(kernels.table(rec))
        Path(out_path).write_text(json.dumps(records, indent=1) + "\n")
    click.echo(f"results: {out_path}")


@click.command("bench-scale")
@click.option("--size", "sizes", multiple=True, default=("0.6B",), show_default=True,
              type=click.Choice(["0.6B", "4B", "8B", "tiny"]), help="Qwen3-Embedding shapes to measure. Repeatable.")
@click.option("--docs", "docs_spec", multiple=True, required=True,
              help="SIZE=N documents of the measured job (size it to the device time you have). Repeatable.")
@click.option("--shard-size", "shard_spec", multiple=True, required=True,
              help="SIZE=N rows per shard (0: the command's own sizing, as a user gets it). Repeatable.")
@click.option("--gpus", type=int, default=2, show_default=True,
              help="GPUs of the scaled runs (0: CPU worker processes, for a smoke run).")
@click.option("--lease-seconds", type=int, default=15, show_default=True, help="Lease of the kill run.")
@click.option("--kill-at", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="The kill run kills a worker once this fraction of the documents is done (0: at its first "
                   "finished shard); later kills keep a long job's one-GPU rest short.")
@click.option("--nodes", "node_sizes", multiple=True,
              help="Sizes that also get the N-separate-processes run and the run with one killed "
                   "(repeatable; default: every size; 'none': no size).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(), default=None, help="Qwen tokenizer folder.")
@click.option("--tiktoken", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--budget-seconds", type=float, default=None, help="Start no further run after this many seconds.")
@click.option("--phase", type=click.Choice(["all", "prepare", "one", "many"]), default="all", show_default=True,
              help="Run one part (prepare: model, corpus, compile cache; one: the one-GPU run; many: the rest, "
                   "against it), so that a long job fits several calls sharing --workdir.")
@click.option("--run", "runs", multiple=True, type=click.Choice(["launch", "nodes", "kill"]),
              help="The scaled runs to make (repeatable; default: all three; nodes and kill only for the --nodes "
                   "sizes): the --gpus N launch, N separate processes, N processes with one killed. With --phase "
                   "many over one --workdir, each may go in its own call.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where models, corpora, outputs and the phases' state go, kept (default: a temporary folder).")
@click.option("--note", default=None, help="How this call ran (what else shared the machine), kept in the records.")
@click.option("--out", "out_path", type=click.Path(), default="bench-scale.json", show_default=True)
def bench_scale(sizes: tuple[str, ...], docs_spec: tuple[str, ...], shard_spec: tuple[str, ...], gpus: int,
                lease_seconds: int, kill_at: float, node_sizes: tuple[str, ...], tokenizer_dir: str | None,
                tiktoken: str | None,
                budget_seconds: float | None, phase: str, runs: tuple[str, ...], workdir: str | None,
                note: str | None, out_path: str) -> None:
    """The real command on one GPU against several (start-up counted), N separate processes, and one killed."""
    import contextlib
    import json
    import tempfile
    import time
    from pathlib import Path

    from pipeline.bench import scale

    start = time.time()
    if phase != "all" and not workdir:
        raise click.UsageError(f"--phase {phase} needs --workdir (the phases share it)")
    tokenizer_dir = _tokenizer(tokenizer_dir, tiktoken)
    docs, shards = _per_size(docs_spec, sizes, "--docs"), _per_size(shard_spec, sizes, "--shard-size")
    devices = [str(i) for i in range(gpus)]
    out = Path(out_path)

    def extra_runs(size: str, run: str) -> bool:
        return (not runs or run in runs) and (not node_sizes or size in node_sizes)
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for size in sizes:
            try:
                records += scale.scaling(size, tokenizer_dir=tokenizer_dir, n_docs=docs[size],
                                         shard_size=shards[size], workdir=work, logs=out.parent / "logs",
                                         devices=devices, workers=2 if gpus == 0 else gpus, lease_s=lease_seconds,
                                         kill=extra_runs(size, "kill"), nodes=extra_runs(size, "nodes"),
                                         launch=not runs or "launch" in runs, kill_at=kill_at, phase=phase,
                                         note=note,
                                         deadline=start + budget_seconds if budget_seconds else None)
            except scale.NoOneGpuRun as e:
                raise click.ClickException(str(e)) from None
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1) + "\n")
    if phase in ("prepare", "one"):
        click.echo(f"{phase}: done in {work} ({time.time() - start:.0f}s); the 'many' phase reports")
        return
    click.echo(scale.table(records))
    click.echo(f"results: {out_path}")


def _per_size(specs: tuple[str, ...], sizes: tuple[str, ...], flag: str,
              default: dict[str, int] | None = None) -> dict[str, int]:
    """``N`` (every size) or ``SIZE=N`` values of a repeatable option -> {size: N}; sizes not named get
    ``default``'s value."""
    values = dict(default or {})
    for spec in specs:
        size, sep, n = spec.partition("=")
        if not sep and size.isdigit():
            values.update({s: int(size) for s in sizes})
            continue
        if not n.isdigit():
            raise click.BadParameter(f"{spec!r}: expected N or SIZE=N", param_hint=flag)
        values[size] = int(n)
    missing = [s for s in sizes if s not in values]
    if missing:
        raise click.BadParameter(f"no value for {', '.join(missing)}", param_hint=flag)
    return values


def _tokenizer(tokenizer_dir: str | None, tiktoken: str | None) -> str:
    import tempfile
    from pathlib import Path

    from pipeline.bench.qwen_tokenizer import build_qwen_tokenizer

    if tokenizer_dir is None or not Path(tokenizer_dir).exists():
        target = Path(tokenizer_dir or tempfile.mkdtemp(prefix="qwen-tok-"))
        tokenizer_dir = str(build_qwen_tokenizer(target, append_eos=True, tiktoken_path=tiktoken))
    return tokenizer_dir


@click.command("bench-job")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
def bench_job(job_file: str) -> None:
    """A job's throughput against a plain loop with fixed batches of 32 over the same documents."""
    import tempfile
    from pathlib import Path

    from pipeline.bench.job import job_vs_plain

    with tempfile.TemporaryDirectory() as tmp:
        rec = job_vs_plain(job_file, Path(tmp))
    click.echo(json.dumps(rec, indent=1))
    click.echo(f"job: {rec['job_docs_per_s']} docs/s, {rec['job_tokens_per_s']:,} tokens/s | plain batch-32 loop: "
               f"{rec['plain_docs_per_s']} docs/s, {rec['plain_tokens_per_s']:,} tokens/s | "
               f"{rec['speedup']}x less time")


