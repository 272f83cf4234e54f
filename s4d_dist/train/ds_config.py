"""The DeepSpeed JSON config, generated from the OmegaConf tree.

Generated rather than hand-written so the batch sizes, precision and ZeRO stage a run uses are
the ones its resolved config records; `launch/ds/*.json` are examples of the output, written by
`python -m s4d_dist.train.ds_config <preset>`. The optimizer is not in it: with ZeRO-0 the step
uses the flat AdamW (train/flat_adamw.py) and DeepSpeed gets none; with ZeRO-1/2 the loops pass a
client AdamW with one group per layer, whose `lr_scale` the schedule applies.
"""
from __future__ import annotations

import json

from omegaconf import DictConfig


def micro_batch(cfg: DictConfig) -> int:
    """Samples per rank per micro-step that DeepSpeed accounts (the larger of the modalities)."""
    return max(cfg.data.image_batch_size, cfg.data.video_batch_size)


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    """The DeepSpeed config of a run of `world_size` ranks; ZeRO's buckets come from
    `deepspeed.*_bucket_size` (config.py says how they are sized)."""
    ds = cfg.deepspeed
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch(cfg),
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch(cfg) * ds.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        # Dynamic loss scaling set like torch's GradScaler, the official runs' scaler
        # (docs/method.md §1.10): start at 2^16, halve on the first overflow and skip that
        # step (hysteresis 1), double after 2000 steps without one.
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1},
        "steps_per_print": 2**31 - 1,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage > 0:
        config["zero_optimization"].update(contiguous_gradients=True, overlap_comm=ds.overlap_comm,
                                           reduce_bucket_size=ds.reduce_bucket_size,
                                           allgather_bucket_size=ds.allgather_bucket_size)
    return config


def main(argv: list[str] | None = None) -> None:
    """Print the generated config of a preset (with overrides) for a given world size."""
    import argparse

    from s4d_dist import config

    parser = argparse.ArgumentParser(
        prog="python -m s4d_dist.train.ds_config",
        description="Print the DeepSpeed JSON config that a preset generates for a world size.",
        epilog="example: python -m s4d_dist.train.ds_config finetune_dfew world_size=8 "
               "deepspeed.zero_stage=2")
    parser.add_argument("preset", nargs="?", default="pretrain_vit_base",
                        help="preset name or YAML file (default pretrain_vit_base)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, and world_size=N (default 1)")
    args = parser.parse_intermixed_args(argv)
    sizes = [a.split("=", 1)[1] for a in args.overrides if a.startswith("world_size=")]
    try:
        world = int(sizes[-1]) if sizes else 1
        cfg = config.load(args.preset,
                          [a for a in args.overrides if not a.startswith("world_size=")])
    except ValueError as error:  # config.ConfigError, or a world size that is not a number
        parser.error(str(error))
    print(json.dumps(deepspeed_config(cfg, world), indent=2))


if __name__ == "__main__":
    main()
