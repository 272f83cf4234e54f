"""The DALI backend: one pipeline per loader, decoding on the GPU (device "mixed": nvJPEG for
images, NVDEC for clips) or on the CPU (`device_id=None`), fed batch by batch from Python.

Why an external source and not `fn.readers.webdataset` (which reads the same tars + .idx with
`shard_id` / `num_shards` / `random_shuffle`): the reader cannot express what the batches
must satisfy here —
- the official epoch order is a global permutation seeded by the epoch (DistributedSampler),
  identical on all ranks and sliced per rank; the reader shuffles within a buffer, and its
  shards are contiguous sample ranges;
- class-balanced fine-tuning draws with replacement (docs/method.md §2.7), which no reader does;
- resuming mid-epoch at the next unseen batch, and consuming only the first `rate` of a loader
  per epoch (§1.6), need batches addressable by position;
- one undecodable sample fails a DALI pipeline for good (the pipeline object is invalid after
  the error), and the reader offers no way to skip it.
So Python reads each sample's members by offset (catalog.py, one pread each), checks them,
draws the random parameters (plan.py, recipes.py) — on a thread a few batches ahead
(prefetch.py) — and hands DALI the encoded bytes plus per-sample parameter tensors through one
`fn.external_source`; all the pixel work — decoding, resizing, RandAugment, normalisation,
erasing — stays in DALI. Images are decoded with `fn.decoders.image_slice`, only the region
their crop reads (ROI decoding), clips with `fn.decoders.video(frames=...)`, only the frames
their window uses.

Corrupt samples (decode.py): the structural check rejects truncated media before DALI sees
them; if a batch still fails inside DALI, the batches in flight are decoded in Python to find
the culprits, which are recorded and substituted, the pipeline is rebuilt, and the same
batches are fed again. A failure with no culprit is a bug and is raised.

Where DALI forces a difference from the official transforms (the torch fallback follows DALI
on each, so the backends agree): resampling is DALI's antialiased ROI resize (within a level of
PIL's), RandAugment's equalize is OpenCV's (DALI has no PIL equalize), its warps are bilinear
and fill with 128 (timm: bicubic, mean colour); the erasing noise comes from DALI's generator.
Which samples, frames, boxes, flips, ops and magnitudes are used is decided in Python,
identically for both backends.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import select
from nvidia.dali.tensors import TensorListGPU

from s4d_dist.pixels import IMAGENET_MEAN, IMAGENET_STD
from s4d_dist.train import distributed

from . import randaug
from .catalog import RawSample
from .decode import CorruptEvent, CorruptSample, MediaCheck, decode_frames, decode_image
from .prefetch import Prefetcher
from .recipes import Recipe, SampleParams
from .plan import BatchPlan, Plan, Request

log = logging.getLogger(__name__)
# How DALI words NVDEC's refusal of a frame size below the decoder's minimum.
NVDEC_TOO_SMALL = "Video is too small"
_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}


_LUMA = (0.299, 0.587, 0.114)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13


def _blend(x, degenerate, factor):
    """degenerate + factor · (x − degenerate), as PIL's ImageEnhance (and torch_backend._blend)."""
    return fn.cast_like(degenerate + (x - degenerate) * factor, x)


def _warp(x, value, matrix):
    return fn.warp_affine(x, matrix=matrix, fill_value=randaug.FILL, inverse_map=True,
                          interp_type=types.INTERP_LINEAR)


def _contrast(x, value, matrix):
    mean = fn.reductions.mean(x, axis_names="HW", keep_dims=True)
    centre = fn.reductions.sum(mean * types.Constant(np.array(_LUMA, np.float32)), axis_names="C", keep_dims=True)
    return _blend(x, centre, value)


def _color(x, value, matrix):
    gray = fn.reductions.sum(x * types.Constant(np.array(_LUMA, np.float32)), axis_names="C", keep_dims=True)
    return _blend(x, gray, value)


def _sharpness(x, value, matrix):
    kernel = types.Constant(_SMOOTH, device=x.device or "cpu")  # a filter input lives with the data
    smooth = fn.cast(fn.filter(x, kernel), dtype=types.FLOAT)  # uint8 − uint8 would wrap
    return _blend(x, smooth, value)


def _auto_contrast(x, value, matrix):
    lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
    hi = fn.reductions.max(x, axis_names="HW", keep_dims=True)
    spread = hi > lo
    scale = 255 / ((hi - lo) * spread + types.Constant(255, dtype=types.UINT8) * (spread ^ True))
    return fn.cast_like((x - lo * spread) * scale, x)


def _solarize(x, value, matrix):
    below = x < value
    return below * x + (below ^ True) * (types.Constant(255, dtype=types.UINT8) - x)


