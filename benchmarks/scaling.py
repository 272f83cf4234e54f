"""Ray Train scaling and scheduling overhead: the demo pre-training run by s4d_dist.orchestrate.

    python benchmarks/scaling.py            # CPU, a few minutes

Configurations, each a fresh run of the `demo` preset shortened to one small epoch, launched
exactly as `launch/sweep.py --mode train` launches it (`ray_train.fit`):
  1 worker on one node · 2 workers on one node · 2 workers on 2 simulated nodes
  (ray.cluster_utils.Cluster: two raylets on this machine) · 1 worker as a Ray Tune trial
  (`trials.run`, the path of every sweep and k-fold trial).
Throughput is all ranks' samples over the wall time of the steps after the first two (data
waits included), from the per-step events in each run's TensorBoard folder. Scheduling
overhead is the time from the launch call to the end of the first training step (worker
processes, imports, process group, DeepSpeed engine, data pipeline, one step). Scaling
efficiency = samples/s with 2 workers / (2 × with 1 worker). Writes
benchmarks/results/scaling_cpu.json. On a shared machine the numbers move with
the load of other processes: the load average is recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(run: Path, started: float, cfg, workers: int) -> dict:
    """Throughput and time to the first step of a finished run, from its TensorBoard events.

    Every step is logged (logging.log_every=1) with its modality's loss, so the samples of each
    step are known (a batch per rank); throughput is the samples of steps 3.. over the wall time
    they took, which weighs image and video steps by their real cost.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    batch = {"image": cfg.data.image_batch_size, "video": cfg.data.video_batch_size}
    steps = sorted((e.step, e.wall_time, workers * batch[m])
                   for m in batch for e in events.Scalars(f"loss/{m}"))
    timed = steps[2:]
    return {"samples_per_s": sum(n for _, _, n in timed[1:]) / (timed[-1][1] - timed[0][1]),
            "steps": len(steps), "first_step_s": steps[0][1] - started}


def run_config(name: str, cfg, workers: int, nodes: int) -> dict:
    from s4d_dist.orchestrate import ray_train, runs

    cfg = runs.with_values(cfg, name, {"run_name": name, "ray": {"num_workers": workers}})
    started = time.time()
    ray_train.fit(cfg)
    result = {"name": name, "workers": workers, "nodes": nodes, "launch": "TorchTrainer",
              **measure(Path(cfg.output_dir) / name, started, cfg, workers)}
    print(json.dumps(result), flush=True)
    return result


def run_trial(cfg) -> dict:
    from ray import tune

    from s4d_dist.orchestrate import runs, trials

    cfg = runs.absolute_paths(runs.with_values(cfg, "tune trial", {"run_name": "tune_trial"}))
    folder = Path(cfg.output_dir) / "tune_trial"
    started = time.time()
    grid = trials.run(cfg, {"seed": tune.grid_search([cfg.seed])}, folder, trials_dir=folder)
    run = next(folder.glob("trial_*"))
    assert not grid.errors, grid.errors
    result = {"name": "tune_trial", "workers": 1, "nodes": 1, "launch": "Tune trial → TorchTrainer",
              **measure(run, started, cfg, 1)}
    print(json.dumps(result), flush=True)
    return result


def run_all(work: Path, args: argparse.Namespace) -> list[dict]:
    """Every configuration, on synthetic shards built in `work`."""
    import ray
    from ray.cluster_utils import Cluster

    from s4d_dist import config
    from s4d_dist.shards.synthetic import build_synthetic

    base = config.load("demo")
    for modality, count in (("image", args.images), ("video", args.clips)):
        build_synthetic(work / modality, modality, {"train": count}, size=base.model.img_size,
                        frames=2 * base.model.num_frames, seed=0, workers=2)
    cfg = config.load("demo", [
        f"output_dir={work / 'runs'}", f"data.image_shards={work / 'image' / 'train'}",
        f"data.video_shards={work / 'video' / 'train'}", "data.video_rate=1.0", "optim.epochs=1",
        "logging.log_every=1", "logging.image_every=100000", "data.workers=0"])

    ray.init(num_cpus=2, include_dashboard=True)  # its state API frees finished trials' resources
    results = [run_config("one_node_1w", cfg, 1, 1), run_config("one_node_2w", cfg, 2, 1),
               run_trial(cfg)]
    ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address)
    results.append(run_config("two_nodes_2w", cfg, 2, 2))
    ray.shutdown()
    nodes.shutdown()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="training images per class")
    parser.add_argument("--clips", type=int, default=24, help="training clips per class")
    args = parser.parse_args(argv)
    import ray
    import torch

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="s4d_scaling_"))
    try:
        results = run_all(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by = {r["name"]: r for r in results}
    one = by["one_node_1w"]["samples_per_s"]
    summary = {
        "device": "cpu", "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__,
        "preset": f"demo (pre-training), one epoch of {args.images}×7 images, {args.clips}×7 clips",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "configs": results,
        "scaling_efficiency": {
            "two_workers_one_node": by["one_node_2w"]["samples_per_s"] / (2 * one),
            "two_workers_two_nodes": by["two_nodes_2w"]["samples_per_s"] / (2 * one)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling_cpu.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["scaling_efficiency"], indent=1))
    return summary


if __name__ == "__main__":
    main()
