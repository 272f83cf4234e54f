"""Which samples each rank reads, batch by batch: epoch plans as pure functions.

A plan is computed from (sample count or labels, seed, epoch, rank, world size) alone, the
same way on every rank and in every DataLoader worker, so that
- ranks read disjoint slices of one shared order (DistributedSampler semantics), and workers
  read whole batches of their rank's plan, never the same batch twice;
- every rank gets the same number of batches, whatever the sample count: the order is padded
  by wrapping to a multiple of the world size (as DistributedSampler does) and a trailing
  partial batch is dropped (training) or padded with rows marked invalid (evaluation);
- resuming an epoch at batch k needs no replay: batch k is a function of its position.
"""
from __future__ import annotations

import numpy as np
import torch

from s4d_dist import seeds


def shuffled_order(num_samples: int, seed: int, epoch: int, cycle: int = 0) -> np.ndarray:
    """A permutation of all samples, as torch's DistributedSampler(shuffle=True) draws it."""
    return torch.randperm(num_samples, generator=seeds.epoch_order(seed, epoch, cycle)).numpy()


def balanced_order(labels: np.ndarray, seed: int, epoch: int, cycle: int = 0) -> np.ndarray:
    """len(labels) draws with replacement, weight 1 / (size of the sample's class)
    (docs/method.md §2.7 ImbalancedDatasetSampler), from a generator shared by all ranks (the
    official one drew per rank from unseeded RNGs, docs/method.md §3.14): each rank then takes
    its disjoint slice."""
    counts = np.bincount(labels)
    weights = torch.from_numpy(1.0 / counts[labels])
    draws = torch.multinomial(weights, len(labels), replacement=True, generator=seeds.epoch_order(seed, epoch, cycle))
    return draws.numpy()


def rank_slice(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of an order: padded by wrapping around to a multiple of `world`, then
    every `world`-th entry from `rank` (torch DistributedSampler)."""
    total = -(-len(order) // world) * world
    padded = np.resize(order, total) if total != len(order) else order
    return padded[rank:total:world]


def train_batches_per_rank(num_samples: int, world: int, batch: int) -> int:
    """Batches one rank gets per pass: ⌊⌈N / world⌉ / batch⌋ (drop_last; docs/method.md
    §2.7)."""
    return (-(-num_samples // world)) // batch


def train_batches(order: np.ndarray, rank: int, world: int, batch: int) -> np.ndarray:
    """(batches, batch) sample indices of one rank for one pass; the partial tail is dropped."""
    mine = rank_slice(order, rank, world)
    count = len(mine) // batch
    return mine[: count * batch].reshape(count, batch)


def eval_rows(num_samples: int, views: int, rank: int, world: int, batch: int) -> np.ndarray:
    """(batches, batch, 2) rows of (sample, view) for one rank; padding rows are (-1, -1).

    Every view of every sample appears exactly once over all ranks, in sample order, in one
    contiguous block per rank (each rank reads neighbouring samples); each rank is padded to
    the same number of full batches, so no rank waits for another at the end.
    """
    total = num_samples * views
    per_rank = -(-total // world)
    count = -(-per_rank // batch) if per_rank else 0
    rows = np.full((count * batch, 2), -1, np.int64)
    first, last = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    flat = np.arange(first, last)
    rows[: len(flat), 0], rows[: len(flat), 1] = flat // views, flat % views
    return rows.reshape(count, batch, 2)
