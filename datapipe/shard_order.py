"""A shard-aware training order: each rank reads a run of shards, not all of them.

The dataset's positions 0..n-1 come partitioned into *groups*, one per shard (a
dataset builds them over its own positions, so a train split carved from the data
groups the rows it serves). For an epoch, on every rank alike:

1. the groups are permuted, seeded from (seed, epoch) as the global order is
   (:func:`epoch_rng`), and laid end to end, rows shuffled within each group;
2. that layout is cut into ``world_size`` contiguous spans of n / world_size rows
   (:func:`deal`), one per rank;
3. each rank shuffles its span again within windows of ``window`` consecutive
   groups, and pads it to ceil(n / world_size) rows by repeating its own rows.

So a rank reads about groups / world_size groups (plus at most the two it shares at
the ends of its span), in an order a prefetcher can follow (:func:`shards_needed`).
This is MosaicML Streaming's shape (shuffle shards, cut the sample space into
contiguous spans); pure numpy, no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from datapipe.errors import ConfigError

# Groups mixed together in a rank's order. 1 would make every batch come from one
# shard, which for class-sorted shards (ImageNet train: a shard per class) is one
# class per batch; a larger window mixes more, and a reader then holds that many
# shards at once. The order is a pure function of it, so changing it changes the order.
DEFAULT_WINDOW = 4


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's order: the global shuffle and this one draw from it."""
    return np.random.default_rng([seed, epoch])


def check_groups(groups: Sequence[Sequence[int]], n: int) -> tuple[np.ndarray, ...]:
    """``groups`` as int64 arrays, refused in one line unless they partition 0..n-1."""
    arrays = tuple(np.asarray(g, dtype=np.int64).reshape(-1) for g in groups)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if len(flat) != n or (n and (flat.min() < 0 or flat.max() >= n
                                 or not (np.bincount(flat, minlength=n) == 1).all())):
        raise ConfigError(f"shard groups must hold each of the dataset's {n} positions "
                          f"exactly once; they hold {len(flat)} positions")
    return arrays


def shard_groups(dataset: Any) -> list[np.ndarray]:
    """The dataset's positions grouped by shard (its ``shard_groups()``), or a one-line error.

    A dataset without shards is refused rather than served as one group: that would
    be a global shuffle under another name, with no part for a rank to read alone.
    """
    if not hasattr(dataset, "shard_groups"):
        raise ConfigError(f"shuffle='shards' needs a dataset that knows its shards; "
                          f"{type(dataset).__name__} does not: use shuffle=True")
    return dataset.shard_groups()


def groups_of(keys: np.ndarray, count: int) -> list[np.ndarray]:
    """The positions of each key 0..count-1 (``keys[p]`` is position p's shard), in order."""
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    cuts = np.searchsorted(keys[order], np.arange(1, count))
    return np.split(order, cuts)


def deal(n: int, world_size: int) -> list[tuple[int, int]]:
    """Each rank's [start, stop) of the epoch's layout: contiguous, sizes n // world or one more.

    Cutting the layout, rather than handing whole groups to ranks (greedy to the
    lightest, or round-robin), balances the ranks exactly whatever the shard sizes:
    every rank pads at most one row, as with the global order, and an epoch has the
    same number of batches as before and as every other epoch. The price is that a
    group at the end of a span is split between two neighbouring ranks. It is also
    what serves fewer groups than ranks: each rank gets a contiguous block of a group.
    """
    bounds = [r * n // world_size for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def epoch_orders(groups: Sequence[np.ndarray], *, seed: int, epoch: int, world_size: int,
                 window: int = DEFAULT_WINDOW) -> list[np.ndarray]:
    """Every rank's row positions for ``epoch``, in order, each ceil(n / world) long.

    ``groups`` as :func:`check_groups` returns them. Every rank computes all of them
    (the draws come from one generator, so ranks agree on the split of a shared group);
    that is O(n), as the global order's permutation is.
    """
    if window < 1:
        raise ConfigError(f"the shard window must be 1 or more groups, got {window!r}")
    rng = epoch_rng(seed, epoch)
    permuted = [groups[g] for g in rng.permutation(len(groups)) if len(groups[g])]
    pieces = [rng.permutation(rows) for rows in permuted]  # the within-group shuffle
    n = sum(len(p) for p in pieces)
    if n == 0:
        return [np.zeros(0, np.int64) for _ in range(world_size)]
    layout = np.concatenate(pieces)
    piece_of = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
    length = math.ceil(n / world_size)
    orders = []
    for start, stop in deal(n, world_size):
        span = layout[start:stop]
        if window > 1 and len(span):
            # Windows count the groups of this span, from its first (maybe partial) one.
            windows = (piece_of[start:stop] - piece_of[start]) // window
            cuts = np.flatnonzero(np.diff(windows)) + 1
            span = np.concatenate([rng.permutation(w) for w in np.split(span, cuts)])
        if not len(span):  # fewer rows than ranks: a row of the layout, as the global order
            span = layout[[start % n]]
        orders.append(np.resize(span, length))  # pads by repeating its own rows
    return orders


def rank_order(groups: Sequence[np.ndarray], *, seed: int, epoch: int, rank: int,
               world_size: int, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Rank ``rank``'s row positions for ``epoch``, in order (see :func:`epoch_orders`)."""
    return epoch_orders(groups, seed=seed, epoch=epoch, world_size=world_size,
                        window=window)[rank]


def shards_needed(groups: Sequence[np.ndarray], *, seed: int, epoch: int, rank: int,
                  world_size: int, window: int = DEFAULT_WINDOW) -> list[int]:
    """The group ids rank ``rank`` reads in ``epoch``, in the order it first reads them.

    What a prefetcher fetches, in that order; no row of the rank's order lies elsewhere.
    """
    order = rank_order(groups, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       window=window)
    group_of = np.zeros(sum(len(g) for g in groups), np.int64)
    for g, rows in enumerate(groups):
        group_of[rows] = g
    ids, first = np.unique(group_of[order], return_index=True)
    return ids[np.argsort(first)].tolist()
