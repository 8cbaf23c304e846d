"""The planner's passes over buckets: what every target row and every placement becomes, a bucket at a time.

1. ``by_id``: bucket by id hash. Each id's first row in input order is kept (later ones are duplicates); each row
   is matched with the placement it stays on (``diff.match_stay``); added / changed / deleted / unchanged are
   counted; the target is written sorted by id (``target.parquet``, for the commit's exactly-once check). Rows
   that need a vector, and every placement (with whether it stays), are spilled by text key; the placements that
   leave the corpus are listed by part.
2. ``by_text``: bucket by text key. Each row that needs a vector copies it from a placement with its text, or is
   embedded by the first row of its text in input order (``diff.assign_vectors``). Rows are spilled by input file.
3. ``files_in_order`` (for ``plan._cut_embed_shards``): file by file, in input order, the rows that need a vector
   are cut into embed shards, each with its work table (an owner is always in an earlier file or earlier in the
   same file, so its shard is known).

Memory: one bucket at a time (``buckets.BUCKET_ROWS`` rows), plus the rows of one input file that need a vector,
plus per part and per shard counters, plus the placements that leave (proportional to the change). A text bucket
holds every row of its texts: a text repeated in millions of rows (an "N/A") makes its bucket that large.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.buckets import Spill
from pipeline.job.diff import Placed, assign_vectors, build_target, match_stay, member
from pipeline.job.manifest import DUP, EMBED, REUSE, SAME

U64, I64, I32 = pa.uint64(), pa.int64(), pa.int32()
HASHES = [("h1", U64), ("h2", U64), ("k1", U64), ("k2", U64), ("x", U64)]
ROWS_SCHEMA = pa.schema([("file", I32), ("frow", I64), *HASHES, ("nbytes", I64)])
PLACED_SCHEMA = pa.schema([*HASHES, ("part", I64), ("prow", I64), ("nseq", I64), ("live", pa.bool_()),
                          ("rank", I64)])  # rank: the placement's position in the order they were spilled
KEYED_SCHEMA = pa.schema([("k1", U64), ("k2", U64), ("part", I64), ("prow", I64), ("nseq", I64),
                          ("live", pa.bool_()), ("dead", pa.bool_()), ("rank", I64)])
RESOLVED_SCHEMA = pa.schema([*ROWS_SCHEMA, ("kind", pa.int8()), ("src_part", I64), ("src_prow", I64),
                             ("src_nseq", I64), ("owner_file", I32), ("owner_frow", I64)])
TARGET_SCHEMA = pa.schema([("file", I32), ("frow", I64), *HASHES])


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def pair(table: pa.Table, a: str, b: str) -> np.ndarray:
    out = np.empty((table.num_rows, 2), np.uint64)
    out[:, 0], out[:, 1] = column(table, a), column(table, b)
    return out


def hash_order(h: np.ndarray, k: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows sorted by id hash, then text key, then kept values (the order of ``target.parquet`` and ``rows.parquet``
    within a bucket)."""
    return np.lexsort((x, k[:, 1], k[:, 0], h[:, 1], h[:, 0]))