def _solarize_add(x, value, matrix):
    below = x < types.Constant(128, dtype=types.UINT8)
    return below * (x + fn.cast(value, dtype=types.UINT8)) + (below ^ True) * x


_RAND_AUGMENT_OPS = {
    "auto_contrast": _auto_contrast,
    "equalize": lambda x, value, matrix: fn.equalize(x),
    "invert": lambda x, value, matrix: types.Constant(255, dtype=types.UINT8) - x,
    "posterize": lambda x, value, matrix: x & fn.cast(value, dtype=types.UINT8),
    "solarize": _solarize, "solarize_add": _solarize_add,
    "color": _color, "contrast": _contrast, "sharpness": _sharpness,
    "brightness": lambda x, value, matrix: fn.brightness(x, brightness=value),
    "identity": lambda x, value, matrix: x,
}


def rand_augment_suite() -> list:
    """One DALI function per randaug.OPS entry, taking the values and matrices of
    randaug.arguments (the geometric ops are all one warp). Plain functions rather than
    `nvidia.dali.auto_aug.augmentations`, whose per-bin parameter tables made the
    conditional graph take ~40 s to define."""
    return [_warp if name in randaug.GEOMETRIC else _RAND_AUGMENT_OPS[name] for name in randaug.OPS]


def input_names(recipe: Recipe) -> list[str]:
    """The per-sample tensors the feeder hands DALI for this recipe, in order."""
    names = ["media"]
    if recipe.modality == "video":
        names.append("frames")
    else:
        names += ["slice_start", "slice_end"]
    for r in range(recipe.copies):
        names += [f"roi_start{r}", f"roi_end{r}"]
    if recipe.kind == "finetune":
        if recipe.rand_augment.num_ops:  # DALI warns about (and still copies) unused inputs
            names += ["ra_op", "ra_value", "ra_matrix"]
        names += ["erase_anchor", "erase_shape"]
        if recipe.modality == "video":
            names.append("pre_size")
    return names


