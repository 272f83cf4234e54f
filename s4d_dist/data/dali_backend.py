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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import select
from nvidia.dali.tensors import TensorListGPU

from s4d_dist import seeds
from s4d_dist.pixels import IMAGENET_MEAN, IMAGENET_STD
from s4d_dist.shards import layout

from . import randaug
from .decode import (CorruptEvent, CorruptSample, MediaCheck, Window, decode_frames, decode_image,
                     decode_window, read_raw, read_window, read_windows)
from .feeder import FeederProcess
from .filler import SlotFiller
from .pixel_ops import augment
from .plan import BatchPlan, Plan, Request
from .prefetch import Prefetcher
from .recipes import Recipe, SampleParams

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
        if recipe.kind == "pretrain":
            names += ["region_start", "region_end", "pre_size"]
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
    if params.region is not None:
        values["region_start"], values["region_end"] = params.region[:2], params.region[2:]
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
        if recipe.kind == "pretrain" and video:  # the official ShortSideScale, then crops of it (pixel_ops)
            region = fn.slice(frames, values["region_start"], values["region_end"] - values["region_start"],
                              axis_names="HW", normalized_anchor=False, normalized_shape=False)
            frames = fn.resize(region, size=values["pre_size"], interp_type=types.INTERP_LINEAR, antialias=False)
            return [_normalize(fn.resize(fn.slice(frames, values[f"roi_start{r}"], values[f"roi_end{r}"] -
                                                  values[f"roi_start{r}"], axis_names="HW",
                                                  normalized_anchor=False, normalized_shape=False),
                                         size=size, interp_type=types.INTERP_LINEAR, antialias=True), video)
                    for r in range(recipe.copies)]
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


def define_frames_graph(feeder, decode_device: str) -> list:
    """Frame storage: every frame of a batch — the distinct frames of all its windows — through
    one batched JPEG decode (nvJPEG on "mixed"), uint8 out; the recipe runs on the device
    afterwards (pixel_ops.augment)."""
    jpegs = fn.external_source(source=feeder, batch=True, dtype=types.UINT8)
    return [fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)]


class _Feeder:
    """DALI's external source. The batches are built ahead of DALI's asking — by a Prefetcher
    thread (prefetch.py), or for frame storage by a FeederProcess (feeder.py) — so that their
    building overlaps the training step; each batch handed over is remembered until its output
    comes back (DALI returns batches in the order it asked for them), with what the frames
    path needs to put decoded frames back into slots."""

    def __init__(self, build: Callable[[Request], tuple[BatchPlan, list, Any]], depth: int,
                 process: FeederProcess | None = None,
                 columns: Callable[[BatchPlan], tuple[list, Any]] | None = None) -> None:
        self.ahead = process or Prefetcher(build, depth)
        self.process, self.columns = process, columns
        self.inflight: deque[tuple[Request, BatchPlan, Any]] = deque()
        self._held: int | None = None  # the feeder-process slot DALI copied last

    def __call__(self):
        request, built = self.ahead.next()
        if self.process is None:
            planned, columns, layout = built
        else:
            planned, slot = built
            columns, layout = self.columns(planned)
            self.let_go()  # DALI copied the previous batch's inputs when it took them
            self._held = slot
        self.inflight.append((request, planned, layout))
        return columns

    def let_go(self) -> None:
        if self._held is not None:
            self.process.release(self._held)
            self._held = None


