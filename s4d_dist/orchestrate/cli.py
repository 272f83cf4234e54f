"""S4D on a Ray cluster: one run, a hyperparameter sweep, or every fold of a k-fold dataset.

    python launch/sweep.py --config demo_finetune --mode train ray.num_workers=2 [key=value ...]
    python launch/sweep.py --config finetune_dfew --mode sweep \\
        sweep.space.optim.base_lr.loguniform=[1e-5,1e-3] sweep.space.model.moae.top_k.choice=[1,2]
    python launch/sweep.py --config finetune_mafw --mode kfold
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/sweep.py ... output_dir=$PWD/runs     # Ray runs the driver elsewhere
    ray submit launch/sweep.yaml launch/sweep.py -- ...     # a cloud cluster: docs/reproducing.md

The cluster: `ray.address` from the command line, else RAY_ADDRESS (what `ray job submit` gives
its drivers), else the preset's `ray.address`, else a local cluster started here with its
dashboard on `ray.dashboard_host` (127.0.0.1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from s4d_dist import config

MODES = ("train", "sweep", "kfold")


def parse(argv: list[str] | None = None):
    """(mode, resolved config) of the command line; `--print-config` prints it and exits."""
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{config.describe_presets()}\n\nexamples:\n"
               + textwrap.indent(textwrap.dedent(__doc__.split("\n\n")[1]), "  "))
    parser.add_argument("--config", required=True, help="preset name (below) or YAML file")
    parser.add_argument("--mode", choices=MODES, default="train")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, anywhere among the flags")
    args = parser.parse_intermixed_args(argv)
    address = os.environ.get("RAY_ADDRESS", "")
    overrides = ([f"ray.address={address}"] if address else []) + args.overrides
    try:
        cfg = config.load(args.config, overrides)
    except config.ConfigError as error:
        parser.error(str(error))
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        raise SystemExit(0)
    return args.mode, cfg


def main(argv: list[str] | None = None) -> int:
    mode, cfg = parse(argv)
    import ray  # heavy imports after argument errors are reported

    from s4d_dist.orchestrate import cluster, kfold_runs, ray_train, sweep
    from s4d_dist.shards.layout import BuildError
    from s4d_dist.train.checkpoint import ResumeError
    from s4d_dist.train.faults import RunStopped

    run = {"train": ray_train.fit, "sweep": sweep.sweep, "kfold": kfold_runs.kfold}[mode]
    try:
        result = run(cfg)
    except (ValueError, FileNotFoundError, BuildError, ResumeError, cluster.ClusterError) as error:
        # Bad input found before training (config, search space, shards, run folder, cluster).
        print(f"launch/sweep.py: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # the workers' stop, once Ray Train stopped restarting them
        print(f"launch/sweep.py: {stop} (exit {stop.exit_code})", file=sys.stderr)
        return stop.exit_code
    finally:
        ray.shutdown()
    if mode == "train":
        print(json.dumps(result, indent=1, default=str))
    return 0
