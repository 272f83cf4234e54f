"""Many runs side by side through Ray Tune, each trial one TorchTrainer.

A trial's own process only launches its TorchTrainer and relays its epoch reports to Tune
(`TuneReportCallback`); the training workers hold the CPUs and GPUs. So a trial reserves some
memory but no CPU (Tune's default of one CPU per trial would keep a 2-worker run off a 2-CPU
node), and `max_concurrent_trials` is the number of runs the cluster holds at once, so that no
trial waits for workers that are not coming.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from s4d_dist import config
from s4d_dist.orchestrate import cluster, ray_train, runs

DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 2**20}


def trial_config(base: dict[str, Any], values: dict[str, Any], trial_id: str,
                 trials_dir: str | None) -> DictConfig:
    """A trial's config: the base with the trial's values; with `trials_dir`, its own run
    folder `<trials_dir>/trial_<id>` (a sweep), else the base's (k-fold: fold<k> folders)."""
    layers = [("sweep base config", base), (f"trial {trial_id} values", values)]
    if trials_dir:
        layers.append(("trial run folder", {"output_dir": trials_dir, "run_name": f"trial_{trial_id}"}))
    return config.from_values(*layers)


def _trial(values: dict[str, Any], base: dict[str, Any], trials_dir: str | None) -> None:
    cfg = trial_config(base, values, tune.get_context().get_trial_id(), trials_dir)
    ray_train.trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def run(cfg: DictConfig, param_space: dict[str, Any], folder: Path, *,
        trials_dir: Path | None = None, scheduler: TrialScheduler | None = None,
        num_samples: int = 1) -> tune.ResultGrid:
    """Run the trials of `param_space` (Tune's own records under `<folder>/tune`), on the
    cluster of `cfg` (joined here, where no session is open) with its GPUs per worker decided."""
    cfg = cluster.connect(cfg)
    cluster.require_state_api()
    trainable = tune.with_parameters(_trial, base=runs.as_dict(cfg),
                                     trials_dir=str(trials_dir) if trials_dir else None)
    tuner = tune.Tuner(
        tune.with_resources(trainable, DRIVER_RESOURCES),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler, num_samples=num_samples,
            # Tune ignores TuneConfig.max_concurrent_trials next to a search_alg of this kind.
            search_alg=BasicVariantGenerator(max_concurrent=cluster.concurrency(cfg),
                                             random_state=cfg.seed)),
        run_config=tune.RunConfig(name="tune", storage_path=str(folder)))
    return tuner.fit()