class DaliRunner:
    """Runs batch requests through a DALI pipeline built for one recipe, onto `device`.

    Clips in frame storage take the frames path (a batched JPEG decode, then the recipe on the
    device); images and VP9 / MJPEG clips take the graph of `define_graph`."""

    def __init__(self, plan: Plan, decode_device: str, threads: int, prefetch: int, seed: int,
                 device: torch.device, feeder_process: bool = True) -> None:
        self.plan = plan
        self.recipe = plan.recipe
        self.decode_device, self.device = decode_device, device
        self.threads, self.prefetch, self.seed = max(threads, 1), max(prefetch, 1), seed
        self.frames = plan.catalog.frame_storage and self.recipe.modality == "video"
        self.filler = SlotFiller(plan, self._load, self._load_many if self.frames else None)
        self.check = MediaCheck(self.recipe.modality)
        process = FeederProcess(plan, self.prefetch) if self.frames and feeder_process else None
        self.feeder = _Feeder(self._prepare, self.prefetch, process, self._columns)
        self.pipe = self._build()
        self.host_bytes = self._read = 0  # pixel bytes handed to the device stage; stored bytes read

    @property
    def encoded_bytes(self) -> int:
        """Stored bytes read for the batches so far (by this process or its feeder process)."""
        return self._read + (self.feeder.process.bytes_read if self.feeder.process is not None else 0)

    @property
    def known_bad(self) -> set[int]:
        return self.filler.known_bad

    def _build(self):
        gpu = self.decode_device == "mixed"
        batch = self.plan.batch_size * (self.recipe.num_frames if self.frames else 1)

        @pipeline_def(batch_size=batch, num_threads=self.threads, device_id=self.device.index if gpu else None,
                      prefetch_queue_depth=self.prefetch, seed=self.seed,
                      enable_conditionals=self.recipe.kind == "finetune" and not self.frames)
        def pipeline():
            if self.frames:
                return tuple(define_frames_graph(self.feeder, self.decode_device))
            return tuple(define_graph(self.recipe, self.feeder, self.decode_device))

        pipe = pipeline()
        pipe.build()
        return pipe

    def _load(self, index: int, params: SampleParams):
        """The frames path: the window's JPEG frames (decode.read_window). The graph path:
        structural check (decode.py), then the bytes as DALI's input, with the frame size."""
        catalog = self.plan.catalog
        if self.frames:
            window = read_window(catalog, index, params.frames)
            self._read += sum(len(j) for j in window.jpegs)
            return window
        raw = read_raw(catalog, index)
        self.check(raw)
        self._read += len(raw.media)
        return np.frombuffer(raw.media, np.uint8), (int(raw.meta["height"]), int(raw.meta["width"]))

    def _load_many(self, samples: np.ndarray, params: list[SampleParams]) -> list:
        """The frames path's first candidates of a batch at once (decode.read_windows)."""
        windows = read_windows(self.plan.catalog, samples, np.stack([p.frames for p in params]))
        self._read += sum(len(j) for w in windows if isinstance(w, Window) for j in w.jpegs)
        return windows

    def _prepare(self, request: Request) -> tuple[BatchPlan, list, Any]:
        """A request's batch and DALI's input columns for it (on the prefetch thread); for the
        frames path also, per slot, the rows of the decoded batch that are its window."""
        planned = self.filler(request)
        if not self.frames:
            columns = zip(*(sample_inputs(self.recipe, s.payload, s.params) for s in planned.slots))
            return planned, [list(column) for column in columns], None
        return (planned, *self._columns(planned))

    def _columns(self, planned: BatchPlan) -> tuple[list, np.ndarray]:
        """The frames path's DALI input (every distinct frame of the batch's windows once) and,
        per slot, the rows of the decoded batch that are its window."""
        jpegs, first_row, layout = [], {}, []
        for slot in planned.slots:  # rows sharing a window (test crops, padding) decode it once
            window = slot.payload
            if id(window) not in first_row:
                first_row[id(window)] = len(jpegs)
                jpegs += window.jpegs if isinstance(window.jpegs[0], np.ndarray) else \
                    [np.frombuffer(j, np.uint8) for j in window.jpegs]
            layout.append(first_row[id(window)] + window.order)
        return jpegs, np.stack(layout)

    feed = _prepare  # the feeder's work for one batch (benchmarks/data.py times it alone)

    def decode_only(self, prepared: list, count: int) -> dict:
        """Decode `count` of the `prepared` batches with the decoder alone: batches and frames
        per second, and frames decoded (a VP9 window decodes from the keyframe before it)."""
        import time

        batches = [prepared[i % len(prepared)] for i in range(count)]
        if self.frames:
            decoded = sum(len(columns) for _, columns, _ in batches)
        else:
            manifest = layout.read_manifest(Path(self.plan.catalog.tars[0]).parent.parent,
                                            Path(self.plan.catalog.tars[0]).parent.name)
            vp9 = manifest["media"]["codec"] == "vp9"
            interval = manifest["build"]["encode"]["keyframe_interval"] if vp9 else 1
            decoded = 0
            for _, columns, _ in batches:
                for frames in columns[1]:
                    first, last = int(frames.min()), int(frames.max())
                    decoded += (last - first // interval * interval + 1) if vp9 else len(np.unique(frames))
        feed = iter(batches)
        device = self.decode_device

        @pipeline_def(batch_size=self.plan.batch_size * self.recipe.num_frames, num_threads=self.threads,
                      device_id=self.device.index if device == "mixed" else None, prefetch_queue_depth=1,
                      seed=self.seed)
        def pipeline():
            if self.frames:
                jpegs = fn.external_source(source=lambda: next(feed)[1], batch=True, dtype=types.UINT8)
                return fn.decoders.image(jpegs, device=device, output_type=types.RGB)
            media, frames = fn.external_source(source=lambda: next(feed)[1][:2], num_outputs=2, batch=True,
                                               dtype=[types.UINT8, types.INT32])
            return fn.decoders.video(media, device=device, frames=frames)

        pipe = pipeline()
        pipe.build()
        start = time.perf_counter()
        for _ in range(count):
            pipe.run()
        seconds = time.perf_counter() - start
        del pipe
        frames = self.recipe.num_frames * self.plan.batch_size * count
        return {"batches_per_s": count / seconds, "frames_per_s": frames / seconds,
                "decoded_frames": decoded, "batches": count}

    def _find_culprits(self) -> list[CorruptEvent]:
        """Decode every sample of the batches in flight in Python; the ones that fail."""
        events = []
        catalog = self.plan.catalog
        for _, planned, _ in self.feeder.inflight:
            for slot in planned.slots:
                clip = int(catalog.clips.of_sample[slot.sample])
                if not slot.valid or clip in self.known_bad:
                    continue
                try:
                    if self.frames:  # read again: a feeder process's slot may hold another batch now
                        decode_window(read_window(catalog, slot.sample, slot.params.frames))
                    elif slot.params.frames is None:
                        decode_image(catalog.read(slot.sample).media)
                    else:
                        decode_frames(catalog.read(slot.sample).media, slot.params.frames)
                except CorruptSample as err:
                    self.known_bad.add(clip)
                    events.append(CorruptEvent(slot.sample, catalog.where(slot.sample), str(err)))
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
        built = [item if feeder.process is not None else item[0] for item in built]
        discarded = [planned for _, planned, _ in feeder.inflight] + built
        events += [event for planned in discarded for event in planned.corrupt]
        requests = [request for request, _, _ in feeder.inflight] + untaken
        feeder.inflight.clear()
        if feeder.process is not None:
            feeder.let_go()
            feeder.process.mark_bad(self.known_bad)
        del self.pipe
        self.pipe = self._build()
        feeder.ahead.start(requests)
        return events

    def _pixels(self, outputs, request: Request, planned: BatchPlan, rows) -> torch.Tensor:
        """(B, copies, 3, [F,] S, S) float on the device from one pipeline output."""
        if not self.frames:
            copies = [_to_torch(out, torch.float32) for out in outputs]
            self.host_bytes += sum(c.nbytes for c in copies if not c.is_cuda)
            return copies[0][:, None] if len(copies) == 1 else torch.stack(copies, dim=1)
        decoded = outputs[0]
        if decoded.is_dense_tensor():
            if isinstance(decoded, TensorListGPU):
                frames = _to_torch(decoded, torch.uint8)
            else:  # a view of DALI's buffer: gathered below, before the next run reuses it
                frames = torch.from_numpy(np.asarray(decoded.as_tensor()))
                self.host_bytes += frames.nbytes
                frames = frames.to(self.device, non_blocking=True)
            if np.array_equal(rows.ravel(), np.arange(rows.size)) and len(frames) == rows.size:
                per_slot = frames.view(*rows.shape, *frames.shape[1:])  # every window in order: no gather
            else:
                index = torch.from_numpy(rows)
                if frames.is_cuda:  # from pinned memory: the copy does not wait for the queued step
                    index = index.pin_memory().to(frames.device, non_blocking=True)
                per_slot = frames[index]
        else:  # frames of several sizes
            per_slot = [torch.stack([_frame(decoded, int(r)) for r in slot_rows]).to(self.device)
                        for slot_rows in rows]
        generator = seeds.erase_noise(request, self.plan.rank)
        return augment(self.recipe, per_slot, planned.slots, generator)

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
                request, planned, rows = feeder.inflight.popleft()
                pixels = self._pixels(outputs, request, planned, rows)
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
            if feeder.process is not None:
                feeder.let_go()

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
        if self.feeder.process is not None:
            self.feeder.process.close()


def _frame(output, row: int) -> torch.Tensor:
    """One sample of a CPU or GPU output batch as a CPU uint8 tensor (frames of mixed sizes)."""
    sample = output.as_cpu().at(row) if isinstance(output, TensorListGPU) else output.at(row)
    return torch.from_numpy(np.array(sample))


def _to_torch(output, dtype: torch.dtype) -> torch.Tensor:
    """A DALI output batch as a torch tensor that owns its memory (DALI reuses its buffers)."""
    tensor = output.as_tensor()
    if isinstance(output, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray  # imports torch's CUDA side: GPU runs only
        out = torch.empty(tensor.shape(), dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor))
