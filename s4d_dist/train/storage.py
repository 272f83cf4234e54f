"""Every rank must see the same run folder and the same shards: on several nodes, shared storage.

A node that mounts `output_dir` somewhere else (its local disk) would write its checkpoint
shards where no restart finds them, and one that sees other shard files would train on other
data — both only noticed much later, if at all. So before anything is trained, rank 0 writes a
marker holding a fresh token into the run folder, and every rank reads it back and measures the
training shards; if any rank sees something else, every rank stops with one message naming that
rank's node and the path.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from s4d_dist import atomic
from s4d_dist.train import distributed
from s4d_dist.train.faults import StorageError

MARKER = ".shared_storage_check"


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def check_shared(folder: Path, shards: list[str]) -> None:
    """Collective: stop (StorageError) unless every rank reads rank 0's marker in `folder` (its
    own view of the run folder) and sees each of `shards` with rank 0's size."""
    if distributed.world_size() == 1:
        return
    marker = Path(folder) / MARKER
    token = secrets.token_hex(16) if distributed.is_main() else ""
    if token:
        atomic.write_text(marker, token)
    token = distributed.host_gather(token)[0]  # also: the marker is written before anyone reads
    sizes = distributed.host_gather([_size(s) for s in shards])
    read = marker.read_text() if marker.is_file() else None
    problem = None
    if read != token:
        problem = (f"the run folder {folder} is not the one rank 0 writes to: output_dir must be "
                   f"storage shared by every node")
    else:
        differing = [(s, mine, theirs) for s, mine, theirs in zip(shards, sizes[distributed.rank()],
                                                                  sizes[0]) if mine != theirs]
        if differing:
            shard, mine, theirs = differing[0]
            seen = "missing" if mine < 0 else f"{mine} bytes"
            problem = (f"{shard} is {seen} here, {theirs} bytes on rank 0 ({len(differing)} "
                       f"shard(s) differ): the shards must be on storage shared by every node")
    problem = distributed.first_problem(problem)
    if distributed.is_main():
        marker.unlink(missing_ok=True)
    if problem is not None:
        raise StorageError(problem)


def shard_files(loader) -> list[str]:
    """The training shards of a TrainLoader: their tars."""
    return [tar for stream in loader.streams for tar in stream.plan.catalog.tars]

