"""The pixel work of a recipe (recipes.py) on decoded uint8 frames, as torch ops on any device.

Both runners hand decoded frames here — DALI's (nvJPEG on the GPU, or its CPU decoder) and the
torch fallback's (Pillow / PyAV) — so for a given plan the two backends crop, resize, flip,
augment and normalise with the same code; `predict` uses it for its test views too. Frames are
uint8 channels-last `(F, H, W, C)` (an image is one frame) until normalisation.

- `resample` is one resampling of a (fractional, possibly mirrored) box to the output size,
  antialiased when shrinking with the filter stretched by the scale: Pillow's
  `resize(box=...)` coefficients (torchvision's backend for the official crops), computed as
  a separable product on the device, then rounded to uint8 like Pillow's output;
- `pretrain_clips` is the pre-training clip chain for a whole batch at once: all frames
  resized in one op, every video's repeated boxes cut from them as views and resized straight
  into the batch, ImageNet normalisation in the one pass that makes the float32 batch, on the
  device;
- the RandAugment ops take randaug.arguments (the values and warp matrices the DALI image graph
  takes too) and compute what PIL / DALI auto_aug compute: enhance ops blend with their
  degenerate image (PIL), equalize is OpenCV's (DALI), statistics are per frame, warps fill
  with 128.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from s4d_dist.pixels import IMAGENET_MEAN, IMAGENET_STD

from . import randaug
from .recipes import Recipe, SampleParams, full_frame

# ---- resampling ---------------------------------------------------------------------------

_SUPPORT = {"linear": 1.0, "cubic": 2.0}


def _filter(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """Pillow's bilinear (triangle) and bicubic (a = -0.5) filters."""
    x = x.abs()
    if kernel == "linear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def axis_weights(lo: torch.Tensor, hi: torch.Tensor, in_size: int, out_size: int, kernel: str,
                 antialias: bool = True) -> torch.Tensor:
    """(..., out_size, in_size) float64 weights resampling [lo, hi) of an axis of `in_size`
    pixels to `out_size` (Pillow's precompute_coeffs: the filter stretched by the scale when
    shrinking unless `antialias` is off, taps clipped to the axis and renormalised). lo > hi
    reads the box mirrored."""
    lo, hi = lo.double(), hi.double()
    first, last = torch.minimum(lo, hi).clamp(min=0), torch.maximum(lo, hi).clamp(max=in_size)
    scale = ((last - first) / out_size)[..., None]
    stretch = scale.clamp(min=1.0) if antialias else torch.ones_like(scale)
    support = _SUPPORT[kernel] * stretch
    centre = first[..., None] + (torch.arange(out_size, dtype=torch.float64, device=lo.device) + 0.5) * scale
    lowest = torch.trunc(centre - support + 0.5).clamp(min=0)
    highest = torch.trunc(centre + support + 0.5).clamp(max=in_size)
    x = torch.arange(in_size, dtype=torch.float64, device=lo.device)
    inside = (x >= lowest[..., None]) & (x < highest[..., None])
    weights = _filter((x - centre[..., None] + 0.5) / stretch[..., None], kernel) * inside
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    mirrored = (lo > hi)[..., None, None]
    return torch.where(mirrored, weights.flip(-2), weights)


def resample(frames: torch.Tensor, roi: np.ndarray, out_hw: tuple[int, int], kernel: str,
             antialias: bool = True) -> torch.Tensor:
    """uint8 (F, H, W, C) → uint8 (F, h, w, C): the box `roi` = (y0, x0, y1, x1) resampled
    (mirrored when y0 > y1 or x0 > x1), on the frames' device."""
    _, height, width, _ = frames.shape
    y0, x0, y1, x1 = (float(v) for v in roi)
    box = torch.tensor([[y0, y1], [x0, x1]], dtype=torch.float64, device=frames.device)
    wy = axis_weights(box[0, 0], box[0, 1], height, out_hw[0], kernel, antialias).float()
    wx = axis_weights(box[1, 0], box[1, 1], width, out_hw[1], kernel, antialias).float()
    x = torch.einsum("fhwc,sw->fhsc", frames.float(), wx).round_().clamp_(0, 255)  # Pillow: 8 bits between passes
    x = torch.einsum("fhsc,rh->frsc", x, wy)
    return x.round_().clamp_(0, 255).to(torch.uint8)


