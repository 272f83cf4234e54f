"""Resumable DeepSpeed checkpoints, the rules for resuming, and fp32 / official exports.

A checkpoint is a DeepSpeed tag folder (model, optimizer and ZeRO shards, each rank its own)
plus, per rank, our `trainer_rank{r}.pt`: the loop position (epoch, batch, global step, data
iterator state) and the RNG states. Our own `latest` pointer is written by rank 0 only after
every rank has finished writing, with a rename, so a crash in the middle of saving leaves the
previous checkpoint the one that resumes (DeepSpeed's own `latest` can run ahead of other ranks).

Storage faults: before training, the space `checkpoint.keep` checkpoints need is compared with
what the filesystem has free, and a run that clearly cannot save is refused. A write that fails
anyway (disk full, I/O error) fails on every rank together — the ranks agree on the outcome
after DeepSpeed's collectives, whichever rank's write failed — and leaves the pointer where it
was, the partial tag folder removed. Tag folders newer than the pointer (a save interrupted by a
crash) are reported and removed when a run resumes.

Resuming (`resume=auto`) continues an unfinished run in the same run folder from its last
checkpoint, and refuses — naming the differing keys — when the folder's run had another model,
task or masking config. A finished run is never silently re-entered (the official code skipped
training when a fold was re-run, docs/method.md §3.16).
"""
from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from s4d_dist import atomic
from s4d_dist.models.moae import split_all_experts
from s4d_dist.train import distributed
from s4d_dist.train.flat_adamw import OptimizerStateError
from s4d_dist.train.faults import EXIT_USAGE, RunStopped, StorageError, human_bytes, storage_failure
from s4d_dist.train.run_folder import CHECKPOINTS, LATEST

log = logging.getLogger(__name__)

# The flat AdamW's state in DeepSpeed's model-states file (its client state; ZeRO-0 only).
FLAT_OPTIMIZER = "flat_optimizer"

# Sections a resumed run must share with the checkpoint; the rest (logging, epochs, ...) may change.
MUST_MATCH = ("task", "model", "mask")


class ResumeError(RunStopped):
    """A run folder or checkpoint that this run must not continue from."""

    exit_code = EXIT_USAGE


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_differences(saved: dict, current: DictConfig,
                       sections: Iterable[str] = MUST_MATCH) -> list[str]:
    """'key: saved → current' for every key under `sections` (top-level names) that differs."""
    now = OmegaConf.to_container(current, resolve=True)
    old = _flatten({k: saved.get(k) for k in sections})
    new = _flatten({k: now.get(k) for k in sections})
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def param_layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every parameter in module order, from which the optimizer's groups
    and ZeRO's flat partitions are built."""
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


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


