"""``embed-corpus slurm submit``: submit a job as an sbatch array, then its index job (``pipeline.job.slurm``)."""

from __future__ import annotations

import shlex
import shutil

import click

from pipeline.errors import PipelineError
from pipeline.job.config import ConfigError
from pipeline.job.slurm import DEFAULT_SCRIPTS, plan_submission, submit


@click.group()
def slurm() -> None:
    """Run a job on a Slurm cluster (scripts in jobs/slurm/)."""


@slurm.command("submit")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--nodes", type=int, default=1, show_default=True, help="Array tasks: one per node.")
@click.option("--gpus-per-node", type=int, default=0, show_default=True, help="GPUs per node (0: CPU workers).")
@click.option("--per-gpu", is_flag=True, help="One Slurm task per GPU instead of one task per node.")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU worker processes per task (no GPUs).")
@click.option("--cpus-per-task", type=int, default=None, help="CPUs of each task (default: Slurm's).")
@click.option("--partition", default=None, help="Partition of both jobs.")
@click.option("--time", "time_limit", default=None, help="Time limit of each task, e.g. 4:00:00; tasks that "
              "reach it requeue themselves and resume.")
@click.option("--account", default=None, help="Account of both jobs.")
@click.option("--index/--no-index", default=True, show_default=True, help="Queue the index job after the array.")
@click.option("--index-mode", type=click.Choice(["build", "update"]), default="build", show_default=True)
@click.option("--index-cpus", type=int, default=None, help="CPUs of the index job.")
@click.option("--index-time", default=None, help="Time limit of the index job (default: --time).")
@click.option("--index-pieces", type=int, default=1, show_default=True,
              help="Build the index as an array of N pieces (one task each, adding disjoint vector parts), then a "
                   "merge job.")
@click.option("--index-args", default="", help="More `index build|update` arguments for every index task, e.g. "
              "'--max-memory 64G --recall-k 100'.")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Per-task logs (default OUTPUT/logs/slurm).")
@click.option("--scripts", type=click.Path(file_okay=False), default=str(DEFAULT_SCRIPTS), show_default=True,
              help="Folder of embed.sbatch and index.sbatch.")
@click.option("--sbatch-arg", "extra", multiple=True, help="More sbatch options for both jobs. Repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the sbatch commands instead of running them.")
def submit_cmd(job_file: str, nodes: int, gpus_per_node: int, per_gpu: bool, workers: int,
               cpus_per_task: int | None, partition: str | None, time_limit: str | None, account: str | None,
               index: bool, index_mode: str, index_cpus: int | None, index_time: str | None, index_pieces: int,
               index_args: str, log_dir: str | None, scripts: str, extra: tuple[str, ...], dry_run: bool) -> None:
    """Submit JOB_FILE as an sbatch array of --nodes tasks, then its index job (afterok on the array)."""
    try:
        plan = plan_submission(job_file, nodes=nodes, gpus_per_node=gpus_per_node, per_gpu=per_gpu, workers=workers,
                               cpus_per_task=cpus_per_task, partition=partition, time_limit=time_limit,
                               account=account, index=index, index_mode=index_mode, index_cpus=index_cpus,
                               index_time=index_time, index_pieces=index_pieces, index_args=index_args,
                               log_dir=log_dir, scripts=scripts, extra=extra)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if dry_run:  # a script that can be run as it is
        click.echo(f"mkdir -p {shlex.quote(str(plan.log_dir))}")
        click.echo(f"ARRAY_ID=$({plan.embed.shell()})")
        if plan.index and plan.merge:
            click.echo(f'INDEX_ID=$({plan.index.shell(dependency="${ARRAY_ID%%;*}")})')
            click.echo(plan.merge.shell(dependency="${INDEX_ID%%;*}"))
        elif plan.index:
            click.echo(plan.index.shell(dependency="${ARRAY_ID%%;*}"))
        return
    if shutil.which("sbatch") is None:
        raise click.ClickException("sbatch is not on PATH: run this on a Slurm login node (or use --dry-run)")
    try:
        array_id, index_id, merge_id = submit(plan)
    except PipelineError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"embedding array: job {array_id} ({nodes} tasks), logs in {plan.log_dir}")
    if index_id and merge_id:
        click.echo(f"index pieces: array job {index_id} ({index_pieces} tasks), starts when every task of {array_id} "
                   f"has succeeded; merge: job {merge_id}, when every piece has")
    elif index_id:
        click.echo(f"index job: {index_id}, starts when every task of {array_id} has succeeded")
    click.echo(f"progress: embed-corpus status {plan.output}")