@functools.cache
def _scaled_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 → normalised float as x · scale − shift, per channel; made once per device (a copy
    to a GPU would wait for the work queued before it)."""
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        return (1 / (255 * std)).float().to(device), (mean / std).float().to(device)


def pretrain_clips(frames: torch.Tensor, region: np.ndarray, pre_size: tuple[int, int], boxes: np.ndarray,
                   size: int) -> torch.Tensor:
    """Pre-training clips of a whole batch: uint8 (V, F, H, W, C) frames, the integer `region`
    (y0, x0, y1, x1) of every frame resized to `pre_size` (bilinear, no antialiasing: the
    official ShortSideScale), then (V, R, 4) integer boxes on the resized frames, each resized
    to `size` (bilinear, antialiased when shrinking) → normalised float (V·R, C, F, size,
    size), copy r of video v at row v·R + r, in channels-last memory (channels fastest).

    The first resampling is one op over all frames; the crops are views of it, each resized
    and written into the batch. On the CPU both run in uint8 (torch's vectorised channels-last
    kernels); on a GPU in float32 (its kernels take no uint8). One in-place pass normalises."""
    videos, num_frames, _, _, channels = frames.shape
    copies = boxes.shape[1]
    cpu = frames.device.type == "cpu"
    y0, x0, y1, x1 = (int(v) for v in region)
    x = frames[:, :, y0:y1, x0:x1].flatten(0, 1).permute(0, 3, 1, 2)  # (V·F, C, h, w), channels last
    with one_thread(cpu):
        x = F.interpolate(x if cpu else x.float(), size=tuple(int(v) for v in pre_size), mode="bilinear",
                          align_corners=False, antialias=False)
        pixels = _batch_buffer((videos, copies, num_frames, size, size, channels), frames.device)
        scale, shift = _scaled_constants(frames.device)
        scale, shift = scale.repeat(size), -shift.repeat(size)  # per row of a frame: long rows vectorise
        for v in range(videos):
            clip = x[v * num_frames:(v + 1) * num_frames]
            for r, (top, left, bottom, right) in enumerate(boxes[v].astype(np.int64).tolist()):
                crop = F.interpolate(clip[:, :, top:bottom, left:right], size=(size, size), mode="bilinear",
                                     align_corners=False, antialias=True)
                out = pixels[v, r]
                out.copy_(crop.permute(0, 2, 3, 1))
                rows = out.view(-1, size * channels)  # normalised while the copy is still in cache
                torch.addcmul(shift, rows, scale, out=rows)
    return pixels.flatten(0, 1).permute(0, 4, 1, 2, 3)


_BUFFERS: list[torch.Tensor] = []
_KEPT = 3


def _batch_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float32 tensor for a batch's pixels. On the CPU one that an earlier batch used is
    handed out again once nothing else holds it (its storage has no other user): a fresh
    allocation this large is zero-filled page by page on first write, which costs more than
    computing the batch. Batches still held elsewhere are never reused."""
    if device.type != "cpu":
        return torch.empty(shape, device=device)
    for buffer in _BUFFERS:
        if buffer.shape == shape and torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2:
            return buffer.view(shape)  # a tensor of its own: while the caller holds it, the count says so
    buffer = torch.empty(shape)
    _BUFFERS.append(buffer)
    del _BUFFERS[:-_KEPT]
    return buffer.view(shape)


@contextlib.contextmanager
def one_thread(cpu: bool = True) -> Iterator[None]:
    """One intra-op thread for the CPU work of a batch: its ops are many and small (a clip's
    crop, a frame's resample), and waking a thread pool for each costs more than the op when
    the cores are busy (DALI's decoder threads, DataLoader workers, the training step)."""
    if not cpu:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- a batch, one sample's chain, and the batch's normalisation ---------------------------

def augment(recipe: Recipe, frames: torch.Tensor | list[torch.Tensor], slots: list,
            generator: torch.Generator) -> torch.Tensor:
    """Decoded uint8 frames of a batch's slots on the device — (B, F, H, W, 3), or a list of
    (F, H, W, 3) — → normalised float (B, copies, 3, [F,] S, S). Pre-training clips of one frame
    size go through `pretrain_clips` as one batch; everything else sample by sample."""
    with one_thread((frames[0] if isinstance(frames, list) else frames).device.type == "cpu"):
        return _augment(recipe, frames, slots, generator)


def _augment(recipe: Recipe, frames: torch.Tensor | list[torch.Tensor], slots: list,
             generator: torch.Generator) -> torch.Tensor:
    if isinstance(frames, list) and len({tuple(f.shape) for f in frames}) == 1:
        frames = torch.stack(frames)
    if (recipe.kind, recipe.modality) == ("pretrain", "video") and isinstance(frames, torch.Tensor):
        firsts = {(tuple(s.params.region.tolist()), tuple(s.params.pre_size.tolist())) for s in slots}
        if len(firsts) == 1:  # one first resampling for all: the batched chain
            (region, pre_size), = firsts
            boxes = np.stack([slot.params.rois for slot in slots])
            out = pretrain_clips(frames, np.array(region), pre_size, boxes, recipe.size)
            return out.unflatten(0, (len(slots), recipe.copies))
    return normalized(recipe, torch.stack([transform(recipe, f, s.params) for f, s in zip(frames, slots)]),
                      slots, generator)