def checkpoint_bytes(engine) -> int:
    """About how many bytes one checkpoint takes, all ranks together: the module's weights
    plus, per parameter, an fp32 master copy and AdamW's two fp32 moments (ZeRO partitions
    them across ranks, so their sum does not depend on the rank count)."""
    params = list(engine.module.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    return weights + 12 * sum(p.numel() for p in params)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# Outcomes of a save, in the order ranks agree on (the largest wins).
_FAILURES = (None, "write failed", "I/O error", "disk full")


class _RecordedWrites:
    """DeepSpeed's checkpoint engine with write errors recorded instead of raised: every rank
    then still reaches the collectives of `save_checkpoint`, whichever rank's write failed."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.error: BaseException | None = None

    def save(self, state_dict: dict, path: str) -> None:
        if self.error is None:
            try:
                self.inner.save(state_dict, path)
            except (OSError, RuntimeError) as error:
                self.error = error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Checkpoints:
    """Saving into, and resuming from, `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, cfg: DictConfig, keep: int = 2) -> None:
        self.dir = Path(run_dir) / CHECKPOINTS
        self.cfg = cfg
        self.keep = keep
        self.size = 0  # bytes of one checkpoint, once `check_space` has estimated it

    def _step_tags(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("step*") if p.is_dir())

    def check_space(self, engine) -> None:
        """Collective: refuse to train when the filesystem clearly cannot hold `keep`
        checkpoints (counting the space of the ones already there, which pruning frees)."""
        self.size = checkpoint_bytes(engine)
        self.dir.mkdir(parents=True, exist_ok=True)
        need = self.size * self.keep
        free = shutil.disk_usage(self.dir).free
        held = sum(_folder_bytes(self.dir / tag) for tag in self._step_tags())
        if distributed.host_any(free + held < need):
            raise StorageError(
                f"not enough space for checkpoints in {self.dir}: checkpoint.keep={self.keep} "
                f"checkpoints of about {human_bytes(self.size)} need {human_bytes(need)}, "
                f"{human_bytes(free)} free; free space, lower checkpoint.keep or pick another "
                f"output_dir")

    @property
    def latest_file(self) -> Path:
        return self.dir / LATEST

    def latest(self) -> str | None:
        return self.latest_file.read_text().strip() if self.latest_file.is_file() else None

    def save(self, engine, trainer_state: dict[str, Any], tag: str | None = None) -> str:
        """Collective: every rank writes its shard and its trainer state.

        Step checkpoints (default tag) become the resume point and are pruned to `keep`; a named
        tag (the best epoch) is written beside them and left alone. A named tag is written as
        `<tag>.partial` and renamed once complete, so a failed save leaves the previous one.
        """
        tag = tag or f"step{trainer_state['global_step']:09d}"
        step_tag = tag.startswith("step")
        written = tag if step_tag else f"{tag}.partial"
        error = self._write(engine, written, {"trainer": trainer_state, "rng": rng_state(),
                                              "config": OmegaConf.to_container(self.cfg,
                                                                               resolve=True),
                                              "param_layout": param_layout(engine.module)})
        self._agree(written, error)  # also the barrier before the pointer moves
        if distributed.is_main():
            try:
                if step_tag:
                    atomic.write_text(self.latest_file, tag)
                else:
                    shutil.rmtree(self.dir / tag, ignore_errors=True)
                    (self.dir / written).replace(self.dir / tag)
            except OSError as publish_error:
                error = publish_error
        self._agree(written, error)
        if distributed.is_main() and step_tag:
            self._prune(tag)
        return tag

    def _agree(self, tag: str, error: BaseException | None) -> None:
        """Collective: go on only if no rank's write failed (else `_fail` on every rank)."""
        failure = distributed.host_max(_FAILURES.index(self._what(error)) if error else 0)
        if failure:
            self._fail(tag, error, _FAILURES[failure])

    def _write(self, engine, tag: str, trainer: dict[str, Any]) -> BaseException | None:
        """This rank's part of a checkpoint; the first error met, instead of raising it."""
        recorded = engine.checkpoint_engine = _RecordedWrites(engine.checkpoint_engine)
        try:
            (self.dir / tag).mkdir(parents=True, exist_ok=True)
            optimizer = getattr(engine, "flat_optimizer", None)  # ZeRO-0: ours, in DeepSpeed's file
            client = {} if optimizer is None else {FLAT_OPTIMIZER: optimizer.state_dict()}
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, client_state=client)
            if recorded.error is None:
                torch.save(trainer, self._trainer_file(self.dir, tag))
        except (OSError, RuntimeError) as error:
            return error
        finally:
            engine.checkpoint_engine = recorded.inner
        return recorded.error

    def _what(self, error: BaseException) -> str:
        """How a write failed. Some full disks surface only as a stream error from torch's
        writer ("basic_ios::clear: iostream error"): then the free space tells."""
        if storage_failure(error):
            return storage_failure(error)
        return "disk full" if shutil.disk_usage(self.dir).free < self.size else "write failed"

    def _fail(self, tag: str, error: BaseException | None, what: str) -> None:
        """Collective, after a failed write on some rank: remove the partial tag folder and stop
        every rank with one message (`what`: the worst failure of any rank); the
        `latest_complete` pointer has not moved."""
        if distributed.is_main():
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        if what == "write failed":
            what = f"{type(error).__name__}: {error}" if error else "a write failed on another rank"
        previous = self.latest()
        kept = f"the previous checkpoint {previous} is intact" if previous else \
            "no earlier checkpoint"
        free = shutil.disk_usage(self.dir).free
        raise StorageError(f"could not write checkpoint {tag} to {self.dir} ({what}): it needs "
                           f"about {human_bytes(self.size)}, {human_bytes(free)} free; {kept}. "
                           f"Free space and rerun the same command to resume") from error

    def _prune(self, newest: str) -> None:
        tags = self._step_tags()
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
        if not module_only:
            self._check_layout(saved.get("param_layout"), engine.module, tag)
        _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_module_only=module_only,
                                           load_optimizer_states=not module_only,
                                           load_lr_scheduler_states=not module_only)
        if client is None:
            raise ResumeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        if module_only:
            return saved["trainer"]
        self._load_flat_optimizer(engine, client.get(FLAT_OPTIMIZER), tag)
        set_rng_state(saved["rng"])
        log.info("resumed from %s (global step %d)", self.dir / tag, saved["trainer"]["global_step"])
        return saved["trainer"]

    def _load_flat_optimizer(self, engine, state: dict | None, tag: str) -> None:
        """The flat AdamW's state (train/flat_adamw.py), refused if the checkpoint holds
        another optimizer's (an older s4d_dist's per-parameter AdamW, or ZeRO's partitions)."""
        optimizer = getattr(engine, "flat_optimizer", None)
        if optimizer is None and state is None:
            return
        if optimizer is None or state is None:
            wrote, runs = (("DeepSpeed's optimizer (ZeRO-1/2, fp16, or an s4d_dist before the "
                            "flat AdamW)", "the flat AdamW (ZeRO-0)") if state is None else
                           ("the flat AdamW (ZeRO-0)", "DeepSpeed's optimizer"))
            raise ResumeError(f"{self.dir / tag} holds the optimizer state of {wrote}, this run "
                              f"steps with {runs}: resume with the deepspeed.zero_stage and "
                              f"s4d_dist that wrote it, or start a run from its weights")
        try:
            optimizer.load_state_dict(state)
        except OptimizerStateError as error:
            raise ResumeError(f"{self.dir / tag}: {error}; resume it with the s4d_dist that "
                              f"wrote it, or start a run from its weights") from error

    def _check_layout(self, saved: list | None, module: torch.nn.Module, tag: str) -> None:
        """Refuse optimizer state written for other parameters. ZeRO keeps it as flat
        partitions of the parameters in order, so a checkpoint from a model whose parameters
        differ in order or shape (an s4d_dist version that held the MoAE experts unstacked,
        say) would load without an error into the wrong places."""
        now = param_layout(module)
        if saved is None:  # written before checkpoints recorded it: ZeRO's own record, unordered
            saved, now = self._zero_param_shapes(tag), sorted(now)
            if saved is None:
                log.warning("%s does not record its parameter layout (older s4d_dist, ZeRO-0): "
                            "resuming without checking it", self.dir / tag)
                return
        if [tuple(p) for p in saved] != now:
            differ = next((f"{a} vs {b}" for a, b in zip(saved, now) if tuple(a) != b),
                          f"{len(saved)} vs {len(now)} parameters")
            raise ResumeError(f"{self.dir / tag} holds optimizer state for other parameters "
                              f"(checkpoint vs this model: {differ}); resume it with the "
                              f"s4d_dist that wrote it, or start a run from its weights")

    def _zero_param_shapes(self, tag: str) -> list[tuple[str, tuple[int, ...]]] | None:
        """The parameters DeepSpeed's ZeRO (stage ≥ 1) saved optimizer state for, sorted."""
        states = self.dir / tag / "mp_rank_00_model_states.pt"
        groups = torch.load(states, map_location="cpu", weights_only=False).get("param_shapes")
        if not groups:
            return None
        return sorted((name, tuple(shape)) for group in groups for name, shape in group.items())

    def check_resumable(self, run_dir: Path) -> str | None:
        """The tag to resume from, after the run-folder rules; checked before anything is built
        or overwritten, so a refused resume leaves the folder as it was."""
        mode, latest = self.cfg.resume, self.latest()
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

    def drop_incomplete(self, resume_tag: str | None) -> None:
        """Remove (rank 0) the step folders newer than the resume point — saves that a crash
        or a full disk cut short — saying so: they are ignored, not silently."""
        incomplete = [t for t in self._step_tags() if resume_tag is None or t > resume_tag]
        if incomplete and distributed.is_main():
            start = f"resuming from {resume_tag}" if resume_tag else "starting from scratch"
            log.info(f"ignoring incomplete checkpoint {', '.join(incomplete)} in {self.dir} "
                     f"(its save was cut short); {start}")
            for tag in incomplete:
                shutil.rmtree(self.dir / tag, ignore_errors=True)


def export_fp32(engine, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a saved checkpoint: ZeRO ≥ 1's fp32 master partitions, the flat
    AdamW's fp32 masters (ZeRO-0), or the module's weights where they are fp32.

    With DeepSpeed's ZeRO-0 optimizer in bf16/fp16 (fp16 runs) the checkpoint holds no fp32
    masters that DeepSpeed's `zero_to_fp32` can read; the module's low-precision weights are
    exported instead, with a warning.
    """
    if engine.zero_optimization_stage() >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        split_all_experts(state)  # the masters are named as parameters; exports as state dicts
        module_keys = list(engine.module.state_dict())
        return {k: state[k].float() for k in module_keys}
    module_state = engine.module.state_dict()
    if getattr(engine, "flat_optimizer", None) is not None:  # the checkpoint's fp32 masters
        saved = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)[FLAT_OPTIMIZER]
        masters = {}
        for group in saved["groups"]:
            flat = group["master"]
            if flat is None:  # fp32 parameters: the module's weights are the masters
                return {k: v.detach().float().cpu().clone() for k, v in module_state.items()}
            sizes = [math.prod(shape) for _, shape in group["layout"]]
            for (name, shape), part in zip(group["layout"], flat.split(sizes)):
                masters[name] = part.view(shape)
        split_all_experts(masters)
        return {k: masters[k].float().clone() if k in masters else v.detach().float().cpu()
                for k, v in module_state.items()}
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        log.warning("ZeRO-0 in reduced precision: exporting the low-precision module weights")
    return {k: v.detach().float().cpu().clone() for k, v in module_state.items()}
