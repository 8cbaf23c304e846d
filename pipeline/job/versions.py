"""Versions: readers see one consistent version of the output, switched atomically when a plan is complete.

A version ``N`` is a directory ``OUTPUT/versions/NNNNNN/`` holding ``vectors/`` (hard links to the immutable parts
in ``OUTPUT/parts/`` that hold its documents: every live id exactly once, no other row), ``rows.parquet`` (where
each document is: id/text/kept hashes, input file and row, part, first output row, output rows) and
``version.json`` (inputs, parts, counts of the run that made it). ``OUTPUT/vectors`` is a symbolic link to the live
version's ``vectors/``; a commit builds the new version under a temporary name, renames it into place, then
renames a new link over the old one (atomic on POSIX): that rename is the commit. The previous version is kept
until the next commit, so a reader that resolved the link (``os.path.realpath``) keeps its files while it reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ManifestMismatch, PipelineError
from pipeline.job import passes
from pipeline.job.buckets import Spill, row_groups
from pipeline.job.diff import Placed, find
from pipeline.job.sink import POOL, docs_path, part_number, part_path
from pipeline.util import fault_point, fsync_dir, write_json_atomic

if TYPE_CHECKING:
    from pipeline.job.manifest import Manifest

log = logging.getLogger(__name__)

VERSIONS = "versions"
LINK = "vectors"
ROWS = "rows.parquet"
INFO = "version.json"
_LINK_TARGET = re.compile(r"^versions/(\d+)/vectors$")


def version_dir(out: Path, n: int) -> Path:
    return out / VERSIONS / f"{n:06d}"


def live_version(out: Path) -> int:
    """The version ``OUTPUT/vectors`` points at (0: none yet).

    Raises:
        ManifestMismatch: ``OUTPUT/vectors`` is a plain folder (an output of an older embed-corpus).
    """
    link = Path(out) / LINK
    if link.is_symlink():
        m = _LINK_TARGET.match(os.readlink(link))
        if m is None:
            raise ManifestMismatch(f"{link} points at {os.readlink(link)!r}, not at a version of this output")
        return int(m.group(1))
    if link.exists():
        if not (link.parent / VERSIONS).is_dir():
            raise ManifestMismatch(f"{link} is a folder: this output was written by an older embed-corpus without "
                                   "versions; start over with --overwrite")
        return _copied_live_version(link.parent)
    return 0


def _copied_live_version(out: Path) -> int:
    """The live version of an output copied without its link (``OUTPUT/vectors`` became a folder): the one its
    manifest says was committed last."""
    try:
        m = json.loads((out / "manifest.json").read_text())
        n = int(m["target"] if m.get("committed") else m["base"])
    except (OSError, ValueError, KeyError):
        n = max((int(p.name) for p in (out / VERSIONS).glob("[0-9]*") if (p / INFO).exists()), default=0)
    log.warning("%s/%s is a folder, not a link (the output was copied without its links?): taking version %d as live",
                out, LINK, n)
    return n


def live_vectors(output: str | Path) -> Path | None:
    """The resolved folder of the live version's parts (what a reader should open), or None before any commit."""
    n = live_version(Path(output))
    return version_dir(Path(output), n) / LINK if n else None


def version_info(out: Path, n: int) -> dict[str, Any]:
    try:
        return json.loads((version_dir(out, n) / INFO).read_text())
    except (OSError, ValueError):
        return {}


def part_complete(out: Path, part: int) -> bool:
    return part_path(out, part).exists() and docs_path(out, part).exists()


def max_part_id(out: Path) -> int:
    """The largest part id in the pool or in any version (-1 when none), so that ids are never reused."""
    ids = [-1]
    for folder in [out / POOL, *(p / LINK for p in (out / VERSIONS).glob("[0-9]*"))]:
        if folder.is_dir():
            ids += [part_number(p) for p in folder.glob("part-[0-9][0-9][0-9][0-9][0-9][0-9]*.parquet")]
    return max(ids)


PLACED_COLUMNS = ("h1", "h2", "k1", "k2", "x", "part", "prow", "nseq")


def part_placements(out: Path, part: int) -> Placed:
    """The documents of one part (from its document index)."""
    docs = pq.read_table(docs_path(out, part))
    n = docs.num_rows
    return Placed(passes.pair(docs, "h1", "h2"), passes.pair(docs, "k1", "k2"), passes.column(docs, "x"),
                  np.full(n, part, np.int64), passes.column(docs, "prow").astype(np.int64, copy=False),
                  passes.column(docs, "nseq").astype(np.int64, copy=False), np.zeros(n, bool))


# --------------------------------------------------------------------------------------------- commit


def commit(out: Path, manifest: Manifest) -> None:
    """Make the plan's version live. The caller holds the plan lock, and every shard of the plan is done.

    Idempotent: a commit killed at any moment is finished by the next one. Raises ``PipelineError`` when the
    parts do not hold every document of the plan exactly once (nothing is switched then).
    """
    from pipeline.job.manifest import MANIFEST

    n = manifest.target
    if live_version(out) != n:
        if version_info(out, n).get("plan_id") != manifest.plan_id:
            shutil.rmtree(version_dir(out, n), ignore_errors=True)  # built by a plan that was replaced since
            _build_version(out, manifest)
        fault_point("before-switch")
        _switch(out, n)
        fault_point("after-switch")
    manifest.committed = True
    write_json_atomic(out / MANIFEST, manifest.to_json())
    fault_point("after-commit")
    collect_garbage(out, keep={n, manifest.base})
    log.info("%s: version %d is live (%d documents)", out, n, manifest.corpus_docs)


