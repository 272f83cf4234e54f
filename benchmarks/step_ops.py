"""How much host work one training step asks for: operators launched, and parameters and groups
the optimizer walks.

    python benchmarks/step_ops.py                          # finetune_dfew / pretrain_vit_base
    TRITON_INTERPRET=1 python benchmarks/step_ops.py --moae-backend triton   # a GPU's MoAE

A GPU step whose kernels are small waits on the host, which pays for every operator it
launches (Python, dispatch, launch) and, under an optimizer or ZeRO, for every parameter group
it walks. These counts depend on the model's structure, not on its width or the device, so they
are taken here on the CPU: the presets' models at a tiny width (same depth, same MoAE layers,
experts and top-k), and the tasks' own objectives (the loss a training step computes), eager:
- `finetune` / `pretrain`: one forward + backward of one clip after a warm-up step (the steady
  state: what is made once is not counted), every operator that reaches torch's dispatch except
  views and allocations (which launch no kernel), each Triton launch counted as one
  (`--moae-backend triton`);
  the fine-tuning forward's operators inside MoAE layers are counted apart, and
  `step_without_moae` is the same model with plain blocks in their place (the rest of the step);
- `moae_layer`: one MoAE layer on its own, forward and backward;
- `optimizer`: the flat AdamW (ZeRO-0, the presets): parameter groups walked on the host and
  operators of one eager device step (one fused kernel per group when compiled).
No timing: benchmarks/train_step.py and the GPU kit time the step. Results go to
benchmarks/results/step_ops_cpu.json, one entry per commit of the code measured (run it from an
older checkout, with --out, to compare).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s4d_dist import config
from s4d_dist.models.factory import build_classifier, build_mae
from s4d_dist.models.moae import MoAE
from s4d_dist.models.param_groups import param_groups

RESULTS = Path(__file__).parent / "results"
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select",
         "unsqueeze", "squeeze", "as_strided", "detach", "alias", "unbind", "split",
         "split_with_sizes", "_reshape_alias", "lift_fresh", "reshape"}
# Operators that allocate or answer a question about dtypes, launching no kernel.
NO_KERNEL = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided",
             "promote_types", "result_type"}
TINY = ["model.embed_dim=48", "model.img_size=32", "model.num_frames=4", "model.decoder_dim=24"]


class OperatorCount(TorchDispatchMode):
    """Counts the operators that reach dispatch while active, views and allocations excluded,
    and Triton kernel launches (as `triton:<kernel>`, the interpreter's own tensor work inside
    one not counted); `inside` counts those made while `inside_depth` > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.inside = 0
        self.inside_depth = 0
        self.in_kernel = 0  # inside a Triton launch: the interpreter's own tensor work is not counted

    def add(self, name: str) -> None:
        self.ops[name] += 1
        self.inside += self.inside_depth > 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS and name not in NO_KERNEL and not self.in_kernel:
            self.add(name)
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def counting_triton(counter: OperatorCount):
    """Count each Triton kernel launch (compiled or interpreted) as one operator."""
    patched = []
    try:
        from triton.runtime import interpreter, jit
        targets = [(jit.JITFunction, "run"), (interpreter.InterpretedFunction, "run")]
    except ImportError:
        targets = []
    for cls, attr in targets:
        original = getattr(cls, attr)

        def run(self, *args, _original=original, **kwargs):
            if not counter.in_kernel:  # an autotuner's launch of its kernel counts once
                counter.add(f"triton:{getattr(self, 'fn', self).__name__}")
            counter.in_kernel += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.in_kernel -= 1
        setattr(cls, attr, run)
        patched.append((cls, attr, original))
    try:
        yield
    finally:
        for cls, attr, original in patched:
            setattr(cls, attr, original)


def forward_backward(run, inside: type[torch.nn.Module] | None = None, model=None) -> dict:
    """Operators of `run()` (returns a scalar loss) and of its backward; with `inside`, how many
    of the forward's are made inside modules of that type."""
    with OperatorCount() as forward, counting_triton(forward):
        hooks = []
        if inside is not None:
            for module in model.modules():
                if isinstance(module, inside):
                    hooks.append(module.register_forward_pre_hook(
                        lambda *_: setattr(forward, "inside_depth", forward.inside_depth + 1)))
                    hooks.append(module.register_forward_hook(
                        lambda *_: setattr(forward, "inside_depth", forward.inside_depth - 1)))
        loss = run()
        for hook in hooks:
            hook.remove()
    with OperatorCount() as backward, counting_triton(backward):
        loss.backward()
    out = {"forward": forward.total(), "backward": backward.total(),
           "total": forward.total() + backward.total(),
           "top_forward": dict(forward.ops.most_common(8)),
           "top_backward": dict(backward.ops.most_common(8))}
    if inside is not None:
        out[f"forward_in_{inside.__name__}"] = forward.inside
    return out


class _Run:
    """What a task's objective reads from a run."""

    def __init__(self, model, dtype=torch.float32) -> None:
        self.engine = type("Engine", (), {"module": model})()
        self.dtype = dtype


def finetune_objective(cfg, model):
    """The fine-tuning task's objective; for code older than `FinetuneTask.objective` (run from
    an older checkout), the same loss written out: soft-target CE + coefficient · aux loss."""
    from s4d_dist.train import finetune

    if hasattr(finetune.FinetuneTask, "objective"):
        return finetune.FinetuneTask(cfg).objective(_Run(model))

    def loss(pixels, targets):
        logits, aux = model(pixels, with_aux=True)
        value = finetune.soft_target_cross_entropy(logits, targets)
        return value if aux is None else value + cfg.model.moae.aux_loss_coeff * aux.float()
    return loss