def transform(recipe: Recipe, frames: torch.Tensor, params: SampleParams) -> torch.Tensor:
    """Decoded frames → uint8 (copies, F, S, S, 3), the recipe's chain up to normalisation
    (recipes.py)."""
    size = (recipe.size, recipe.size)
    if recipe.kind == "pretrain" and recipe.modality == "video":  # pretrain_clips, one sample
        y0, x0, y1, x1 = params.region.astype(np.int64).tolist()
        x = resample(frames[:, y0:y1, x0:x1], full_frame(y1 - y0, x1 - x0), tuple(params.pre_size), "linear",
                     antialias=False)
        crops = [x[:, top:bottom, left:right] for top, left, bottom, right in params.rois.astype(np.int64).tolist()]
        return torch.stack([resample(c, full_frame(*c.shape[1:3]), size, "linear") for c in crops])
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
    scale, shift = _scaled_constants(frames.device)
    x = frames.movedim(-1, 2).float()
    x = x.mul_(scale.view(-1, 1, 1, 1)).sub_(shift.view(-1, 1, 1, 1))
    if recipe.modality == "image":
        return x[:, :, :, 0]
    if recipe.kind == "finetune":
        for i, slot in enumerate(slots):
            erase_noise_(x[i, 0], slot.params.erase, generator)
    return x


def erase_constant(frames: torch.Tensor, box: np.ndarray, value: int = 0) -> torch.Tensor:
    """Fill (top, left, h, w) of every frame with `value` (uint8, before normalisation)."""
    top, left, h, w = (int(v) for v in box)
    if h:
        frames = frames.clone()
        frames[:, top:top + h, left:left + w, :] = value
    return frames


def erase_noise_(pixels: torch.Tensor, box: np.ndarray, generator: torch.Generator) -> None:
    """timm RandomErasing mode "pixel" after normalisation, in place: N(0, 1) values in the
    box, the same box on every frame (cube), fresh noise per frame. pixels: (C, T, H, W). The
    noise is drawn on the CPU (the generator's device), so every device gets the same."""
    top, left, h, w = (int(v) for v in box)
    if h:
        region = pixels[..., top:top + h, left:left + w]
        region.copy_(torch.randn(region.shape, generator=generator))


# ------------------------------------------------------------------------------- RandAugment
def _affine(frames: torch.Tensor, inverse: np.ndarray) -> torch.Tensor:
    """Warp with a 2×3 matrix mapping output pixel coordinates (x, y; edges) to input ones;
    outside the frame reads randaug.FILL."""
    _, height, width, _ = frames.shape
    device = frames.device
    ys, xs = torch.meshgrid(torch.arange(height, device=device) + 0.5, torch.arange(width, device=device) + 0.5,
                            indexing="ij")
    m = torch.tensor(inverse, dtype=torch.float32, device=device)
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


_LUMA = (0.299, 0.587, 0.114)


def _luma(frames: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_LUMA, device=frames.device)


def _contrast(frames: torch.Tensor, factor: float) -> torch.Tensor:
    centre = (frames.float().mean(dim=(1, 2), keepdim=True) * _luma(frames)).sum(-1, keepdim=True)
    return _blend(frames, centre, factor)


def _color(frames: torch.Tensor, factor: float) -> torch.Tensor:
    gray = (frames.float() * _luma(frames)).sum(-1, keepdim=True)
    return _blend(frames, gray, factor)


_SMOOTH = ((1.0, 1, 1), (1, 5, 1), (1, 1, 1))


def _sharpness(frames: torch.Tensor, factor: float) -> torch.Tensor:
    x = frames.permute(0, 3, 1, 2).float()
    channels = x.shape[1]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    kernel = torch.tensor(_SMOOTH, device=frames.device) / 13
    smooth = F.conv2d(padded, kernel.expand(channels, 1, 3, 3), groups=channels)
    return _blend(frames, smooth.permute(0, 2, 3, 1), factor)


def _equalize(frames: torch.Tensor) -> torch.Tensor:
    """Per frame and channel histogram equalisation, OpenCV's formula (as DALI)."""
    f, h, w, c = frames.shape
    device = frames.device
    planes = frames.permute(0, 3, 1, 2).reshape(f * c, h * w).long()
    hist = torch.zeros(f * c, 256, dtype=torch.long, device=device).scatter_add_(1, planes, torch.ones_like(planes))
    cdf = hist.cumsum(1)
    first = torch.gather(hist, 1, (hist > 0).long().argmax(1, keepdim=True))
    denominator = (h * w - first).clamp(min=1)
    lut = ((cdf - first).clamp(min=0).double() * 255 / denominator).round().clamp(0, 255)
    constant = (first == h * w)
    lut = torch.where(constant, torch.arange(256, device=device).double().expand_as(lut), lut).to(torch.uint8)
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
