"""Operators one MoAE layer launches per forward and per backward, per backend, and the
fine-tune step's total with each.

    python benchmarks/moae_ops.py                     # finetune_dfew structure (E 8, k 2)

Counted as benchmarks/step_ops.py counts them (every operator that reaches torch's dispatch,
views excluded), each Triton kernel launch as one operator: the `triton` backend runs in the
Triton interpreter here (this script sets TRITON_INTERPRET=1), whose own tensor copies around
a launch are not what a GPU runs and are not counted (`triton_launches_as_operators`). Counts
depend on the structure, not on the width or the device. Results go to
benchmarks/results/moae_ops_cpu.json, one entry per commit of the code measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode  # noqa: E402

from s4d_dist import config  # noqa: E402
from s4d_dist.models.factory import build_classifier  # noqa: E402
from s4d_dist.models.moae import MoAE  # noqa: E402
import step_ops  # noqa: E402  (next to this script)
from step_ops import OperatorCount, forward_backward  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@contextlib.contextmanager
def triton_launches_as_operators() -> Iterator[None]:
    """While active, an interpreted Triton launch counts as one operator (`triton:<kernel>`)
    of the innermost OperatorCount, and the interpreter's copies inside it count as none."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        mode = _get_current_dispatch_mode()
        if isinstance(mode, OperatorCount):
            mode.ops[f"triton:{self.fn.__name__}"] += 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    try:
        yield
    finally:
        InterpretedFunction.run = run


def layer_ops(backend: str, num_experts: int, top_k: int) -> dict:
    """One training-mode layer, 4 × 50 tokens of width 32, router noise drawn by the layer."""
    torch.manual_seed(0)
    layer = MoAE(32, num_experts, top_k, 8, backend=backend).train()
    tokens = torch.randn(4, 50, 32, requires_grad=True)

    def loss() -> torch.Tensor:
        return layer(tokens).sum() + layer.aux_loss

    counts = forward_backward(loss)
    with OperatorCount() as forward:
        layer(tokens)
    counts["forward_operators"] = dict(forward.ops.most_common())
    return counts


def finetune_step_ops(preset: str, backend: str) -> dict:
    """The preset's fine-tune model at a tiny width, one clip, as step_ops.py builds it."""
    torch.manual_seed(0)
    cfg = config.load(preset, ["model.embed_dim=48", "model.img_size=32", "model.num_frames=4",
                               f"model.moae.backend={backend}"])
    model = build_classifier(cfg).train()
    clip = torch.randn(1, 3, 4, 32, 32)

    def loss() -> torch.Tensor:
        logits, aux = model(clip, "video", with_aux=True)
        return logits.sum() + aux

    counts = forward_backward(loss)
    return {key: counts[key] for key in ("forward", "backward")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="finetune_dfew")
    parser.add_argument("--out", type=Path, default=RESULTS / "moae_ops_cpu.json")
    args = parser.parse_args()

    moae_cfg = config.load(args.preset).model.moae
    result = {"device": "cpu (counts do not depend on it; Triton launches counted as one)",
              "torch": torch.__version__, "preset": args.preset,
              "layer": "MoAE training forward + backward, 4 x 50 tokens, D 32, H 8, "
                       f"E {moae_cfg.num_experts}, k {moae_cfg.top_k}, loss = out.sum() + aux",
              "moae_layer": {}, "step": {}}
    # A census that counts Triton launches itself (step_ops.counting_triton) needs no patch.
    launches = (contextlib.nullcontext() if hasattr(step_ops, "counting_triton")
                else triton_launches_as_operators())
    with launches:
        for backend in ("torch", "triton"):
            result["moae_layer"][backend] = layer_ops(backend, moae_cfg.num_experts,
                                                      moae_cfg.top_k)
            result["step"][backend] = finetune_step_ops(args.preset, backend)
    for backend, counts in result["moae_layer"].items():
        print(f"{backend:>6}: layer {counts['forward']} forward + {counts['backward']} backward "
              f"operators; fine-tune step {result['step'][backend]['forward']} + "
              f"{result['step'][backend]['backward']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    runs = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**runs, commit: result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
