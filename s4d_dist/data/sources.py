"""A rank's batches of one loader, addressed by a request tuple that any process can build.

A request names a batch without saying what is in it — training: (epoch, cycle, batch), where
cycle counts passes over the data within an epoch (rate > 1); evaluation: (batch,). The
source turns it into the batch's rows from the epoch plan (plans.py) and then into a BatchSpec
(specs.py). Both backends work from requests: the torch fallback ships them to DataLoader
workers, DALI's feeder builds specs from them, and a resumed epoch simply starts from a later
request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import plans
from .catalog import Catalog
from .recipes import Recipe
from .specs import BatchSpec, Load, Slot, eval_batch, first_loadable, train_batch

Request = tuple[int, ...]


@dataclass
class TrainSource:
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
        return plans.train_batches_per_rank(len(self.catalog), self.world, self.batch_size)

    def rows(self, epoch: int, cycle: int) -> np.ndarray:
        """(batches, batch_size) sample indices of this rank's pass `cycle` of `epoch`."""
        key = (epoch, cycle)
        if key not in self._cache:
            if self.balanced:
                order = plans.balanced_order(self.catalog.labels, self.seed, epoch, cycle)
            else:
                order = plans.shuffled_order(len(self.catalog), self.seed, epoch, cycle)
            self._cache = {key: plans.train_batches(order, self.rank, self.world, self.batch_size)}
        return self._cache[key]

    def requests(self, epoch: int, start: int, count: int) -> list[Request]:
        """Batches start .. start+count-1 of the epoch; past one pass the loader starts again."""
        per_pass = self.batches_per_pass
        return [(epoch, k // per_pass, k % per_pass) for k in range(start, start + count)]

    def build(self, request: Request, load: Load, known_bad: set[int]) -> BatchSpec:
        epoch, cycle, batch = request
        rows = self.rows(epoch, cycle)
        return train_batch(self.catalog, self.recipe, rows[batch], rows[batch + 1:].ravel(),
                           (self.seed, epoch, cycle, self.rank, batch), load, known_bad)


@dataclass
class EvalSource:
    """Evaluation batches: every view of every sample once over all ranks, padded rows
    marked invalid, the same number of batches on every rank."""

    catalog: Catalog
    recipe: Recipe
    batch_size: int
    rank: int
    world: int
    _filler: Slot | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.rows = plans.eval_rows(len(self.catalog), self.recipe.views, self.rank, self.world, self.batch_size)

    @property
    def num_batches(self) -> int:
        return len(self.rows)

    def requests(self, start: int = 0) -> list[Request]:
        return [(b,) for b in range(start, self.num_batches)]

    def build(self, request: Request, load: Load, known_bad: set[int]) -> BatchSpec:
        def filler() -> Slot:
            if self._filler is None:
                self._filler = first_loadable(self.catalog, self.recipe, load, known_bad)
            return self._filler

        return eval_batch(self.catalog, self.recipe, self.rows[request[0]], load, known_bad, filler)


Source = TrainSource | EvalSource


def spec_fields(spec: BatchSpec) -> dict[str, Any]:
    """The non-pixel part of a batch: which sample and view fills each row."""
    slots = spec.slots
    return {
        "index": torch.tensor([s.index for s in slots], dtype=torch.int64),
        "label": torch.tensor([s.label for s in slots], dtype=torch.int64),
        "view": torch.tensor([s.view for s in slots], dtype=torch.int64),
        "valid": torch.tensor([s.valid for s in slots], dtype=torch.bool),
        "key": [s.key for s in slots],
        "corrupt": list(spec.corrupt),
    }
