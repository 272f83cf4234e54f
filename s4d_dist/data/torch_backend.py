"""The pure-PyTorch backend: Pillow / PyAV decoding and torch_ops in DataLoader workers.

Used where DALI is not installed (`data.backend=auto`) or asked for (`data.backend=torch`).
A DataLoader item is a whole batch: the workers receive batch requests (sources.py), build the
batch in full and return it, so workers never split a batch, read disjoint batches, and the
output is identical whatever the number of workers. Workers come from a forkserver (a child
forked from the trainer would inherit its threads' locks — DALI's, tqdm's, NCCL's — while a
spawned one re-imports torch each time), which has this module preloaded, and persist across
epochs.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from s4d_dist import seeds
from s4d_dist.pixels import normalize

from . import boxes
from .catalog import RawSample
from .corrupt import MediaCheck
from .decode import decode_frames, decode_image
from .recipes import Recipe, SampleParams
from .sources import Request, Source, spec_fields
from .torch_ops import erase_constant, erase_noise_, rand_augment, resample


def load_decoded(check: MediaCheck, raw: RawSample, params: SampleParams) -> torch.Tensor:
    """Check, then decode what the sample's parameters need: uint8 (F, H, W, 3), F = 1 for
    images."""
    check(raw)
    if params.frames is None:
        return torch.from_numpy(decode_image(raw.media)[None].copy())
    return torch.from_numpy(decode_frames(raw.media, params.frames).copy())


def transform(recipe: Recipe, frames: torch.Tensor, params: SampleParams) -> torch.Tensor:
    """Decoded frames → uint8 (copies, F, S, S, 3), the recipe's chain up to normalisation
    (recipes.py)."""
    size = (recipe.size, recipe.size)
    if recipe.kind == "finetune" and recipe.modality == "video":
        height, width = frames.shape[1:3]
        x = resample(frames, boxes.full_frame(height, width), tuple(params.pre_size), "linear")
        return resample(rand_augment(x, params.ops), params.rois[0], size, "linear")[None]
    if recipe.kind == "finetune":
        x = rand_augment(resample(frames, params.rois[0], size, "linear"), params.ops)
        return erase_constant(x, params.erase)[None]
    return torch.stack([resample(frames, roi, size, recipe.interp) for roi in params.rois])


def normalized(recipe: Recipe, frames: torch.Tensor, slots: list, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, copies, F, S, S, 3) → float (B, copies, 3, [F,] S, S), ImageNet-normalised in
    one pass over the batch, then the fine-tuning clips' noise erasing (after normalisation)."""
    x = frames.movedim(-1, 2).float().div_(255)
    x = normalize(x.flatten(0, 1)).unflatten(0, frames.shape[:2])
    if recipe.modality == "image":
        return x[:, :, :, 0]
    if recipe.kind == "finetune":
        for i, slot in enumerate(slots):
            erase_noise_(x[i, 0], slot.params.erase, generator)
    return x


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches, indexed by request."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.known_bad: set[int] = set()  # per process: each worker learns on its own
        self.load = functools.partial(load_decoded, MediaCheck(source.recipe.modality))

    def __getitem__(self, request: Request) -> dict[str, Any]:
        with _single_thread():
            spec = self.source.build(request, self.load, self.known_bad)
            recipe = self.source.recipe
            frames = torch.stack([transform(recipe, s.payload, s.params) for s in spec.slots])
            generator = seeds.erase_noise(request, self.source.rank)
            pixels = normalized(recipe, frames, spec.slots, generator)
        return {"pixels": pixels, **spec_fields(spec)}


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread while building a batch in the trainer's process (workers=0), as
    DataLoader workers have: the per-sample ops are small, and waking a thread pool for each
    costs more than the op (measured: a 32-px resample 35 ms with 2 threads, 0.07 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Requests(torch.utils.data.Sampler):
    """The requests of the current pass; replaced between passes (the workers persist)."""

    def __init__(self) -> None:
        self.items: list[Request] = []

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class TorchRunner:
    """Runs batch requests through a (persistent) DataLoader."""

    def __init__(self, source: Source, workers: int, prefetch: int) -> None:
        self.requests = _Requests()
        extra = {}
        if workers > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # workers fork with torch and this module loaded
            extra = dict(persistent_workers=True, prefetch_factor=max(prefetch, 1), multiprocessing_context=context)
        # A generator of its own (seeds.dataloader says why).
        self.loader = torch.utils.data.DataLoader(
            BatchDataset(source), sampler=self.requests, batch_size=None, num_workers=workers,
            collate_fn=_identity, pin_memory=torch.cuda.is_available(),
            generator=seeds.dataloader(), **extra)

    def run(self, requests: Iterable[Request]) -> Iterator[dict[str, Any]]:
        self.requests.items = list(requests)
        if self.requests.items:
            yield from self.loader

    def close(self) -> None:
        """Let go of the DataLoader: its persistent workers stop when it is collected."""
        self.loader = None


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch
