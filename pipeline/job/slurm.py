"""Slurm: the ``sbatch`` lines of ``embed-corpus slurm submit JOB.yaml``: the embedding array and its index jobs.

The job scripts are ``jobs/slurm/embed.sbatch`` and ``jobs/slurm/index.sbatch``; this module only works out
their ``sbatch`` options and environment, submits the array, then the index with ``afterok`` on it. Every
array task is an independent worker on the same OUTPUT (shards are shared through leased claims), so the array
size is only how many nodes work at once; a task that is preempted or reaches its time limit requeues itself.

The index is one job, or with ``index_pieces=N`` an array of N tasks (``index build --pieces N --piece K``: the
first trains, each adds a disjoint run of vector parts to its own piece files) followed by a merge job
(``--merge``) with ``afterok`` on that array. A failed piece fails the array, so the merge is cancelled; rerun the
failed task alone (``sbatch --array=K ...``), then the merge.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.job.config import ConfigError, load_job_file

DEFAULT_SCRIPTS = Path(__file__).resolve().parents[2] / "jobs" / "slurm"


@dataclass(frozen=True)
class Submission:
    """One ``sbatch`` call: its arguments (without ``sbatch``) and the variables added to its environment."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def command(self, dependency: str | None = None) -> list[str]:
        """``sbatch ARGS``, with ``--dependency=afterok:DEPENDENCY`` when given."""
        return ["sbatch", *([f"--dependency=afterok:{dependency}"] if dependency else []), *self.args]

    def shell(self, dependency: str | None = None) -> str:
        """The call as a shell line, e.g. ``EMBED_JOB=/x/job.yaml sbatch --array=0-3 ... embed.sbatch``;
        ``dependency`` is written unquoted (it may be a shell variable)."""
        words = [shlex.quote(w) for w in self.command()]
        if dependency:
            words.insert(1, f'--dependency="afterok:{dependency}"')
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), *words])


@dataclass(frozen=True)
class SlurmPlan:
    """The array's submission, the index job's (None with ``index=False``; an array with ``index_pieces > 1``), the
    merge job's (None unless ``index_pieces > 1``), where logs go, the job's output."""

    embed: Submission
    index: Submission | None
    log_dir: Path
    output: Path
    merge: Submission | None = None


def embed_corpus_command() -> str:
    """The ``embed-corpus`` of this interpreter's environment (so compute nodes run the same install)."""
    beside = Path(sys.executable).parent / "embed-corpus"
    return str(beside) if beside.exists() else (shutil.which("embed-corpus") or "embed-corpus")


