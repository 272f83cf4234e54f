"""The pure-PyTorch backend: Pillow / PyAV decoding and torch pixel ops in DataLoader workers.

Used where DALI is not installed (`data.backend=auto`) or asked for (`data.backend=torch`).
A DataLoader item is a whole batch: the workers receive batch requests (plan.py), build the
batch in full and return it, so workers never split a batch, read disjoint batches, and the
output is identical whatever the number of workers. Workers come from a forkserver (a child
forked from the trainer would inherit its threads' locks — DALI's, tqdm's, NCCL's — while a
spawned one re-imports torch each time), which has this module preloaded, and persist across
epochs.

One batch: plan.batch (which samples, their parameters, each decoded by decode.decoded) →
`transform` per sample (the recipe's chain up to normalisation) → `normalized` for the batch.

Pixel ops. Frames are uint8 channels-last `(F, H, W, C)` (an image is one frame) until
normalisation, as in the DALI graph, so each op here mirrors one DALI op and uses its
conventions:
- `resample` is DALI's `fn.resize` with a region of interest: one resampling of a
  (fractional, possibly mirrored) box to the output size, antialiased when shrinking with the
  filter stretched by the scale — done by Pillow, torchvision's backend for the official crops,
  whose arithmetic DALI's matches to within a level;
- the RandAugment ops take randaug.arguments (the same values and warp matrices as the DALI
  graph) and compute what PIL / DALI auto_aug compute: enhance ops blend with their degenerate
  image (PIL), equalize is OpenCV's (DALI), statistics are per frame, warps fill with 128.
"""
from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from s4d_dist import seeds
from s4d_dist.pixels import normalize

from . import randaug
from .decode import decoded
from .plan import Plan, Request
from .recipes import Recipe, SampleParams, full_frame


