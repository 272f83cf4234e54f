"""The pure-PyTorch backend: Pillow / PyAV decoding in DataLoader workers, pixel ops on the device.

Used where DALI is not installed (`data.backend=auto`) or asked for (`data.backend=torch`).
A DataLoader item is a whole batch: the workers receive batch requests (plan.py), fill the
batch (filler.py: every slot read and decoded to uint8 frames by `load`) and return it, so
workers never split a batch, read disjoint batches, and the output is identical whatever the
number of workers. Workers come from a forkserver (a child forked from the trainer would
inherit its threads' locks — DALI's, tqdm's, NCCL's — while a spawned one re-imports torch
each time), which has this module preloaded, and persist across epochs.

The uint8 frames then go to the device, where pixel_ops.augment crops, resizes, augments and
normalises the batch — the same code DALI's frame-storage path runs after its decoder.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from s4d_dist import seeds

from .decode import CorruptSample, decode_window, decoded, read_raw, read_window, read_windows
from .filler import SlotFiller
from .pixel_ops import augment, one_thread
from .plan import Plan, Request
from .recipes import SampleParams


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches of decoded frames, indexed by request."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.frame_storage = plan.catalog.frame_storage
        self.filler = SlotFiller(plan, self.load, self.load_many if self.frame_storage else None)  # per process

    def load(self, index: int, params: SampleParams) -> torch.Tensor:
        """uint8 (F, H, W, 3): the frames the parameters use (one frame for an image)."""
        if self.frame_storage and params.frames is not None:
            return decode_window(read_window(self.plan.catalog, index, params.frames))
        return decoded(read_raw(self.plan.catalog, index), params)

    def load_many(self, samples: np.ndarray, params: list[SampleParams]) -> list:
        """Frame storage, a training batch's first candidates: read at once, decoded one by one."""
        if params[0].frames is None:
            return [self._load_or_corrupt(int(i), p) for i, p in zip(samples, params)]
        windows = read_windows(self.plan.catalog, samples, np.stack([p.frames for p in params]))
        return [w if isinstance(w, CorruptSample) else _decoded_or_corrupt(w) for w in windows]

    def _load_or_corrupt(self, index: int, params: SampleParams):
        try:
            return self.load(index, params)
        except CorruptSample as err:
            return err

    def __getitem__(self, request: Request) -> dict[str, Any]:
        with one_thread():  # as DataLoader workers have (the trainer's process when workers=0)
            batch = self.filler(request)
        return {"request": request, "frames": [slot.payload for slot in batch.slots], "slots": batch.slots,
                **batch.fields()}


class _Requests(torch.utils.data.Sampler):
    """The requests of the current pass; replaced between passes (the workers persist)."""

    def __init__(self) -> None:
        self.items: list[Request] = []

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class TorchRunner:
    """Runs batch requests through a (persistent) DataLoader, then augments on `device`."""

    def __init__(self, plan: Plan, workers: int, prefetch: int, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.requests = _Requests()
        self.host_bytes = self.encoded_bytes = 0
        extra = {}
        if workers > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # workers fork with torch and this module loaded
            extra = dict(persistent_workers=True, prefetch_factor=max(prefetch, 1), multiprocessing_context=context)
        # A generator of its own (seeds.dataloader says why).
        self.loader = torch.utils.data.DataLoader(
            BatchDataset(plan), sampler=self.requests, batch_size=None, num_workers=workers,
            collate_fn=_identity, pin_memory=device.type == "cuda",
            generator=seeds.dataloader(), **extra)

    def run(self, requests: Iterable[Request]) -> Iterator[dict[str, Any]]:
        self.requests.items = list(requests)
        if not self.requests.items:
            return
        for batch in self.loader:
            frames = [f.to(self.device, non_blocking=True) for f in batch.pop("frames")]
            self.host_bytes += sum(f.nbytes for f in frames)
            generator = seeds.erase_noise(batch.pop("request"), self.plan.rank)
            batch["pixels"] = augment(self.plan.recipe, frames, batch.pop("slots"), generator)
            yield batch

    def close(self) -> None:
        """Let go of the DataLoader: its persistent workers stop when it is collected."""
        self.loader = None


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _decoded_or_corrupt(window):
    try:
        return decode_window(window)
    except CorruptSample as err:
        return err
