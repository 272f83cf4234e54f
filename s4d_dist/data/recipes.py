"""What happens to one sample, per phase and modality, and the random draws it needs.

A recipe is the backend-neutral description of a transform chain; `sample_params` /
`view_params` draw everything random about one sample (frames, boxes, flips, RandAugment ops,
erasing) in numpy, and `batch_params` draws the pre-training parameters of a whole batch as
arrays (one generator, no per-sample Python). The DALI graph (dali_backend.py) and pixel_ops.py
(frame storage on both backends, everything on the torch fallback) apply the same chain with
those parameters, so for a given seed both backends crop, flip and augment the same samples the
same way; the DALI graph differs only in resampling arithmetic, the RandAugment pixel kernels
and the erasing noise.

The chains (docs/method.md §1.8, §2.10, §2.11; "≡" marks where one resampling replaces two
official steps, which is the same sampling grid without the intermediate rounding):

pretrain image   decode → RandomResizedCrop(S, scale .2–1, bicubic) + hflip ≡ one ROI resize
                 → normalize
pretrain video   decode frames (pretrain_indices) → [data.video_source_crop: the fixed crop the
                 official loader cuts from VoxCeleb2's 224² frames, rows 0:160 × cols 32:192]
                 → ShortSideScale(1.2·S) (bilinear, no antialiasing, once per frame) → for each
                 of `repeats` copies: RandomResizedCrop(S, scale .08–1, bilinear, one integer box
                 for all frames); no flip → normalize — the official's two resamplings, so the
                 copies share the first. Copies get independent boxes (and, from the loader,
                 independent masks): repeated augmentation (§1.6)
finetune image   decode → Resize(1.2·S) → RandomCrop(S) + hflip ≡ one ROI resize → RandAugment
                 (rand-m9-n2-mstd0.5-inc1) → RandomErasing(p .25, value 0, before normalize)
                 → normalize
finetune video   decode frames (finetune_indices) → Resize(S) → RandAugment (rand-m7-n4-mstd0.5-
                 inc1, same ops for all frames) → RandomResizedCrop(S, scale .08–1) + hflip, one
                 box for all frames → normalize → RandomErasing(p .25, "pixel": N(0,1) noise,
                 same box on all frames)
eval             decode frames of temporal view t (eval_view_indices) → short side to
                 eval_short_side → crop c (eval_crop) ≡ one ROI resize → normalize

S = model.img_size (160; 64 in the demo). Official quirks, each on its switch: fine-tuning
frames squashed to S×S instead of keeping their aspect ratio (`official.squash_train_frames`,
§3.11); test frames squashed likewise, which makes the test crops identical
(`official.squash_test_frames`, §3.9).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import math

import numpy as np

from . import randaug

Kind = Literal["pretrain", "finetune", "eval"]
Modality = Literal["image", "video"]

IMAGE_ERASE_SCALE = (0.02, 0.33)   # S/sfer: RandomErasing(scale=(0.02, 0.33))
VIDEO_ERASE_SCALE = (0.02, 1 / 3)  # timm RandomErasing defaults (kinetics.py)


@dataclass(frozen=True)
class SampleParams:
    """Everything random about one sample. `rois` holds one (y0, x0, y1, x1) box per output
    copy, in the pixels of the frame it is cut from (the decoded frame, or the pre-resized one
    for fine-tuning videos); `erase` is (top, left, h, w) on the output, h = 0 for none."""

    rois: np.ndarray                       # (copies, 4) float32
    frames: np.ndarray | None = None    # (T,) int64, videos
    pre_size: np.ndarray | None = None  # (2,) int64 (h, w) the frame is resized to first, videos
    region: np.ndarray | None = None    # (4,) float32 box of the decoded frame resized to pre_size (pre-training)
    ops: np.ndarray | None = None       # (n, 3) int32 RandAugment rows, fine-tuning
    erase: np.ndarray | None = None     # (4,) int64, fine-tuning


@dataclass(frozen=True)
class Recipe:
    """A transform chain, fixed for a loader (see the module docstring)."""

    kind: Kind
    modality: Modality
    size: int
    num_frames: int = 1
    stride: int = 1
    repeats: int = 1
    resize_ratio: float = 1.2
    rand_augment: randaug.RandAugmentSpec | None = None
    erase_prob: float = 0.0
    eval_short_side: int = 0
    temporal_views: int = 1
    spatial_crops: int = 1
    squash: bool = False
    source_crop: tuple[int, int, int, int] | None = None  # pre-training clips: fixed (y0, x0, y1, x1) first
    source_frame: tuple[int, int] | None = None  # the (height, width) source_crop is meant for
    # RandomResizedCrop area ranges. Official: (0.2, 1) for pre-training images (CFG
    # RandomResizedCrop(scale=[0.2, 1.0], interpolation=3)); torchvision's default (0.08, 1) for
    # both video recipes.
    image_crop_scale: tuple[float, float] = (0.2, 1.0)
    video_crop_scale: tuple[float, float] = (0.08, 1.0)

    @property
    def interp(self) -> str:
        """bicubic for pre-training images (CFG interpolation=3), bilinear everywhere else."""
        return "cubic" if (self.kind, self.modality) == ("pretrain", "image") else "linear"

    @property
    def copies(self) -> int:
        return self.repeats if (self.kind, self.modality) == ("pretrain", "video") else 1

    @property
    def views(self) -> int:
        """Rows per sample in evaluation."""
        return self.temporal_views * self.spatial_crops if self.modality == "video" else 1

    def _resized(self, height: int, width: int, short: int) -> tuple[int, int]:
        return (short, short) if self.squash else short_side_size(height, width, short)

    def sample_params(self, meta: dict, rng: np.random.Generator) -> SampleParams:
        """The random draws of one training sample, from its stored height/width/frames."""
        height, width = int(meta["height"]), int(meta["width"])
        if self.kind == "pretrain":
            table = np.array([[int(meta.get("frames", 1)), height, width]])
            return self.batch_params(table, rng, lambda _: meta.get("clip", "?"))[0]
        if self.kind == "finetune":
            return self._finetune(height, width, meta, rng)
        raise ValueError(f"{self.kind} samples have views, not random parameters")

    def _erase(self, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
        box = erase_box(self.size, self.size, rng, scale) if rng.random() < self.erase_prob else None
        return np.array(box or (0, 0, 0, 0), np.int64)

    def _finetune(self, height: int, width: int, meta: dict, rng: np.random.Generator) -> SampleParams:
        if self.modality == "image":
            resized = self._resized(height, width, round(self.resize_ratio * self.size))
            crop = scaled(random_crop(*resized, self.size, rng), resized, (height, width))
            roi = mirrored(crop, rng.random() < 0.5)
            ops = randaug.draw(self.rand_augment, rng)
            return SampleParams(np.array([roi], np.float32), ops=ops, erase=self._erase(rng, IMAGE_ERASE_SCALE))
        index = finetune_indices(int(meta["frames"]), self.num_frames, self.stride, rng)
        pre = self._resized(height, width, self.size)
        ops = randaug.draw(self.rand_augment, rng)
        roi = mirrored(random_resized_crop(*pre, self.video_crop_scale, rng), rng.random() < 0.5)
        return SampleParams(np.array([roi], np.float32), frames=index, pre_size=np.array(pre, np.int64),
                            ops=ops, erase=self._erase(rng, VIDEO_ERASE_SCALE))

    def batch_params(self, table: np.ndarray, rng: np.random.Generator,
                     name: Callable[[int], str] | None = None) -> list[SampleParams]:
        """Pre-training parameters of len(table) samples, row i from row i of `table` (frames,
        height, width) and row i of every array drawn from `rng`: the draws have the same
        shapes whatever the samples, so a row's parameters depend on its position alone. The
        same rules as `sample_params` (torchvision's RandomResizedCrop tries, the official
        window), each vectorised over the batch. `name(i)` (row i's clip key, asked only on error) names a clip that the
        source crop does not fit."""
        if self.kind != "pretrain":
            raise ValueError(f"{self.kind} samples draw one at a time (sample_params / view_params)")
        count = len(table)
        frames, height, width = (table[:, i].astype(np.int64) for i in range(3))
        if self.modality == "image":
            boxes = random_resized_crops(height[:, None], width[:, None], self.image_crop_scale, rng, 1)[:, 0]
            flip = rng.random(count) < 0.5
            boxes[flip] = boxes[flip][:, [0, 3, 2, 1]]
            return [SampleParams(box[None]) for box in boxes.astype(np.float32)]
        window = self.num_frames * self.stride
        start = np.where(frames >= window, np.floor(rng.random(count) * (frames - window + 1)), 0).astype(np.int64)
        reachable = start + (frames - 1 - start) // self.stride * self.stride
        index = np.minimum(start[:, None] + self.stride * np.arange(self.num_frames), reachable[:, None])
        if self.source_crop:
            top, left, bottom, right = self.source_crop
            wrong = (height != self.source_frame[0]) | (width != self.source_frame[1]) if self.source_frame else \
                (bottom > height) | (right > width)
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                what = (f"is cut from {self.source_frame[0]}×{self.source_frame[1]} frames" if self.source_frame
                        else "exceeds them")
                clip = f"clip {name(i)}" if name is not None else "a clip"
                raise ValueError(f"data.video_source_crop {list(self.source_crop)} {what}, but {clip} is "
                                 f"{int(height[i])}×{int(width[i])}: set data.video_source_crop=[] for shards at "
                                 "another frame size (or stored already cut)")
            region = np.tile(np.array(self.source_crop, np.float64), (count, 1))
        else:
            region = np.stack([np.zeros(count), np.zeros(count), height, width], axis=1).astype(np.float64)
        region_h, region_w = region[:, 2] - region[:, 0], region[:, 3] - region[:, 1]
        short = round(self.resize_ratio * self.size)
        wide = region_w >= region_h
        resized_h = np.where(wide, short, np.floor(region_h / region_w * short)).astype(np.int64)
        resized_w = np.where(wide, np.floor(region_w / region_h * short), short).astype(np.int64)
        boxes = random_resized_crops(resized_h[:, None], resized_w[:, None], self.video_crop_scale, rng, self.repeats)
        return [SampleParams(b.astype(np.float32), frames=i, pre_size=np.array([h, w], np.int64),
                             region=r.astype(np.float32))
                for b, i, h, w, r in zip(boxes, index, resized_h, resized_w, region)]

    def view_params(self, meta: dict, view: int) -> SampleParams:
        """Evaluation view `view` (temporal view · spatial_crops + crop) of one sample."""
        height, width = int(meta["height"]), int(meta["width"])
        temporal, crop = divmod(view, self.spatial_crops if self.modality == "video" else 1)
        short = self.eval_short_side or self.size
        if self.squash:
            roi = full_frame(height, width)
        else:
            roi = eval_crop(height, width, short, self.size, crop,
                                  self.spatial_crops if self.modality == "video" else 1)
        index = None
        if self.modality == "video":
            index = eval_view_indices(int(meta["frames"]), self.num_frames, self.stride,
                                             self.temporal_views)[temporal]
        return SampleParams(np.array([roi], np.float32), frames=index)


def recipe_from_config(cfg, kind: Kind, modality: Modality) -> Recipe:
    """The recipe of a loader from the run config (model sizes, data and augment sections)."""
    m, d, a = cfg.model, cfg.data, cfg.augment
    if d.eval_short_side and d.eval_short_side < m.img_size:
        raise ValueError(f"data.eval_short_side {d.eval_short_side} must be 0 or at least model.img_size "
                         f"{m.img_size} (the test crops are img_size squares)")
    rand_augment = None
    if kind == "finetune":
        rand_augment = randaug.parse(a.video_rand_augment if modality == "video" else a.image_rand_augment)
    return Recipe(
        kind=kind, modality=modality, size=m.img_size,
        num_frames=m.num_frames if modality == "video" else 1,
        stride=d.sampling_rate, repeats=d.video_repeats if kind == "pretrain" else 1,
        resize_ratio=d.resize_ratio, rand_augment=rand_augment,
        erase_prob=a.erase_prob if kind == "finetune" else 0.0,
        eval_short_side=d.eval_short_side, temporal_views=d.test_temporal_views,
        spatial_crops=d.test_spatial_crops,
        squash=cfg.official.squash_test_frames if kind == "eval" else cfg.official.squash_train_frames,
        source_crop=tuple(d.video_source_crop) if d.video_source_crop and kind == "pretrain" else None,
        source_frame=tuple(d.video_source_frame) if d.video_source_crop and kind == "pretrain" else None,
        image_crop_scale=tuple(a.image_crop_scale), video_crop_scale=tuple(a.video_crop_scale),
    )


# ---- frames: Which frames of a clip a sample uses: the official temporal sampling rules as pure functions.
#
#
# Both backends (DALI and the torch fallback) call these, so a clip yields the same frame indices
# whichever decodes it. Indices are relative to the stored sample: a long video is stored in
# chunks (shards/media.py), a sample is one chunk, and sampling never leaves it.

def pretrain_indices(n_frames: int, num_frames: int, stride: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Pre-training window (docs/method.md §1.8; official path_dataset.py): `num_frames` frames
    `stride` apart.

    A clip of at least one window (num_frames · stride frames) starts uniformly in
    {0 .. n − window}; a shorter clip starts at 0 and repeats its last frame on the stride grid
    (the last *reachable* frame, not the last frame) to fill the window.

    The official loader (1-based offsets, `offset + step < duration`) stops one stride early
    when the clip's last frame is itself on the grid (n − 1 divisible by the stride); here that
    frame is reachable, as the rule intends.
    """
    window = num_frames * stride
    start = int(rng.integers(0, n_frames - window + 1)) if n_frames >= window else 0
    last_reachable = start + ((n_frames - 1 - start) // stride) * stride
    return np.minimum(start + stride * np.arange(num_frames), last_reachable).astype(np.int64)


def finetune_indices(n_frames: int, num_frames: int, stride: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Fine-tuning training window (docs/method.md §2.10; official kinetics.py `loadvideo_decord`,
    one segment).

    With W = num_frames · stride: a clip longer than W takes `num_frames` points of
    linspace(end − W, end) for end uniform in {W .. n − 1} (spacing W/(num_frames−1), so about
    4.27 for stride 4, not 4), truncated to integers and clipped to end − 1. A clip of at most W
    frames takes linspace(0, n, n // stride) padded with n to num_frames, clipped to n − 1: the
    whole clip, then its last frame repeated.
    """
    window = num_frames * stride
    if n_frames > window:
        end = int(rng.integers(window, n_frames))
        index = np.linspace(end - window, end, num=num_frames)
        return np.clip(index, end - window, end - 1).astype(np.int64)
    count = n_frames // stride
    index = np.concatenate([np.linspace(0, n_frames, num=count), np.full(num_frames - count, n_frames)])
    return np.clip(index, 0, n_frames - 1).astype(np.int64)


def eval_view_indices(n_frames: int, num_frames: int, stride: int, views: int) -> np.ndarray:
    """Test-time temporal views (docs/method.md §2.11; official kinetics.py test mode):
    (views, num_frames) indices.

    Every `stride`-th frame of the clip (padded with its last to at least `num_frames`), then
    view v takes `num_frames` consecutive ones from int(v · (K − num_frames) / (views − 1)):
    for 2 views the first and the last window, {0, K − num_frames} in strided frames. One view
    takes the middle window (the official code divides by zero there).
    """
    strided = np.arange(0, n_frames, stride)
    if len(strided) < num_frames:
        strided = np.concatenate([strided, np.full(num_frames - len(strided), strided[-1])])
    spare = len(strided) - num_frames
    if views == 1:
        starts = [spare // 2]
    else:
        starts = [int(v * (spare / (views - 1))) for v in range(views)]
    return np.stack([strided[s:s + num_frames] for s in starts]).astype(np.int64)


# ---- boxes: Spatial augmentation parameters as boxes in source pixels, drawn with numpy.
#
#
# Every crop / resize / flip of a recipe becomes one region of interest (ROI) of the decoded
# frame that is resampled to the output size in a single step: `(y0, x0, y1, x1)` in source
# pixel coordinates (edges, not centres), mirrored horizontally when x0 > x1 — the convention of
# DALI's `fn.resize(roi_start, roi_end)`, which the torch fallback (pixel_ops.resample) follows.
# Drawing the boxes here, not inside DALI, gives both backends the same random crops for the
# same seed and makes them a pure function of (seed, epoch, rank, batch), so a resumed epoch
# repeats them exactly.
#
# The random draws follow torchvision / timm step by step (same loops, bounds and rounding);
# only the random number stream differs (numpy instead of Python's `random` / torch).

Roi = tuple[float, float, float, float]  # y0, x0, y1, x1


def full_frame(height: int, width: int) -> Roi:
    return (0.0, 0.0, float(height), float(width))


def mirrored(roi: Roi, flip: bool) -> Roi:
    """The same box read right to left when `flip` (a horizontal flip folded into the ROI)."""
    y0, x0, y1, x1 = roi
    return (y0, x1, y1, x0) if flip else roi


def _box_tries(area: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """The 10 tries of torchvision's RandomResizedCrop and RandomErasing: an area fraction
    uniform in `scale`, a log-uniform aspect ratio in `ratio`, drawn in that order; each try as
    (round(√(area·aspect)), round(√(area / aspect)))."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        yield int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))


def random_resized_crop(height: int, width: int, scale: tuple[float, float],
                        rng: np.random.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Roi:
    """torchvision RandomResizedCrop.get_params: up to 10 tries of an area fraction in `scale`
    and a log-uniform aspect ratio, else the largest central crop within `ratio`."""
    for w, h in _box_tries(height * width, scale, ratio, rng):
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (float(top), float(left), float(top + h), float(left + w))
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (float(top), float(left), float(top + h), float(left + w))


def random_resized_crops(height: np.ndarray, width: np.ndarray, scale: tuple[float, float],
                         rng: np.random.Generator, copies: int,
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """`random_resized_crop` for (n, 1) frame sizes, `copies` boxes each: (n, copies, 4)
    float64 boxes. All 10 tries are drawn for every box (fixed shapes), the first that fits is
    kept, its position drawn uniformly; none fitting gives the central crop."""
    count = len(height)
    tries = rng.random((2, count, copies, 10))
    position = rng.random((2, count, copies))
    area = (height * width)[..., None] * (scale[0] + (scale[1] - scale[0]) * tries[0])
    log_ratio = np.log(ratio)
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * tries[1])
    w = np.rint(np.sqrt(area * aspect))
    h = np.rint(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width[..., None]) & (h > 0) & (h <= height[..., None])
    pick = fits.argmax(-1)[..., None]
    w, h, found = np.take_along_axis(w, pick, -1)[..., 0], np.take_along_axis(h, pick, -1)[..., 0], fits.any(-1)
    top = np.floor(position[0] * (height - h + 1))
    left = np.floor(position[1] * (width - w + 1))
    in_ratio = width / height
    fallback_w = np.where(in_ratio < min(ratio), width, np.where(in_ratio > max(ratio), np.rint(height * max(ratio)), width))
    fallback_h = np.where(in_ratio < min(ratio), np.rint(width / min(ratio)), height)
    fallback_w, fallback_h = np.broadcast_to(fallback_w, w.shape), np.broadcast_to(fallback_h, h.shape)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    top = np.where(found, top, (height - h) // 2)
    left = np.where(found, left, (width - w) // 2)
    return np.stack([top, left, top + h, left + w], axis=-1).astype(np.float64)


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to `short` (pytorchvideo ShortSideScale: floor)."""
    if width < height:
        return int(math.floor(height / width * short)), short
    return short, int(math.floor(width / height * short))


def scaled(roi: Roi, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Roi:
    """A box drawn on a resized frame, mapped back onto the frame before that resize."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    y0, x0, y1, x1 = roi
    return (y0 * sy, x0 * sx, y1 * sy, x1 * sx)


def random_crop(height: int, width: int, size: int, rng: np.random.Generator) -> Roi:
    """torchvision RandomCrop(size) without padding."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return (float(top), float(left), float(top + size), float(left + size))


def erase_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float] = (0.02, 1 / 3),
              ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> tuple[int, int, int, int] | None:
    """timm / torchvision RandomErasing box (probability applied by the caller): up to 10 tries
    of an area fraction in `scale` and a log-uniform aspect ratio; (top, left, h, w) or None
    when no try fits."""
    for h, w in _box_tries(height * width, scale, ratio, rng):  # h along the aspect, as timm
        if w < width and h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def eval_crop(height: int, width: int, short: int, crop: int, index: int, crops: int) -> Roi:
    """Spatial test view `index` of `crops`: the frame scaled so its short side is `short`,
    then a `crop`-square at int(index · (L − crop) / (crops − 1)) along each axis (kinetics.py
    test mode), mapped back to source pixels.

    On a non-square frame this is the official sliding crop along the long side. The official
    code squashes frames to 160×160 first, so its crops are all the same frame
    (docs/method.md §3.9); here the aspect ratio is kept, and with short > crop the views differ
    even on square frames (corners along the diagonal). One crop is the centre crop.
    """
    h, w = (short, int(round(width * short / height))) if height <= width else \
        (int(round(height * short / width)), short)
    if crops == 1:
        top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    else:
        top, left = int(index * (h - crop) / (crops - 1)), int(index * (w - crop) / (crops - 1))
    return scaled((float(top), float(left), float(top + crop), float(left + crop)), (h, w), (height, width))
