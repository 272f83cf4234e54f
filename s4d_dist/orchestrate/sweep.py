"""Hyperparameter sweeps: trials drawn from `sweep.space`, stopped early by ASHA on the
validation metric each epoch reports, every trial a TorchTrainer with its own run folder.

The sweep folder `<output_dir>/<run_name>` holds:
    trial_<id>/                   each trial's run folder (config, checkpoints, tb/, metrics.json)
    tune/                         Ray Tune's own records
    sweep_results.csv, .json      one row per trial, best first
    best.yaml                     the best trial's config: a preset for `--config` / config.load

Trials are ranked by the best value of `sweep.metric` over their epochs, the rule by which
fine-tuning picks its best epoch (on validation, never on test).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray.tune.schedulers import ASHAScheduler

from s4d_dist import atomic, config
from s4d_dist.orchestrate import runs, space, trials
from s4d_dist.train.loop import run_dir


def reported_metrics(cfg: DictConfig) -> set[str]:
    """What every epoch reports through train()'s on_epoch_end hook: the training loss, and
    for fine-tuning FinetuneTask.after_epoch's WAR and UAR on the split it selects the best
    epoch on (val_war / val_uar; test_war / test_uar under official.select_on_test)."""
    from s4d_dist.train.finetune import FinetuneTask

    names = {"train_loss"}
    split = FinetuneTask(cfg).selection_split() if cfg.task == "finetune" else None
    if split:
        names |= {f"{split}_war", f"{split}_uar"}
    return names


def check(cfg: DictConfig) -> list[space.Dimension]:
    """Everything about a sweep that can be wrong before the cluster is involved."""
    if cfg.sweep.metric not in reported_metrics(cfg):
        raise config.ConfigError(
            f"sweep.metric '{cfg.sweep.metric}' is not reported by task={cfg.task} with this "
            f"config; reported each epoch: {', '.join(sorted(reported_metrics(cfg)))}")
    dims = space.check(cfg)
    runs.check_data(cfg)
    return dims


def _scheduler(cfg: DictConfig) -> ASHAScheduler | None:
    s = cfg.sweep
    if s.scheduler == "fifo":
        return None
    return ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=cfg.optim.epochs,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _lookup(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def _row(result, cfg: DictConfig, dims: list[space.Dimension], folder: Path) -> dict[str, Any]:
    metric = cfg.sweep.metric
    row: dict[str, Any] = {"trial_id": result.metrics.get("trial_id"), "status": "error",
                           "epochs": result.metrics.get("epoch", 0)}
    row.update({dim.key: _lookup(result.config, dim.key) for dim in dims})
    history = result.metrics_dataframe
    values = [] if history is None or metric not in history else history[metric].dropna().tolist()
    pick = max if cfg.sweep.mode == "max" else min
    row[metric] = values[-1] if values else None
    row[f"{metric}_best"] = pick(values) if values else None
    run = None
    if row["trial_id"]:
        run = run_dir(trials.trial_config(runs.as_dict(cfg), result.config, row["trial_id"],
                                          str(folder)))
    if result.error is None and run is not None:
        finished = (run / "metrics.json").is_file()
        row["status"] = "finished" if finished else "stopped early"
        if finished:
            final = json.loads((run / "metrics.json").read_text())
            test = final.get("best", final.get("last", {}))
            row.update(test_war=test.get("war"), test_uar=test.get("uar"))
    row["run_dir"] = str(run) if run else None
    row["error"] = str(result.error).strip()[:2000] if result.error else None
    return row


def _ranked(rows: list[dict[str, Any]], cfg: DictConfig) -> list[dict[str, Any]]:
    key = f"{cfg.sweep.metric}_best"
    sign = -1 if cfg.sweep.mode == "max" else 1
    return sorted(rows, key=lambda r: sign * r[key] if r[key] is not None else math.inf)


def write_table(rows: list[dict[str, Any]], cfg: DictConfig, folder: Path) -> None:
    """sweep_results.csv and .json, best first (each whole or absent: atomic.py)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic.replacing(folder / "sweep_results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    atomic.write_text(folder / "sweep_results.json", json.dumps(
        {"metric": cfg.sweep.metric, "mode": cfg.sweep.mode, "ranked_by": f"{cfg.sweep.metric}_best",
         "trials": rows}, indent=1, default=float))


def write_best_preset(cfg: DictConfig, values: dict[str, Any], row: dict[str, Any],
                      path: Path) -> None:
    """The best trial's full config as a preset, named `<run_name>_best`, with no sweep left in it."""
    best = runs.as_dict(config.from_values(("sweep base config", runs.as_dict(cfg)),
                                           ("best trial values", values)))
    best["run_name"] = f"{cfg.run_name}_best"
    best["sweep"]["space"] = {}
    config.from_values((str(path), best))  # what config.load will do with the file
    metric = cfg.sweep.metric
    atomic.write_text(path, f"# Best trial {row['trial_id']} of sweep {cfg.run_name}: {metric} "
                    f"{row[f'{metric}_best']} (best epoch). Train it with\n"
                    f"#   python launch/sweep.py --config {path} --mode train\n"
                    + OmegaConf.to_yaml(OmegaConf.create(best)))


def _print(rows: list[dict[str, Any]], dims: list[space.Dimension], metric: str) -> None:
    columns = ["trial_id", "status", "epochs", *(d.key for d in dims), f"{metric}_best", "test_war"]
    print("  ".join(columns))
    for row in rows:
        print("  ".join(f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c))
                        for c in columns))


def sweep(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the sweep of `cfg` and return its rows, best first (also written to files)."""
    cfg = runs.absolute_paths(cfg)
    dims = check(cfg)
    folder = Path(cfg.output_dir) / cfg.run_name
    folder.mkdir(parents=True, exist_ok=True)
    grid = trials.run(cfg, space.param_space(dims), folder, trials_dir=folder,
                      scheduler=_scheduler(cfg), num_samples=cfg.sweep.num_samples)
    rows = _ranked([_row(result, cfg, dims, folder) for result in grid], cfg)
    write_table(rows, cfg, folder)
    if not rows or rows[0][f"{cfg.sweep.metric}_best"] is None:
        raise RuntimeError(f"no trial of sweep {folder} reported {cfg.sweep.metric}; "
                           f"see {folder / 'sweep_results.json'}")
    values = runs.nested({dim.key: rows[0][dim.key] for dim in dims})
    write_best_preset(cfg, values, rows[0], folder / "best.yaml")
    _print(rows, dims, cfg.sweep.metric)
    return rows
