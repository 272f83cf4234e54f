"""The README's main job on the small `demo` preset: `python -m s4d_dist.demo`.

Renders synthetic expressive faces, runs a few MAE pre-training steps on images and clips,
initialises the MoAE classifier from that MAE the way the official code does, runs a few
multi-task fine-tuning steps, and prints what happened. Single process, plain torch.optim: the
DeepSpeed pipeline (shards, DALI, schedules, checkpoints, TensorBoard) replaces this loop when
the training issue lands.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from s4d_dist import config
from s4d_dist.data.masking import random_masks
from s4d_dist.data.synthetic import SyntheticSpec, iter_samples
from s4d_dist.models import official
from s4d_dist.models.build import build_classifier, build_mae
from s4d_dist.models.mae import mae_loss, mae_targets
from s4d_dist.models.param_groups import param_groups
from s4d_dist.models.vit import count_params
from s4d_dist.pixels import from_uint8


def synthetic_batch(spec: SyntheticSpec, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    samples = list(iter_samples(spec, modality, "train"))
    pixels = torch.stack([from_uint8(torch.from_numpy(a)) for _, _, a, _ in samples])
    return pixels, torch.tensor([label for _, label, _, _ in samples])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    cfg = config.load("demo", args.overrides)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    spec = SyntheticSpec(samples_per_class=3, size=m.img_size, frames=m.num_frames, seed=cfg.seed)
    start = time.time()
    batches = {mod: synthetic_batch(spec, mod) for mod in ("image", "video")}
    print(f"rendered {sum(len(b[1]) for b in batches.values())} synthetic faces "
          f"({m.img_size}px, {m.num_frames}-frame clips) in {time.time() - start:.1f}s")

    mae = build_mae(cfg)
    opt = torch.optim.AdamW(param_groups(mae, cfg.optim.weight_decay), lr=cfg.optim.base_lr,
                            betas=tuple(cfg.optim.betas))
    ratios = {"image": cfg.mask.image_ratio, "video": cfg.mask.video_ratio}
    print(f"MAE pre-training: {count_params(mae):,} parameters")
    for step in range(args.steps):
        modality = "image" if step % 2 == 0 else "video"
        pixels, _ = batches[modality]
        mask = random_masks(len(pixels), mae.encoder.num_tokens(modality), ratios[modality])
        loss = mae_loss(mae(pixels, mask), mae_targets(pixels, m.tubelet, m.patch), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, 1) or step >= args.steps - 2:
            print(f"  step {step:3d} {modality:5s} MAE loss {loss.item():.4f}")

    model = build_classifier(cfg)
    report = official.init_from_pretrained(model, mae.state_dict())
    print(f"fine-tuning model: {count_params(model):,} parameters; from the MAE: "
          f"{report['carried']} keys carried, {report['fresh']} freshly initialised")
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.base_lr)
    for step in range(args.steps):
        modality = "video" if step % 2 == 0 else "image"
        pixels, labels = batches[modality]
        loss = F.cross_entropy(model(pixels, modality), labels)
        aux = model.aux_loss()
        total = loss + m.moae.aux_loss_coeff * aux if aux is not None else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        if step in (0, 1) or step >= args.steps - 2:
            print(f"  step {step:3d} {modality:5s} CE {loss.item():.4f} aux "
                  f"{0.0 if aux is None else aux.item():.4f}")
    for i, layer in model.moae_layers().items():
        stats = {k: np.round(v.detach().float().numpy(), 3).tolist() for k, v in layer.stats.items()}
        print(f"  MoAE layer {i}: {stats}")
    print(f"demo finished in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