def spill_version(spill: Spill, out: Path, n: int, parts: set[int] | None = None) -> set[int]:
    """The documents of version ``n`` (live), or of its ``parts`` only, into ``spill``; returns the parts seen."""
    wanted = np.fromiter(parts, np.int64, len(parts)) if parts is not None else None
    seen: set[int] = set()
    for table in row_groups(version_dir(out, n) / ROWS, list(PLACED_COLUMNS)):
        part = table.column("part").to_numpy()
        if wanted is not None:
            keep = np.isin(part, wanted)
            table, part = table.filter(pa.array(keep)), part[keep]
        seen.update(np.unique(part).tolist())
        spill.add(table.append_column("live", pa.array(np.ones(table.num_rows, bool)))
                  .append_column("rank", pa.array(np.arange(spill.added, spill.added + table.num_rows))))
        del table
        pa.default_memory_pool().release_unused()
    return seen


def spill_part(spill: Spill, out: Path, part: int, *, live: bool) -> None:
    """The documents of one part (from its document index) into ``spill``."""
    docs = pq.read_table(docs_path(out, part))
    n = docs.num_rows
    spill.add(docs.append_column("part", pa.array(np.full(n, part, np.int64)))
              .append_column("live", pa.array(np.full(n, live)))
              .append_column("rank", pa.array(np.arange(spill.added, spill.added + n))))


def _spill_version_placements(spill: Spill, out: Path, manifest: Manifest) -> None:
    """The documents of the plan's version: the kept parts (from the base version, or finished by a replaced
    plan) and the parts its shards write."""
    kept = set(manifest.kept_parts)
    if manifest.base and kept:
        kept -= spill_version(spill, out, manifest.base, kept)
    for p in sorted(kept):
        spill_part(spill, out, p, live=False)
    for s in manifest.shards:
        if s.docs:
            spill_part(spill, out, s.id, live=False)


ROWS_SCHEMA = pa.schema([(c, pa.uint64()) for c in ("h1", "h2", "k1", "k2", "x")] + [
    ("file", pa.int32()), ("frow", pa.int64()), ("part", pa.int64()), ("prow", pa.int64()), ("nseq", pa.int64())])


