"""Resumable DeepSpeed checkpoints, the rules for resuming, and fp32 / official exports.

A checkpoint is a DeepSpeed tag folder (model, optimizer and ZeRO shards, each rank its own)
plus, per rank, our `trainer_rank{r}.pt`: the loop position (epoch, batch, global step, data
iterator state) and the RNG states. Our own `latest` pointer is written by rank 0 only after
every rank has finished writing, with a rename, so a crash in the middle of saving leaves the
previous checkpoint the one that resumes (DeepSpeed's own `latest` can run ahead of other ranks).

Resuming (`resume=auto`) continues an unfinished run in the same run folder from its last
checkpoint, and refuses — naming the differing keys — when the folder's run had another model,
task or masking config. A finished run is never silently re-entered (the official code skipped
training when a fold was re-run, §3.16).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from s4d_dist.train import distributed

log = logging.getLogger(__name__)

# Sections a resumed run must share with the checkpoint; the rest (logging, epochs, ...) may change.
MUST_MATCH = ("task", "model", "mask")


class ResumeError(RuntimeError):
    """A run folder or checkpoint that this run must not continue from."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_differences(saved: dict, current: DictConfig) -> list[str]:
    """'key: saved → current' for every MUST_MATCH key that differs."""
    now = OmegaConf.to_container(current, resolve=True)
    old = _flatten({k: saved.get(k) for k in MUST_MATCH})
    new = _flatten({k: now.get(k) for k in MUST_MATCH})
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoints:
    """Saving into, and resuming from, `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, cfg: DictConfig, keep: int = 2) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.keep = keep

    @property
    def latest_file(self) -> Path:
        return self.dir / "latest_complete"

    def latest(self) -> str | None:
        return self.latest_file.read_text().strip() if self.latest_file.is_file() else None

    def save(self, engine, trainer_state: dict[str, Any], tag: str | None = None) -> str:
        """Collective: every rank writes its shard and its trainer state.

        Step checkpoints (default tag) become the resume point and are pruned to `keep`; a named
        tag (the best epoch) is written beside them and left alone.
        """
        tag = tag or f"step{trainer_state['global_step']:09d}"
        (self.dir / tag).mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        torch.save({"trainer": trainer_state, "rng": rng_state(),
                    "config": OmegaConf.to_container(self.cfg, resolve=True)},
                   self._trainer_file(self.dir, tag))
        distributed.barrier()
        if distributed.is_main() and tag.startswith("step"):
            tmp = self.latest_file.with_suffix(".tmp")
            tmp.write_text(tag)
            os.replace(tmp, self.latest_file)
            self._prune(tag)
        distributed.barrier()
        return tag

    def _prune(self, newest: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[: max(0, tags.index(newest) + 1 - self.keep)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    @staticmethod
    def _trainer_file(folder: Path, tag: str) -> Path:
        return folder / tag / f"trainer_rank{distributed.rank()}.pt"

    def _read_trainer_file(self, tag: str) -> dict[str, Any]:
        return torch.load(self._trainer_file(self.dir, tag), map_location="cpu",
                          weights_only=False)

    def load(self, engine, tag: str, module_only: bool = False) -> dict[str, Any]:
        """Restore engine, RNG and loop position; returns the trainer state.

        `module_only` restores the weights alone (to evaluate the best epoch at the end).
        """
        saved = self._read_trainer_file(tag)
        _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_module_only=module_only,
                                           load_optimizer_states=not module_only,
                                           load_lr_scheduler_states=not module_only)
        if client is None:
            raise ResumeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        if module_only:
            return saved["trainer"]
        set_rng_state(saved["rng"])
        log.info("resumed from %s (global step %d)", self.dir / tag, saved["trainer"]["global_step"])
        return saved["trainer"]

    def check_resumable(self, run_dir: Path) -> str | None:
        """The tag to resume from, after the run-folder rules; checked before anything is built
        or overwritten, so a refused resume leaves the folder as it was."""
        mode, latest = self.cfg.resume, self.latest()
        if mode not in ("auto", "never"):
            raise ResumeError(f"resume={mode!r}: use auto or never")
        if (Path(run_dir) / "finished.json").is_file():
            raise ResumeError(f"{run_dir} holds a finished run; pick another run_name or "
                              f"output_dir (or delete the folder) to train again")
        if latest is None:
            return None
        if mode == "never":
            raise ResumeError(f"resume=never but {self.dir} already holds checkpoints; "
                              f"pick another run_name or output_dir")
        differences = config_differences(self._read_trainer_file(latest)["config"], self.cfg)
        if differences:
            raise ResumeError(f"{self.dir / latest} was trained with another config; refusing "
                              f"to resume. Differences: " + "; ".join(differences))
        return latest


def export_fp32(engine, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a saved checkpoint (ZeRO ≥ 1: from the fp32 master partitions).

    With ZeRO-0 in bf16/fp16 there are no fp32 masters in the checkpoint that DeepSpeed's
    `zero_to_fp32` can read; the module's low-precision weights are exported instead, with a
    warning.
    """
    if engine.zero_optimization_stage() >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        module_keys = list(engine.module.state_dict())
        return {k: state[k].float() for k in module_keys}
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        log.warning("ZeRO-0 in reduced precision: exporting the low-precision module weights")
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
