"""Building a loader's batches in a process of its own, so the feeder never holds the trainer's GIL.

`FeederProcess` has the Prefetcher's interface (prefetch.py): `start(requests)`, then `next()`
gives `(request, batch)` in request order, `stop()` abandons the rest. A child process
(forkserver) runs the slot filler (filler.py) on the frame-storage path: it fills each batch,
copies the frames' JPEG bytes into one of `depth` shared-memory slots and sends the rest of
the batch — which samples, their parameters and where each frame lies in the slot — through a
queue. The trainer's side turns the slot into views (no copy) for DALI, which copies them into
its own buffers when it takes the batch; the slot is then free for the child again (`release`).

Order, substitutes and resume are the filler's, so the batches are the same as from a thread:
the child learns the samples found corrupt inside DALI (`mark_bad`) before a restart, and each
`start` is a new generation whose stale results are dropped.
"""
from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Iterable
from dataclasses import replace
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from .decode import Window, read_windows
from .filler import SlotFiller
from .plan import BatchPlan, Plan, Request

_POLL = 0.05


def _child_load_many(plan: Plan):
    def load_many(samples, params):
        return read_windows(plan.catalog, samples, np.stack([p.frames for p in params]))
    return load_many


def _child_load(plan: Plan):
    from .decode import read_window

    def load(index, params):
        return read_window(plan.catalog, index, params.frames)
    return load


def _serve(plan: Plan, slot_names: list[str], slot_bytes: int, commands, results, free, halt) -> None:
    """The child: fill batches of the latest `run` command into free slots until told to stop."""
    # Attaching registers the names again with the resource tracker the forkserver shares with
    # the trainer's side, which unlinks them (and unregisters them, once) when it closes.
    slots = [shared_memory.SharedMemory(name=name) for name in slot_names]
    filler = SlotFiller(plan, _child_load(plan), _child_load_many(plan))
    try:
        while True:
            command = commands.get()
            if command is None:
                return
            kind, generation, payload = command
            if kind == "bad":
                filler.known_bad.update(payload)
                continue
            for request in payload:
                if halt.is_set():
                    break
                try:
                    planned = filler(request)
                    item = _pack(planned, slots, slot_bytes, free, halt)
                except Exception as error:  # raised on the trainer's side, in its turn
                    results.put((generation, request, error, None))
                    break
                if item is None:  # halted while waiting for a slot
                    break
                results.put((generation, request, *item))
            results.put((generation, None, None, None))  # end of this run
    finally:
        for slot in slots:
            slot.close()


def _pack(planned: BatchPlan, slots, slot_bytes: int, free, halt) -> tuple[BatchPlan, tuple] | None:
    """Copy the batch's distinct windows' frames into a free slot; the batch with each window
    replaced by its frames' (start, end) in the slot."""
    while True:
        try:
            slot = free.get(timeout=_POLL)
            break
        except queue.Empty:
            if halt.is_set():
                return None
    buffer = np.ndarray((slot_bytes,), np.uint8, slots[slot].buf)
    placed: dict[int, Window] = {}
    position = 0
    for s in planned.slots:
        window = s.payload
        if id(window) in placed:
            continue
        spans = []
        for jpeg in window.jpegs:
            size = len(jpeg)
            if position + size > slot_bytes:
                raise ValueError(f"a batch's frames exceed the feeder's {slot_bytes}-byte slot; "
                                 "raise FeederProcess.slot_bytes")
            buffer[position:position + size] = np.frombuffer(jpeg, np.uint8) if isinstance(jpeg, bytes) else jpeg
            spans.append((position, position + size))
            position += size
        placed[id(window)] = Window(spans, window.order)
    slots_out = [replace(s, payload=placed[id(s.payload)]) for s in planned.slots]
    return BatchPlan(slots_out, planned.corrupt), (slot, position)


class FeederProcess:
    """Prefetcher's interface, the batches built by a child process (see the module docstring).
    `next()` gives batches whose windows' frames are views of shared memory, valid until
    `release()` is called for that batch."""

    def __init__(self, plan: Plan, depth: int, slot_bytes: int = 64 << 20) -> None:
        context = multiprocessing.get_context("forkserver")
        self.depth, self.slot_bytes = max(depth, 1) + 1, slot_bytes
        self._slots = [shared_memory.SharedMemory(create=True, size=slot_bytes) for _ in range(self.depth)]
        self._commands, self._results = context.Queue(), context.Queue()
        self._free, self._halt = context.Queue(), context.Event()
        for slot in range(self.depth):
            self._free.put(slot)
        self._process = context.Process(
            target=_serve, name="s4d-feeder", daemon=True,
            args=(plan, [s.name for s in self._slots], slot_bytes, self._commands, self._results, self._free,
                  self._halt))
        self._process.start()
        self._generation = 0
        self.bytes_read = 0  # JPEG bytes of the batches taken
        self._requests: list[Request] = []
        self._taken = 0
        self._running = False

    def start(self, requests: Iterable[Request]) -> None:
        self.stop()
        self._generation += 1
        self._requests, self._taken = list(requests), 0
        self._halt.clear()
        self._commands.put(("run", self._generation, self._requests))
        self._running = True

    def mark_bad(self, samples: Iterable[int]) -> None:
        """Samples found corrupt outside the child (inside DALI): skipped from the next start."""
        self._commands.put(("bad", self._generation, sorted(samples)))

    def _get(self) -> tuple:
        while True:
            try:
                generation, request, planned, where = self._results.get(timeout=5 * _POLL)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError("the feeder process died (see its output above)") from None
                continue
            if generation == self._generation:
                return request, planned, where
            if where is not None:  # a stale batch: its slot is free again
                self._free.put(where[0])

    def next(self) -> tuple[Request, tuple[BatchPlan, Any]]:
        if not self._running:
            raise StopIteration
        request, planned, where = self._get()
        if request is None:
            self._running = False
            raise StopIteration
        if isinstance(planned, Exception):
            self._running = False
            raise planned
        slot, used = where
        self.bytes_read += used
        buffer = np.ndarray((self.slot_bytes,), np.uint8, self._slots[slot].buf)
        views: dict[int, Window] = {}
        for s in planned.slots:
            if id(s.payload) not in views:
                views[id(s.payload)] = Window([buffer[a:b] for a, b in s.payload.jpegs], s.payload.order)
        planned = BatchPlan([replace(s, payload=views[id(s.payload)]) for s in planned.slots], planned.corrupt)
        self._taken += 1
        return request, (planned, slot)

    def release(self, slot: int) -> None:
        """The batch in `slot` was copied out (by DALI): the child may reuse the slot."""
        self._free.put(slot)

    def stop(self) -> tuple[list[Request], list[BatchPlan]]:
        """Stop building. Returns the requests not taken yet, in order, and the batches already
        built for some of them (dropped; their corrupt events are the caller's to keep)."""
        built = []
        if self._running:
            self._halt.set()
            while True:  # drain this generation up to its end marker
                request, planned, where = self._get()
                if where is not None:
                    self._free.put(where[0])
                if request is None:
                    break
                if isinstance(planned, Exception):
                    continue
                built.append(planned)
            self._running = False
        untaken, self._requests = self._requests[self._taken:], []
        self._taken = 0
        return untaken, built

    def close(self) -> None:
        self.stop()
        self._commands.put(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        for slot in self._slots:
            slot.close()
            slot.unlink()
