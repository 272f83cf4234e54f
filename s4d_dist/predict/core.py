"""Scoring inputs: crop, cut the evaluation's views, batch them through the model, average.

Views are cut by the evaluation recipe itself (data/recipes.py `view_params`, the torch
backend's `transform` and `normalized`), so an input scored here gets exactly the temporal
windows, crops and pixels the test-set evaluation would give the same clip: a clip yields
`test_temporal_views × test_spatial_crops` rows, an image one, and the softmax probabilities of
a clip's rows are averaged as in evaluation. Images go to the image (SFER) head, clips and
frame folders to the video (DFER) head.

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

from .faces import FaceDetector, centre_box
from .inputs import Input, InputError, decode
from .model import Model


@dataclass
class Prediction:
    """One input's result: probabilities per class of its head, or the reason it has none."""

    input: str
    kind: str
    head: str | None = None
    crop: str | None = None      # "centre" | "face"
    decoder: str | None = None   # "dali" | "python"
    frames: int = 0
    views: int = 0
    probs: dict[str, float] | None = None
    error: str | None = None

    @property
    def top1(self) -> str | None:
        return max(self.probs, key=self.probs.get) if self.probs else None


@dataclass
class _Views:
    pixels: torch.Tensor  # (V, 3, [T,] S, S) float
    crop: str
    decoder: str
    frames: int


class Predictor:
    """Scores lists of inputs with one model on one device."""

    def __init__(self, model: Model, device: torch.device, batch_size: int = 32,
                 face_detect: bool = False, min_frames: int = 2,
                 temporal_views: int | None = None, spatial_crops: int | None = None,
                 workers: int = 2, decoder: str = "python") -> None:
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
        self.recipes: dict[str, Recipe] = {}
        for modality in ("image", "video"):
            recipe = recipe_from_config(model.cfg, "eval", modality)
            self.recipes[modality] = replace(
                recipe, temporal_views=temporal_views or recipe.temporal_views,
                spatial_crops=spatial_crops or recipe.spatial_crops)

    def views(self, item: Input, frames: np.ndarray, decoder: str) -> _Views:
        """Crop and cut an input's decoded frames into its evaluation views; InputError if it
        cannot."""
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
        pixels = normalized(recipe, torch.stack(cut), [], torch.Generator())[:, 0]
        return _Views(pixels, crop, decoder, len(frames))

    def _prepare(self, item: Input, decoded: np.ndarray | None) -> _Views | Prediction:
        """The input's views from DALI's frames, or decoded here when DALI has none for it."""
        try:
            if decoded is None:
                return self.views(item, decode(item), "python")
            return self.views(item, decoded, "dali")
        except InputError as error:
            return Prediction(item.path, item.kind, error=str(error))

    def _prepare_chunk(self, chunk: list[Input], pool: ThreadPoolExecutor
                       ) -> list[_Views | Prediction]:
        decoded = self.dali(chunk) if self.dali is not None else [None] * len(chunk)
        return list(pool.map(self._prepare, chunk, decoded))

    @torch.no_grad()
    def _probabilities(self, pixels: torch.Tensor, modality: str) -> np.ndarray:
        out = []
        for rows in pixels.split(self.batch_size):
            logits = self.network(rows.to(self.device, non_blocking=True), modality)
            out.append(logits.float().softmax(-1).cpu())
        return torch.cat(out).numpy()

    def _score(self, items: list[Input], prepared: list[_Views | Prediction]
               ) -> list[Prediction | None]:
        results = [p if isinstance(p, Prediction) else None for p in prepared]
        for modality in ("image", "video"):
            mine = [i for i, (item, p) in enumerate(zip(items, prepared))
                    if isinstance(p, _Views) and item.modality == modality]
            if not mine:
                continue
            probs = self._probabilities(torch.cat([prepared[i].pixels for i in mine]), modality)
            names = self.model.classes[modality]
            ends = np.cumsum([len(prepared[i].pixels) for i in mine])
            for i, rows in zip(mine, np.split(probs, ends[:-1])):
                views = prepared[i]
                results[i] = Prediction(items[i].path, items[i].kind, modality, views.crop,
                                        views.decoder, views.frames, len(rows),
                                        dict(zip(names, rows.mean(0).tolist())))
        return results

    def __call__(self, items: list[Input]) -> Iterator[Prediction]:
        """Predictions in input order. While the model scores a chunk of `batch_size` inputs,
        the next one is decoded and cut into views on a thread of its own: DALI decodes the
        chunk in one go, the `workers` threads decode the rest (Pillow and PyAV release the
        GIL) and cut the views."""
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with ThreadPoolExecutor(max(self.workers, 1)) as pool, ThreadPoolExecutor(1) as ahead:
            def submit(chunk: list[Input]) -> Future[list[_Views | Prediction]]:
                return ahead.submit(self._prepare_chunk, chunk, pool)

            pending = submit(chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                prepared = pending.result()
                pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None
                yield from self._score(chunk, prepared)
