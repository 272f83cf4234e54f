"""What happens to one sample, per phase and modality, and the random draws it needs.

A recipe is the backend-neutral description of a transform chain; `sample_params` /
`view_params` draw everything random about one sample (frames, boxes, flips, RandAugment ops,
erasing) in numpy. The DALI graph (dali_backend.py) and the torch fallback (torch_backend.py)
apply the same chain with those parameters, so for a given seed both backends crop, flip and
augment the same samples the same way; they differ only in resampling arithmetic, the
RandAugment pixel kernels and the erasing noise.

The chains (docs/method.md §1.8, §2.10, §2.11; "≡" marks where one resampling replaces two
official steps, which is the same sampling grid without the intermediate rounding):

pretrain image   decode → RandomResizedCrop(S, scale .2–1, bicubic) + hflip ≡ one ROI resize
                 → normalize
pretrain video   decode frames (pretrain_indices) → [data.video_source_crop: the fixed crop the
                 official loader cuts from VoxCeleb2's 224² frames, rows 0:160 × cols 32:192]
                 → for each of `repeats` copies:
                 ShortSideScale(1.2·S) → RandomResizedCrop(S, scale .08–1, bilinear, one box for
                 all frames) ≡ one ROI resize; no flip → normalize. Copies get independent
                 boxes (and, from the loader, independent masks): repeated augmentation (§1.6)
finetune image   decode → Resize(1.2·S) → RandomCrop(S) + hflip ≡ one ROI resize → RandAugment
                 (rand-m9-n2-mstd0.5-inc1) → RandomErasing(p .25, value 0, before normalize)
                 → normalize
finetune video   decode frames (finetune_indices) → Resize(S) → RandAugment (rand-m7-n4-mstd0.5-
                 inc1, same ops for all frames) → RandomResizedCrop(S, scale .08–1) + hflip, one
                 box for all frames → normalize → RandomErasing(p .25, "pixel": N(0,1) noise,
                 same box on all frames)
eval             decode frames of temporal view t (eval_view_indices) → short side to
                 eval_short_side → crop c (boxes.eval_crop) ≡ one ROI resize → normalize

S = model.img_size (160; 64 in the demo). Official quirk kept only with `official_quirks`:
frames squashed to S×S instead of keeping their aspect ratio (§3.11), which also makes the test
crops identical (§3.9).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import boxes, frames, randaug

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
    pre_size: np.ndarray | None = None  # (2,) int64 (h, w), fine-tuning videos
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
        return (short, short) if self.squash else boxes.short_side_size(height, width, short)

    def sample_params(self, meta: dict, rng: np.random.Generator) -> SampleParams:
        """The random draws of one training sample, from its stored height/width/frames."""
        height, width = int(meta["height"]), int(meta["width"])
        if self.kind == "pretrain":
            return self._pretrain(height, width, meta, rng)
        if self.kind == "finetune":
            return self._finetune(height, width, meta, rng)
        raise ValueError(f"{self.kind} samples have views, not random parameters")

    def _pretrain(self, height: int, width: int, meta: dict, rng: np.random.Generator) -> SampleParams:
        if self.modality == "image":
            roi = boxes.random_resized_crop(height, width, self.image_crop_scale, rng)
            return SampleParams(np.array([boxes.mirrored(roi, rng.random() < 0.5)], np.float32))
        index = frames.pretrain_indices(int(meta["frames"]), self.num_frames, self.stride, rng)
        top, left, bottom, right = self.source_crop or (0, 0, height, width)
        if self.source_frame and (height, width) != self.source_frame:
            raise ValueError(f"data.video_source_crop {list(self.source_crop)} is cut from {self.source_frame[0]}×"
                             f"{self.source_frame[1]} frames, but clip {meta.get('clip', '?')} is {height}×{width}: "
                             "set data.video_source_crop=[] for shards at another frame size")
        if bottom > height or right > width:
            raise ValueError(f"data.video_source_crop {list(self.source_crop)} exceeds a {height}×{width} clip "
                             f"({meta.get('clip', '?')})")
        region = (bottom - top, right - left)
        scaled = boxes.short_side_size(*region, round(self.resize_ratio * self.size))
        rois = [boxes.shifted(boxes.scaled(boxes.random_resized_crop(*scaled, self.video_crop_scale, rng), scaled, region),
                              top, left) for _ in range(self.repeats)]
        return SampleParams(np.array(rois, np.float32), frames=index)

    def _erase(self, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
        box = boxes.erase_box(self.size, self.size, rng, scale) if rng.random() < self.erase_prob else None
        return np.array(box or (0, 0, 0, 0), np.int64)

    def _finetune(self, height: int, width: int, meta: dict, rng: np.random.Generator) -> SampleParams:
        if self.modality == "image":
            resized = self._resized(height, width, round(self.resize_ratio * self.size))
            crop = boxes.scaled(boxes.random_crop(*resized, self.size, rng), resized, (height, width))
            roi = boxes.mirrored(crop, rng.random() < 0.5)
            ops = randaug.draw(self.rand_augment, rng)
            return SampleParams(np.array([roi], np.float32), ops=ops, erase=self._erase(rng, IMAGE_ERASE_SCALE))
        index = frames.finetune_indices(int(meta["frames"]), self.num_frames, self.stride, rng)
        pre = self._resized(height, width, self.size)
        ops = randaug.draw(self.rand_augment, rng)
        roi = boxes.mirrored(boxes.random_resized_crop(*pre, self.video_crop_scale, rng), rng.random() < 0.5)
        return SampleParams(np.array([roi], np.float32), frames=index, pre_size=np.array(pre, np.int64),
                            ops=ops, erase=self._erase(rng, VIDEO_ERASE_SCALE))

    def view_params(self, meta: dict, view: int) -> SampleParams:
        """Evaluation view `view` (temporal view · spatial_crops + crop) of one sample."""
        height, width = int(meta["height"]), int(meta["width"])
        temporal, crop = divmod(view, self.spatial_crops if self.modality == "video" else 1)
        short = self.eval_short_side or self.size
        if self.squash:
            roi = boxes.full_frame(height, width)
        else:
            roi = boxes.eval_crop(height, width, short, self.size, crop,
                                  self.spatial_crops if self.modality == "video" else 1)
        index = None
        if self.modality == "video":
            index = frames.eval_view_indices(int(meta["frames"]), self.num_frames, self.stride,
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
        spatial_crops=d.test_spatial_crops, squash=bool(cfg.official_quirks),
        source_crop=tuple(d.video_source_crop) if d.video_source_crop and kind == "pretrain" else None,
        source_frame=tuple(d.video_source_frame) if d.video_source_crop and kind == "pretrain" else None,
        image_crop_scale=tuple(a.image_crop_scale), video_crop_scale=tuple(a.video_crop_scale),
    )