def decode_region(roi: np.ndarray, out_size: int, interp: str, frame_hw: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The integer (start, end) of the image region that resampling `roi` to `out_size` reads:
    the box plus the filter's reach (wider when shrinking), clipped to the frame. Decoding
    only that region (libjpeg-turbo / nvJPEG ROI decoding) skips the rest of the image, and the
    result is the same as decoding all of it."""
    reach = 2.0 if interp == "cubic" else 1.0
    y0, x0, y1, x1 = (float(v) for v in roi)
    start, end = [], []
    for low, high, limit in ((min(y0, y1), max(y0, y1), frame_hw[0]), (min(x0, x1), max(x0, x1), frame_hw[1])):
        margin = math.ceil(reach * max((high - low) / out_size, 1.0)) + 1
        start.append(max(math.floor(low) - margin, 0))
        end.append(min(math.ceil(high) + margin, limit))
    return np.array(start, np.int32), np.array(end, np.int32)


def sample_inputs(recipe: Recipe, payload: tuple[np.ndarray, tuple[int, int]],
                  params: SampleParams) -> list[np.ndarray]:
    """One sample's values for `input_names(recipe)`; `payload` is (bytes, frame (h, w))."""
    media, frame_hw = payload
    values = {"media": media}
    rois = params.rois
    if params.frames is not None:
        values["frames"] = params.frames.astype(np.int32)
    else:  # images decode only the region their one box reads; the box moves with it
        values["slice_start"], values["slice_end"] = decode_region(rois[0], recipe.size, recipe.interp, frame_hw)
        rois = rois - np.tile(values["slice_start"], 2).astype(np.float32)
    for r, (y0, x0, y1, x1) in enumerate(rois):
        values[f"roi_start{r}"] = np.array([y0, x0], np.float32)
        values[f"roi_end{r}"] = np.array([y1, x1], np.float32)
    if params.ops is not None:
        height, width = params.pre_size if params.pre_size is not None else (recipe.size, recipe.size)
        values["ra_op"], values["ra_value"], values["ra_matrix"] = randaug.arguments(params.ops, height, width)
        values["erase_anchor"] = params.erase[:2].astype(np.float32)
        values["erase_shape"] = params.erase[2:].astype(np.float32)
    if params.pre_size is not None:
        values["pre_size"] = params.pre_size.astype(np.float32)
    return [values[name] for name in input_names(recipe)]


def _rand_augment(frames, op, value, matrix, num_ops: int):
    suite = rand_augment_suite()
    for level in range(num_ops):
        frames = select(suite, op[level], frames, value[level], matrix[level])
    return frames


def _normalize(frames, video: bool):
    return fn.crop_mirror_normalize(frames, dtype=types.FLOAT, output_layout="CFHW" if video else "CHW",
                                    mean=[255 * v for v in IMAGENET_MEAN], std=[255 * v for v in IMAGENET_STD])


def define_graph(recipe: Recipe, feeder, decode_device: str) -> list:
    """The recipe (recipes.py) as DALI ops; one output per copy, (C, [F,] S, S) float each."""
    names = input_names(recipe)
    dtypes = [types.UINT8 if n == "media" else types.INT32 if n in ("frames", "ra_op", "slice_start", "slice_end")
              else types.FLOAT for n in names]
    values = dict(zip(names, fn.external_source(source=feeder, num_outputs=len(names), batch=True, dtype=dtypes)))
    video = recipe.modality == "video"
    size = [recipe.size, recipe.size]
    if video:
        frames = fn.decoders.video(values["media"], device=decode_device, frames=values["frames"])
    else:
        frames = fn.decoders.image_slice(values["media"], device=decode_device, output_type=types.RGB,
                                         start=values["slice_start"], end=values["slice_end"], axis_names="HW")

    def crop(x, r: int, interp: str):
        return fn.resize(x, roi_start=values[f"roi_start{r}"], roi_end=values[f"roi_end{r}"], size=size,
                         interp_type=_INTERP[interp], antialias=True)

    if recipe.kind != "finetune":
        return [_normalize(crop(frames, r, recipe.interp), video) for r in range(recipe.copies)]
    num_ops = recipe.rand_augment.num_ops
    ra = (values.get("ra_op"), values.get("ra_value"), values.get("ra_matrix"), num_ops)
    if not video:
        x = _rand_augment(crop(frames, 0, "linear"), *ra)
        x = fn.erase(x, anchor=values["erase_anchor"], shape=values["erase_shape"], axis_names="HW", fill_value=0)
        return [_normalize(x, video)]
    x = fn.resize(frames, size=values["pre_size"], interp_type=types.INTERP_LINEAR, antialias=True)
    x = _normalize(crop(_rand_augment(x, *ra), 0, "linear"), video)
    keep = fn.erase(x * 0.0 + 1.0, anchor=values["erase_anchor"], shape=values["erase_shape"], axes=[2, 3],
                    fill_value=0.0)
    return [x * keep + fn.random.normal(x) * (1.0 - keep)]


class _Feeder:
    """DALI's external source. The batches are built by a Prefetcher thread ahead of DALI's
    asking (prefetch.py), so that Python work overlaps the training step; each batch handed
    over is remembered until its output comes back (DALI returns batches in the order it asked
    for them)."""

    def __init__(self, build: Callable[[Request], tuple[BatchPlan, list[list[np.ndarray]]]],
                 depth: int) -> None:
        self.ahead: Prefetcher[tuple[BatchPlan, list[list[np.ndarray]]]] = Prefetcher(build, depth)
        self.inflight: deque[tuple[Request, BatchPlan]] = deque()

    def __call__(self) -> list[list[np.ndarray]]:
        request, (planned, columns) = self.ahead.next()
        self.inflight.append((request, planned))
        return columns


def dali_device_id() -> int:
    """The GPU DALI decodes on: the current device, which must be this rank's. Every rank's
    pipeline would land on GPU 0 if the loader were built before the device is set
    (distributed.init sets it)."""
    current, expected = torch.cuda.current_device(), distributed.device().index
    if current != expected:
        raise RuntimeError(f"DALI would decode on GPU {current}, but this rank's device is cuda:{expected} "
                           "(LOCAL_RANK): call s4d_dist.train.distributed.init() before building loaders")
    return current


class DaliRunner:
    """Runs batch requests through a DALI pipeline built for one recipe."""

    def __init__(self, plan: Plan, decode_device: str, threads: int, prefetch: int, seed: int) -> None:
        self.plan = plan
        self.recipe = plan.recipe
        self.decode_device = decode_device
        self.threads, self.prefetch, self.seed = max(threads, 1), max(prefetch, 1), seed
        self.known_bad: set[int] = set()
        self.check = MediaCheck(self.recipe.modality)
        self.feeder = _Feeder(self._prepare, self.prefetch)
        self.pipe = self._build()

    def _build(self):
        gpu = self.decode_device == "mixed"

        @pipeline_def(batch_size=self.plan.batch_size, num_threads=self.threads,
                      device_id=dali_device_id() if gpu else None, prefetch_queue_depth=self.prefetch,
                      seed=self.seed, enable_conditionals=self.recipe.kind == "finetune")
        def pipeline():
            return tuple(define_graph(self.recipe, self.feeder, self.decode_device))

        pipe = pipeline()
        pipe.build()
        return pipe

    def _prepare(self, request: Request) -> tuple[BatchPlan, list[list[np.ndarray]]]:
        """A request's batch and DALI's input columns for it (on the prefetch thread)."""
        planned = self.plan.batch(request, self.load_checked, self.known_bad)
        columns = zip(*(sample_inputs(self.recipe, s.payload, s.params) for s in planned.slots))
        return planned, [list(column) for column in columns]

    def load_checked(self, raw: RawSample, params: SampleParams) -> tuple[np.ndarray, tuple[int, int]]:
        """Structural check (decode.py), then the bytes as DALI's input, with the frame size."""
        self.check(raw)
        return np.frombuffer(raw.media, np.uint8), (int(raw.meta["height"]), int(raw.meta["width"]))

    def _find_culprits(self) -> list[CorruptEvent]:
        """Decode every sample of the batches in flight in Python; the ones that fail."""
        events = []
        catalog = self.plan.catalog
        for _, planned in self.feeder.inflight:
            for slot in planned.slots:
                if slot.index < 0 or slot.index in self.known_bad:
                    continue
                raw = catalog.read(slot.index)
                try:
                    decode_image(raw.media) if slot.params.frames is None else decode_frames(raw.media, slot.params.frames)
                except CorruptSample as err:
                    self.known_bad.add(slot.index)
                    events.append(CorruptEvent(slot.index, catalog.where(slot.index), str(err)))
        return events

    def _nvdec_cannot_decode(self, error: Exception) -> bool:
        """Whether `error` is NVDEC refusing a clip below its minimum frame size (128×128 for VP9
        on Hopper; the demo's clips are 64 px). The CPU decoder takes any size, so the loader
        switches to it, once and said, rather than stop or call valid clips corrupt."""
        if self.decode_device != "mixed" or NVDEC_TOO_SMALL not in str(error):
            return False
        log.warning("clips smaller than the GPU video decoder's minimum (%s); decoding this "
                    "loader's clips on the CPU", str(error).split(NVDEC_TOO_SMALL)[1].split("\n")[0].strip(" :."))
        self.decode_device = "cpu"
        return True

    def _recover(self, error: Exception) -> list[CorruptEvent]:
        """Culprits found (or the decoder changed, see _nvdec_cannot_decode), pipeline rebuilt,
        the batches not yet yielded queued again. Returns the culprits and the events already
        met while building the discarded batches (the rebuilt ones skip those samples
        silently)."""
        feeder = self.feeder
        untaken, built = feeder.ahead.stop()  # the builder also reads the catalog and known_bad
        switched = self._nvdec_cannot_decode(error)
        events = [] if switched else self._find_culprits()
        if not events and not switched:
            raise error
        discarded = [planned for _, planned in feeder.inflight] + [planned for planned, _ in built]
        events += [event for planned in discarded for event in planned.corrupt]
        requests = [request for request, _ in feeder.inflight] + untaken
        feeder.inflight.clear()
        del self.pipe
        self.pipe = self._build()
        feeder.ahead.start(requests)
        return events

    def run(self, requests: Iterable[Request]) -> Iterator[dict[str, Any]]:
        feeder = self.feeder
        feeder.ahead.start(requests)
        found: list[CorruptEvent] = []
        finished = False
        try:
            while True:
                try:
                    outputs = self.pipe.run()
                except StopIteration:
                    finished = True
                    return
                except RuntimeError as error:
                    found += self._recover(error)
                    continue
                _, planned = feeder.inflight.popleft()
                copies = [_to_torch(out) for out in outputs]
                pixels = copies[0][:, None] if len(copies) == 1 else torch.stack(copies, dim=1)
                fields = planned.fields()
                fields["corrupt"] = found + fields["corrupt"]
                found = []
                yield {"pixels": pixels, **fields}
        finally:
            feeder.ahead.stop()
            if finished:
                self.pipe.reset()
            else:  # abandoned mid-way: drop what DALI already prefetched
                self._drain()
            feeder.inflight.clear()

    def _drain(self) -> None:
        """Run out the batches in flight so the next run starts clean (a failure among them
        only means a fresh pipeline)."""
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except RuntimeError:
            del self.pipe
            self.pipe = self._build()

    def close(self) -> None:
        del self.pipe


def _to_torch(output) -> torch.Tensor:
    """A DALI output batch as a torch tensor that owns its memory (DALI reuses its buffers)."""
    tensor = output.as_tensor()
    if isinstance(output, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray  # imports torch's CUDA side: GPU runs only
        out = torch.empty(tensor.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor))
