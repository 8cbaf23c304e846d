"""Buckets: rows split by the leading bits of a 64-bit hash, so that planning and committing hold one bucket at a
time (memory bounded by the bucket size, not by the corpus).

Rows go to bucket ``h >> (64 - bits)`` of one of their hash columns; with ``bits`` chosen so that a bucket holds
about ``BUCKET_ROWS`` rows, a corpus of any size is diffed a few million rows at a time. Every row with one id (or
one text key) lands in one bucket, so what is decided by id (or by text) is decided within a bucket. Buckets are
spilled to Arrow IPC files in a scratch folder; with a single bucket they stay in memory.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

BUCKET_ROWS = int(os.environ.get("EMBED_CORPUS_BUCKET_ROWS", 1 << 20))  # rows per bucket (tests set it small)
MAX_BITS = 10  # at most 1024 buckets (two spills are written at once: 2048 open files); larger buckets beyond
SPILL_PREFIX = ".spill-"


def _files_needed(bits: int) -> int:
    return 2 * (1 << bits) + 256  # two spills written at once, and the rest of the process


def allow_open_files(bits: int) -> int:
    """Raise this process's limit of open files (up to its hard limit) to what ``2**bits`` buckets need; returns
    the limit. Every process that spills calls it: a worker that commits a plan another process made, too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = _files_needed(bits)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return need if soft == resource.RLIM_INFINITY else soft
    raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        return raised
    except (ValueError, OSError):
        return soft


def bucket_bits(rows: int) -> int:
    """Bits of the bucket number for about ``BUCKET_ROWS`` rows per bucket (0: one bucket), within the number of
    files this process may open (raised to the hard limit where it is lower than the buckets need)."""
    bits = 0
    while (rows >> bits) > BUCKET_ROWS and bits < MAX_BITS:
        bits += 1
    limit = allow_open_files(bits)
    while bits and _files_needed(bits) > limit:
        bits -= 1
    return bits


def bucket_of(h: np.ndarray, bits: int) -> np.ndarray:
    """Bucket number of each uint64 hash."""
    if not bits:
        return np.zeros(len(h), np.int64)
    return (np.asarray(h, np.uint64) >> np.uint64(64 - bits)).astype(np.int64)


class Spill:
    """Tables of one schema, split into ``2**bits`` buckets by the column ``key``; read back bucket by bucket.

    Rows of one bucket are read back in the order they were added.
    """

    def __init__(self, folder: Path | None, name: str, schema: pa.Schema, key: str, bits: int) -> None:
        self.schema, self.key, self.bits = schema, key, bits
        self.n = 1 << bits
        self.rows = np.zeros(self.n, np.int64)
        self._memory: list[list[pa.RecordBatch]] | None = [[] for _ in range(self.n)] if folder is None else None
        self._paths = [folder / f"{name}-{b:05d}.arrow" for b in range(self.n)] if folder is not None else []
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._closed = False

    def add(self, table: pa.Table | pa.RecordBatch | dict[str, np.ndarray], buckets: np.ndarray | None = None
            ) -> None:
        """Append rows (to the buckets of their key column, or to ``buckets`` given per row)."""
        if isinstance(table, dict):
            table = pa.table(table, schema=self.schema)
        elif isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        if buckets is None:
            buckets = bucket_of(table.column(self.key).to_numpy(), self.bits)
        if self.n == 1:
            self._put(0, table)
            return
        order = np.argsort(buckets, kind="stable")
        sorted_b = buckets[order]
        table = table.take(pa.array(order))
        edges = np.flatnonzero(np.r_[True, sorted_b[1:] != sorted_b[:-1], True])
        for a, z in zip(edges[:-1], edges[1:], strict=True):
            self._put(int(sorted_b[a]), table.slice(a, z - a))

    @property
    def added(self) -> int:
        """Rows added so far."""
        return int(self.rows.sum())

    def _put(self, b: int, table: pa.Table) -> None:
        if self._closed:
            raise RuntimeError("rows added to a spill after it was closed or read")
        self.rows[b] += table.num_rows
        if self._memory is not None:
            self._memory[b].extend(table.to_batches())
            return
        writer = self._writers.get(b)
        if writer is None:
            writer = self._writers[b] = pa.ipc.new_stream(str(self._paths[b]), self.schema)
        writer.write_table(table)

    def close(self) -> None:
        """No more rows will be added (a bucket's file is written once: adding after this is an error)."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._closed = True

    def read(self, b: int) -> pa.Table:
        """Bucket ``b`` (emptied from memory once read)."""
        self.close()
        pa.default_memory_pool().release_unused()  # what the last bucket used goes back to the system
        if self._memory is not None:
            batches, self._memory[b] = self._memory[b], []
            return pa.Table.from_batches(batches, self.schema)
        if not self.rows[b]:
            return self.schema.empty_table()
        with pa.ipc.open_stream(str(self._paths[b])) as reader:
            table = reader.read_all()
        os.unlink(self._paths[b])
        return table

    def __iter__(self) -> Iterator[tuple[int, pa.Table]]:
        for b in range(self.n):
            yield b, self.read(b)


def row_groups(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet file one row group at a time (``iter_batches`` keeps what it read until the end of the file:
    memory grew with the file)."""
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    for g in range(reader.num_row_groups):
        yield reader.read_row_group(g, columns=columns)


class Scratch:
    """A scratch folder for spills beside the output (same filesystem), removed on exit; none for one bucket."""

    def __init__(self, out: Path, bits: int) -> None:
        self.folder: Path | None = None
        if bits:
            allow_open_files(bits)
            (out / "plan").mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=out / "plan"))

    def spill(self, name: str, schema: pa.Schema, key: str, bits: int) -> Spill:
        return Spill(self.folder, name, schema, key, bits)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def remove_stale_spills(out: Path) -> None:
    """Scratch folders a killed planner left (call under the plan lock)."""
    folder = out / "plan"
    if folder.is_dir():
        for path in folder.glob(f"{SPILL_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
