"""AdamW over flat buffers, with layer-wise lr decay as a per-parameter scale (docs/design.md
"The training step"; the recipe's decay: docs/method.md §2.9).

    groups = param_groups(model, weight_decay, layer_decay, depth)  # ≤ 2 groups, `lr_scales`
    optimizer = FlatAdamW(groups, betas, eps, masters=fp32_weights)  # after DeepSpeed's cast
    optimizer.set_lr(lr); loss.backward(); optimizer.step() or device_step(skip); zero_grad()

Each group's parameters, gradients, fp32 master weights (when the parameters are bf16) and
moments are one flat buffer each; the parameters are views into theirs. Backward leaves each
parameter's gradient where autograd puts it (a fresh tensor, no per-parameter accumulation
kernel), and `collect_grads` adds them into the flat gradient with one multi-tensor operation
per group, leaving `.grad` None again. The groups are only what the update's constants need —
weight decay or not — so an optimizer step walks at most two groups on the host, however many
layers the lr decay tells apart.

AdamW's per-parameter facts are kept: each parameter's own lr scale and its own step count, and
a parameter that received no gradient in a step (the other modality's head) is left as it is —
no decay, no moment update, no step counted — as torch's AdamW (the official loop's optimizer)
leaves a parameter whose `.grad` is None.

Two ways to take a step:
- `step()`: the host's numbers (lr and step counts as Python floats), the operations of torch's
  single-tensor AdamW on each parameter's views, batched with `torch._foreach_*`: bit-identical
  to torch's AdamW (CPU runs reproduce earlier ones);
- `device_step(skip)`: lr, step counts and the skip flag as device tensors, nothing read back;
  the per-parameter numbers (scale, bias corrections, whether it steps) are small tables indexed
  by each element's parameter id (`seg`, int32), and the update is `flat_adamw`, elementwise
  over the flat buffers (fused by torch.compile after `compile()`). A skipped step
  (`skip` = 1: a non-finite loss or gradient) leaves weights, moments and counts untouched.
  This is what a GPU step, compiled or captured in a CUDA graph, runs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

STATE_FORMAT = "s4d_dist.flat_adamw.v1"


class OptimizerStateError(ValueError):
    """Saved optimizer state that does not fit this optimizer (another layout or format)."""


def flat_adamw(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, seg: torch.Tensor, steps: torch.Tensor,
               scales: torch.Tensor, keep: torch.Tensor, lr: torch.Tensor,
               coef: torch.Tensor | float, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> None:
    """One AdamW step on a group's flat fp32 buffers, in place. `seg` (N,) is each element's
    parameter id; `steps`, `scales` and `keep` (P,) are per parameter (`steps` already counts
    this step where `keep`); `lr` is 0-d; `coef` scales the gradient (clipping)."""
    # Per-parameter numbers in float64, as torch's AdamW computes them on the host.
    lr_p = lr.double() * scales.double() * keep.double()
    step = steps.double().clamp(min=1)
    factor_p = (lr_p / (1 - beta1 ** step)).float()       # lr · scale / bias correction 1
    root_p = (1 - beta2 ** step).sqrt().float()           # √ bias correction 2
    decay_p = (1 - lr_p * weight_decay).float()
    kept = keep[seg] > 0
    g = torch.where(kept, grad.float() * coef, 0.0)       # a skipped step's gradient may be NaN
    exp_avg.lerp_(g, torch.where(kept, 1 - beta1, 0.0))
    exp_avg_sq.mul_(torch.where(kept, beta2, 1.0)).addcmul_(g, g, value=1 - beta2)
    denom = exp_avg_sq.sqrt() / root_p[seg] + eps
    if weight_decay:
        master.mul_(decay_p[seg])
    master.sub_(factor_p[seg] * exp_avg / denom)


class FlatGroup:
    """One group's flat buffers and each parameter's place in them."""

    def __init__(self, group: dict, master: torch.Tensor | None) -> None:
        params: list[nn.Parameter] = group["params"]
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"group {group.get('name')}: parameters of one dtype and device "
                             f"only, got {dtypes} on {devices}")
        self.names: list[str] = list(group["names"])
        self.shapes = [tuple(p.shape) for p in params]
        self.weight_decay = float(group["weight_decay"])
        self.scales = [float(s) for s in group["lr_scales"]]
        self.numels = [p.numel() for p in params]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        size, dtype, device = sum(self.numels), dtypes.pop(), devices.pop()
        self.data = torch.empty(size, dtype=dtype, device=device)
        self.grad = torch.zeros(size, dtype=dtype, device=device)
        self.params = params
        for p, view in zip(params, self.views(self.data)):
            view.copy_(p.detach().reshape(-1))
            p.data = view.view(p.shape)
            p.grad = None
        self.grad_views = [v.view(shape) for v, shape in zip(self.views(self.grad), self.shapes)]
        if dtype == torch.float32:
            self.master = self.data
        else:  # fp32 masters: the weights before DeepSpeed's cast where given, else upcast
            self.master = (master.to(device) if master is not None else self.data).float().clone()
        self.exp_avg = torch.zeros(size, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(size, dtype=torch.float32, device=device)
        self.steps = [0] * len(params)  # host mirror of `steps_t` for `step()`
        self.steps_t = torch.zeros(len(params), dtype=torch.float32, device=device)
        self.scales_t = torch.tensor(self.scales, dtype=torch.float32, device=device)
        self._seg: torch.Tensor | None = None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n] for o, n in zip(self.offsets, self.numels)]

    @property
    def seg(self) -> torch.Tensor:
        """(N,) int32: the parameter id of each element (built on first use)."""
        if self._seg is None:
            counts = torch.tensor(self.numels, device=self.data.device)
            ids = torch.arange(len(self.numels), dtype=torch.int32, device=self.data.device)
            self._seg = torch.repeat_interleave(ids, counts, output_size=self.data.numel())
        return self._seg

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(zip(self.names, self.shapes))


class FlatAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) over ≤ 4 flat groups; see the module docstring.

    `groups` as `models.param_groups.param_groups` returns them (`params`, `names`,
    `weight_decay`, `lr_scales`); `masters` (one flat fp32 tensor per group, the parameters in
    group order) are the weights to keep as fp32 masters when the parameters are bf16.
    """

    MAX_GROUPS = 4

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, masters: list[torch.Tensor] | None = None) -> None:
        if len(groups) > self.MAX_GROUPS:
            raise ValueError(f"{len(groups)} parameter groups; FlatAdamW takes at most "
                             f"{self.MAX_GROUPS} (one per weight-decay value)")
        super().__init__([dict(g) for g in groups],
                         dict(lr=0.0, betas=tuple(betas), eps=eps, weight_decay=0.0))
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.flat = [FlatGroup(g, masters[i] if masters else None)
                     for i, g in enumerate(self.param_groups)]
        device = self.flat[0].data.device
        self.lr_t = torch.zeros((), dtype=torch.float32, device=device)
        self._used: list[set[int]] = [set() for _ in self.flat]
        self._used_tables: dict[tuple, list[torch.Tensor]] = {}
        self._update: Callable[..., None] = flat_adamw

    def compile(self, **kwargs) -> None:
        """Run `device_step`'s update through torch.compile (its elementwise work fused)."""
        self._update = torch.compile(flat_adamw, fullgraph=True, dynamic=False, **kwargs)

    # ---- what a step needs --------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """This iteration's base lr (each parameter takes lr · its scale); for `device_step` it
        is written into a device tensor (a captured graph reads it from there)."""
        for group in self.param_groups:
            group["lr"] = lr
        self.lr_t.fill_(lr)

    def collect_grads(self) -> None:
        """Add the parameters' gradients into the flat gradients (one `_foreach_add_` per
        group) and set `.grad` to None; which parameters had one is remembered for the step."""
        for g, used in zip(self.flat, self._used):
            ids = [i for i, p in enumerate(g.params) if p.grad is not None]
            if ids:
                torch._foreach_add_([g.grad_views[i] for i in ids], [g.params[i].grad for i in ids])
                for i in ids:
                    g.params[i].grad = None
                used.update(ids)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients (the parameters' `.grad` are None between steps)."""
        for g in self.flat:
            g.grad.zero_()
            for p in g.params:
                p.grad = None

    def reduce_gradients(self, world_size: int) -> None:
        """Average the flat gradients over the ranks: one all-reduce per group."""
        if world_size > 1:
            for g in self.flat:
                dist.all_reduce(g.grad)
                g.grad.div_(world_size)

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients, a 0-d fp32 device tensor."""
        norms = [torch.linalg.vector_norm(g.grad, dtype=torch.float32) for g in self.flat]
        return torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]

    def used(self) -> list[set[int]]:
        """Per group, the parameters that received a gradient since the last step."""
        return self._used

    def forget_used(self) -> None:
        """Start the next step's record (a step skipped without `step`/`device_step`)."""
        self._used = [set() for _ in self.flat]

    @torch.no_grad()
    def step(self, closure=None, coef: torch.Tensor | None = None) -> None:
        """AdamW on the host's numbers, torch's single-tensor arithmetic per parameter (see the
        module docstring); `coef` (0-d) scales the gradients (clipping)."""
        if closure is not None:
            raise ValueError("FlatAdamW.step takes no closure")
        self.collect_grads()
        b1, b2, eps = self.beta1, self.beta2, self.eps
        for g, group, used in zip(self.flat, self.param_groups, self._used):
            ids = sorted(used)
            if not ids:
                continue
            grads = g.grad if g.grad.dtype == torch.float32 else g.grad.float()
            if coef is not None:
                grads = grads * coef
            pick = [g.views(x) for x in (g.master, grads, g.exp_avg, g.exp_avg_sq)]
            master, grad, exp_avg, exp_avg_sq = ([views[i] for i in ids] for views in pick)
            lrs = [group["lr"] * g.scales[i] for i in ids]
            for i in ids:
                g.steps[i] += 1
            if g.weight_decay != 0:
                torch._foreach_mul_(master, [1 - lr * g.weight_decay for lr in lrs])
            torch._foreach_lerp_(exp_avg, grad, 1 - b1)
            torch._foreach_mul_(exp_avg_sq, b2)
            torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - b2)
            steps = [float(g.steps[i]) for i in ids]
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, [(1 - b2 ** s) ** 0.5 for s in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(master, exp_avg, denom,
                                    [-lr / (1 - b1 ** s) for lr, s in zip(lrs, steps)])
            g.steps_t.copy_(torch.tensor(g.steps, dtype=torch.float32))
            if g.master is not g.data:
                g.data.copy_(g.master)
        self.forget_used()

    @torch.no_grad()
    def device_step(self, skip: torch.Tensor, coef: torch.Tensor | float = 1.0) -> None:
        """AdamW on device tensors, nothing read back: `skip` (0-d, 1 = skip this step) leaves
        everything as it was; `coef` scales the gradients (clipping)."""
        self.collect_grads()
        keep_ok = skip <= 0
        for g, table in zip(self.flat, self._used_table()):
            keep = (table & keep_ok).float()
            g.steps_t.add_(keep)
            self._update(g.master, g.grad, g.exp_avg, g.exp_avg_sq, g.seg, g.steps_t,
                         g.scales_t, keep, self.lr_t, coef, self.beta1, self.beta2, self.eps,
                         g.weight_decay)
            if g.master is not g.data:
                g.data.copy_(g.master)
        self.forget_used()

    def _used_table(self) -> list[torch.Tensor]:
        """Per group, a (P,) bool device tensor of the parameters that received a gradient,
        cached by the pattern (a step of each modality has its own)."""
        key = tuple(frozenset(u) for u in self._used)
        if key not in self._used_tables:
            tables = []
            for g, used in zip(self.flat, self._used):
                table = torch.zeros(len(g.numels), dtype=torch.bool)
                table[sorted(used)] = True
                tables.append(table.to(g.data.device))
            self._used_tables[key] = tables
        return self._used_tables[key]

    # ---- checkpoints --------------------------------------------------------------------
    def layout(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        return [g.layout() for g in self.flat]

    def state_dict(self) -> dict:
        """Moments, per-parameter step counts and fp32 masters (when separate), with the layout
        they belong to; the module's state holds the (low-precision) weights."""
        return {"format": STATE_FORMAT, "betas": (self.beta1, self.beta2), "eps": self.eps,
                "groups": [{"layout": g.layout(), "weight_decay": g.weight_decay,
                            "lr_scales": g.scales, "steps": g.steps_t.clone(),
                            "exp_avg": g.exp_avg, "exp_avg_sq": g.exp_avg_sq,
                            "master": None if g.master is g.data else g.master}
                           for g in self.flat]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; refuses (OptimizerStateError, naming the
        difference) state of another format or layout instead of loading it into the wrong
        places."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise OptimizerStateError(
                "optimizer state in another format (per-parameter AdamW state of an older "
                f"s4d_dist, or not s4d_dist's); this version keeps {STATE_FORMAT}")
        saved = [[(n, tuple(s)) for n, s in group["layout"]] for group in state["groups"]]
        if saved != self.layout():
            mine = [p for group in self.layout() for p in group]
            theirs = [p for group in saved for p in group]
            differ = next((f"{a} vs {b}" for a, b in zip(theirs, mine) if a != b),
                          f"{len(theirs)} vs {len(mine)} parameters in "
                          f"{len(saved)} vs {len(self.flat)} groups")
            raise OptimizerStateError(f"optimizer state for another parameter layout "
                                      f"(saved vs this model: {differ})")
        for g, group in zip(self.flat, state["groups"]):
            g.exp_avg.copy_(group["exp_avg"])
            g.exp_avg_sq.copy_(group["exp_avg_sq"])
            g.steps_t.copy_(group["steps"])
            g.steps = [int(s) for s in group["steps"].tolist()]
            if group["master"] is not None and g.master is not g.data:
                g.master.copy_(group["master"])
            elif g.master is not g.data:  # saved in fp32 (the weights): masters from weights
                g.master.copy_(g.data)

    def master_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name → fp32 weights (the masters, or the fp32 parameters themselves)."""
        return {name: view.view(shape) for g in self.flat
                for name, shape, view in zip(g.names, g.shapes, g.views(g.master))}