def _build_version(out: Path, manifest: Manifest) -> None:
    """Write version ``manifest.target`` beside the live one, bucket by bucket of id hashes: check that its parts
    hold every document of the plan's target exactly once, and list them in ``rows.parquet`` (sorted by id hash)."""
    from pipeline.job.buckets import Scratch

    n = manifest.target
    bits = int(manifest.plan.get("bucket_bits", 0))
    final = version_dir(out, n)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / LINK).mkdir(parents=True)
    parts: set[int] = set()
    docs = rows = missing = extra = 0
    try:
        with Scratch(out, bits) as scratch:
            placed = scratch.spill("placed", passes.PLACED_SCHEMA, "h1", bits)
            _spill_version_placements(placed, out, manifest)
            placed.close()  # its files are read back later: one spill's writers open at a time
            target = scratch.spill("target", passes.TARGET_SCHEMA, "h1", bits)
            for table in row_groups(manifest.work_dir(out) / "target.parquet"):
                target.add(table)
            with pq.ParquetWriter(tmp / ROWS, ROWS_SCHEMA, compression="zstd") as writer:
                for b in range(target.n):
                    t, p = target.read(b), placed.read(b)
                    th, tk, tx = passes.pair(t, "h1", "h2"), passes.pair(t, "k1", "k2"), passes.column(t, "x")
                    ph, pk, px = passes.pair(p, "h1", "h2"), passes.pair(p, "k1", "k2"), passes.column(p, "x")
                    to, po = passes.hash_order(th, tk, tx), passes.hash_order(ph, pk, px)
                    tcols = [th[:, 0], th[:, 1], tk[:, 0], tk[:, 1], tx]
                    pcols = [ph[:, 0], ph[:, 1], pk[:, 0], pk[:, 1], px]
                    if len(to) != len(po) or not all(np.array_equal(pc_[po], tc_[to]) for pc_, tc_ in
                                                     zip(pcols, tcols, strict=True)):
                        lost = int((find(pcols, po, tcols) < 0).sum())
                        missing, extra = missing + lost, extra + len(po) - (len(to) - lost)
                        continue
                    part, nseq = passes.column(p, "part")[po], passes.column(p, "nseq")[po]
                    parts.update(np.unique(part).tolist())
                    docs, rows = docs + len(to), rows + int(nseq.sum())
                    writer.write_table(pa.table({
                        "h1": th[to, 0], "h2": th[to, 1], "k1": tk[to, 0], "k2": tk[to, 1], "x": tx[to],
                        "file": passes.column(t, "file")[to], "frow": passes.column(t, "frow")[to], "part": part,
                        "prow": passes.column(p, "prow")[po], "nseq": nseq}, schema=ROWS_SCHEMA))
        if missing or extra:
            raise PipelineError(f"{out}: the parts of version {n} do not hold the corpus exactly once ({missing} "
                                f"documents missing, {extra} extra); nothing was switched. Rerun the same command.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in sorted(parts):
        os.link(part_path(out, p), tmp / LINK / part_path(out, p).name)
    with open(tmp / ROWS, "rb+") as f:
        os.fsync(f.fileno())
    write_json_atomic(tmp / INFO, {
        "version": n, "plan_id": manifest.plan_id, "base": manifest.base, "created_at": time.time(),
        "fingerprint": manifest.fingerprint,
        "docs": docs, "rows": rows, "parts": sorted(parts), "counts": manifest.counts,
        "files": [{"path": pf.file.path, "key": pf.file.key, "digest": pf.file.digest, "format": pf.file.format,
                   "compression": pf.file.compression, "generated_ids": pf.generated_ids, "stat": list(pf.file.stat)}
                  for pf in manifest.files],
    })
    fsync_dir(tmp / LINK)
    fsync_dir(tmp)
    fault_point("before-version-rename")
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _switch(out: Path, n: int) -> None:
    """Point ``OUTPUT/vectors`` at version ``n``: a new link under a temporary name, renamed over the old one."""
    tmp = out / f".{LINK}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    if (out / LINK).is_dir() and not (out / LINK).is_symlink():  # a copied output (see _copied_live_version)
        shutil.rmtree(out / LINK)
    os.symlink(f"{VERSIONS}/{n:06d}/{LINK}", tmp)
    os.replace(tmp, out / LINK)
    fsync_dir(out)


def collect_garbage(out: Path, keep: set[int]) -> None:
    """Remove versions other than ``keep``, then parts that no kept version links (and their side files)."""
    folder = out / VERSIONS
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.isdigit() and int(entry.name) not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                fault_point("during-gc")
    pool = out / POOL
    if not pool.is_dir():
        return
    # by name as well as by links: a pool file another worker replaced is not the one a version links
    linked = {p.name for v in folder.glob("[0-9]*") for p in (v / LINK).glob("part-*.parquet")}
    for path in pool.glob("part-*.parquet"):
        if path.name.endswith(".docs.parquet") or path.name in linked:
            continue
        try:
            if path.stat().st_nlink == 1:  # only the pool names it: no kept version holds it
                docs_path(out, part_number(path)).unlink(missing_ok=True)
                path.unlink()
        except (OSError, ValueError):
            continue
    for path in pool.glob("dups-*.parquet"):
        path.unlink(missing_ok=True)
    for path in pool.glob("part-*.docs.parquet"):
        if not part_path(out, part_number(path)).exists():
            path.unlink(missing_ok=True)


def publish(out: Path, add: list[int], drop: Iterable[int] = ()) -> int:
    """Make a new version of the live parts, less ``drop``, plus the pool parts ``add`` (written with their document
    indexes, ``sink.write_part``): for outputs made without a plan (index tests and benchmarks). The documents of
    live parts keep where they came from; added ones come from no input file. Returns the new version."""
    out = Path(out)
    base = live_version(out)
    dropped = np.fromiter(set(drop), np.int64)
    tables = []
    if base:
        rows = pq.read_table(version_dir(out, base) / ROWS)
        tables.append(rows.filter(pa.array(~np.isin(rows.column("part").to_numpy(), dropped))))
    for p in add:
        docs = pq.read_table(docs_path(out, p))
        n = docs.num_rows
        tables.append(pa.table({
            **{c: docs.column(c) for c in ("h1", "h2", "k1", "k2", "x")},
            "file": pa.array(np.full(n, -1, np.int32)), "frow": pa.array(np.full(n, -1, np.int64)),
            "part": pa.array(np.full(n, p, np.int64)), "prow": docs.column("prow"), "nseq": docs.column("nseq")}))
    rows = pa.concat_tables(tables, promote_options="permissive") if tables else None
    parts = sorted(set(rows.column("part").to_pylist())) if rows is not None else []
    n = max([base, *(int(p.name) for p in (out / VERSIONS).glob("[0-9]*"))]) + 1 if (out / VERSIONS).is_dir() \
        else base + 1
    final = version_dir(out, n)
    (final / LINK).mkdir(parents=True)
    for p in parts:
        os.link(part_path(out, p), final / LINK / part_path(out, p).name)
    if rows is not None:
        pq.write_table(rows, final / ROWS)
    info = version_info(out, base) if base else {}
    write_json_atomic(final / INFO, {"version": n, "plan_id": "", "base": base, "created_at": time.time(),
                                     "docs": rows.num_rows if rows is not None else 0,
                                     "rows": int(pc.sum(rows.column("nseq")).as_py() or 0) if rows is not None else 0,
                                     "parts": parts, "files": info.get("files", [])})
    _switch(out, n)
    collect_garbage(out, keep={n, base})
    return n
