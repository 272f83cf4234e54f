"""Optimizer parameter groups: which weights decay, and each layer's learning-rate scale.

Fine-tuning (docs/method.md §2.9): no decay for 1-D parameters and `*.bias`; layer-wise lr decay
with scale = decay^(depth + 1 - layer_id), layer_id 0 for the patch embedding, j + 1 for block j
(its MoAE adapters included) and depth + 1 for everything after the blocks.
Pre-training (§1.7): no decay for biases, norms, the attention q/v biases and the mask token.
The official pre-training rule (fnmatch `*.bias` + LayerNorm modules) misses `q_bias`,
`v_bias` and `mask_token` (§3.17); `official_pretrain_rule=True` reproduces it. The official
fine-tuning rule is already the correct one.
"""
from __future__ import annotations

import fnmatch

from torch import nn


def layer_id(name: str, depth: int) -> int:
    """Depth position of a parameter for layer-wise lr decay (0 = input, depth + 1 = heads)."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _official_pretrain_no_decay(model: nn.Module) -> set[str]:
    norm_params = {f"{module_name}.{p}" if module_name else p
                   for module_name, module in model.named_modules()
                   if isinstance(module, nn.LayerNorm) for p, _ in module.named_parameters()}
    return {n for n, _ in model.named_parameters()
            if fnmatch.fnmatch(n, "*.bias") or n in norm_params}


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (every 1-D parameter, q/v biases included) and the mask token."""
    return param.ndim <= 1 or name.endswith("bias") or name == "mask_token"


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 depth: int | None = None, official_pretrain_rule: bool = False,
                 by_layer: bool = False) -> list[dict]:
    """Groups for the optimizers, parameters in module order with their `names`.

    Default: one group per weight-decay value (≤ 2), each parameter's lr scale in `lr_scales`
    (the scheduled lr is multiplied by it): what train/flat_adamw.py takes. `by_layer`: one
    group per (layer, decay) with a single `lr_scale`, named `layer{id}_decay|no_decay`, for an
    optimizer with one lr per group (DeepSpeed's ZeRO; layer-wise decay over ViT-B's 12 blocks
    makes 28). `depth` (number of blocks) is needed only when `layer_decay` != 1.
    """
    if layer_decay != 1.0 and depth is None:
        raise ValueError("layer-wise lr decay needs the encoder depth")
    quirky = _official_pretrain_no_decay(model) if official_pretrain_rule else None
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip_decay = name in quirky if quirky is not None else no_decay(name, param)
        lid = layer_id(name, depth) if layer_decay != 1.0 else 0
        scale = layer_decay ** (depth + 1 - lid) if layer_decay != 1.0 else 1.0
        kind = "no_decay" if skip_decay else "decay"
        group = groups.setdefault((lid if by_layer else 0, skip_decay), {
            "name": f"layer{lid}_{kind}" if by_layer else kind, "params": [], "names": [],
            "lr_scales": [], "weight_decay": 0.0 if skip_decay else weight_decay})
        group["params"].append(param)
        group["names"].append(name)
        group["lr_scales"].append(scale)
        if by_layer:
            group["lr_scale"] = scale
    return list(groups.values())
