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
        """The payload of sample `index`, or None (recorded) when it is corrupt."""
        catalog = self.plan.catalog
        try:
            if index in catalog.bad:
                raise CorruptSample(catalog.bad[index])
            return self.load(index, params)
        except CorruptSample as err:
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
        """Candidates are clips (known_bad holds clips); a slot holds the sample (chunk) its
        window is in."""
        plan: TrainPlan = self.plan
        mine, later = plan.candidates(request)
        samples, first = plan.first_params(request)
        loaded = self._first_payloads(samples, first)
        catalog = plan.catalog
        labels = catalog.labels[samples].tolist() if catalog.labelled else [-1] * len(samples)
        slots, events = [], []
        for j, (clip, sample) in enumerate(zip(mine.tolist(), samples.tolist())):
            if loaded is not None and clip not in self.known_bad and not isinstance(loaded[j], CorruptSample):
                slots.append(Slot(sample, catalog.keys[sample], labels[j], 0, True, first[j], loaded[j], sample))
                continue
            for attempt, clip in enumerate(chain(mine[j:].tolist(), mine[:j].tolist(), map(int, later))):
                if clip in self.known_bad:
                    continue
                if attempt == 0:
                    sample, params = int(samples[j]), first[j]
                else:
                    sample, params = plan.params(request, j, attempt, clip)
                if attempt == 0 and loaded is not None:
                    payload = loaded[j]
                    events.append(CorruptEvent(sample, catalog.where(sample), str(payload)))
                else:
                    payload = self._try(sample, params, events)
                if payload is None or isinstance(payload, CorruptSample):
                    self.known_bad.add(clip)
                    continue
                slots.append(Slot(sample, catalog.keys[sample], self._label(sample), 0, True, params, payload, sample))
                break
            else:
                raise RuntimeError(f"no loadable sample left for batch {list(request)}: every candidate of "
                                   f"slot {j} is corrupt (see the corruption log)")
        return BatchPlan(slots, events)

    def _eval(self, request: Request) -> BatchPlan:
        """(clip, view) rows, (-1, -1) for padding; a row's index, key and label are its clip's
        (a clip stored in chunks is scored once). Invalid rows copy a valid row of the batch, or
        the first loadable clip when there is none; rows of one clip that read the same frames
        share one payload."""
        plan: EvalPlan = self.plan
        clips = plan.catalog.clips
        slots: list[Slot | None] = []
        events: list[CorruptEvent] = []
        loaded: dict[tuple, Any] = {}
        for clip, view in plan.rows[request[0]].tolist():
            slot = None
            if clip >= 0 and clip not in self.known_bad:
                sample, params = plan.params(clip, view)
                frames = None if params.frames is None else params.frames.tobytes()
                if (sample, frames) not in loaded:
                    loaded[sample, frames] = self._try(sample, params, events)
                if loaded[sample, frames] is None:
                    self.known_bad.add(clip)
                else:
                    slot = Slot(clip, clips.keys[clip], self._label(sample), view, True, params,
                                loaded[sample, frames], sample)
            slots.append(slot)
        valid = next((s for s in slots if s is not None), None) or self._first_loadable()
        invalid = replace(valid, index=-1, key="", label=-1, view=-1, valid=False)
        return BatchPlan([s if s is not None else invalid for s in slots], events)

    def _first_loadable(self) -> Slot:
        """The first loadable clip (view 0), to fill a batch that has no valid row at all."""
        if self._filler is not None:
            return self._filler
        plan: EvalPlan = self.plan
        for clip in range(plan.num_clips):
            if clip in self.known_bad:
                continue
            sample, params = plan.params(clip, 0)
            payload = self._try(sample, params, [])
            if payload is not None:
                self._filler = Slot(clip, plan.catalog.clips.keys[clip], self._label(sample), 0, False, params,
                                    payload, sample)
                return self._filler
            self.known_bad.add(clip)
        raise RuntimeError(f"no loadable sample in {plan.catalog.tars[0]} ...")
