"""Official S4D checkpoints in and out (docs/method.md §6).

`load(path)` turns an official pre-training (`vit_base_voxceleb2+affectnet_100.pt`) or
fine-tuning (`checkpoint-best.pth`) file into our model with its weights in place, and
`save(model, path)` writes our model in that layout, so results can be compared with (and
handed to) the official code. `init_from_pretrained` is the official fine-tuning initialisation
(§6.3), done strictly: every key that should carry over must, and the counts are reported.

Files are unpickled with `weights_only=True`; the only extra type allowed is the
`argparse.Namespace` that official fine-tuned checkpoints store under `args`.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s4d_dist.models.classifier import S4DClassifier
from s4d_dist.models.mae import PretrainMAE

log = logging.getLogger(__name__)

HEAD_DIM = 64  # heads are not stored in a checkpoint; every official model uses 64-wide heads
NOT_FROM_PRETRAIN = ("moe_layer.", "fc_norm.", "head.")  # fine-tune keys a pre-train lacks


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason in the message."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside an official file: `model`, else `module`, else the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to unpickle (only tensors, plain containers and "
                              f"argparse.Namespace are allowed): {error}") from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from None
    return pick_state_dict(obj, str(path))


def pick_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """§6.3 step 1: `obj["model"]`, else `obj["module"]`, else `obj` itself."""
    if isinstance(obj, dict):
        for key in ("model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: holds no state dict of tensors")
    return obj


def _count_indexed(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _encoder_shape(sd: dict[str, torch.Tensor], prefix: str,
                   num_heads: int | None) -> dict[str, Any]:
    """Encoder hyper-parameters read off tensor shapes (heads, unless given, from HEAD_DIM)."""
    dim, in_chans, tubelet, patch, _ = sd[f"{prefix}patch_embed.proj.weight"].shape
    keys = list(sd)
    return dict(embed_dim=dim, in_chans=in_chans, tubelet=tubelet, patch=patch,
                depth=_count_indexed(keys, rf"{re.escape(prefix)}blocks\.(\d+)\."),
                num_heads=num_heads or dim // HEAD_DIM,
                mlp_ratio=sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / dim)


def mae_from_state_dict(sd: dict[str, torch.Tensor], img_size: int = 160,
                        num_frames: int = 16, num_heads: int | None = None,
                        decoder_heads: int | None = None) -> PretrainMAE:
    decoder_dim = sd["mask_token"].shape[-1]
    return PretrainMAE(img_size=img_size, num_frames=num_frames,
                       **_encoder_shape(sd, "encoder.", num_heads), decoder_dim=decoder_dim,
                       decoder_depth=_count_indexed(list(sd), r"decoder\.blocks\.(\d+)\."),
                       decoder_heads=decoder_heads or decoder_dim // HEAD_DIM)


def classifier_from_state_dict(sd: dict[str, torch.Tensor], img_size: int = 160,
                               num_frames: int = 16, top_k: int = 2,
                               num_heads: int | None = None,
                               **moae_options: Any) -> S4DClassifier:
    """A classifier shaped like `sd`; `top_k` is not stored in checkpoints (official: 2)."""
    shape = _encoder_shape(sd, "", num_heads)
    moae_layers = sorted({int(k.split(".")[1]) for k in sd if ".moe_layer." in k})
    first = f"blocks.{moae_layers[0]}.moe_layer." if moae_layers else None
    num_experts = _count_indexed(list(sd), rf"{re.escape(first)}experts\.(\d+)\.") if first else 8
    hidden = sd[f"{first}experts.0.fc1.weight"].shape[0] if first else shape["embed_dim"] // 4
    return S4DClassifier(img_size=img_size, num_frames=num_frames, **shape,
                         num_image_classes=sd["head.image.weight"].shape[0],
                         num_video_classes=sd["head.video.weight"].shape[0],
                         moae_layers=tuple(moae_layers), num_experts=num_experts, top_k=top_k,
                         hidden_ratio=hidden / shape["embed_dim"], **moae_options)


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    expected, given = set(model.state_dict()), set(sd)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise CheckpointError(f"{source}: key set differs from the model: "
                              f"{len(missing)} missing {missing[:5]}, "
                              f"{len(unexpected)} unexpected {unexpected[:5]}")
    for key, tensor in model.state_dict().items():
        if sd[key].shape != tensor.shape:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(sd[key].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
    model.load_state_dict(sd)


def load(path: str | Path, **options: Any) -> PretrainMAE | S4DClassifier:
    """Our model with the weights of an official file; the kind is read from the keys.

    `options` go to the model for what a checkpoint does not store (img_size, num_frames,
    num_heads / decoder_heads when heads are not 64 wide, top_k, capacity_factor, moae_backend,
    and the MoAE's official switches: router_noise_at_eval, aux_loss_on_logits, stale_aux_loss).
    """
    sd = read_state_dict(path)
    if "mask_token" in sd and "encoder.patch_embed.proj.weight" in sd:
        model: nn.Module = mae_from_state_dict(sd, **options)
    elif "head.image.weight" in sd and "head.video.weight" in sd:
        model = classifier_from_state_dict(sd, **options)
    else:
        raise CheckpointError(f"{path}: neither an S4D pre-training checkpoint (mask_token, "
                              f"encoder.*) nor a fine-tuning one (head.image, head.video)")
    _load_strict(model, sd, str(path))
    log.info("loaded %s: %s, %d keys, %d parameters", path, type(model).__name__, len(sd),
             sum(t.numel() for t in sd.values()))
    return model


def save(model: PretrainMAE | S4DClassifier | dict[str, torch.Tensor],
         path: str | Path, epoch: int | None = None) -> None:
    """Write `{"model": state_dict, "epoch": epoch}` in the official key layout, fp32.

    Takes a model or its state dict (e.g. the fp32 weights exported from a DeepSpeed run).
    """
    state = model if isinstance(model, dict) else model.state_dict()
    sd = {k: v.detach().float().cpu().clone() for k, v in state.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "epoch": epoch}, path)


def remap_pretrained(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """§6.3 step 3: strip `backbone.` / `encoder.`, rename `head.video*` to `head*`."""
    out = {}
    for key, value in sd.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        if key.startswith("encoder."):
            key = key[len("encoder."):]
        if key.startswith("head.video"):
            key = "head" + key[len("head.video"):]
        out[key] = value
    return out


def init_from_pretrained(model: S4DClassifier, source: str | Path | dict) -> dict[str, int]:
    """Initialise a fine-tuning model from an MAE checkpoint (ours or official), as §6.3.

    Carries every encoder weight (patch embedding and all blocks, FFNs included); the MAE's final
    `norm`, its decoder, `encoder_to_decoder` and `mask_token` are left behind, and the MoAE
    adapters, `fc_norm` and both heads keep their fresh init — exactly the official outcome
    (158 keys for ViT-B), but any other missing or unexpected key is an error, not a print.
    """
    if isinstance(source, dict):
        name, sd = "state dict", pick_state_dict(source, "state dict")
    else:
        name, sd = str(source), read_state_dict(source)
    target = model.state_dict()
    sd = remap_pretrained(sd)
    for head in ("head.weight", "head.bias"):  # §6.3 step 2
        if head in sd and (head not in target or sd[head].shape != target[head].shape):
            del sd[head]
    carried = {k: v for k, v in sd.items() if k in target}
    expected = {k for k in target if not any(part in k for part in NOT_FROM_PRETRAIN)}
    if set(carried) != expected:
        absent = sorted(expected - set(carried))
        raise CheckpointError(f"{name}: does not hold the encoder this model needs; "
                              f"{len(absent)} keys absent, e.g. {absent[:5]}")
    for key, value in carried.items():
        if value.shape != target[key].shape:
            raise CheckpointError(f"{name}: '{key}' has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(target[key].shape)}")
    unexpected = sorted(set(sd) - set(carried))
    allowed_unused = re.compile(r"^(norm\.|decoder\.|encoder_to_decoder\.|mask_token$)")
    stray = [k for k in unexpected if not allowed_unused.match(k)]
    if stray:
        raise CheckpointError(f"{name}: keys that belong to no part of an MAE: {stray[:5]}")
    model.load_state_dict(carried, strict=False)
    report = {"carried": len(carried), "left_behind": len(unexpected),
              "fresh": len(target) - len(carried)}
    log.info("initialised from %s: %d keys carried, %d pre-training keys left behind, "
             "%d fine-tuning keys freshly initialised", name, *report.values())
    return report
