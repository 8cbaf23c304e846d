"""The diff's NumPy matching against a plain-Python reference on random corpora (ids, texts and kept values drawn
from small alphabets, so that duplicates, edits, moves and hash-prefix collisions all occur)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.job.diff import Placed, build_target, diff, find, member


def arrays(rows: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(id, text, kept) small ints -> hash-like arrays; ids share their first word in pairs (collision paths)."""
    h = np.array([[i // 2, i] for i, _, _ in rows], np.uint64).reshape(-1, 2)
    k = np.array([[t // 2, t] for _, t, _ in rows], np.uint64).reshape(-1, 2)
    x = np.array([v for _, _, v in rows], np.uint64)
    return h, k, x


row = st.tuples(st.integers(0, 12), st.integers(0, 6), st.integers(0, 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(row, max_size=30), st.lists(st.tuples(row, st.booleans()), max_size=30))
def test_diff_matches_a_python_reference(current, placed_rows):
    h, k, x = arrays(current)
    n = len(current)
    target, dup, first = build_target(np.zeros(n, np.int32), np.arange(n, dtype=np.int64), h, k, x,
                                      np.ones(n, np.int64))
    # reference target: first occurrence of each id, in input order
    seen, want = set(), []
    for i, (idv, _, _) in enumerate(current):
        if idv not in seen:
            seen.add(idv)
            want.append(i)
    assert target.frow.tolist() == want
    assert sorted(dup.tolist()) == sorted(set(range(n)) - set(want))
    for d, f in zip(dup.tolist(), first.tolist(), strict=True):
        assert current[f][0] == current[d][0] and f < d and f in want

    prow_ = [r for r, _ in placed_rows]
    ph, pk, px = arrays(prow_)
    m = len(prow_)
    live = np.array([lv for _, lv in placed_rows], bool)
    placed = Placed(ph, pk, px, np.arange(m, dtype=np.int64) // 3, np.arange(m, dtype=np.int64) % 3,
                    np.ones(m, np.int64), live)
    d = diff(target, placed)
    trows = [current[i] for i in want]
    used = set()
    for i, r in enumerate(trows):
        same = [j for j, p in enumerate(prow_) if p == r]
        if same:
            assert d.stay[i] in same and d.reuse[i] == -1 and d.owner[i] == -1
            assert not any(live[j] and not live[d.stay[i]] for j in same)  # a live placement is preferred
            used.add(int(d.stay[i]))
            continue
        assert d.stay[i] == -1
        texts = [j for j, p in enumerate(prow_) if p[1] == r[1]]
        if texts:
            assert d.reuse[i] in texts and d.owner[i] == -1
            continue
        owner = next(j for j, q in enumerate(trows) if q[1] == r[1] and d.stay[j] < 0 and d.reuse[j] < 0)
        assert d.reuse[i] == -1 and d.owner[i] == owner
    assert set(np.flatnonzero(~d.dead).tolist()) == used


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=40),
       st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=20))
def test_find_and_member(table, queries):
    t = np.array(table, np.uint64).reshape(-1, 2)
    q = np.array(queries, np.uint64).reshape(-1, 2)
    order = np.argsort(t[:, 0], kind="stable")  # ties on the first column in table order
    pos = find([t[:, 0], t[:, 1]], order, [q[:, 0], q[:, 1]])
    for i, qq in enumerate(queries):
        if qq in table:
            assert pos[i] == table.index(qq)  # the first equal row in `order`
        else:
            assert pos[i] == -1
    assert member(q, t).tolist() == [qq in table for qq in queries]