def pretrain_objective(cfg, model):
    """The pre-training task's objective; for older code, the same loss written out."""
    from s4d_dist.models.mae import mae_loss, mae_targets
    from s4d_dist.train import pretrain

    if hasattr(pretrain.PretrainTask, "objective"):
        return pretrain.PretrainTask(cfg).objective(_Run(model))

    def loss(pixels, mask):
        m = cfg.model
        visible = int((~mask[0]).sum())
        pred = model(pixels, mask, num_visible=visible)
        return mae_loss(pred, mae_targets(pixels, m.tubelet, m.patch), mask)
    return loss


def finetune_step(preset: str, backend: str, *overrides: str) -> dict:
    cfg = config.load(preset, TINY + [f"model.moae.backend={backend}", *overrides])
    torch.manual_seed(0)
    model = build_classifier(cfg).train()
    objective = finetune_objective(cfg, model)
    clip = torch.randn(1, 3, 4, 32, 32)
    targets = torch.softmax(torch.randn(1, cfg.model.num_video_classes), -1)
    objective(clip, targets).backward()  # warm-up: what is made once is not per step
    model.zero_grad(set_to_none=True)  # as the flat AdamW leaves them between steps
    counts = forward_backward(lambda: objective(clip, targets), MoAE, model)
    return {"parameters": len(list(model.parameters())),
            "state_dict_tensors": len(model.state_dict()), "moae_backend": backend,
            "moae_layers": len(cfg.model.moae.layers), **counts}


def pretrain_step(preset: str) -> dict:
    from s4d_dist.data.masking import random_masks

    cfg = config.load(preset, TINY)
    torch.manual_seed(0)
    model = build_mae(cfg).train()
    objective = pretrain_objective(cfg, model)
    clip, mask = torch.randn(1, 3, 4, 32, 32), random_masks(1, 8, cfg.mask.video_ratio)
    objective(clip, mask).backward()
    model.zero_grad(set_to_none=True)  # as the flat AdamW leaves them between steps
    return {"parameters": len(list(model.parameters())),
            **forward_backward(lambda: objective(clip, mask))}


def moae_layer(preset: str, backend: str) -> dict:
    moae = config.load(preset).model.moae
    torch.manual_seed(0)
    layer = MoAE(32, moae.num_experts, moae.top_k, 8, backend=backend).train()
    tokens = torch.randn(4, 50, 32, requires_grad=True)

    def loss() -> torch.Tensor:
        return layer(tokens).sum() + layer.aux_loss
    loss().backward()
    layer.zero_grad(set_to_none=True)  # as the flat AdamW leaves them between steps
    tokens.grad = None
    return forward_backward(loss)


def optimizer_step(preset: str) -> dict:
    cfg = config.load(preset, TINY)
    torch.manual_seed(0)
    model = build_classifier(cfg)
    o = cfg.optim
    try:
        from s4d_dist.train.flat_adamw import FlatAdamW
    except ImportError:  # older code: DeepSpeed's groups, one per layer and decay
        groups = param_groups(model, o.weight_decay, o.layer_decay, depth=cfg.model.depth)
        return {"host_groups": len(groups), "parameters": len(list(model.parameters()))}
    groups = param_groups(model, o.weight_decay, o.layer_decay, depth=cfg.model.depth)
    optimizer = FlatAdamW(groups, tuple(o.betas), o.eps)
    logits, aux = model(torch.randn(1, 3, 4, 32, 32), with_aux=True)
    (logits.sum() + aux).backward()
    optimizer.set_lr(1e-4)
    optimizer.device_step(torch.zeros(()))  # warm-up: builds the per-element tables once
    (model(torch.randn(1, 3, 4, 32, 32), with_aux=True)[0].sum()).backward()
    with OperatorCount() as ops:
        optimizer.device_step(torch.zeros(()))
    by_layer = param_groups(model, o.weight_decay, o.layer_decay, depth=cfg.model.depth,
                            by_layer=True)
    return {"host_groups": len(optimizer.param_groups),
            "groups_zero_1_2": len(by_layer), "parameters": len(list(model.parameters())),
            "device_step_ops_eager": ops.total()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="finetune_dfew")
    parser.add_argument("--pretrain-preset", default="pretrain_vit_base")
    parser.add_argument("--moae-backend", default="torch",
                        help="torch, or triton (set TRITON_INTERPRET=1 on a CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_ops_cpu.json")
    args = parser.parse_args()

    result = {"device": "cpu (counts do not depend on it)", "torch": torch.__version__,
              "preset": args.preset, "width": "embed_dim 48, 32 px, 4 frames, 1 clip",
              "method": "the tasks' objectives, after a warm-up step, gradients None before "
                        "backward (the flat AdamW leaves them so)",
              "step": finetune_step(args.preset, args.moae_backend),
              "step_without_moae": finetune_step(args.preset, "torch", "model.moae.enabled=false"),
              "pretrain_step": pretrain_step(args.pretrain_preset),
              "moae_layer": moae_layer(args.preset, args.moae_backend),
              "optimizer": optimizer_step(args.preset)}
    print(json.dumps(result, indent=1))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    key = commit if args.moae_backend == "torch" else f"{commit} moae={args.moae_backend}"
    runs = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**runs, key: result}, indent=1))


if __name__ == "__main__":
    main()