@dataclass
class Outcome:
    """What pass 1 found, beyond its spills."""

    files: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("docs", "added", "changed", "deleted", "unchanged", "reused", "embedded", "deduplicated"), 0))
    docs_per_file: np.ndarray | None = None
    staying: dict[int, int] = field(default_factory=dict)  # part -> documents that stay
    leaving: dict[int, list[np.ndarray]] = field(default_factory=dict)  # part -> first rows of documents that go
    duplicates: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # (file, frow, first file, first frow)

    def __post_init__(self) -> None:
        self.docs_per_file = np.zeros(self.files, np.int64)

    def leaving_rows(self, part: int) -> np.ndarray:
        found = self.leaving.get(part)
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def _add_counts(into: dict[int, int], keys: np.ndarray) -> None:
    values, counts = np.unique(keys, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        into[v] = into.get(v, 0) + c


def by_id(rows: Spill, placed: Spill, need: Spill, keyed: Spill, target: pq.ParquetWriter, files: int) -> Outcome:
    """Pass 1 (see the module docstring)."""
    got = Outcome(files)
    c = got.counts
    for b in range(rows.n):
        t, p = rows.read(b), placed.read(b)
        file, frow = column(t, "file"), column(t, "frow")
        tg, dup, first = build_target(file, frow, pair(t, "h1", "h2"), pair(t, "k1", "k2"), column(t, "x"),
                                      column(t, "nbytes"))
        if len(dup):
            got.duplicates.append((file[dup], frow[dup], file[first], frow[first]))
        del t, file, frow
        live = column(p, "live").astype(bool)
        pl = Placed(pair(p, "h1", "h2"), pair(p, "k1", "k2"), column(p, "x"), column(p, "part"), column(p, "prow"),
                    column(p, "nseq"), live)
        stay, dead = match_stay(tg, pl)
        old_h = pl.h if live.all() else pl.h[live]
        in_old = member(tg.h, old_h) if len(pl) else np.zeros(len(tg), bool)
        unchanged = stay >= 0
        c["docs"] += len(tg)
        c["added"] += int((~in_old).sum())
        c["changed"] += int((in_old & ~unchanged).sum())
        c["unchanged"] += int(unchanged.sum())
        c["deleted"] += int((~member(old_h, tg.h)).sum()) if len(old_h) else 0
        got.docs_per_file += np.bincount(tg.file, minlength=files)
        order = hash_order(tg.h, tg.k, tg.x)
        target.write_table(pa.table({"file": tg.file[order], "frow": tg.frow[order], "h1": tg.h[order, 0],
                                     "h2": tg.h[order, 1], "k1": tg.k[order, 0], "k2": tg.k[order, 1],
                                     "x": tg.x[order]}, schema=TARGET_SCHEMA))
        del order
        if len(pl):
            _add_counts(got.staying, pl.part[~dead])
            gone = np.flatnonzero(dead)
            gone = gone[np.argsort(pl.part[gone], kind="stable")]
            parts = pl.part[gone]
            edges = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1], True]) if len(gone) else np.zeros(1, int)
            for a, z in zip(edges[:-1], edges[1:], strict=True):
                got.leaving.setdefault(int(parts[a]), []).append(pl.prow[gone[a:z]])
            keyed.add({"k1": pl.k[:, 0], "k2": pl.k[:, 1], "part": pl.part, "prow": pl.prow, "nseq": pl.nseq,
                       "live": pl.live, "dead": dead, "rank": column(p, "rank")})
        del p
        sel = np.flatnonzero(~unchanged)
        need.add({"file": tg.file[sel], "frow": tg.frow[sel], "h1": tg.h[sel, 0], "h2": tg.h[sel, 1],
                  "k1": tg.k[sel, 0], "k2": tg.k[sel, 1], "x": tg.x[sel], "nbytes": tg.nbytes[sel]})
    return got


def file_group(files: int, bits: int) -> Callable[[np.ndarray], np.ndarray]:
    """Input files to ``2**bits`` groups of consecutive files (so groups read in order give files in order)."""
    n = 1 << bits
    return lambda file: (file.astype(np.int64) * n) // max(files, 1)


