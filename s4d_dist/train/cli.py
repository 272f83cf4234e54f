"""Command line of the training entry points (launch/pretrain.py, launch/finetune.py).

    deepspeed launch/pretrain.py --config pretrain_vit_base [key=value ...]
    torchrun --nproc_per_node 8 launch/finetune.py --config finetune_dfew data.fold=3
    python launch/finetune.py --config demo

`--config` is a preset name or a YAML path; the rest are dotlist overrides. The launcher's
own `--local_rank` is accepted and ignored (LOCAL_RANK is read from the environment).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from s4d_dist import config


def parse(task: str, argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog=f"launch/{task}.py",
                                     description=f"S4D {task} under DeepSpeed")
    parser.add_argument("--config", required=True, help="preset name or YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    try:
        return config.load(args.config, [f"task={task}", *args.overrides])
    except config.ConfigError as error:
        parser.error(str(error))


def main(task: str, argv: list[str] | None = None) -> dict:
    cfg = parse(task, argv)
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    from s4d_dist.train.loop import train  # heavy imports after argument errors are reported

    return train(cfg, make_task(cfg))


def make_task(cfg):
    """The loop's task for `cfg.task`, imported only when needed (each pulls in models, data)."""
    if cfg.task == "pretrain":
        from s4d_dist.train.pretrain import PretrainTask
        return PretrainTask(cfg)
    from s4d_dist.train.finetune import FinetuneTask
    return FinetuneTask(cfg)
