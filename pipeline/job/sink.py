"""Sink: write one shard's vectors as a Parquet part, atomically, then its done-marker.

Layout of an output directory::

    OUTPUT/manifest.json              the plan (inputs, shards, settings fingerprint)
    OUTPUT/job.json                   how vectors were made (model, pooling, dims, prompt) for queries
    OUTPUT/vectors/part-NNNNNN.parquet one file per shard
    OUTPUT/shards/NNNNNN.done.json    the shard's stats; written after its part, so it marks completion
    OUTPUT/shards/NNNNNN.failed.json  the last error of a shard that failed
    OUTPUT/rejects/FFFFF.jsonl        rows skipped with --on-bad-record skip, with reasons
    OUTPUT/logs/run-*.log             one log per run

A part appears only complete (written under a temporary name, fsynced, renamed). A run killed between the
rename and the marker redoes the shard and replaces the part with the same rows, so no id is ever duplicated.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import raise_if_full
from pipeline.job.plan import Shard
from pipeline.util import write_json_atomic


def part_path(out: Path, shard: Shard) -> Path:
    return out / "vectors" / f"part-{shard.name}.parquet"


def done_path(out: Path, shard: Shard) -> Path:
    return out / "shards" / f"{shard.name}.done.json"


def failed_path(out: Path, shard: Shard) -> Path:
    return out / "shards" / f"{shard.name}.failed.json"


def is_done(out: Path, shard: Shard) -> bool:
    return done_path(out, shard).exists()


def embedding_array(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """(n, d) float array -> Arrow ``fixed_size_list<float32|float16>[d]`` without a per-row copy."""
    n, d = vectors.shape
    flat = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), d)


def write_part(out: Path, shard: Shard, table: pa.Table) -> Path:
    """Write ``table`` as the shard's part file: temporary name, fsync, rename."""
    final = part_path(out, shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=65536)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as exc:  # a full disk: leave no partial file, say where and how much
        tmp.unlink(missing_ok=True)
        raise_if_full(exc, final, needed=table.nbytes)
        raise
    os.replace(tmp, final)
    return final


def mark_done(out: Path, shard: Shard, stats: dict[str, Any]) -> None:
    """Record the shard as finished (after its part is in place) and clear an earlier failure."""
    path = done_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"shard": shard.id, "part": part_path(out, shard).name, "finished_at": time.time(),
                             "host": socket.gethostname(), "pid": os.getpid(), **stats})
    failed_path(out, shard).unlink(missing_ok=True)


def mark_failed(out: Path, shard: Shard, error: str) -> None:
    path = failed_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"shard": shard.id, "error": error, "failed_at": time.time(),
                             "host": socket.gethostname(), "pid": os.getpid()})


def read_markers(out: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Done and failed markers by shard id."""
    done: dict[int, dict[str, Any]] = {}
    failed: dict[int, dict[str, Any]] = {}
    folder = out / "shards"
    if folder.is_dir():
        for p in folder.iterdir():
            kind = done if p.name.endswith(".done.json") else failed if p.name.endswith(".failed.json") else None
            if kind is None:
                continue
            try:
                kind[int(p.name.split(".")[0])] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
    return done, failed
