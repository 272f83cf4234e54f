"""Process-group setup and the few collectives the loops need.

The same entry point runs under `deepspeed`, `torchrun` and plain `python`. The first two export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*; for plain `python` we fill in a one-process group,
since DeepSpeed would otherwise try MPI discovery (and fail without mpi4py).
"""
from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None) -> None:
    """Join (or, alone, create) the default process group through DeepSpeed."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available()
                                                            else "gloo"))


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


def any_true(flag: bool) -> bool:
    """True on every rank if it is True on any: ranks must agree before skipping a step."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
