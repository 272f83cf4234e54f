"""The prefetch thread that builds DALI's batches ahead (prefetch.py): request order whatever the
timing, a bounded lead, errors in their turn, and a stop that says exactly what was not taken
(what the DALI runner re-queues after a corrupt sample, or drops when an epoch is abandoned)."""
from __future__ import annotations

import threading
import time

import pytest

from s4d_dist.data.prefetch import Prefetcher


class Recorder:
    """A build function that records what it built, on which thread; some requests are slow."""

    def __init__(self, slow: frozenset = frozenset(), fail: frozenset = frozenset()) -> None:
        self.built, self.threads = [], set()
        self.slow, self.fail = slow, fail

    def __call__(self, request):
        self.threads.add(threading.current_thread().name)
        if request in self.slow:
            time.sleep(0.05)
        if request in self.fail:
            raise OSError(f"cannot read {request}")
        self.built.append(request)
        return ("batch", request)


def take_all(ahead: Prefetcher) -> list:
    items = []
    while True:
        try:
            items.append(ahead.next())
        except StopIteration:
            return items


def test_builds_in_request_order_on_a_background_thread():
    requests = [(0, 0, b) for b in range(12)]
    build = Recorder(slow=frozenset(requests[::3]))
    ahead = Prefetcher(build, depth=2)
    ahead.start(requests)
    assert take_all(ahead) == [(r, ("batch", r)) for r in requests]
    assert build.threads == {"batch-prefetch"}
    with pytest.raises(StopIteration):  # and stays finished
        ahead.next()
    assert ahead.stop() == ([], [])


def test_lead_is_bounded():
    build = Recorder()
    ahead = Prefetcher(build, depth=2)
    ahead.start([(b,) for b in range(20)])
    ahead.next()
    time.sleep(0.2)  # plenty of time to run away
    assert len(build.built) <= 1 + 2 + 1  # taken + queued + one waiting for room
    ahead.stop()


def test_stop_returns_what_was_not_taken_and_a_restart_continues_exactly():
    requests = [(b,) for b in range(10)]
    ahead = Prefetcher(Recorder(), depth=3)
    ahead.start(requests)
    first = [ahead.next() for _ in range(4)]
    time.sleep(0.1)
    untaken, built = ahead.stop()
    assert untaken == requests[4:]
    assert built == [("batch", r) for r in requests[4:4 + len(built)]] and built  # discarded
    with pytest.raises(StopIteration):  # stopped: DALI's next ask ends its run
        ahead.next()
    ahead.start(untaken)
    assert first + take_all(ahead) == [(r, ("batch", r)) for r in requests]


def test_a_build_error_is_raised_in_its_turn_and_its_request_is_not_taken():
    requests = [(b,) for b in range(6)]
    ahead = Prefetcher(Recorder(fail=frozenset({(3,)})), depth=2)
    ahead.start(requests)
    assert [ahead.next()[0] for _ in range(3)] == requests[:3]
    with pytest.raises(OSError, match=r"cannot read \(3,\)"):
        ahead.next()
    assert ahead.stop()[0] == requests[3:]
