"""From a plan row to the samples of one batch: reading, checking, substituting, drawing.

Shared by both backends; each passes its own `load(raw, params)`: the torch fallback decodes
there (the decode is the check), DALI only checks structure and keeps the bytes. A sample that
fails to load is recorded as a CorruptEvent and its slot is filled deterministically:
- training: by the next loadable sample of the same batch (cyclically), then of the rank's
  later batches — the batch keeps its size, so every rank still steps in lockstep;
- evaluation: by a copy of a loadable row, marked invalid like sampler padding, so it is
  dropped from the metrics and the number dropped is known.
Random draws come from one generator per (slot, attempt), derived from the batch's seed key,
so a slot's parameters do not depend on whether a corrupt neighbour was found by the check or
earlier, nor on which worker or backend builds the batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

import numpy as np

from s4d_dist import seeds

from .catalog import Catalog, RawSample
from .corrupt import CorruptEvent
from .decode import CorruptSample
from .recipes import Recipe, SampleParams

Load = Callable[[RawSample, SampleParams], Any]


@dataclass(frozen=True)
class Slot:
    """One row of a batch: which sample fills it, how to transform it, and its payload
    (backend-specific: encoded bytes for DALI, decoded frames for torch)."""

    index: int
    key: str
    label: int
    view: int
    valid: bool
    params: SampleParams
    payload: Any


@dataclass(frozen=True)
class BatchSpec:
    slots: list[Slot]
    corrupt: list[CorruptEvent]


def _read(catalog: Catalog, index: int) -> RawSample:
    try:
        return catalog.read(index)
    except ValueError as err:  # the json member does not parse
        raise CorruptSample(f"unreadable metadata: {err}") from None


def train_batch(catalog: Catalog, recipe: Recipe, rows: np.ndarray, later: np.ndarray,
                seed_key: Sequence[int], load: Load, known_bad: set[int]) -> BatchSpec:
    """The slots of a training batch of sample indices `rows`; `later` are the rank's next
    planned samples, the last resort when no sample of the batch loads (read lazily)."""
    slot_seeds = seeds.slot_seeds(seed_key, len(rows))
    rows = [int(i) for i in rows]
    slots, events = [], []
    for j, first in enumerate(rows):
        for attempt, index in enumerate(chain([first], rows[j + 1:], rows[:j], map(int, later))):
            if index in known_bad:
                continue
            try:
                raw = _read(catalog, index)
                params = recipe.sample_params(raw.meta, seeds.sample_rng(slot_seeds[j], attempt))
                payload = load(raw, params)
            except CorruptSample as err:
                known_bad.add(index)
                events.append(CorruptEvent(index, catalog.where(index), str(err)))
                continue
            slots.append(Slot(index, raw.key, raw.label, 0, True, params, payload))
            break
        else:
            raise RuntimeError(f"no loadable sample left for batch {list(seed_key)}: every candidate of "
                               f"{catalog.where(first)} ... is corrupt (see the corruption log)")
    return BatchSpec(slots, events)


def eval_batch(catalog: Catalog, recipe: Recipe, rows: np.ndarray, load: Load, known_bad: set[int],
               filler: Callable[[], Slot]) -> BatchSpec:
    """The slots of an evaluation batch of (sample, view) rows; (-1, -1) rows are padding.
    Invalid rows copy a valid row of the batch, or `filler()` when there is none."""
    slots: list[Slot | None] = []
    events = []
    loaded: dict[tuple, Any] = {}  # the spatial crops of a temporal view share its decoded frames
    for index, view in rows.tolist():
        slot = None
        if index >= 0 and index not in known_bad:
            try:
                raw = _read(catalog, index)
                params = recipe.view_params(raw.meta, view)
                frames = None if params.frames is None else params.frames.tobytes()
                if (index, frames) not in loaded:
                    loaded[index, frames] = load(raw, params)
                slot = Slot(index, raw.key, raw.label, view, True, params, loaded[index, frames])
            except CorruptSample as err:
                known_bad.add(index)
                events.append(CorruptEvent(index, catalog.where(index), str(err)))
        slots.append(slot)
    valid = next((s for s in slots if s is not None), None) or filler()
    invalid = replace(valid, index=-1, key="", label=-1, view=-1, valid=False)
    return BatchSpec([s if s is not None else invalid for s in slots], events)


def first_loadable(catalog: Catalog, recipe: Recipe, load: Load, known_bad: set[int]) -> Slot:
    """The first loadable sample (view 0), to fill a batch that has no valid row at all."""
    for index in range(len(catalog)):
        if index in known_bad:
            continue
        try:
            raw = _read(catalog, index)
            params = recipe.view_params(raw.meta, 0)
            return Slot(index, raw.key, raw.label, 0, False, params, load(raw, params))
        except CorruptSample:
            known_bad.add(index)
    raise RuntimeError(f"no loadable sample in {catalog.tars[0]} ...")
