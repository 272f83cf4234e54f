"""Which modality each optimizer step uses (docs/method.md §1.6 pre-training, §2.7 fine-tuning).

Both phases use the official ConcatIterator "use_one" strategy (concat_dataset.py): source i
contributes int(L_i · rate_i) steps, where L_i is the number of batches its loader gives one
rank in an epoch, and the epoch's order is a `torch.randperm` of the list of source ids drawn
from a generator seeded with the epoch number alone, so every rank draws the same order and
all ranks run the same modality at the same step (the collectives of the two modalities'
graphs never interleave).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from s4d_dist import seeds


def step_counts(loader_batches: Sequence[int], rates: Sequence[float]) -> list[int]:
    """int(L_i · rate_i) for each source: a rate r consumes the first r of that loader's
    batches this epoch (r > 1 starts it again)."""
    if len(loader_batches) != len(rates):
        raise ValueError(f"{len(loader_batches)} loaders but {len(rates)} rates")
    return [int(length * rate) for length, rate in zip(loader_batches, rates)]


def source_order(counts: Sequence[int], epoch: int) -> torch.Tensor:
    """(sum(counts),) int64 source ids: randperm of [0]*c0 + [1]*c1 + ..., seeded by `epoch`."""
    generator = seeds.source_order(epoch)
    ids = torch.cat([torch.ones(count, dtype=torch.int64) * i for i, count in enumerate(counts)])
    return ids[torch.randperm(len(ids), generator=generator)]
