"""Ranks: which worker this is, from the launcher's environment (Slurm, torchrun, Kubernetes), and its GPU.

The rank only names a worker and picks its GPU: work is shared through shard claims, never split by rank.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    source: str  # "slurm-array" | "slurm" | "torchrun" | "k8s" | "local"


def detect_rank(env: dict[str, str] | None = None) -> Rank:
    """The worker's rank from the environment of Slurm (array or tasks), torchrun, or a Kubernetes indexed job."""
    env = dict(os.environ if env is None else env)
    local = int(env.get("SLURM_LOCALID", env.get("LOCAL_RANK", "0")))
    if "SLURM_ARRAY_TASK_ID" in env:
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        tasks = int(env.get("SLURM_NTASKS", "1"))
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Rank(task * tasks + int(env.get("SLURM_PROCID", "0")), count * tasks, local, "slurm-array")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Rank(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), local, "slurm")
    if "RANK" in env and "WORLD_SIZE" in env:
        return Rank(int(env["RANK"]), int(env["WORLD_SIZE"]), local, "torchrun")
    if "JOB_COMPLETION_INDEX" in env:
        return Rank(int(env["JOB_COMPLETION_INDEX"]), int(env.get("JOB_COMPLETION_COUNT", "1")), 0, "k8s")
    return Rank(0, 1, 0, "local")


def device_for_rank(device: str | None, env: dict[str, str] | None = None) -> str | None:
    """With several visible GPUs and a launcher's local rank (Slurm tasks or torchrun), each local worker takes
    ``cuda:LOCAL_RANK``; otherwise the configured device is kept."""
    if device not in (None, "cuda"):
        return device
    rank = detect_rank(env)
    if rank.source == "local":
        return device
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:
        return device
    return f"cuda:{rank.local_rank % n}" if n > 1 else device



def worker_name() -> str:
    """``host:pid:token`` plus the launcher's rank where one is set (Slurm, torchrun, Kubernetes).

    The random token keeps two live workers apart when host name and pid coincide (containers that share the
    host's name, where every worker is pid 1): two workers with one name would each take the other's claims
    for their own.
    """
    rank = detect_rank()
    suffix = f":{rank.source}{rank.rank}" if rank.source != "local" else ""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}{suffix}"
