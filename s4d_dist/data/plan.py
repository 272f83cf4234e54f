"""Which samples fill each batch, and how each is augmented: (epoch, position) → a batch plan.

Everything here is a pure function of (sample count or labels, seed, epoch, rank, world size,
batch position), computed the same way on every rank, in every DataLoader worker and by either
backend, so that
- ranks read disjoint slices of one shared order (DistributedSampler semantics), and workers
  read whole batches of their rank's plan, never the same batch twice;
- every rank gets the same number of batches, whatever the sample count: the order is padded by
  wrapping to a multiple of the world size (as DistributedSampler does) and a trailing partial
  batch is dropped (training) or padded with rows marked invalid (evaluation);
- resuming an epoch at batch k needs no replay: batch k is a function of its position;
- DALI and the torch fallback crop, flip and augment the same samples the same way: the random
  parameters of every sample (recipes.py) are drawn here, from one generator per (slot,
  attempt) derived from the batch's position.

A batch is named by a request tuple — training: (epoch, cycle, batch), where cycle counts passes
over the data within an epoch (rate > 1); evaluation: (batch,). The plan says which samples
may fill each slot (`TrainPlan.candidates`, `EvalPlan.rows`) and their parameters; it reads
nothing but the catalog's index. Reading, decoding and substituting corrupt samples is the
slot filler's (filler.py). A slot's parameters depend only on its position and its attempt
(the position in its candidate list), so they are the same whether a corrupt neighbour was
found now, in an earlier epoch or by another backend.

Modality mixing (docs/method.md §1.6 pre-training, §2.7 fine-tuning): the official
ConcatIterator "use_one" strategy (concat_dataset.py) — source i contributes int(L_i · rate_i)
steps, L_i being the batches its loader gives one rank in an epoch, in the order of a
`torch.randperm` seeded with the epoch alone, so all ranks run the same modality at the same step
(the collectives of the two modalities' graphs never interleave).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from s4d_dist import seeds

from .catalog import Catalog
from .decode import CorruptEvent
from .recipes import Recipe, SampleParams

Request = tuple[int, ...]


# ---- orders ------------------------------------------------------------------------------

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


def eval_rows(num_samples: int, views: int, rank: int, world: int, batch: int,
              order: str = "sample") -> np.ndarray:
    """(batches, batch, 2) rows of (sample, view) for one rank; padding rows are (-1, -1).

    Every view of every sample appears exactly once over all ranks; each rank is padded to the
    same number of full batches, so no rank waits for another at the end. `order`:
    - "sample": in sample order, one contiguous block per rank (each rank reads neighbouring
      samples, a sample's views side by side);
    - "view": the official test order (docs/method.md §2.11) — the list of every sample for
      view 0, then for view 1, ..., read by DistributedSampler(shuffle=False), i.e. every
      `world`-th row from `rank` — so a forward holds one view of `batch` different samples
      (two views where it crosses from one to the next). Its wrap-around duplicates are the
      padding rows here.
    """
    total = num_samples * views
    per_rank = -(-total // world)
    count = -(-per_rank // batch) if per_rank else 0
    rows = np.full((count * batch, 2), -1, np.int64)
    if order == "view":
        flat = np.arange(rank, total, world)
        rows[: len(flat), 0], rows[: len(flat), 1] = flat % num_samples, flat // num_samples
    else:
        first, last = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
        flat = np.arange(first, last)
        rows[: len(flat), 0], rows[: len(flat), 1] = flat // views, flat % views
    return rows.reshape(count, batch, 2)


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


# ---- batches -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """One row of a batch: which sample fills it (`index`: in training the sample, in evaluation
    the clip scored; `sample`: the stored sample read), how to transform it, and its payload
    (what the runner's load returned: encoded bytes for DALI, decoded frames for torch)."""

    index: int
    key: str
    label: int
    view: int
    valid: bool
    params: SampleParams
    payload: Any
    sample: int = -1


@dataclass(frozen=True)
class BatchPlan:
    slots: list[Slot]
    corrupt: list[CorruptEvent]

    def fields(self) -> dict[str, Any]:
        """The non-pixel part of the batch: which sample and view fills each row."""
        slots = self.slots
        return {
            "index": torch.tensor([s.index for s in slots], dtype=torch.int64),
            "label": torch.tensor([s.label for s in slots], dtype=torch.int64),
            "view": torch.tensor([s.view for s in slots], dtype=torch.int64),
            "valid": torch.tensor([s.valid for s in slots], dtype=torch.bool),
            "key": [s.key for s in slots],
            "corrupt": list(self.corrupt),
        }


def meta_of(row: np.ndarray) -> dict[str, int]:
    """What the recipes read of a sample's metadata, from its (frames, height, width) row."""
    return {"frames": int(row[0]), "height": int(row[1]), "width": int(row[2])}


# ---- clips: what the plans draw and score (issue: a clip is one clip, whatever its chunks) -----

def unit_table(catalog: Catalog, clips: np.ndarray) -> np.ndarray:
    """(frames, height, width) of clips: a chunked clip's frames are all its chunks'."""
    c = catalog.clips
    if not c.chunked:
        return catalog.table(clips)
    rows = catalog.table(c.members[c.first[clips]]).copy()
    rows[:, 0] = c.frames[clips]
    return rows


def unit_labels(catalog: Catalog) -> np.ndarray:
    """Each clip's label (its first chunk's)."""
    c = catalog.clips
    return catalog.labels if not c.chunked else catalog.labels[c.members[c.first[:-1]]]


def locate(catalog: Catalog, clip: int, params: SampleParams) -> tuple[int, SampleParams]:
    """The sample that holds a window of `clip`, and the parameters in that sample's frames. A
    window that crosses a chunk boundary is moved into the chunk that holds its middle frame
    (by less than a window; chunks are 64-128 frames by default, so few windows move; a window
    longer than a chunk repeats the chunk's last frame); with no chunks, the clip is the sample."""
    c = catalog.clips
    if not c.chunked or params.frames is None:
        return (int(c.members[c.first[clip]]) if c.chunked else clip), params
    chunks = c.samples(clip)
    starts = c.start[chunks]
    which = int(np.searchsorted(starts, params.frames[len(params.frames) // 2], side="right")) - 1
    sample = int(chunks[which])
    length = int(catalog.table(np.array([sample]))[0, 0])
    frames = params.frames - starts[which]
    frames = frames - min(int(frames[0]), 0)
    frames = np.clip(frames - max(int(frames[-1]) - (length - 1), 0), 0, length - 1)
    return sample, replace(params, frames=frames)


@dataclass
class TrainPlan:
    """Training batches: a shuffled (or class-balanced) order over all samples, split across
    ranks, `batch_size` samples per batch, the partial tail dropped."""

    catalog: Catalog
    recipe: Recipe
    batch_size: int
    seed: int
    rank: int
    world: int
    balanced: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.catalog.labelled and self.recipe.kind == "finetune":
            # read and range-checked now (fail before step 0); workers get them pickled
            self.catalog.labels  # noqa: B018
        if self.batches_per_pass == 0:
            raise ValueError(f"{self.catalog.tars[0]} ...: {len(self.catalog)} samples give no full batch of "
                             f"{self.batch_size} on each of {self.world} ranks; lower the batch size")

    @property
    def batches_per_pass(self) -> int:
        return train_batches_per_rank(len(self.catalog.clips.keys), self.world, self.batch_size)

    def rows(self, epoch: int, cycle: int) -> np.ndarray:
        """(batches, batch_size) clip indices of this rank's pass `cycle` of `epoch` (the samples
        themselves when no clip is stored in chunks): each clip drawn as often as any other."""
        key = (epoch, cycle)
        if key not in self._cache:
            if self.balanced:
                order = balanced_order(unit_labels(self.catalog), self.seed, epoch, cycle)
            else:
                order = shuffled_order(len(self.catalog.clips.keys), self.seed, epoch, cycle)
            self._cache = {key: train_batches(order, self.rank, self.world, self.batch_size)}
        return self._cache[key]

    def requests(self, epoch: int, start: int, count: int) -> list[Request]:
        """Batches start .. start+count-1 of the epoch; past one pass the loader starts again."""
        per_pass = self.batches_per_pass
        return [(epoch, k // per_pass, k % per_pass) for k in range(start, start + count)]

    def candidates(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """The batch's clips and the rank's later ones. Slot j may be filled, in order, by
        mine[j], the batch's next clips (cyclically), then the later ones — the last resort
        when no clip of this batch loads; the position in that list is its attempt number."""
        epoch, cycle, position = request
        rows = self.rows(epoch, cycle)
        return rows[position], rows[position + 1:].ravel()

    def first_params(self, request: Request) -> tuple[np.ndarray, list[SampleParams]]:
        """Every slot's sample and parameters for its first candidate clip (a window drawn over
        the whole clip, then located in its chunk); pre-training draws them as arrays over the
        batch (recipes.batch_params), fine-tuning one slot at a time."""
        epoch, cycle, position = request
        clips = self.rows(epoch, cycle)[position]
        table = unit_table(self.catalog, clips)
        if self.recipe.kind == "pretrain":
            drawn = self.recipe.batch_params(table, seeds.batch_rng((self.seed, epoch, cycle, self.rank, position)),
                                             lambda i: self.catalog.clips.keys[int(clips[i])])
        else:
            slot_seeds = self._slot_seeds(request)
            drawn = [self.recipe.sample_params(meta_of(row), seeds.sample_rng(slot_seeds[j], 0))
                     for j, row in enumerate(table)]
        if not self.catalog.clips.chunked:
            return clips, drawn
        located = [locate(self.catalog, int(c), p) for c, p in zip(clips, drawn)]
        return np.array([s for s, _ in located], np.int64), [p for _, p in located]

    def params(self, request: Request, slot: int, attempt: int, clip: int) -> tuple[int, SampleParams]:
        """The sample and parameters of `slot` for its `attempt`-th candidate `clip` (attempt ≥
        1: a substitute for a corrupt clip draws from a stream of its own)."""
        rng = seeds.sample_rng(self._slot_seeds(request)[slot], attempt)
        table = unit_table(self.catalog, np.array([clip]))
        if self.recipe.kind == "pretrain":
            return locate(self.catalog, clip,
                          self.recipe.batch_params(table, rng, lambda _: self.catalog.clips.keys[clip])[0])
        return locate(self.catalog, clip, self.recipe.sample_params(meta_of(table[0]), rng))

    def _slot_seeds(self, request: Request) -> np.ndarray:
        epoch, cycle, position = request
        return seeds.slot_seeds((self.seed, epoch, cycle, self.rank, position), self.batch_size)


@dataclass
class EvalPlan:
    """Evaluation batches: every view of every sample once over all ranks, padded rows
    marked invalid, the same number of batches on every rank; `order` as in `eval_rows`."""

    catalog: Catalog
    recipe: Recipe
    batch_size: int
    rank: int
    world: int
    order: str = "sample"

    def __post_init__(self) -> None:
        self.rows = eval_rows(self.num_clips, self.recipe.views, self.rank, self.world, self.batch_size,
                              self.order)

    @property
    def num_clips(self) -> int:
        """What is scored: clips (a clip stored in chunks is one), one score each."""
        return len(self.catalog.clips.keys)

    @property
    def num_batches(self) -> int:
        return len(self.rows)

    def requests(self, start: int = 0) -> list[Request]:
        return [(b,) for b in range(start, self.num_batches)]

    def params(self, clip: int, view: int) -> tuple[int, SampleParams]:
        """View `view` of `clip` — its temporal views spread over the whole clip, as the
        official test — and the sample that holds it."""
        drawn = self.recipe.view_params(meta_of(unit_table(self.catalog, np.array([clip]))[0]), view)
        return locate(self.catalog, clip, drawn)


Plan = TrainPlan | EvalPlan
