"""What the trainer calls: epochs of batches for pre-training, fine-tuning and evaluation.

    loader = train_loader(cfg, rank, world_size)        # cfg.task: pretrain | finetune
    for epoch in range(first_epoch, cfg.optim.epochs):
        batches = loader.epoch(epoch)                    # len(batches) == loader.steps_per_epoch
        if resume_state: batches.load_state_dict(resume_state)
        for batch in batches: ...                        # batches.state_dict() at any point
    loader.corrupt.summary()                             # corrupt samples skipped so far

    test = eval_loader(cfg, "test", "video", rank, world_size)
    for batch in test.batches(): ...                     # rows: (index, view), valid

Batches (the contract in docs/design.md), pixels on the loader's device (the trainer's), the
other tensors on the CPU:
  pre-training  {"modality", "pixels" (B, 3, [T,] S, S) float, "mask" (B, N) bool, "index" (B,)}
                (videos: B = video_batch_size clips = video_batch_size / video_repeats videos,
                each video repeated with independent crops and masks, docs/method.md §1.6)
  fine-tuning   {"modality", "pixels", "label" (B,) int64, "index"}
  evaluation    {"modality", "pixels", "label", "index", "view", "valid" (B,) bool, "key" list}
"index" is the sample's position in its loader's catalog; in evaluation (index, view) names a
row, and rows with valid False (padding, corrupt samples) carry index −1 and must be dropped.
"""
from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from omegaconf import DictConfig

from s4d_dist import seeds
from s4d_dist.shards import layout
from s4d_dist.tubelets import model_tokens

from . import plan
from .catalog import Catalog, open_catalog, shard_paths
from .decode import CorruptionLog
from .masking import random_masks
from .plan import EvalPlan, Plan, TrainPlan
from .recipes import Recipe, recipe_from_config

MODALITIES = {"pretrain": ("image", "video"), "finetune": ("video", "image")}  # official source ids (§1.6, §2.7)


def choose_backend(cfg: DictConfig) -> str:
    """`data.backend`, with auto = DALI when it imports, else the torch fallback."""
    if cfg.data.backend != "auto":
        return cfg.data.backend
    return "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"


def dali_decode_device(cfg: DictConfig) -> str:
    """"mixed" (nvJPEG / NVDEC) on a GPU machine, "cpu" otherwise, unless data.dali_device says."""
    if cfg.data.dali_device != "auto":
        return cfg.data.dali_device
    return "mixed" if torch.cuda.is_available() else "cpu"


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in pinned memory when it is on the CPU and a GPU will read it, so that copying it
    `.to(device, non_blocking=True)` is asynchronous: from pageable memory the host waits for
    the copy. The torch backend's DataLoader pins its batches already (`pin_memory`); DALI's
    outputs and the masks drawn here are not."""
    if torch.cuda.is_available() and not tensor.is_cuda and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def default_device() -> torch.device:
    """The current CUDA device where there is one, else the CPU (callers that train pass theirs)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def make_runner(cfg: DictConfig, batches: Plan, backend: Literal["dali", "torch"], seed: int,
                device: torch.device):
    """The object that turns the plan's requests into pixel batches on `device` (`backend` as
    `choose_backend` resolves it; the config's type admits no other value)."""
    if backend == "dali":
        from .dali_backend import DaliRunner  # DALI is optional
        return DaliRunner(batches, dali_decode_device(cfg), cfg.data.workers, cfg.data.prefetch, seed, device)
    from .torch_backend import TorchRunner
    return TorchRunner(batches, cfg.data.workers, cfg.data.prefetch, device)


def clip_of(key: str) -> str:
    """The clip a sample key belongs to (chunks of one video share it: shards/samples.py)."""
    return layout.clip_key(key)[0]


