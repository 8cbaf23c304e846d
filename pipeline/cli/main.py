"""The ``embed-corpus`` command group: every sub-command registered on one click group."""

from __future__ import annotations

import click

from pipeline.cli.bench import bench, bench_attention, bench_job, bench_scale
from pipeline.cli.common import Group
from pipeline.cli.index import eval_cmd, index, search
from pipeline.cli.run import run, status
from pipeline.cli.serve import serve
from pipeline.cli.slurm import slurm
from pipeline.util import configure_logging


@click.group(cls=Group)
@click.version_option(package_name="embed-corpus")
def main() -> None:
    """embed-corpus: turn Parquet/JSONL corpora into embedding vectors, resumably."""
    configure_logging()


for command in (run, status, index, search, bench, bench_attention, bench_job, bench_scale, slurm, serve):
    main.add_command(command)
main.add_command(eval_cmd, "eval")
