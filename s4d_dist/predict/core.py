"""Scoring inputs: crop, cut the evaluation's views, batch them through the model, average.

Views are cut by the evaluation recipe itself (data/recipes.py `view_params`, the torch
backend's `transform` and `normalized`), so an input scored here gets exactly the temporal
windows, crops and pixels the test-set evaluation would give the same clip: a clip yields
`test_temporal_views × test_spatial_crops` rows, an image one, and the softmax probabilities of
a clip's rows are averaged as in evaluation. Images go to the image (SFER) head, clips and
frame folders to the video (DFER) head.

With a `Timeline` a clip is scored per window instead of whole: windows of a length every
stride (in seconds or frames), each cut into the evaluation's views as a clip of its own and
reported as a prediction of its own with its frame range and times; with face detection each
window is cut to a box of its own, so a face that moves is followed.

Inputs are decoded one chunk ahead of the model, by DALI for the whole chunk at once (dali.py)
or by Pillow / PyAV in threads (inputs.decode); each prediction says which decoder it used.

Rows of several inputs share a forward pass (`batch_size` rows). An MoAE layer's expert
capacity is a fraction of its batch's tokens, exactly as in training and evaluation, so a
score can move in the last digits with the batch it shares; scored alone, an input's views are
one batch, as in an evaluation whose batch holds one clip's views.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from s4d_dist.data.recipes import Recipe, recipe_from_config
from s4d_dist.data.pixel_ops import normalized, transform
from s4d_dist.shards.faces import Box, FaceDetector, centre_box, xyxy

from .inputs import Decoded, Input, InputError, decode
from .model import Model
from .timeline import Timeline, Window


@dataclass
class Prediction:
    """One row of results: probabilities per class of the input's head for the input (or, on a
    timeline, one window of it), or the reason it has none."""

    input: str
    kind: str
    head: str | None = None
    crop: str | None = None      # "centre" | "face"
    box: list[int] | None = None  # the square scored: [left, top, right, bottom], source pixels
    decoder: str | None = None   # "dali" | "python"
    frames: int = 0
    views: int = 0
    probs: dict[str, float] | None = None
    error: str | None = None
    warning: str | None = None   # scored, but not as given (a video that decodes short)
    window: Window | None = None  # timeline rows

    @property
    def top1(self) -> str | None:
        return max(self.probs, key=self.probs.get) if self.probs else None


@dataclass
class _Views:
    """A row to score: the views of an input or of one of its windows."""

    pixels: torch.Tensor  # (V, 3, [T,] S, S) float
    crop: str
    box: Box
    decoder: str
    frames: int
    warning: str | None = None
    window: Window | None = None


Row = _Views | Prediction  # to score, or already decided (an error)


class Predictor:
    """Scores lists of inputs with one model on one device."""

    def __init__(self, model: Model, device: torch.device, batch_size: int = 32,
                 face_detect: bool = False, min_frames: int = 2,
                 temporal_views: int | None = None, spatial_crops: int | None = None,
                 workers: int = 2, decoder: str = "python", timeline: Timeline | None = None,
                 fps: float | None = None) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.dali = None
        if decoder == "dali":
            try:
                from .dali import DaliDecoder
            except ImportError as error:  # DALI is optional
                raise ImportError(f"decoding with DALI needs it installed (pip install -e "
                                  f"'.[dali]'): {error}") from None
            self.dali = DaliDecoder(device, batch_size, workers)
        self.network = model.network.to(device)
        self.detector = FaceDetector() if face_detect else None
        self.min_frames, self.workers = min_frames, workers
        self.timeline, self.fps = timeline, fps
        self.recipes: dict[str, Recipe] = {}
        for modality in ("image", "video"):
            recipe = recipe_from_config(model.cfg, "eval", modality)
            self.recipes[modality] = replace(
                recipe, temporal_views=temporal_views or recipe.temporal_views,
                spatial_crops=spatial_crops or recipe.spatial_crops)

    def views(self, item: Input, frames: np.ndarray) -> tuple[torch.Tensor, str, Box]:
        """Crop frames (T, H, W, 3) and cut them into their evaluation views: (pixels, "face" or
        "centre", the box); InputError if they cannot be."""
        if item.modality == "video" and len(frames) < self.min_frames:
            raise InputError(f"too short: {len(frames)} frame(s), at least {self.min_frames} "
                             "needed")
        if self.detector is not None:
            box, crop = self.detector.box(frames), "face"
            if box is None:
                raise InputError("no face found")
        else:
            box, crop = centre_box(*frames.shape[1:3]), "centre"
        top, left, bottom, right = box
        frames = frames[:, top:bottom, left:right]
        recipe = self.recipes[item.modality]
        meta = {"height": bottom - top, "width": right - left, "frames": len(frames)}
        cut = []
        for view in range(recipe.views):
            params = recipe.view_params(meta, view)
            chosen = frames if params.frames is None else frames[params.frames]
            cut.append(transform(recipe, torch.from_numpy(chosen.copy()), params))
        return normalized(recipe, torch.stack(cut), [], torch.Generator())[:, 0], crop, box

    def _rows(self, item: Input, decoded: Decoded, decoder: str) -> list[Row]:
        """The input's rows: the whole input, or each window of a clip on a timeline."""
        frames, warning = decoded.frames, decoded.warning
        if self.timeline is None or item.modality == "image":
            pixels, crop, box = self.views(item, frames)
            return [_Views(pixels, crop, box, decoder, len(frames), warning)]
        try:
            windows = self.timeline.windows(len(frames), decoded.fps or self.fps)
        except ValueError as error:
            raise InputError(str(error)) from None
        rows: list[Row] = []
        for window in windows:
            span = frames[window.start_frame:window.end_frame]
            try:
                pixels, crop, box = self.views(item, span)
                rows.append(_Views(pixels, crop, box, decoder, len(span), warning, window))
            except InputError as error:
                rows.append(Prediction(item.path, item.kind, error=str(error), warning=warning,
                                       window=window))
        return rows

    def _prepare(self, item: Input, decoded: Decoded | None) -> list[Row]:
        """The input's rows from DALI's frames, or decoded here when DALI has none for it."""
        try:
            if decoded is None:
                return self._rows(item, decode(item), "python")
            return self._rows(item, decoded, "dali")
        except InputError as error:
            return [Prediction(item.path, item.kind, error=str(error))]

    def _prepare_chunk(self, chunk: list[Input], pool: ThreadPoolExecutor) -> list[list[Row]]:
        decoded = self.dali(chunk) if self.dali is not None else [None] * len(chunk)
        return list(pool.map(self._prepare, chunk, decoded))

    @torch.no_grad()
    def _probabilities(self, pixels: torch.Tensor, modality: str) -> np.ndarray:
        out = []
        for rows in pixels.split(self.batch_size):
            logits = self.network(rows.to(self.device, non_blocking=True), modality)
            out.append(logits.float().softmax(-1).cpu())
        return torch.cat(out).numpy()

    def _score(self, items: list[Input], prepared: list[list[Row]]) -> list[list[Prediction]]:
        results = [[row if isinstance(row, Prediction) else None for row in rows]
                   for rows in prepared]
        for modality in ("image", "video"):
            mine = [(i, k) for i, (item, rows) in enumerate(zip(items, prepared))
                    if item.modality == modality
                    for k, row in enumerate(rows) if isinstance(row, _Views)]
            if not mine:
                continue
            probs = self._probabilities(torch.cat([prepared[i][k].pixels for i, k in mine]),
                                        modality)
            names = self.model.classes[modality]
            ends = np.cumsum([len(prepared[i][k].pixels) for i, k in mine])
            for (i, k), views in zip(mine, np.split(probs, ends[:-1])):
                row = prepared[i][k]
                results[i][k] = Prediction(
                    items[i].path, items[i].kind, modality, row.crop, xyxy(row.box), row.decoder,
                    row.frames, len(views), dict(zip(names, views.mean(0).tolist())),
                    warning=row.warning, window=row.window)
        return results

    def score(self, items: list[Input]) -> Iterator[list[Prediction]]:
        """Each input's predictions (one, or one per timeline window), in input order. While the
        model scores a chunk of inputs, the next one is decoded and cut into views on a thread
        of its own: DALI decodes the chunk in one go, the `workers` threads decode the rest
        (Pillow and PyAV release the GIL) and cut the views. A chunk is `batch_size` inputs, or
        one on a timeline, whose windows fill the batches."""
        size = 1 if self.timeline is not None else self.batch_size
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(max(self.workers, 1)) as pool, ThreadPoolExecutor(1) as ahead:
            def submit(chunk: list[Input]) -> Future[list[list[Row]]]:
                return ahead.submit(self._prepare_chunk, chunk, pool)

            pending = submit(chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                prepared = pending.result()
                pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None
                yield from self._score(chunk, prepared)

    def __call__(self, items: list[Input]) -> Iterator[Prediction]:
        """Every prediction, in input order (an input's windows in time order)."""
        for predictions in self.score(items):
            yield from predictions
