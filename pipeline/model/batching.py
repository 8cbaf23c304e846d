"""Batching: length-sorted token-budget batches. Pure NumPy, no torch, so it is cheap to test exhaustively.

Sequences are sorted by length within windows of ``window`` sequences (bounded memory, and rows that arrive
together stay together), longest first so that a batch that cannot fit fails early. A batch is closed when
one more sequence would break the budget:

- ``padded``: ``count * longest <= budget`` (what a padded forward pass allocates);
- ``packed``: ``sum(lengths) <= budget`` (what a padding-free forward pass allocates).

A single sequence longer than the budget forms a batch of its own.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Cost = Literal["padded", "packed"]


def batch_cost(lengths: np.ndarray, cost: Cost) -> int:
    """Tokens a batch of these lengths costs under the given policy."""
    if len(lengths) == 0:
        return 0
    return int(lengths.max()) * len(lengths) if cost == "padded" else int(lengths.sum())


def token_budget_batches(
    lengths: np.ndarray,
    budget: int,
    *,
    window: int | None = None,
    cost: Cost = "padded",
    max_batch: int | None = None,
) -> list[np.ndarray]:
    """Cut sequence indices into batches under a token budget.

    Args:
        lengths: int array (n,), tokens per sequence (>= 1).
        budget: tokens per batch (see the module docstring for how they are counted).
        window: sequences sorted together (default: all).
        cost: ``"padded"`` or ``"packed"``.
        max_batch: optional cap on sequences per batch.

    Returns:
        A list of int64 index arrays into ``lengths``; together they hold every index exactly once.

    Example:
        >>> [b.tolist() for b in token_budget_batches(np.array([3, 9, 4, 8]), 16)]
        [[1], [3, 2], [0]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if budget < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    n = len(lengths)
    window = max(n, 1) if window is None or window <= 0 else window  # n may be 0: a shard of rejected rows
    batches: list[np.ndarray] = []
    for lo in range(0, n, window):
        idx = np.arange(lo, min(lo + window, n), dtype=np.int64)
        order = idx[np.argsort(-lengths[idx], kind="stable")]
        batches.extend(_cut(order, lengths, budget, cost, max_batch))
    return batches


def _cut(order: np.ndarray, lengths: np.ndarray, budget: int, cost: Cost, max_batch: int | None) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    start = 0
    total = longest = 0
    for pos, i in enumerate(order):
        n = int(lengths[i])
        count = pos - start
        new_longest = max(longest, n)
        new_cost = new_longest * (count + 1) if cost == "padded" else total + n
        full = max_batch is not None and count >= max_batch
        if count and (new_cost > budget or full):
            out.append(order[start:pos])
            start, total, longest = pos, n, n
        else:
            total, longest = total + n, new_longest
    if start < len(order):
        out.append(order[start:])
    return out
