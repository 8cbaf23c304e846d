"""The ``embed-corpus`` command group: every sub-command registered on one click group."""

from __future__ import annotations

import os

import click

from pipeline.cli.bench import bench, bench_attention, bench_job, bench_scale
from pipeline.cli.common import Group
from pipeline.cli.index import eval_cmd, index, search
from pipeline.cli.run import run, status
from pipeline.cli.serve import serve
from pipeline.cli.slurm import slurm
from pipeline.model.caches import use_bytecode_cache
from pipeline.util import configure_logging


@click.group(cls=Group)
@click.version_option(package_name="embed-corpus")
def main() -> None:
    """embed-corpus: turn Parquet/JSONL corpora into embedding vectors, resumably."""
    configure_logging()
    # Before anything touches CUDA (workers inherit it): torch's allocator maps more memory into the segments it
    # has instead of caching a block per tensor size, and every pack has sizes of its own; the 0.6B model held
    # 4.1 GiB instead of 8.9 on an H200, at the same speed (data/benchmarks/h200-probe-model-alone-2026-12-01.txt).
    # A user's own setting wins, under either of torch's names for it.
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    use_bytecode_cache()  # before any command imports torch


for command in (run, status, index, search, bench, bench_attention, bench_job, bench_scale, slurm, serve):
    main.add_command(command)
main.add_command(eval_cmd, "eval")