def shard_cost(kind: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """The work of each row for byte-sized shards: its text's bytes where it is embedded, an eighth of them
    where its vector is copied."""
    return np.where(kind == EMBED, nbytes, nbytes // 8 + 1)


def by_text(need: Spill, keyed: Spill, resolved: Spill, group: Callable[[np.ndarray], np.ndarray],
            counts: dict[str, int], file_cost: np.ndarray | None = None) -> None:
    """Pass 2 (see the module docstring). ``file_cost`` (one entry per input file) gets each file's
    ``shard_cost`` added up: how much work the shards cut after a file hold."""
    for b in range(need.n):
        t, p = need.read(b), keyed.read(b)
        if not t.num_rows:
            continue
        file, frow = column(t, "file"), column(t, "frow")
        rank = (file.astype(np.int64) << 40) | frow  # input order (rows < 2**40 per file)
        pk = pair(p, "k1", "k2")
        reuse, owner = assign_vectors(pair(t, "k1", "k2"), rank, pk, column(p, "live").astype(bool),
                                      column(p, "dead").astype(bool), column(p, "rank"))
        hit = reuse >= 0
        src = np.maximum(reuse, 0)
        emb = owner >= 0
        own = np.maximum(owner, 0)
        counts["reused"] += int(hit.sum())
        owners = emb & (owner == np.arange(len(owner)))
        counts["embedded"] += int(owners.sum())
        counts["deduplicated"] += int((emb & ~owners).sum())
        kind = np.where(hit, REUSE, EMBED).astype(np.int8)
        if file_cost is not None:
            file_cost += np.bincount(file, shard_cost(kind, column(t, "nbytes")), len(file_cost)).astype(np.int64)
        out = t.append_column("kind", pa.array(kind))
        for name, values in (("src_part", column(p, "part")), ("src_prow", column(p, "prow"))):
            out = out.append_column(name, pa.array(np.where(hit, values[src] if len(values) else -1, -1)))
        nseq = column(p, "nseq")
        out = out.append_column("src_nseq", pa.array(np.where(hit, nseq[src] if len(nseq) else 0, 0)))
        out = out.append_column("owner_file", pa.array(np.where(emb, file[own], -1).astype(np.int32)))
        out = out.append_column("owner_frow", pa.array(np.where(emb, frow[own], -1)))
        resolved.add(out, buckets=group(file))


def files_in_order(resolved: Spill) -> Iterator[tuple[int, pa.Table]]:
    """The resolved rows of each input file that has any, files in input order, rows by row."""
    for _g, table in resolved:
        if not table.num_rows:
            continue
        file = column(table, "file")
        order = np.lexsort((column(table, "frow"), file))
        table, file = table.take(pa.array(order)), file[order]
        edges = np.flatnonzero(np.r_[True, file[1:] != file[:-1], True])
        for a, z in zip(edges[:-1], edges[1:], strict=True):
            yield int(file[a]), table.slice(a, z - a)


@dataclass
class FileShards:
    """The embed shards cut from one file: the first row of each (sorted) and its shard id."""

    first_frow: np.ndarray
    sid: np.ndarray

    def of(self, frow: np.ndarray) -> np.ndarray:
        return self.sid[np.searchsorted(self.first_frow, frow, "right") - 1]


def work_table(rows: pa.Table, sid: int, cut: dict[int, FileShards]) -> pa.Table:
    """The work table of embed shard ``sid`` from its resolved rows (``cut``: the shards of the files so far)."""
    frow = column(rows, "frow")
    kind = column(rows, "kind").copy()
    ofile, ofrow = column(rows, "owner_file"), column(rows, "owner_frow")
    file = column(rows, "file")
    emb = kind == EMBED
    self_owned = (ofile == file) & (ofrow == frow)
    owner_shard = np.full(len(frow), -1, np.int64)
    for f in np.unique(ofile[emb]).tolist():
        sel = emb & (ofile == f)
        owner_shard[sel] = cut[f].of(ofrow[sel])
    same = emb & ~self_owned & (owner_shard == sid)
    dup = emb & ~self_owned & ~same
    kind[same], kind[dup] = SAME, DUP
    return pa.table({
        "frow": frow, "kind": kind, "owner_frow": np.where(emb, ofrow, -1), "owner_shard": owner_shard,
        "h1": column(rows, "h1"), "h2": column(rows, "h2"), "k1": column(rows, "k1"), "k2": column(rows, "k2"),
        "x": column(rows, "x"), "src_part": column(rows, "src_part"), "src_prow": column(rows, "src_prow"),
        "src_nseq": column(rows, "src_nseq"),
    })
