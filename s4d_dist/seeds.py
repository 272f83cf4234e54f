"""Every random stream of a run, by name, and how each is derived from the run's seed.

A stream is a pure function of its key (the run's seed and where in the run it is drawn: epoch,
step, batch, rank), never of what was drawn before, so every rank, DataLoader worker and
backend draws the same values for the same key and a resumed run draws what the interrupted one
would have. Streams keyed by the same identity are kept apart by a namespace, the first element
of their key.

    epoch_order        which samples, in which order (DistributedSampler's seed + epoch)
    source_order       which source each step of a mixed epoch reads (seeded by the epoch)
    slot_seeds         one seed per batch slot: the sample's augmentation parameters
    sample_rng         a slot's parameter draws, for each attempt at a loadable sample
    batch_rng          a pre-training batch's parameter draws, as arrays over its slots (first
                       attempts; a substitute draws from sample_rng)  (namespace 13)
    erase_noise        the torch backend's random-erasing noise of a batch   (namespace 7)
    mae_masks          a pre-training batch's token masks                    (namespace 11)
    step_rng           per-step randomness of the loss (mixup / cutmix)
    seed_process       torch's and numpy's global generators (model initialisation)
    dali_seed          the DALI pipeline's own seed
    dataloader         the torch backend DataLoader's base seed (draws nothing that matters)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ERASE_NOISE = 7
MAE_MASKS = 11
BATCH_PARAMS = 13


def seed_state(key: Sequence[int], count: int) -> np.ndarray:
    """`count` independent uint64 seeds from the SeedSequence of `key`."""
    return np.random.SeedSequence([int(k) for k in key]).generate_state(count, np.uint64)


def torch_generator(key: Sequence[int]) -> torch.Generator:
    """A CPU torch generator seeded from the SeedSequence of `key`."""
    generator = torch.Generator()
    generator.manual_seed(int(seed_state(key, 1)[0]) & (2**63 - 1))
    return generator


def epoch_order(seed: int, epoch: int, cycle: int) -> torch.Generator:
    """DistributedSampler's generator (seed + epoch) for a loader's first pass over an epoch; a
    further pass in the same epoch (rate > 1) gets an independent stream."""
    if cycle == 0:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        return generator
    return torch_generator((seed, epoch, cycle))


def source_order(epoch: int) -> torch.Generator:
    """The generator of an epoch's source interleaving, the same on every rank."""
    generator = torch.Generator()
    generator.manual_seed(epoch)
    return generator


def slot_seeds(batch_key: Sequence[int], count: int) -> np.ndarray:
    """One independent seed per slot of a batch, from the batch's identity."""
    return seed_state(batch_key, count)


def sample_rng(slot_seed: int, attempt: int) -> np.random.Generator:
    """The parameter draws of a slot for its `attempt`-th candidate sample."""
    return np.random.default_rng([int(slot_seed), attempt])


def batch_rng(batch_key: Sequence[int]) -> np.random.Generator:
    """The parameter draws of a whole batch's first candidates, from the batch's identity."""
    return np.random.default_rng(np.random.SeedSequence([BATCH_PARAMS, *(int(k) for k in batch_key)]))


def erase_noise(request: Sequence[int], rank: int) -> torch.Generator:
    """The torch backend's erasing noise for the batch `request` of `rank`."""
    return torch_generator((ERASE_NOISE, *request, rank))


def mae_masks(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The token masks of a pre-training batch."""
    return torch_generator((MAE_MASKS, seed, epoch, step, rank))


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """Per-step randomness (mixup) that a resumed run draws identically."""
    return np.random.default_rng([seed, step, rank])


def seed_process(seed: int, rank: int) -> None:
    """torch's and numpy's global generators, per rank."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)


def dali_seed(seed: int, rank: int) -> int:
    """The seed of a rank's DALI pipeline."""
    return seed * 1000 + rank


def dataloader() -> torch.Generator:
    """The torch backend DataLoader's own generator. Without one, every epoch's iterator draws
    its base seed from the global torch RNG, which the MoAE router noise also draws from, so a
    run resumed mid-epoch would not repeat the uninterrupted run. The workers' seeds it gives
    matter nothing: every random draw of a batch comes from the streams above."""
    return torch.Generator().manual_seed(0)
