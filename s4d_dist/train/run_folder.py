"""Where a run lives: `<output_dir>/<run_name>`, plus `/fold<k>` for a k-fold fine-tuning run.

Imports nothing heavy: the command line and the checks before a run (preflight.py) need the
folder before torch and DeepSpeed are imported.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CHECKPOINTS = "checkpoints"  # checkpoint.py's folder in the run folder
LATEST = "latest_complete"  # its pointer to the last complete checkpoint


def run_dir(cfg: DictConfig) -> Path:
    """`<output_dir>/<run_name>`, plus `/fold<k>` for a k-fold fine-tuning run."""
    path = Path(cfg.output_dir) / cfg.run_name
    return path / f"fold{cfg.data.fold}" if cfg.task == "finetune" and cfg.data.fold else path


def has_checkpoint(folder: Path) -> bool:
    """Whether the run folder holds a complete checkpoint to resume from (checkpoint.py)."""
    return (Path(folder) / CHECKPOINTS / LATEST).is_file()