def transform(recipe: Recipe, frames: torch.Tensor, params: SampleParams) -> torch.Tensor:
    """Decoded frames → uint8 (copies, F, S, S, 3), the recipe's chain up to normalisation
    (recipes.py)."""
    size = (recipe.size, recipe.size)
    if recipe.kind == "finetune" and recipe.modality == "video":
        height, width = frames.shape[1:3]
        x = resample(frames, full_frame(height, width), tuple(params.pre_size), "linear")
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

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.known_bad: set[int] = set()  # per process: each worker learns on its own

    def __getitem__(self, request: Request) -> dict[str, Any]:
        with _single_thread():
            batch = self.plan.batch(request, decoded, self.known_bad)
            recipe = self.plan.recipe
            frames = torch.stack([transform(recipe, s.payload, s.params) for s in batch.slots])
            generator = seeds.erase_noise(request, self.plan.rank)
            pixels = normalized(recipe, frames, batch.slots, generator)
        return {"pixels": pixels, **batch.fields()}


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

    def __init__(self, plan: Plan, workers: int, prefetch: int) -> None:
        self.requests = _Requests()
        extra = {}
        if workers > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # workers fork with torch and this module loaded
            extra = dict(persistent_workers=True, prefetch_factor=max(prefetch, 1), multiprocessing_context=context)
        # A generator of its own (seeds.dataloader says why).
        self.loader = torch.utils.data.DataLoader(
            BatchDataset(plan), sampler=self.requests, batch_size=None, num_workers=workers,
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


# ---- pixel ops --------------------------------------------------------------------------

_FILTERS = {"linear": Image.BILINEAR, "cubic": Image.BICUBIC}


def resample(frames: torch.Tensor, roi: np.ndarray, out_hw: tuple[int, int], kernel: str) -> torch.Tensor:
    """uint8 (F, H, W, C) → uint8 (F, h, w, C): the box `roi` = (y0, x0, y1, x1) resampled.

    Pillow's `resize(box=...)` is exactly this operation (fractional box, filter stretched by
    the scale when shrinking, window clipped to the frame), in C: 5-10× faster here than the
    same resampling as two dense matrix products in torch, and the very kernel the official
    torchvision transforms ran on PIL images. A mirrored box is resized then flipped."""
    y0, x0, y1, x1 = (float(v) for v in roi)
    _, height, width, _ = frames.shape
    box = (max(min(x0, x1), 0.0), max(min(y0, y1), 0.0), min(max(x0, x1), width), min(max(y0, y1), height))
    out = np.empty((len(frames), out_hw[0], out_hw[1], frames.shape[3]), np.uint8)
    for i, frame in enumerate(frames.numpy()):
        image = Image.fromarray(frame).resize((out_hw[1], out_hw[0]), _FILTERS[kernel], box=box)
        if x0 > x1:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if y0 > y1:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        out[i] = np.asarray(image)
    return torch.from_numpy(out)


def erase_constant(frames: torch.Tensor, box: np.ndarray, value: int = 0) -> torch.Tensor:
    """Fill (top, left, h, w) of every frame with `value` (uint8, before normalisation)."""
    top, left, h, w = (int(v) for v in box)
    if h:
        frames = frames.clone()
        frames[:, top:top + h, left:left + w, :] = value
    return frames


def erase_noise_(pixels: torch.Tensor, box: np.ndarray, generator: torch.Generator) -> None:
    """timm RandomErasing mode "pixel" after normalisation, in place: N(0, 1) values in the
    box, the same box on every frame (cube), fresh noise per frame. pixels: (C, T, H, W)."""
    top, left, h, w = (int(v) for v in box)
    if h:
        region = pixels[..., top:top + h, left:left + w]
        region.copy_(torch.randn(region.shape, generator=generator))


# ------------------------------------------------------------------------------- RandAugment
def _affine(frames: torch.Tensor, inverse: np.ndarray) -> torch.Tensor:
    """Warp with a 2×3 matrix mapping output pixel coordinates (x, y; edges) to input ones;
    outside the frame reads randaug.FILL."""
    _, height, width, _ = frames.shape
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    m = torch.tensor(inverse, dtype=torch.float32)
    src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    grid = torch.stack([src_x / width * 2 - 1, src_y / height * 2 - 1], dim=-1)
    grid = grid.expand(frames.shape[0], height, width, 2)
    x = frames.permute(0, 3, 1, 2).float()
    ones = torch.ones_like(x[:, :1])
    warped = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    out = warped[:, :-1] + randaug.FILL * (1 - warped[:, -1:])
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _blend(frames: torch.Tensor, degenerate: torch.Tensor, factor: float) -> torch.Tensor:
    """degenerate + factor · (frames − degenerate), as PIL's ImageEnhance."""
    x = frames.float()
    return _to_uint8(degenerate + factor * (x - degenerate))


_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _contrast(frames: torch.Tensor, factor: float) -> torch.Tensor:
    centre = (frames.float().mean(dim=(1, 2), keepdim=True) * _LUMA).sum(-1, keepdim=True)
    return _blend(frames, centre, factor)


def _color(frames: torch.Tensor, factor: float) -> torch.Tensor:
    gray = (frames.float() * _LUMA).sum(-1, keepdim=True)
    return _blend(frames, gray, factor)


_SMOOTH = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13


def _sharpness(frames: torch.Tensor, factor: float) -> torch.Tensor:
    x = frames.permute(0, 3, 1, 2).float()
    channels = x.shape[1]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    smooth = F.conv2d(padded, _SMOOTH.expand(channels, 1, 3, 3), groups=channels)
    return _blend(frames, smooth.permute(0, 2, 3, 1), factor)


def _equalize(frames: torch.Tensor) -> torch.Tensor:
    """Per frame and channel histogram equalisation, OpenCV's formula (as DALI)."""
    f, h, w, c = frames.shape
    planes = frames.permute(0, 3, 1, 2).reshape(f * c, h * w).long()
    hist = torch.zeros(f * c, 256, dtype=torch.long).scatter_add_(1, planes, torch.ones_like(planes))
    cdf = hist.cumsum(1)
    first = torch.gather(hist, 1, (hist > 0).long().argmax(1, keepdim=True))
    denominator = (h * w - first).clamp(min=1)
    lut = ((cdf - first).clamp(min=0).double() * 255 / denominator).round().clamp(0, 255)
    constant = (first == h * w)
    lut = torch.where(constant, torch.arange(256).double().expand_as(lut), lut).to(torch.uint8)
    out = torch.gather(lut, 1, planes)
    return out.reshape(f, c, h, w).permute(0, 2, 3, 1).contiguous()


def _auto_contrast(frames: torch.Tensor) -> torch.Tensor:
    x = frames.float()
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255 / (hi - lo).clamp(min=1), torch.ones_like(hi))
    return _to_uint8((x - torch.where(hi > lo, lo, torch.zeros_like(lo))) * scale)


def _rand_augment_op(frames: torch.Tensor, name: str, value: float, matrix: np.ndarray) -> torch.Tensor:
    if name in randaug.GEOMETRIC:
        return _affine(frames, matrix)
    if name == "identity":
        return frames
    if name == "auto_contrast":
        return _auto_contrast(frames)
    if name == "equalize":
        return _equalize(frames)
    if name == "invert":
        return 255 - frames
    if name == "posterize":
        return frames & int(value)
    if name == "solarize":
        return torch.where(frames < value, frames, 255 - frames)
    if name == "solarize_add":
        return torch.where(frames < 128, (frames.int() + int(value)).clamp(max=255).to(torch.uint8), frames)
    if name == "brightness":
        return _to_uint8(frames.float() * value)
    if name == "contrast":
        return _contrast(frames, value)
    if name == "color":
        return _color(frames, value)
    if name == "sharpness":
        return _sharpness(frames, value)
    raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment(frames: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Apply drawn RandAugment rows (op, magnitude bin, sign) to uint8 (F, H, W, C) frames."""
    ops, values, matrices = randaug.arguments(rows, frames.shape[1], frames.shape[2])
    for op, value, matrix in zip(ops.tolist(), values.tolist(), matrices):
        frames = _rand_augment_op(frames, randaug.OPS[op], value, matrix)
    return frames
