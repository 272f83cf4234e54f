"""Process-group setup and the few collectives the loops need.

The same entry point runs under `deepspeed`, `torchrun` and plain `python`. The first two export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*; for plain `python` we fill in a one-process group,
since DeepSpeed would otherwise try MPI discovery (and fail without mpi4py).
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# Longer than any build of DeepSpeed's CPU communication op takes (about a minute on 2 cores).
STALE_BUILD_LOCK_S = 600.0


def free_port() -> int:
    """A TCP port free on every interface. The rendezvous store listens on all of them, so a
    port free on 127.0.0.1 alone can still be taken on another address (a local Ray cluster
    holds many), and the store's bind then fails with EADDRINUSE."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init(backend: str | None = None) -> None:
    """Join (or, alone, create) the default process group through DeepSpeed.

    On a GPU machine the rank's device is set first, from LOCAL_RANK: the train loader (its DALI
    pipelines take `torch.cuda.current_device()`) and NCCL's communicator are created before
    DeepSpeed's engine would set it, and would otherwise all land on GPU 0.
    """
    import deepspeed

    solo = "RANK" not in os.environ
    if solo:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= visible:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this process sees {visible} GPU(s): "
                               "start at most one rank per visible GPU")
        torch.cuda.set_device(local_rank)
    else:
        wait_for_build_lock("deepspeed_shm_comm")
    attempts = 0 if dist.is_initialized() else 3 if solo else 1
    for attempt in range(attempts):
        try:
            deepspeed.init_distributed(dist_backend=backend or (
                "nccl" if torch.cuda.is_available() else "gloo"))
            break
        except dist.DistNetworkError as error:
            # Alone, the port is ours to choose; another process may have taken the free one
            # between the choice and the bind. Launchers choose theirs: nothing to retry then.
            if "EADDRINUSE" not in str(error) or attempt == attempts - 1:
                raise
            os.environ["MASTER_PORT"] = str(free_port())


def wait_for_build_lock(extension: str) -> None:
    """Wait while torch's JIT build lock of `extension` is held, removing it once it is older
    than any build takes.

    DeepSpeed's CPU backend JIT-loads its shared-memory op at every start, holding that lock for
    a moment; a process killed in that moment (preempted, kill -9) leaves it behind, and every
    later run on the machine would wait for it forever inside torch, silently. Ranks that wait
    for a live build just wait here instead.
    """
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(extension, verbose=False)) / "lock"
    said = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_BUILD_LOCK_S:
            log.warning(f"removing {lock}: left {age:.0f} s ago by a process that stopped while "
                        "building or loading DeepSpeed's CPU op")
            lock.unlink(missing_ok=True)
            return
        if not said:
            log.info(f"waiting for {lock} (another process is building DeepSpeed's CPU op)")
            said = True
        time.sleep(1.0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A 0-d float flag (0 or 1), set on every rank if it is set on any: ranks must agree
    before skipping a step. Stays on the device: with NCCL the all-reduce is queued on the GPU
    and nothing waits for it on the host."""
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def host_any(flag: bool) -> bool:
    """True on every rank if `flag` is True on any: agreement on a host-side fact (a signal
    received, a failed write)."""
    return bool(host_max(int(flag)))


def host_max(value: int) -> int:
    """The largest of every rank's `value`, on every rank. One int over gloo — through a CPU
    group when the default backend is NCCL — so it never waits for the GPU's queued work."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group())
    return int(tensor.item())


def host_gather(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (over gloo, like host_max):
    what the ranks found, for a message that names the rank concerned."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj, group=_host_group())
    return gathered


def first_problem(problem: str | None) -> str | None:
    """Collective: the problem of the lowest rank that has one (None: none has), on every rank,
    so that all stop together with one message; another rank's names its rank and node."""
    found = host_gather((socket.gethostname(), problem))
    for r, (host, text) in enumerate(found):
        if text is not None:
            return text if r == 0 else f"rank {r} on {host}: {text}"
    return None


@functools.cache
def _host_group():
    """The default group when it is gloo already, else a gloo group of every rank (made once,
    collectively, at the first host collective, which every rank reaches at the same point)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def gather_arrays(array: np.ndarray) -> np.ndarray:
    """Concatenate a per-rank array (any length) from every rank, on every rank."""
    if world_size() == 1:
        return array
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def release_shared_memory() -> None:
    """Collective, once DeepSpeed's communication backend is up on every rank (its engine
    built). On CPU, when every rank runs on this machine, that backend maps a shared-memory
    buffer per rank (about 66 MB of RAM, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>) and never unlinks it, so every such run left its buffers in RAM until reboot
    — on a machine running the tests, gigabytes, until Ray's memory monitor killed workers.
    Every rank has mapped every buffer by now, so each rank removes its own buffer's name: the
    memory goes with the last process that maps it."""
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_"
                               f"{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    if name.exists():  # on every rank or none: all on this machine, on CPU
        barrier()
        name.unlink(missing_ok=True)