def plan_submission(
    job_file: str | os.PathLike[str],
    *,
    nodes: int,
    gpus_per_node: int = 0,
    per_gpu: bool = False,
    workers: int = 1,
    cpus_per_task: int | None = None,
    partition: str | None = None,
    time_limit: str | None = None,
    account: str | None = None,
    index: bool = True,
    index_mode: str = "build",
    index_cpus: int | None = None,
    index_time: str | None = None,
    index_pieces: int = 1,
    index_args: str = "",
    log_dir: str | os.PathLike[str] | None = None,
    scripts: str | os.PathLike[str] = DEFAULT_SCRIPTS,
    extra: tuple[str, ...] = (),
    cwd: str | os.PathLike[str] | None = None,
) -> SlurmPlan:
    """The two ``sbatch`` calls for a job file.

    Args:
        job_file: the job (YAML); it must name its ``output``. Relative paths in it are taken from ``cwd``.
        nodes: array tasks, one per node (default layout) each using all ``gpus_per_node`` GPUs.
        gpus_per_node: GPUs per node; 0 runs ``workers`` CPU worker processes per task.
        per_gpu: one Slurm task per GPU (``--ntasks-per-node=G --gpus-per-task=1``) instead of one per node.
        workers: CPU worker processes per task when there are no GPUs.
        cpus_per_task: ``--cpus-per-task`` of the array (default: Slurm's).
        partition, time_limit, account: passed as ``--partition``, ``--time``, ``--account`` to both jobs.
        index: also queue the index job (``afterok`` on the whole array).
        index_mode: ``build`` (a fresh index) or ``update`` (add the new parts).
        index_cpus, index_time: ``--cpus-per-task`` and ``--time`` of the index job (of each piece and the merge).
        index_pieces: build the index as an array of this many pieces, then a merge job (``build`` only).
        index_args: more ``embed-corpus index build|update`` arguments (``EMBED_INDEX_ARGS``), e.g.
            ``"--max-memory 64G"``; the same for every piece and the merge.
        log_dir: per-task logs (default ``OUTPUT/logs/slurm``); created by ``submit``.
        scripts: the folder holding ``embed.sbatch`` and ``index.sbatch``.
        extra: more ``sbatch`` options, for both jobs (``--qos=high``, ``--mem=0``...).
        cwd: the directory the jobs run in (default: the current one).

    Raises:
        ConfigError: a bad count, a missing script, or a job file without ``output``.
    """
    cwd = Path(cwd or os.getcwd()).resolve()
    job = (cwd / job_file).resolve()
    values = load_job_file(job)
    if not values.get("output"):
        raise ConfigError(f"{job_file}: the job file must name its output directory (key 'output')")
    output = (cwd / str(values["output"])).resolve()
    for name, value in (("nodes", nodes), ("workers", workers)):
        if value < 1:
            raise ConfigError(f"{name}: {value} must be at least 1")
    if gpus_per_node < 0:
        raise ConfigError(f"gpus_per_node: {gpus_per_node} must be 0 (CPU) or more")
    if per_gpu and not gpus_per_node:
        raise ConfigError("per_gpu needs gpus_per_node")
    if index_mode not in ("build", "update"):
        raise ConfigError(f"index_mode: {index_mode!r} is not one of build, update")
    if index_pieces < 1:
        raise ConfigError(f"index_pieces: {index_pieces} must be at least 1")
    if index_pieces > 1 and index_mode != "build":
        raise ConfigError("index_pieces: an index is built in pieces by `index build`; `index update` adds in one job")
    scripts = Path(scripts)
    for script in ("embed.sbatch", "index.sbatch"):
        if not (scripts / script).is_file():
            raise ConfigError(f"{scripts / script} not found: give the folder of the job scripts with --scripts")
    logs = Path(log_dir).resolve() if log_dir else output / "logs" / "slurm"
    common = [f"--partition={partition}"] if partition else []
    common += [f"--account={account}"] if account else []
    base_env = {"EMBED_REPO": str(cwd), "EMBED_CORPUS": embed_corpus_command()}

    args = ["--parsable", f"--array=0-{nodes - 1}", f"--job-name=embed-{job.stem}", "--nodes=1",
            f"--output={logs}/embed-%A_%a.log", *common]
    args += [f"--time={time_limit}"] if time_limit else []
    if gpus_per_node and per_gpu:
        args += [f"--ntasks-per-node={gpus_per_node}", "--gpus-per-task=1"]
    elif gpus_per_node:
        args += ["--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
    else:
        args += ["--ntasks-per-node=1"]
    args += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    args += [*extra, str(scripts / "embed.sbatch")]
    embed = Submission(args, {**base_env, "EMBED_JOB": str(job), "EMBED_WORKERS": str(workers)})

    index_job = merge_job = None
    if index:
        def index_submission(name: str, log_name: str, step: str, array: list[str]) -> Submission:
            iargs = ["--parsable", "--kill-on-invalid-dep=yes", *array, f"--job-name={name}-{job.stem}",
                     f"--output={logs}/{log_name}", *common]
            iargs += [f"--time={index_time}"] if index_time else ([f"--time={time_limit}"] if time_limit else [])
            iargs += [f"--cpus-per-task={index_cpus}"] if index_cpus else []
            iargs += [*extra, str(scripts / "index.sbatch")]
            env = {**base_env, "EMBED_OUTPUT": str(output), "EMBED_INDEX_MODE": index_mode, "EMBED_INDEX_STEP": step,
                   "EMBED_JOB": str(job)}  # a build takes the job file's `index:` options
            if index_pieces > 1:
                env["EMBED_INDEX_PIECES"] = str(index_pieces)
            if index_args:
                env["EMBED_INDEX_ARGS"] = index_args
            return Submission(iargs, env)

        if index_pieces > 1:
            index_job = index_submission("index", "index-%A_%a.log", "piece", [f"--array=0-{index_pieces - 1}"])
            merge_job = index_submission("index-merge", "index-merge-%j.log", "merge", [])
        else:
            index_job = index_submission("index", "index-%j.log", "all", [])
    return SlurmPlan(embed, index_job, logs, output, merge_job)


def _sbatch(sub: Submission, dependency: str | None = None) -> str:
    """Run ``sbatch --parsable`` and return the job id it prints (``id`` or ``id;cluster``)."""
    proc = subprocess.run(sub.command(dependency), env={**os.environ, **sub.env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return proc.stdout.strip().splitlines()[-1].split(";")[0].strip()


def submit(plan: SlurmPlan) -> tuple[str, str | None, str | None]:
    """Submit the array, then the index job (or array) depending on it, then the merge job depending on that.

    Returns:
        ``(array job id, index job id or None, merge job id or None)``.
    """
    plan.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    array_id = _sbatch(plan.embed)
    index_id = _sbatch(plan.index, dependency=array_id) if plan.index else None
    merge_id = _sbatch(plan.merge, dependency=index_id) if plan.merge and index_id else None
    return array_id, index_id, merge_id
