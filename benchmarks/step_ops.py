"""How much host work one training step asks for: operators launched, and parameters handled.

    python benchmarks/step_ops.py                     # the finetune_dfew model structure
    python benchmarks/step_ops.py --preset demo_finetune

A GPU step whose kernels are small waits on the host, which pays for every operator it
launches (Python, dispatch, launch) and, under an optimizer or ZeRO, for every parameter
tensor. Both counts depend on the model's structure, not on its width or the device, so they
are taken here on the CPU: the preset's model at a tiny width (same depth, same MoAE layers,
experts and top-k), one eager forward + backward of one clip, every operator that reaches
torch's dispatch counted except views (which launch no kernel); and one MoAE layer on its own.
No timing: the GPU run (benchmarks/gpu/) times the step. Results go to
benchmarks/results/step_ops_cpu.json, one entry per commit of the code measured (run it from
an older checkout, with --out, to compare).
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s4d_dist import config
from s4d_dist.models.factory import build_classifier
from s4d_dist.models.moae import MoAE

RESULTS = Path(__file__).parent / "results"
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select",
         "unsqueeze", "squeeze", "as_strided", "detach", "alias", "unbind", "split",
         "split_with_sizes", "_reshape_alias", "lift_fresh", "reshape"}


class OperatorCount(TorchDispatchMode):
    """Counts the operators that reach dispatch while active, views excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def forward_backward(run) -> dict:
    """Operators of `run()` (returns a scalar loss) and of its backward."""
    with OperatorCount() as forward:
        loss = run()
    with OperatorCount() as backward:
        loss.backward()
    return {"forward": sum(forward.ops.values()), "backward": sum(backward.ops.values()),
            "top_backward": dict(backward.ops.most_common(6))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="finetune_dfew")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_ops_cpu.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = config.load(args.preset, ["model.embed_dim=48", "model.img_size=32",
                                    "model.num_frames=4"])
    model = build_classifier(cfg).train()
    clip = torch.randn(1, 3, 4, 32, 32)

    def model_loss() -> torch.Tensor:
        logits, aux = model(clip, "video", with_aux=True)
        return logits.sum() + aux

    moae_cfg = cfg.model.moae
    layer = MoAE(32, moae_cfg.num_experts, moae_cfg.top_k, 8).train()
    tokens = torch.randn(4, 50, 32, requires_grad=True)

    def layer_loss() -> torch.Tensor:
        return layer(tokens).sum() + layer.aux_loss

    result = {"device": "cpu (counts do not depend on it)", "torch": torch.__version__,
              "preset": args.preset, "width": "embed_dim 48, 32 px, 4 frames, 1 clip",
              "parameters": len(list(model.parameters())),
              "state_dict_tensors": len(model.state_dict()),
              "step": forward_backward(model_loss),
              "moae_layer": forward_backward(layer_loss)}
    print(json.dumps(result, indent=1))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    runs = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**runs, commit: result}, indent=1))


if __name__ == "__main__":
    main()