def held_out(catalog: Catalog, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the samples of a deterministic `fraction` of clips, kept out of training to
    choose the best epoch (the official code chose it on the test set, §3.8)."""
    cut = int(round(fraction * 10_000))
    return np.array([zlib.crc32(f"{seed}:{clip_of(k)}".encode()) % 10_000 < cut for k in catalog.keys], bool)


def _location(cfg: DictConfig, modality: str) -> str:
    location = cfg.data.image_shards if modality == "image" else cfg.data.video_shards
    if not location:
        raise ValueError(f"data.{modality}_shards is not set")
    return location


def _carves_validation(cfg: DictConfig, modality: str) -> bool:
    """Whether fine-tuning holds clips out of train to pick its best epoch on. Not under
    official.select_on_test: the official trains on the whole split and picks the best epoch
    on test (§3.8)."""
    return (cfg.task == "finetune" and modality == "video" and not cfg.data.val_shards
            and cfg.data.val_fraction > 0 and not cfg.official.select_on_test)


def train_catalog(cfg: DictConfig, modality: str) -> Catalog:
    """The training samples of a modality (a fold's train parts with data.fold; without the
    held-out validation clips when fine-tuning carves them)."""
    fold = cfg.data.fold if modality == "video" else None
    catalog = open_catalog(shard_paths(_location(cfg, modality), "train", fold),
                           skip_truncated=cfg.data.skip_truncated)
    if _carves_validation(cfg, modality):
        catalog = catalog.subset(np.flatnonzero(~held_out(catalog, cfg.data.val_fraction, cfg.seed)))
    return catalog


def eval_catalog(cfg: DictConfig, split: str, modality: str) -> Catalog:
    """The samples of `split` of a modality: data.val_shards / test_shards when set (videos),
    else the fold's `split` parts / the dataset's split, or for "val" the clips carved out of
    the fine-tuning train set."""
    explicit = {"val": cfg.data.val_shards, "test": cfg.data.test_shards}.get(split, "")
    if explicit and modality == "video":
        return open_catalog(shard_paths(explicit, split), skip_truncated=cfg.data.skip_truncated)
    if split == "val" and _carves_validation(cfg, modality):
        full = open_catalog(shard_paths(_location(cfg, modality), "train", cfg.data.fold),
                            skip_truncated=cfg.data.skip_truncated)
        return full.subset(np.flatnonzero(held_out(full, cfg.data.val_fraction, cfg.seed)))
    location = _location(cfg, modality)
    fold = cfg.data.fold if modality == "video" else None
    if fold is None and (Path(location) / layout.MANIFEST_JSON).is_file():
        location = str(Path(location).parent)  # a split folder: its sibling split
    return open_catalog(shard_paths(location, split, fold), skip_truncated=cfg.data.skip_truncated)


def stored_cut(recipe: Recipe, catalog: Catalog) -> Recipe:
    """The recipe for clips stored already cut (`shards --video-crop`): the same cut as
    data.video_source_crop is not cut again; another one is a config error naming both."""
    if catalog.stored_crop is None or recipe.source_crop is None:
        return recipe
    if list(recipe.source_crop) != catalog.stored_crop:
        raise ValueError(f"{catalog.tars[0]} ...: clips are stored cut to {catalog.stored_crop}, but "
                         f"data.video_source_crop is {list(recipe.source_crop)}; set it to "
                         f"{catalog.stored_crop} (or [] to use the stored frames as they are)")
    return replace(recipe, source_crop=None, source_frame=None)


class _Stream:
    """One modality's training batches: its plan, recipe and runner."""

    def __init__(self, cfg: DictConfig, modality: str, rank: int, world: int, backend: str,
                 device: torch.device) -> None:
        self.modality = modality
        self.recipe: Recipe = recipe_from_config(cfg, cfg.task, modality)
        batch = cfg.data.image_batch_size if modality == "image" else cfg.data.video_batch_size
        if cfg.task == "pretrain" and modality == "video":
            if batch % cfg.data.video_repeats:
                raise ValueError(f"data.video_batch_size {batch} must divide by data.video_repeats "
                                 f"{cfg.data.video_repeats} (clips per batch = videos × repeats)")
            batch //= cfg.data.video_repeats
        balanced = cfg.task == "finetune" and modality == "image" and cfg.data.balance_images
        catalog = train_catalog(cfg, modality)
        self.recipe = stored_cut(self.recipe, catalog)
        classes = cfg.model.num_image_classes if modality == "image" else cfg.model.num_video_classes
        if cfg.task == "finetune" and len(catalog.class_names) != classes:
            raise ValueError(f"{catalog.tars[0]} ...: {catalog.dataset} has {len(catalog.class_names)} classes "
                             f"{catalog.class_names}, model.num_{modality}_classes is {classes}")
        self.plan = TrainPlan(catalog, self.recipe, batch, cfg.seed, rank, world, balanced)
        self.runner = make_runner(cfg, self.plan, backend, seeds.dali_seed(cfg.seed, rank), device)


class TrainLoader:
    """Modality-mixed training epochs for cfg.task (§1.6 pre-training, §2.7 fine-tuning).

    A modality whose shards are not configured is left out (single-modality runs)."""

    def __init__(self, cfg: DictConfig, rank: int = 0, world_size: int = 1, backend: str | None = None,
                 device: torch.device | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        device = device or default_device()
        self.backend = backend or choose_backend(cfg)
        self.corrupt = CorruptionLog()
        wanted = [m for m in MODALITIES[cfg.task] if (cfg.data.image_shards if m == "image" else cfg.data.video_shards)]
        if not wanted:
            raise ValueError("set data.image_shards and/or data.video_shards")
        self.streams = [_Stream(cfg, m, rank, world_size, self.backend, device) for m in wanted]
        rates = {"image": cfg.data.image_rate, "video": cfg.data.video_rate}
        self.counts = plan.step_counts([s.plan.batches_per_pass for s in self.streams],
                                         [rates[s.modality] for s in self.streams])

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.counts)

    def epoch(self, epoch: int) -> EpochIterator:
        return EpochIterator(self, epoch)

    def close(self) -> None:
        for stream in self.streams:
            stream.runner.close()


class EpochIterator:
    """One epoch of a TrainLoader; `state_dict()` says how far it got, `load_state_dict()`
    (before iterating) makes it start at the next unseen batch of that state."""

    def __init__(self, loader: TrainLoader, epoch: int) -> None:
        self.loader, self.epoch, self.step = loader, epoch, 0
        self.order = plan.source_order(loader.counts, epoch)

    def __len__(self) -> int:
        return len(self.order)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] != self.epoch:
            raise ValueError(f"state of epoch {state['epoch']} loaded into epoch {self.epoch}")
        if not 0 <= state["step"] <= len(self):
            raise ValueError(f"step {state['step']} outside this epoch's {len(self)} steps")
        self.step = state["step"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = self.loader
        done = self.order[: self.step]
        iterators = []
        for i, stream in enumerate(loader.streams):
            start = int((done == i).sum())
            requests = stream.plan.requests(self.epoch, start, loader.counts[i] - start)
            iterators.append(stream.runner.run(requests))
        try:
            for source_id in self.order[self.step:].tolist():
                stream = loader.streams[source_id]
                batch = next(iterators[source_id])
                for event in batch.pop("corrupt"):
                    loader.corrupt.record(event)
                out = self._finish(stream, batch)
                self.step += 1
                yield out
        finally:
            for iterator in iterators:
                iterator.close()

    def _finish(self, stream: _Stream, batch: dict[str, Any]) -> dict[str, Any]:
        cfg = self.loader.cfg
        pixels = pinned(batch["pixels"])
        copies = pixels.shape[1]
        out = {"modality": stream.modality, "pixels": pixels.flatten(0, 1),
               "index": batch["index"].repeat_interleave(copies)}
        if cfg.task == "finetune":
            out["label"] = pinned(batch["label"])
            return out
        tokens = model_tokens(cfg.model, stream.modality)
        ratio = cfg.mask.video_ratio if stream.modality == "video" else cfg.mask.image_ratio
        generator = seeds.mae_masks(cfg.seed, self.epoch, self.step, self.loader.rank)
        mask = random_masks(len(out["pixels"]), tokens, ratio, generator)  # on the CPU: same on any machine
        out["mask"] = pinned(mask).to(pixels.device, non_blocking=True)
        return out


class EvalLoader:
    """Deterministic multi-view evaluation over one split (§2.11 done right): every (sample,
    view) row once across ranks, padding marked invalid, the same batch count on every rank."""

    def __init__(self, cfg: DictConfig, catalog: Catalog, modality: str, rank: int = 0, world_size: int = 1,
                 backend: str | None = None, temporal_views: int | None = None,
                 spatial_crops: int | None = None, device: torch.device | None = None) -> None:
        recipe = recipe_from_config(cfg, "eval", modality)
        if temporal_views is not None or spatial_crops is not None:
            recipe = replace(recipe, temporal_views=temporal_views or recipe.temporal_views,
                             spatial_crops=spatial_crops or recipe.spatial_crops)
        self.modality, self.recipe = modality, recipe
        self.corrupt = CorruptionLog()
        self.plan = EvalPlan(catalog, recipe, cfg.data.eval_batch_size, rank, world_size,
                             cfg.data.eval_order)
        self.runner = make_runner(cfg, self.plan, backend or choose_backend(cfg), seeds.dali_seed(cfg.seed, rank),
                                  device or default_device())

    @property
    def class_names(self) -> list[str]:
        return self.plan.catalog.class_names

    @property
    def num_samples(self) -> int:
        """What is scored: clips (a clip stored in chunks is one) or images."""
        return self.plan.num_clips

    def __len__(self) -> int:
        return self.plan.num_batches

    def batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        for batch in self.runner.run(self.plan.requests(start)):
            for event in batch.pop("corrupt"):
                self.corrupt.record(event)
            batch["pixels"] = pinned(batch["pixels"][:, 0])
            yield {"modality": self.modality, **batch}

    def close(self) -> None:
        self.runner.close()


def train_loader(cfg: DictConfig, rank: int = 0, world_size: int = 1, backend: str | None = None,
                 device: torch.device | None = None) -> TrainLoader:
    """Training epochs for cfg.task, batches on `device` (default: `default_device()`)."""
    return TrainLoader(cfg, rank, world_size, backend, device)


def eval_loader(cfg: DictConfig, split: str, modality: str, rank: int = 0, world_size: int = 1,
                backend: str | None = None, temporal_views: int | None = None,
                spatial_crops: int | None = None, device: torch.device | None = None) -> EvalLoader:
    """Evaluation of `split` ("val" | "test") of a modality; views default to
    data.test_temporal_views × data.test_spatial_crops (videos; images have one view)."""
    return EvalLoader(cfg, eval_catalog(cfg, split, modality), modality, rank, world_size, backend,
                      temporal_views, spatial_crops, device)
