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

    from pipeline.bench import gpu as bench_mod
    from pipeline.bench.qwen_tokenizer import build_qwen_tokenizer

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


