"""Filling a plan's batches: each slot's sample read and loaded, corrupt samples substituted.

The plan (plan.py) says which samples may fill a slot and with which parameters; the runner's
`load(index, params)` reads a sample and turns it into the payload its decoder takes (bytes of
the frames a window uses, or decoded frames), raising CorruptSample for one that cannot be
read. A sample that fails is recorded as a CorruptEvent, remembered (`known_bad`, per process)
and its slot filled deterministically:
- training: by the slot's next candidate (the next loadable sample of the same batch,
  cyclically, then of the rank's later batches) — the batch keeps its size, so every rank
  still steps in lockstep;
- evaluation: by a copy of a loadable row, marked invalid like sampler padding, so it is dropped
  from the metrics and the number dropped is known.
Samples the catalog set aside when it opened (a frame index that does not fit its tar) count as
corrupt the first time a slot meets them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import chain
from typing import Any

import numpy as np

from .decode import CorruptEvent, CorruptSample
from .plan import BatchPlan, EvalPlan, Plan, Request, Slot, TrainPlan
from .recipes import SampleParams

Load = Callable[[int, SampleParams], Any]
LoadMany = Callable[[np.ndarray, list[SampleParams]], list]  # payloads, or CorruptSample instances


class SlotFiller:
    """`filler(request)` → the BatchPlan of that request, loaded with `load` — or, for a
    training batch's first candidates, all at once with `load_many` when the runner has one."""

    def __init__(self, plan: Plan, load: Load, load_many: LoadMany | None = None) -> None:
        self.plan, self.load, self.load_many = plan, load, load_many
        self.known_bad: set[int] = set()
        self._filler: Slot | None = None

    def __call__(self, request: Request) -> BatchPlan:
        if isinstance(self.plan, TrainPlan):
            return self._train(request)
        return self._eval(request)

    def _label(self, index: int) -> int:
        catalog = self.plan.catalog
        return int(catalog.labels[index]) if catalog.labelled else -1

    def _try(self, index: int, params: SampleParams, events: list[CorruptEvent]) -> Any | None:
        """The payload of `index`, or None (recorded) when it is corrupt."""
        catalog = self.plan.catalog
        try:
            if index in catalog.bad:
                raise CorruptSample(catalog.bad[index])
            return self.load(index, params)
        except CorruptSample as err:
            self.known_bad.add(index)
            events.append(CorruptEvent(index, catalog.where(index), str(err)))
            return None

    def _first_payloads(self, samples: np.ndarray, first: list[SampleParams]) -> list | None:
        if self.load_many is None:
            return None
        catalog = self.plan.catalog
        out = self.load_many(samples, first)
        for j, index in enumerate(samples.tolist()):
            if index in catalog.bad:
                out[j] = CorruptSample(catalog.bad[index])
        return out

    def _train(self, request: Request) -> BatchPlan:
        plan: TrainPlan = self.plan
        first = plan.first_params(request)
        mine, later = plan.candidates(request)
        loaded = self._first_payloads(mine, first)
        catalog = plan.catalog
        labels = catalog.labels[mine].tolist() if catalog.labelled else [-1] * len(mine)
        slots, events = [], []
        for j, index in enumerate(mine.tolist()):
            if loaded is not None and index not in self.known_bad and not isinstance(loaded[j], CorruptSample):
                slots.append(Slot(index, catalog.keys[index], labels[j], 0, True, first[j], loaded[j]))
                continue
            for attempt, index in enumerate(chain(mine[j:].tolist(), mine[:j].tolist(), map(int, later))):
                if index in self.known_bad:
                    continue
                params = first[j] if attempt == 0 else plan.params(request, j, attempt, index)
                if attempt == 0 and loaded is not None:
                    payload = loaded[j]
                    self.known_bad.add(index)
                    events.append(CorruptEvent(index, catalog.where(index), str(payload)))
                    continue
                payload = self._try(index, params, events)
                if payload is not None:
                    slots.append(Slot(index, catalog.keys[index], self._label(index), 0, True, params, payload))
                    break
            else:
                raise RuntimeError(f"no loadable sample left for batch {list(request)}: every candidate of "
                                   f"slot {j} is corrupt (see the corruption log)")
        return BatchPlan(slots, events)

    def _eval(self, request: Request) -> BatchPlan:
        """(sample, view) rows, (-1, -1) for padding. Invalid rows copy a valid row of the
        batch, or the catalog's first loadable sample when there is none; rows of one sample
        that read the same frames share one payload."""
        plan: EvalPlan = self.plan
        slots: list[Slot | None] = []
        events: list[CorruptEvent] = []
        loaded: dict[tuple, Any] = {}
        for index, view in plan.rows[request[0]].tolist():
            slot = None
            if index >= 0 and index not in self.known_bad:
                params = plan.params(index, view)
                frames = None if params.frames is None else params.frames.tobytes()
                if (index, frames) not in loaded:
                    loaded[index, frames] = self._try(index, params, events)
                if loaded[index, frames] is not None:
                    slot = Slot(index, plan.catalog.keys[index], self._label(index), view, True, params,
                                loaded[index, frames])
            slots.append(slot)
        valid = next((s for s in slots if s is not None), None) or self._first_loadable()
        invalid = replace(valid, index=-1, key="", label=-1, view=-1, valid=False)
        return BatchPlan([s if s is not None else invalid for s in slots], events)

    def _first_loadable(self) -> Slot:
        """The first loadable sample (view 0), to fill a batch that has no valid row at all."""
        if self._filler is not None:
            return self._filler
        plan: EvalPlan = self.plan
        for index in range(len(plan.catalog)):
            if index in self.known_bad:
                continue
            params = plan.params(index, 0)
            payload = self._try(index, params, [])
            if payload is not None:
                self._filler = Slot(index, plan.catalog.keys[index], self._label(index), 0, False, params, payload)
                return self._filler
        raise RuntimeError(f"no loadable sample in {plan.catalog.tars[0]} ...")
