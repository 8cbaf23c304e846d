"""Diff: what a run must do to turn the placed documents into exactly the current corpus. Pure NumPy.

Terms:
- the *target* is the current corpus: every valid row of every input file, in input order (files in the order
  the inputs give them, rows in file order), an id kept only at its first occurrence (later ones are duplicates);
- a *placement* is a document already written into a part file: its id hash, text key and kept-values hash, and
  where it is (part, first output row, output rows). The placements are the live version's documents, plus those
  of the parts a replaced, unfinished plan had finished (nothing embedded is embedded twice);
- a target row *stays* where a placement holds the same id, text and kept values; a placement no target row
  stays on is *dead*, and so is every part that holds one: such a part is rewritten without its dead rows
  (copy-on-write), or dropped when nothing of it stays;
- every other target row *needs* a vector: *reused* from any placement with the same text key, else *embedded*
  once per distinct key (the first row of the key in input order owns it; the others copy its vector).

Everything is keyed by 128-bit hashes held in NumPy arrays (about 60 bytes per row, no Python object per row);
matching sorts by the first 64 bits only and compares the rest where they meet (``find``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Target:
    """The current corpus, one row per document kept (arrays of equal length, in input order)."""

    file: np.ndarray  # int32: index of the input file
    frow: np.ndarray  # int64: row in the file
    h: np.ndarray  # (n, 2) uint64 id hash
    k: np.ndarray  # (n, 2) uint64 text key
    x: np.ndarray  # uint64 kept-values hash
    nbytes: np.ndarray  # int64 text bytes

    def __len__(self) -> int:
        return len(self.frow)


@dataclass
class Placed:
    """Documents already in part files (arrays of equal length)."""

    h: np.ndarray  # (n, 2) uint64
    k: np.ndarray  # (n, 2) uint64
    x: np.ndarray  # uint64
    part: np.ndarray  # int64 part id
    prow: np.ndarray  # int64 first output row of the document in its part
    nseq: np.ndarray  # int64 output rows of the document (chunks)
    live: np.ndarray  # bool: in the live version (preferred when two placements match)

    def __len__(self) -> int:
        return len(self.part)


def build_target(file: np.ndarray, frow: np.ndarray, h: np.ndarray, k: np.ndarray, x: np.ndarray,
                 nbytes: np.ndarray) -> tuple[Target, np.ndarray, np.ndarray]:
    """Keep each id's first row in input order.

    Args: arrays of every valid row, in input order.

    Returns:
        ``(target, duplicate, first)``: ``duplicate`` are the indices (into the inputs) of rows whose id appeared
        earlier, ``first`` the index of that earlier row for each.
    """
    n = len(frow)
    order = np.lexsort((np.arange(n), h[:, 1], h[:, 0]))  # by id, then input position
    same = np.zeros(n, bool)
    if n > 1:
        s0, s1 = h[order, 0], h[order, 1]
        same[1:] = (s0[1:] == s0[:-1]) & (s1[1:] == s1[:-1])
        del s0, s1
    if not same.any():  # no id repeats (the usual case): the rows are the target as they are
        none = np.zeros(0, np.int64)
        return Target(file, frow, h, k, x, nbytes), none, none
    group_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
    duplicate = order[same]
    first = order[group_start[same]]
    keep = np.ones(n, bool)
    keep[duplicate] = False
    idx = np.flatnonzero(keep)
    return Target(file[idx], frow[idx], h[idx], k[idx], x[idx], nbytes[idx]), duplicate, first


def find(cols: list[np.ndarray], order: np.ndarray, query: list[np.ndarray]) -> np.ndarray:
    """For each query row, the index of the first row of ``cols`` (in ``order``) equal to it, or -1.

    ``order`` sorts the table by its first column (how it breaks ties decides which of several equal rows is
    found). Native ``uint64`` searches on the first column (a 64-bit hash: equal first values almost always mean
    equal rows), made in sorted query order: a binary search per random query misses the cache at every step
    (17 s for 10M queries into 10M rows here, against 3 s sorted first). The other columns are compared at the
    position found; only rows whose first value repeats with other values (a hash collision, one id placed
    twice) are looked at one by one. Memory: a sorted copy of the first column and a few arrays per query.
    """
    q = np.ascontiguousarray(query[0])
    found = np.full(len(q), -1, np.int64)
    if not len(order) or not len(q):
        return found
    first = cols[0][order]
    lo = np.empty(len(q), np.int64)
    qo = np.argsort(q)
    lo[qo] = np.searchsorted(first, q[qo])
    del qo
    n = len(first)
    cand = np.flatnonzero(lo < n)
    cand = cand[first[lo[cand]] == q[cand]]
    idx = order[lo[cand]]
    ok = np.ones(len(cand), bool)
    for col, qc in zip(cols[1:], query[1:], strict=True):
        ok &= col[idx] == qc[cand]
    found[cand[ok]] = idx[ok]
    for i in cand[~ok].tolist():  # rare: walk the run of equal first values
        j = int(lo[i]) + 1
        while j < n and first[j] == q[i]:
            r = order[j]
            if all(col[r] == qc[i] for col, qc in zip(cols[1:], query[1:], strict=True)):
                found[i] = r
                break
            j += 1
    return found


def _cols(h: np.ndarray, k: np.ndarray | None = None, x: np.ndarray | None = None) -> list[np.ndarray]:
    out = [h[:, 0], h[:, 1]]
    if k is not None:
        out += [k[:, 0], k[:, 1]]
    if x is not None:
        out.append(x)
    return out


@dataclass
class Diff:
    """The outcome for every target row and every placement.

    Attributes:
        stay: int64 per target row: the placement it stays on, or -1.
        reuse: int64 per target row: the placement whose vector it copies (same text key), or -1.
        owner: int64 per target row that is embedded: the target row that embeds its key (itself for the owner);
            -1 for rows that stay or reuse.
        dead: bool per placement: no target row stays on it.
    """

    stay: np.ndarray
    reuse: np.ndarray
    owner: np.ndarray
    dead: np.ndarray


def match_stay(target: Target, placed: Placed) -> tuple[np.ndarray, np.ndarray]:
    """``(stay, dead)``: per target row the placement it stays on (same id, text key and kept values) or -1; per
    placement whether no target row stays on it. Decided by id: a bucket of ids holds all it needs."""
    n, m = len(target), len(placed)
    stay = np.full(n, -1, np.int64)
    dead = np.ones(m, bool)
    if m and n:
        # by id hash; among equal placements the live one first (live=True -> 0), then by position
        porder = np.lexsort((np.arange(m), ~placed.live, placed.h[:, 0]))
        stay = find(_cols(placed.h, placed.k, placed.x), porder, _cols(target.h, target.k, target.x))
        del porder
        dead[stay[stay >= 0]] = False
    return stay, dead


def assign_vectors(k: np.ndarray, rank: np.ndarray, pk: np.ndarray, plive: np.ndarray, pdead: np.ndarray,
                   prank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where each row that needs a vector gets it. Decided by text key: a bucket of keys holds all it needs.

    Args:
        k: (n, 2) text keys of the rows that need a vector; ``rank``: their input order (smaller first, distinct).
        pk, plive, pdead: the placements' text keys, whether live, whether dead (``match_stay``); ``prank``:
            their order among all placements (the last tie-break; default: as given).

    Returns:
        ``(reuse, owner)``: per row the placement whose vector it copies (a staying one preferred, then a live
        one) or -1; for the rows left to embed, the row that embeds their key (the first in input order), else -1.
    """
    n, m = len(k), len(pk)
    reuse = np.full(n, -1, np.int64)
    if m and n:
        korder = np.lexsort((np.arange(m) if prank is None else prank, ~plive, pdead, pk[:, 0]))
        reuse = find(_cols(pk), korder, _cols(k))
    owner = np.full(n, -1, np.int64)
    embed = np.flatnonzero(reuse < 0)
    if len(embed):
        k1, k2 = k[embed, 0], k[embed, 1]
        order = np.lexsort((rank[embed], k2, k1))  # by key, then input order
        first = np.ones(len(embed), bool)
        first[1:] = (k1[order][1:] != k1[order][:-1]) | (k2[order][1:] != k2[order][:-1])
        leader = np.maximum.accumulate(np.where(first, np.arange(len(embed)), 0))
        owner[embed[order]] = embed[order][leader]
    return reuse, owner


def diff(target: Target, placed: Placed) -> Diff:
    """Match the target against the placements (see the module docstring): ``match_stay`` then
    ``assign_vectors`` over the whole of both (the planner runs them bucket by bucket)."""
    n = len(target)
    stay, dead = match_stay(target, placed)
    need = np.flatnonzero(stay < 0)
    reuse_n, owner_n = assign_vectors(target.k[need], need, placed.k, placed.live, dead)
    reuse = np.full(n, -1, np.int64)
    reuse[need] = reuse_n
    owner = np.full(n, -1, np.int64)
    owned = owner_n >= 0
    owner[need[owned]] = need[owner_n[owned]]
    return Diff(stay, reuse, owner, dead)


def member(h: np.ndarray, of: np.ndarray) -> np.ndarray:
    """bool per row of ``h`` ((n, 2) hashes): whether ``of`` ((m, 2)) holds it."""
    return find(_cols(of), np.argsort(of[:, 0]), _cols(h)) >= 0
