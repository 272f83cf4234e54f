"""What stops a run on purpose, the exit code each such stop has, and graceful preemption.

Exit codes of the training entry points (launch/pretrain.py, launch/finetune.py), so that a
scheduler or wrapper script can tell a retry from a bug:

     0  finished
     1  unexpected error (its traceback is in <run>/logs/rank<k>.log)
     2  usage: bad config or command line — a file, fold or class count the config names that
        the files contradict (preflight.py), a checkpoint that does not fit the model — a run
        folder this run must not continue from
     3  diverged: too many consecutive non-finite losses
    65  data (EX_DATAERR): empty, unfinished or truncated shards, a missing split, bad labels
    69  peers (EX_UNAVAILABLE): a collective with the other ranks failed or timed out — a rank
        died, hangs, or cannot be reached (NCCL / gloo errors and timeouts); every rank that
        meets it says so, since the one that would normally speak may be the one that died
    73  storage (EX_CANTCREAT): the output filesystem is too small or a checkpoint write failed;
        the previous complete checkpoint is intact
    75  preempted (EX_TEMPFAIL): SIGTERM / SIGUSR1 received, a checkpoint was written at the next
        step boundary; starting the same command again resumes from it (resume=auto)
"""
from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED = 1, 2, 3
EXIT_DATA, EXIT_PEERS, EXIT_STORAGE, EXIT_PREEMPTED = 65, 69, 73, 75

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's `--signal=USR1@<s>`


class RunStopped(RuntimeError):
    """A stop whose message says all the user needs (one line); `exit_code` classifies it."""

    exit_code = EXIT_FAILED


class DataError(RunStopped):
    exit_code = EXIT_DATA


class StorageError(RunStopped):
    exit_code = EXIT_STORAGE


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


# errno values, and what torch's zip writer (inline_container.cc) says instead of ENOSPC when a
# write comes up short, that mean the filesystem ran out of room or failed under us.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}
_STORAGE_MESSAGES = ("unexpected pos", "enforce fail", "PytorchStreamWriter failed",
                     "No space left")


# What gloo and NCCL say when a peer is gone or a collective ran out of time, where torch raises a
# plain RuntimeError rather than one of its torch.distributed.DistError types.
_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Timed out",
                  "timed out", "Socket Timeout", "NCCL error", "Watchdog caught collective")


def peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective failing because of the other ranks."""
    import torch.distributed as dist

    if "EADDRINUSE" in str(error):  # a port taken on this machine: no peer involved
        return False
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_MESSAGES))


def storage_failure(error: BaseException) -> str | None:
    """'disk full' / 'I/O error' when `error` is the filesystem failing, else None."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return "I/O error" if error.errno == errno.EIO else "disk full"
    if isinstance(error, RuntimeError) and any(m in str(error) for m in _STORAGE_MESSAGES):
        return "disk full"
    return None


def human_bytes(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.3g} TB"


# Signal handlers belong to the process, so the note does too: the handler may be installed from
# another thread than the loop's (a Ray Train worker's loop runs beside the actor's main thread).
_received = 0  # the first preemption signal noted since `listen()`
_previous: dict[int, Any] = {}  # the handlers `listen()` replaced


def _note(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = _received or signum


def listen() -> None:
    """Main thread only: from now on note SIGTERM / SIGUSR1 instead of dying of them (a note
    from an earlier run in this process is forgotten)."""
    global _received
    _received = 0
    for signum in PREEMPTION_SIGNALS:
        previous = signal.signal(signum, _note)
        _previous.setdefault(signum, previous)


def stop_listening() -> None:
    """Main thread only: put back the handlers `listen()` replaced."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()


def ignore_further() -> None:
    """Main thread only: a process stopping for a preemption (on its way to exit 75) ignores
    any further preemption signal. A scheduler may repeat SIGTERM, and DeepSpeed's launcher
    SIGTERMs the ranks still exiting once the first has exited 75; either would turn the clean
    exit into a death by signal, which the launcher then reports instead of 75. A Python handler
    cannot prevent that: the interpreter puts its handlers back to the default while it shuts
    down, and only SIG_IGN lasts. SIGKILL still ends an exit that hangs."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# Runs a call on the process's main thread; False where it has none to run it on.
MainThread = Callable[[Callable[[], None]], bool]


def on_this_thread(call: Callable[[], None]) -> bool:
    """The MainThread of a loop started by deepspeed / torchrun / python: `call` runs here if
    this is the main thread (elsewhere, with none to ask, signals keep their effect)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    call()
    return True


class Preemption:
    """SIGTERM / SIGUSR1 turned into a stop at a step boundary that every rank agrees on.

    The handler only notes the signal, so whatever runs (a step, a checkpoint being written)
    finishes undisturbed; a second signal during the save changes nothing, and a rank leaving
    the context to stop ignores any later one (`ignore_further`). `requested(step)`
    agrees on the note with one int all-reduced over gloo every `check_every` steps (it waits
    for no GPU work; every rank calls it at the same steps), after which `signal` names it on
    every rank.

    Handlers can be installed only on the process's main thread: `main_thread(call)` runs
    `call` there — the caller itself by default; a Ray Train worker, whose loop runs in a thread
    of its own, asks its actor's main thread (orchestrate/ray_train.py).
    """

    def __init__(self, check_every: int = 1,
                 main_thread: MainThread = on_this_thread) -> None:
        self.check_every = max(1, check_every)
        self.signal = ""  # the signal the ranks agreed on
        self._main_thread = main_thread
        self._listening = False

    @property
    def received(self) -> int:
        """The first signal number noted on this rank since the run began (0: none)."""
        return _received if self._listening else 0

    def __enter__(self) -> Preemption:
        self._listening = self._main_thread(listen)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._listening:  # stopping for a signal, this rank's or another's: see ignore_further
            self._main_thread(ignore_further if self.signal or self.received else stop_listening)

    def requested(self, step: int) -> bool:
        if step % self.check_every:
            return False
        from s4d_dist.train import distributed  # torch: not for the exceptions' importers

        agreed = distributed.host_max(self.received)
        self.signal = signal.Signals(agreed).name if agreed else ""
        return bool(agreed)
