"""Token-budget batching: no row lost or repeated, no batch over its budget, sorted within windows."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model import batching
from pipeline.model.batching import batch_cost, token_budget_batches

lengths_st = st.lists(st.integers(min_value=1, max_value=600), min_size=0, max_size=250).map(
    lambda xs: np.array(xs, dtype=np.int64)
)
budget_st = st.integers(min_value=1, max_value=5000)
window_st = st.one_of(st.none(), st.integers(min_value=1, max_value=80))
cost_st = st.sampled_from(["padded", "packed"])
max_batch_st = st.one_of(st.none(), st.integers(min_value=1, max_value=40))


def _window_of(i: int, window: int | None) -> int:
    return 0 if window is None else i // window


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lengths=lengths_st, budget=budget_st, window=window_st, cost=cost_st, max_batch=max_batch_st)
def test_batches_keep_every_row_once_and_respect_the_budget(lengths, budget, window, cost, max_batch):
    batches = token_budget_batches(lengths, budget, window=window, cost=cost, max_batch=max_batch)

    # every index exactly once
    flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(b.dtype == np.int64 and len(b) > 0 for b in batches)

    for b in batches:
        # no batch over its budget, unless it is one sequence that is longer than the budget by itself
        c = batch_cost(lengths[b], cost)
        assert c <= budget or (len(b) == 1 and lengths[b[0]] > budget), (b.tolist(), lengths[b].tolist(), c)
        if max_batch is not None:
            assert len(b) <= max_batch
        # a batch never mixes sequences of two windows
        assert len({_window_of(int(i), window) for i in b}) == 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lengths=lengths_st, budget=budget_st, window=window_st, cost=cost_st, max_batch=max_batch_st)
def test_batches_are_length_sorted_within_windows_and_greedy(lengths, budget, window, cost, max_batch):
    batches = token_budget_batches(lengths, budget, window=window, cost=cost, max_batch=max_batch)
    if not batches:
        assert len(lengths) == 0
        return
    flat = np.concatenate(batches)
    windows = np.array([_window_of(int(i), window) for i in flat])
    # windows come in order, and within one window lengths never increase (longest first)
    assert (np.diff(windows) >= 0).all()
    for w in np.unique(windows):
        seq = lengths[flat[windows == w]]
        assert (np.diff(seq) <= 0).all(), seq.tolist()
    # greedy: a batch was closed only because the next sequence of its window would not fit
    for b, nxt in zip(batches, batches[1:], strict=False):
        if _window_of(int(b[0]), window) != _window_of(int(nxt[0]), window):
            continue
        grown = np.append(b, nxt[0])
        too_many = max_batch is not None and len(grown) > max_batch
        assert too_many or batch_cost(lengths[grown], cost) > budget


def test_windows_bound_the_sort():
    # Sorting is only within windows of 3: the long sequences of the second window stay after the first.
    lengths = np.array([1, 2, 3, 10, 20, 30])
    batches = token_budget_batches(lengths, 1000, window=3)
    assert [b.tolist() for b in batches] == [[2, 1, 0], [5, 4, 3]]


def test_padded_and_packed_costs_differ():
    lengths = np.array([10, 1, 1, 1])
    # padded: 4 sequences padded to 10 cost 40 tokens; packed: 13
    assert batch_cost(lengths, "padded") == 40
    assert batch_cost(lengths, "packed") == 13
    assert [len(b) for b in token_budget_batches(lengths, 20, cost="padded")] == [2, 2]
    assert [len(b) for b in token_budget_batches(lengths, 20, cost="packed")] == [4]


def test_a_sequence_longer_than_the_budget_is_alone():
    lengths = np.array([5, 500, 5, 5])
    batches = token_budget_batches(lengths, 100)
    assert [b.tolist() for b in batches] == [[1], [0, 2, 3]]


def test_max_batch_caps_the_count():
    batches = token_budget_batches(np.ones(10, dtype=np.int64), 1000, max_batch=4)
    assert [len(b) for b in batches] == [4, 4, 2]


def test_edge_cases():
    assert token_budget_batches(np.zeros(0, np.int64), 10) == []
    with pytest.raises(ValueError, match="budget"):
        token_budget_batches(np.array([1, 2]), 0)


def test_docstring_example():
    result = doctest.testmod(batching, verbose=False)
    assert result.attempted >= 1 and result.failed == 0
