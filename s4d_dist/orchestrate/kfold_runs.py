"""The folds of a k-fold dataset (DFEW, MAFW) fine-tuned side by side from one command.

Each fold is a Tune trial running one TorchTrainer with `data.fold=k`, in the run folder the
loop already gives it, `<output_dir>/<run_name>/fold<k>`; as many run at once as the cluster
holds. The summary — per fold, and mean ± std over folds of each test metric for the last and
the best epoch — is read from the folds' own metrics.json, so it is the same numbers the runs
wrote, and lands in `<output_dir>/<run_name>/kfold_summary.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from ray import tune

from s4d_dist import atomic, config
from s4d_dist.orchestrate import runs, trials
from s4d_dist.train.loop import run_dir
from s4d_dist.train.metrics import mean_std

EPOCHS = ("last", "best")


def fold_configs(cfg: DictConfig) -> dict[int, DictConfig]:
    if cfg.task != "finetune":
        raise config.ConfigError(f"--mode kfold fine-tunes; task is '{cfg.task}'")
    if not cfg.sweep.folds:
        raise config.ConfigError("sweep.folds is empty: no fold to run")
    return {k: runs.with_values(cfg, f"fold {k}", {"data": {"fold": k}}) for k in cfg.sweep.folds}


def summarize(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{last, best: {metric: {mean, std}}, folds: {k: {last, best: {metric: value}}}}."""
    summary: dict[str, Any] = {"folds": {}}
    for epoch in EPOCHS:
        per_fold = [r[epoch] for r in results.values() if epoch in r]
        if per_fold:
            summary[epoch] = {k: {"mean": m, "std": s} for k, (m, s) in mean_std(per_fold).items()}
    for k, r in results.items():
        summary["folds"][k] = {e: {m: v for m, v in r[e].items() if isinstance(v, (int, float))}
                               for e in EPOCHS if e in r}
    return summary


def _print(summary: dict[str, Any]) -> None:
    print(f"k-fold summary over folds {sorted(summary['folds'])} (test, mean ± std):")
    for epoch in EPOCHS:
        if epoch in summary:
            cells = [f"{k} {v['mean']:.2f} ± {v['std']:.2f}" for k, v in summary[epoch].items()
                     if k != "samples"]
            print(f"  {epoch + ' epoch':<11} " + "   ".join(cells))


def kfold(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune every fold of `sweep.folds`; return and write the summary."""
    cfg = runs.absolute_paths(cfg)
    folds = fold_configs(cfg)
    for fold_cfg in folds.values():
        runs.check_folder(fold_cfg)
        runs.check_data(fold_cfg)
    folder = Path(cfg.output_dir) / cfg.run_name
    grid = trials.run(cfg, {"data": {"fold": tune.grid_search(list(folds))}}, folder)
    results, failed = {}, {}
    for k, fold_cfg in folds.items():
        metrics = run_dir(fold_cfg) / "metrics.json"
        if metrics.is_file():
            results[k] = json.loads(metrics.read_text())
    for result in grid:
        if result.error is not None:
            failed[result.config["data"]["fold"]] = str(result.error).strip()[:2000]
    summary = summarize(results)
    summary["failed"] = failed
    atomic.write_text(folder / "kfold_summary.json", json.dumps(summary, indent=1))
    _print(summary)
    if failed or len(results) < len(folds):
        raise RuntimeError(f"folds {sorted(set(folds) - set(results))} did not finish "
                           f"(errors: {failed}); summary of the others in {folder / 'kfold_summary.json'}")
    return summary
