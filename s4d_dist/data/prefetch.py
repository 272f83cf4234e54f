"""Batches built ahead of their use on a background thread, in request order, a bounded number.

Building a batch for DALI is Python work — each sample's bytes read and checked, its random
parameters drawn (plan.py) — done here on a thread of its own, so that it overlaps the training
step and DALI's decoding instead of running between two steps. One thread builds the requests
strictly in order, so the batches, the samples substituted for corrupt ones and the resume
position are the same whatever the timing; the queue bound keeps memory flat when the consumer
is slower.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .plan import Request

T = TypeVar("T")
_END = object()


class Prefetcher(Generic[T]):
    """`start(requests)`, then `next()` gives `(request, build(request))` in order until
    StopIteration; `stop()` abandons the rest and says what was not taken."""

    def __init__(self, build: Callable[[Request], T], depth: int) -> None:
        self.build, self.depth = build, max(depth, 1)
        self._worker: threading.Thread | None = None
        self._requests: list[Request] = []
        self._taken = 0
        self._ready: queue.Queue = queue.Queue()
        self._halt = threading.Event()

    def start(self, requests: Iterable[Request]) -> None:
        """Begin building `requests` (a run already going is stopped first)."""
        self.stop()
        self._requests, self._taken = list(requests), 0
        self._ready, self._halt = queue.Queue(self.depth), threading.Event()
        self._worker = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        for request in self._requests:
            try:
                item = (request, self.build(request))
            except Exception as error:  # raised by next(), on the consumer's thread, in order
                item = error
            if not self._put(item) or isinstance(item, Exception):
                return
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Wait for room unless stopped; False if stopped first."""
        while not self._halt.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[Request, T]:
        """The next request and its batch; StopIteration after the last one (or when stopped),
        a build's exception in that request's turn."""
        if self._worker is None:
            raise StopIteration
        item = self._ready.get()
        if item is _END or isinstance(item, Exception):
            self._halt.set()  # the worker is done: later calls must not wait for it
            self._worker = None
            if isinstance(item, Exception):
                raise item
            raise StopIteration
        self._taken += 1
        return item

    def stop(self) -> tuple[list[Request], list[T]]:
        """Stop building. Returns the requests not taken yet, in order, and the batches already
        built for some of them (now discarded). Idempotent."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._halt.set()
            worker.join()
        built = []
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if isinstance(item, tuple):
                built.append(item[1])
        untaken, self._requests = self._requests[self._taken:], []
        self._taken = 0
        return untaken, built
