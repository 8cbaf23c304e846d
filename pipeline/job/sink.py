"""Sink: write one shard's rows as a Parquet part with its document index, atomically, then its done-marker.

Layout of an output directory::

    OUTPUT/manifest.json                   the plan (inputs, shards, counts, versions), see ``plan.py``
    OUTPUT/job.json                        how vectors were made (model, pooling, dims, prompt), for queries
    OUTPUT/vectors -> versions/N/vectors   the live version: what readers read (see ``versions.py``)
    OUTPUT/versions/N/                     a version: vectors/ (hard links to its parts), rows.parquet, version.json
    OUTPUT/parts/part-SSSSSS.parquet       every part written (immutable once renamed into place)
    OUTPUT/parts/part-SSSSSS.docs.parquet  its document index: id/text/kept hashes, first row and row count
    OUTPUT/parts/dups-SSSSSS.parquet       rows of shard SSSSSS whose text another shard embeds (copied later)
    OUTPUT/shards/SSSSSS.done.json         the shard's stats; written after its part, so it marks completion
    OUTPUT/shards/SSSSSS.failed.json       the last error of a shard that failed
    OUTPUT/shards/SSSSSS.claim             a worker's claim on the shard (heartbeat, progress)
    OUTPUT/plan/                           scans of the inputs, work tables of the plan
    OUTPUT/rejects/FFFFF.jsonl             rows not embedded (--on-bad-record skip), with reasons
    OUTPUT/logs/run-*.log                  one log per run

A part appears only complete (written under a temporary name, fsynced, renamed), its document index before it,
and the shard counts as done only when its marker AND its part exist. Part ids are never reused, so a name always
means the same content.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import raise_if_full
from pipeline.util import fault_point, write_json_atomic

POOL = "parts"
WRITTEN_AT = b"embed_corpus.written_at"  # a part's Parquet metadata key (seconds since the epoch)
log = logging.getLogger(__name__)


def part_path(out: Path, part: int) -> Path:
    return out / POOL / f"part-{part:06d}.parquet"


def docs_path(out: Path, part: int) -> Path:
    return out / POOL / f"part-{part:06d}.docs.parquet"


def part_number(path: Path) -> int:
    """The part id in a part's or its document index's file name: six digits or more (``part-000042.parquet``,
    ``part-1000000.docs.parquet``; ids only grow, so a nightly output reaches seven)."""
    return int(path.name[len("part-"):].split(".", 1)[0])


def dups_path(out: Path, shard: int) -> Path:
    return out / POOL / f"dups-{shard:06d}.parquet"


def done_path(out: Path, shard) -> Path:
    return out / "shards" / f"{_sid(shard):06d}.done.json"


def failed_path(out: Path, shard) -> Path:
    return out / "shards" / f"{_sid(shard):06d}.failed.json"


def _sid(shard) -> int:
    return shard if isinstance(shard, int) else shard.id


def is_done(out: Path, shard) -> bool:
    """A shard is done when its marker and its part both exist (a marker alone never counts)."""
    return done_path(out, shard).exists() and part_path(out, _sid(shard)).exists()


def embedding_array(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """(n, d) float array -> Arrow ``fixed_size_list<float32|float16>[d]`` without a per-row copy."""
    n, d = vectors.shape
    flat = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), d)


def write_atomic(table: pa.Table, final: Path, *, row_group_size: int = 65536, fault: str = "",
                 once: bool = False) -> bool:
    """Write ``table`` as Parquet at ``final``: temporary name (``.NAME.tmp-HOST-PID``), fsync, rename. ``once``:
    a file already at ``final`` is kept and this one dropped (a hard link, not a rename, puts it there).

    Returns:
        Whether this table is the one at ``final`` now.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as exc:  # a full disk: leave no partial file, say where and how much
        tmp.unlink(missing_ok=True)
        raise_if_full(exc, final, needed=table.nbytes)
        raise
    if fault:
        fault_point(fault)
    if not once:
        os.replace(tmp, final)
        return True
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def docs_table(h: np.ndarray, k: np.ndarray, x: np.ndarray, prow: np.ndarray, nseq: np.ndarray) -> pa.Table:
    """A part's document index: one row per document (id hash, text key, kept-values hash, first row, rows)."""
    return pa.table({"h1": h[:, 0], "h2": h[:, 1], "k1": k[:, 0], "k2": k[:, 1], "x": x,
                     "prow": prow.astype(np.int64), "nseq": nseq.astype(np.int64)})


def write_part(out: Path, part: int, table: pa.Table, docs: pa.Table) -> Path:
    """The part's document index, then the part itself (both atomic); the part's link makes it exist.

    A part is written once: a worker whose claim was taken over while it wrote (a pause longer than the lease)
    keeps the part the other worker wrote, from the same plan's rows (as a resumed run keeps the part of a worker
    stopped before its marker). Replacing it would leave the pool with a file no version links, which garbage
    collection took for unused, deleting the live part's pool copy and document index (every later run of the
    output failed).
    """
    path = part_path(out, part)
    if path.exists():
        log.warning("part %d is there already (written by a worker stopped before its marker, or by one that took "
                    "this worker's claim over): keeping it", part)
        return path
    write_atomic(docs, docs_path(out, part))
    # when it was written, in the file itself: what tells it from a part rewritten under its name (a copy of the
    # output keeps it; the file's modification time does not survive `cp -r`)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), WRITTEN_AT: repr(time.time()).encode()})
    if not write_atomic(table, path, fault="before-part-rename", once=True):
        log.warning("part %d was written by another worker meanwhile (it took this worker's claim over): "
                    "keeping that one", part)
    fault_point("after-part-rename")
    return path


def mark_done(out: Path, shard, stats: dict[str, Any]) -> None:
    """Record the shard as finished (after its part is in place) and clear an earlier failure."""
    path = done_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    sid = _sid(shard)
    write_json_atomic(path, {"shard": sid, "part": part_path(out, sid).name, "finished_at": time.time(),
                             "host": socket.gethostname(), "pid": os.getpid(), **stats})
    failed_path(out, shard).unlink(missing_ok=True)


def mark_failed(out: Path, shard, error: str) -> None:
    path = failed_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"shard": _sid(shard), "error": error, "failed_at": time.time(),
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


def remove_stale_temp_files(out: Path, older_than: float) -> None:
    """Delete temporary files left by killed workers: at once when they name a process of this host that no longer
    exists, else once they are older than any live worker's could be."""
    import shutil

    from pipeline.util import pid_alive

    now, host = time.time(), socket.gethostname()
    for folder in (out / POOL, out / "shards", out / "versions", out / "canary", out):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp-*"):
            suffix = path.name.rsplit(".tmp-", 1)[1]
            owner, _, pid = suffix.rpartition("-")
            dead = owner == host and pid.isdigit() and not pid_alive(int(pid))
            try:
                if dead or now - path.stat().st_mtime > older_than:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()
            except OSError:
                pass
