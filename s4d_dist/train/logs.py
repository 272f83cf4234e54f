"""Where a run's log records go: each rank's file in the run folder, and a short console.

    with run_logs(run / "logs" / f"rank{rank}.log", rank) as path: ...

Everything from INFO goes to `<run>/logs/rank<k>.log` with time, logger and level, so each
rank keeps its own record (tracebacks included, cli.py). The console is for a person watching
rank 0: this project's INFO lines as `[s4d] message` on stdout (rank 0 only, so a line is said
once, not per rank), and warnings and errors of every rank and library on stderr. Other
libraries' INFO chatter stays in the files.

Entering `run_logs` while it is already active (the command line around `train()`) changes
nothing, so `train()` can make sure of it whatever started it: the command line, the demo, a
Ray worker or a test.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FILE_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
OURS = "s4d_dist"
_active: list[Path | None] = []  # the file of the run_logs in force, if any


class _Ours(logging.Filter):
    """This project's records below WARNING (those above go to stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(OURS) and record.levelno < logging.WARNING


@contextlib.contextmanager
def run_logs(path: Path, rank: int, console: bool = True) -> Iterator[Path | None]:
    """Log to `path` and, with `console`, the console (see the module docstring) while the block
    runs; yields `path`, or None where it cannot be created (a full disk: the console still
    works). A Ray Train worker passes console=False: it has no console of its own."""
    if _active:
        yield _active[-1]
        return
    handlers: list[logging.Handler] = []
    if console:
        problems = logging.StreamHandler(sys.stderr)
        problems.setLevel(logging.WARNING)
        problems.setFormatter(logging.Formatter(f"%(levelname)s rank {rank} %(name)s: %(message)s"))
        handlers.append(problems)
    if console and rank == 0:
        said = logging.StreamHandler(sys.stdout)
        said.setFormatter(logging.Formatter("[s4d] %(message)s"))
        said.addFilter(_Ours())
        handlers.append(said)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path)
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(file)
    except OSError:
        path = None
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    _active.append(path)
    try:
        yield path
    finally:
        _active.pop()
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
