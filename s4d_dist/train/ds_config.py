"""The DeepSpeed JSON config, generated from the OmegaConf tree.

Generated rather than hand-written so the batch sizes, precision and ZeRO stage a run uses are
the ones its resolved config records; `launch/ds/*.json` are examples of the output, written by
`python -m s4d_dist.train.ds_config <preset>`. The optimizer is not in it: the loops pass a
client AdamW built from our parameter groups, whose per-group `lr_scale` the schedule applies.
"""
from __future__ import annotations

import json
import sys

from omegaconf import DictConfig


def micro_batch(cfg: DictConfig) -> int:
    """Samples per rank per micro-step that DeepSpeed accounts (the larger of the modalities)."""
    return max(cfg.data.image_batch_size, cfg.data.video_batch_size)


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    ds = cfg.deepspeed
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch(cfg),
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch(cfg) * ds.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2},
        "steps_per_print": 2**31 - 1,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage > 0:
        config["zero_optimization"].update(contiguous_gradients=True, overlap_comm=True,
                                           reduce_bucket_size=5e8, allgather_bucket_size=5e8)
    return config


def main() -> None:
    """Print the generated config of a preset (with overrides) for a given world size."""
    from s4d_dist import config

    preset, *rest = sys.argv[1:] or ["pretrain_vit_base"]
    world = int(next((a.split("=", 1)[1] for a in rest if a.startswith("world_size=")), 1))
    cfg = config.load(preset, [a for a in rest if not a.startswith("world_size=")])
    print(json.dumps(deepspeed_config(cfg, world), indent=2))


if __name__ == "__main__":
    main()
