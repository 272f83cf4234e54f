"""A model wrapped by DeepSpeed, and one optimisation step with the guards a long run needs.

The loops (pretrain.py, finetune.py) only say what a step computes — the inputs of a batch and
the objective of those inputs; everything about applying it — the learning rate of this
iteration and each parameter's scale of it, precision, skipping a step whose loss or gradients
are not finite (on every rank at once, or the others would hang in the all-reduce), giving up
after too many in a row, compiling and capturing the step — lives here. A step reads nothing
back from the GPU: its loss, gradient norm and skip counts stay device tensors until a log step
reads them, so the host keeps queueing work ahead of the GPU.

Two optimizers (docs/design.md "The training step"):
- ZeRO-0 in fp32 or bf16: the flat AdamW of train/flat_adamw.py, stepped here — backward into
  its flat gradients, one all-reduce per group, the norm, the update; DeepSpeed gets no
  optimizer (it places and casts the module and writes checkpoints, with the optimizer's state
  as their client state). With `compile` the objective and the update go through torch.compile,
  and on a GPU each input shape's whole step is captured once and replayed as a CUDA graph.
- ZeRO-1/2, and fp16 (dynamic loss scaling): DeepSpeed's optimizer over a client torch AdamW
  with one group per (layer, weight decay), as its ZeRO needs one lr per group.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from s4d_dist.models.param_groups import param_groups
from s4d_dist.train import distributed
from s4d_dist.train.ds_config import deepspeed_config
from s4d_dist.train.flat_adamw import FlatAdamW

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss: the run is diverging, not unlucky."""


def adamw(groups: list[dict], cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over our parameter groups (each keeps its `lr_scale`, which set_lr applies).

    Fused where the parameters are on CUDA: one kernel for every tensor instead of several per
    tensor, and the implementation that honours `found_inf`, through which Stepper skips a
    non-finite step without a host sync. Elsewhere torch's default implementation, so CPU runs
    reproduce earlier ones exactly.
    """
    on_cuda = any(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             **({"fused": True} if on_cuda else {}))


def uses_flat_optimizer(cfg: DictConfig) -> bool:
    """ZeRO-0 without loss scaling: train/flat_adamw.py steps the parameters."""
    return cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision != "fp16"


def compile_enabled(cfg: DictConfig) -> bool:
    """`deepspeed.compile`, where null means: on a GPU."""
    wanted = cfg.deepspeed.compile
    return distributed.device().type == "cuda" if wanted is None else bool(wanted)


def build_engine(cfg: DictConfig, model: nn.Module):
    """DeepSpeed engine around `model`, with its optimizer: the flat AdamW as
    `engine.flat_optimizer` (ZeRO-0, `uses_flat_optimizer`), else DeepSpeed's over a client
    AdamW with one group per layer."""
    import deepspeed

    model.to(distributed.device())
    if cfg.deepspeed.activation_checkpointing:
        encoder = getattr(model, "encoder", model)
        encoder.grad_checkpointing = True
    flat = uses_flat_optimizer(cfg)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay,
                          depth=cfg.model.depth, by_layer=not flat,
                          official_pretrain_rule=cfg.official.pretrain_decay_qv_bias and cfg.task == "pretrain")
    # The fp32 weights, kept as the masters before DeepSpeed casts the module to bf16.
    masters = [torch.cat([p.detach().float().reshape(-1) for p in group["params"]])
               for group in groups] if flat and cfg.deepspeed.precision == "bf16" else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=None if flat else adamw(groups, cfg),
        config=deepspeed_config(cfg, distributed.world_size()))
    if flat:
        # DeepSpeed makes a placeholder bf16 optimizer when given none, and would save and load
        # its empty state (as ZeRO files); the flat AdamW's goes in as client state instead.
        engine.optimizer = None
        engine.save_zero_checkpoint = False
        engine.flat_optimizer = FlatAdamW(groups, tuple(cfg.optim.betas), cfg.optim.eps, masters)
    if compile_enabled(cfg):
        if flat:
            engine.flat_optimizer.compile()  # the objective is compiled by the Stepper
        else:
            engine.compile()
    return engine


def flat_optimizer(engine) -> FlatAdamW | None:
    """The engine's flat AdamW, or None where DeepSpeed steps (ZeRO-1/2, fp16)."""
    return getattr(engine, "flat_optimizer", None)


def set_lr(engine, lr: float) -> None:
    """Apply this iteration's lr, scaled per parameter (layer-wise decay)."""
    optimizer = flat_optimizer(engine)
    if optimizer is not None:
        optimizer.set_lr(lr)
        return
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass
class StepOutcome:
    """One step's results, as device tensors: returning them costs no host sync. Read them
    (`float(...)`) only where they are reported."""

    loss: torch.Tensor  # 0-d fp32; not finite on a skipped step
    skipped: torch.Tensor  # 0-d bool: the ranks agreed to skip this step
    grad_norm: torch.Tensor | None  # 0-d; None where the step did not run (host-side skip)


Objective = Callable[..., torch.Tensor]


class Stepper:
    """Runs guarded forward → backward → step, counting skipped (non-finite) steps on the device.

    `step(objective, inputs, lr)` is a training step: the loss `objective(*inputs)` (the
    task's, over device tensors), backward and the optimizer step; `stepper(loss, lr)` the same
    on a loss already computed (eager only; with the flat optimizer computed by
    `engine.module`, not by the DeepSpeed engine's forward, whose hooks want its backward).
    With `compile` (flat optimizer) the objective runs through torch.compile (fullgraph: a
    graph break is an error), and with `cuda_graphs` on a GPU each input shape's whole step
    (forward, backward, all-reduce, the guard, the update, the counts) is run twice for real,
    then captured once and replayed (`CapturedStep`).

    A step whose loss (or, with the flat optimizer, gradient norm) is not finite on any rank is
    skipped on every rank. The ranks agree through an all-reduce of a device flag (queued on the
    GPU, nothing waits for it), and the skip happens where the flag is:
    - on the device (GPU, or any compiled step): the flat AdamW's `device_step(skip)`, or the
      fused torch AdamW's `found_inf` under DeepSpeed, leaves parameters, moments and step
      counts untouched. Backward and step run in full on every rank, so the ranks stay in
      lockstep without the host knowing the outcome;
    - on the host otherwise (CPU, where reading the flag costs nothing; DeepSpeed with another
      optimizer on a GPU: one 1-element read per step): backward and step are not run at all.
    With gradient accumulation a non-finite micro-step poisons the accumulated gradients, so the
    skip covers the whole optimizer step it belongs to. (DeepSpeed's own fp16, bf16 and
    ZeRO-1/2 optimizers also skip a step whose gradients are not finite; that check reads its
    flag on the host, inside DeepSpeed.)

    Counts stay on the device; `check()` reads them at log steps and raises NonFiniteLossError
    once `max_consecutive_skips` steps in a row were skipped — at the first check after it.
    """

    def __init__(self, engine, max_consecutive_skips: int = 20, compile: bool = False,
                 cuda_graphs: bool = False) -> None:
        self.engine = engine
        self.dtype = DTYPES[self._precision(engine)]
        self.max_consecutive = max_consecutive_skips
        self.device = distributed.device()
        self.optimizer = flat_optimizer(engine)
        self.accum = engine.gradient_accumulation_steps()
        self.clip = engine.gradient_clipping() or None
        self.micro = 0
        client = getattr(engine, "client_optimizer", None)
        fused = isinstance(client, torch.optim.Optimizer) and all(
            group.get("fused") for group in client.param_groups)
        self.device_skip = client if fused and self.optimizer is None else None
        self.compile = compile and self.optimizer is not None
        self.on_host = self.optimizer is not None and self.device.type == "cpu" and not compile
        self.cuda_graphs = (cuda_graphs and self.compile and self.device.type == "cuda"
                            and self.accum == 1)
        if cuda_graphs and self.compile and self.device.type == "cuda" and self.accum > 1:
            log.info("deepspeed.cuda_graphs: not with grad_accum %d; compiled steps run uncaptured",
                     self.accum)
        self.unapplied: torch.Tensor | None = None  # any non-finite micro-step since the last step
        self.skipped, self.streak, self.longest = (  # total, current run, longest: updated in place
            torch.zeros((), device=self.device) for _ in range(3))
        self.reported = 0
        self.lr = 0.0
        self._compiled: dict[Objective, Objective] = {}
        self._graphs: dict[tuple, CapturedStep] = {}

    @staticmethod
    def _precision(engine) -> str:
        if engine.bfloat16_enabled():
            return "bf16"
        return "fp16" if engine.fp16_enabled() else "fp32"

    def step(self, objective: Objective, inputs: Sequence[torch.Tensor], lr: float) -> StepOutcome:
        """One training step: the loss of `objective(*inputs)`, backward, optimizer step."""
        if not self.compile:
            return self(objective(*inputs), lr)
        compiled = self._compiled.get(objective)
        if compiled is None:
            compiled = self._compiled[objective] = torch.compile(objective, fullgraph=True,
                                                                 dynamic=False)
        if not self.cuda_graphs:
            return self(compiled(*inputs), lr)
        key = (objective, *((tuple(t.shape), t.dtype) for t in inputs))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = CapturedStep(self, compiled, inputs)
        return graph(inputs, lr)

    def __call__(self, loss: torch.Tensor, lr: float) -> StepOutcome:
        """Backward and step on `loss` (this micro-batch's, forward done) at learning rate `lr`."""
        value = loss.detach().float()
        flag = distributed.any_rank((~torch.isfinite(value)).float())
        self.lr = lr
        if self.optimizer is not None:
            return self._flat_step(loss, value, flag, lr)
        self._count(flag)
        skipped = flag > 0
        if self.device_skip is not None:
            self._skip_on_device(flag)
        elif bool(flag):  # one 1-element read, free on the CPU
            return StepOutcome(value, skipped, None)
        set_lr(self.engine, lr)
        self.engine.backward(loss)
        own_norm = self._grad_norm() if self._norm_not_tracked() else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        return StepOutcome(value, skipped, None if norm is None else torch.as_tensor(norm))

    def _flat_step(self, loss: torch.Tensor, value: torch.Tensor, flag: torch.Tensor,
                   lr: float) -> StepOutcome:
        self.optimizer.set_lr(lr)
        self.micro += 1
        boundary = self.micro % self.accum == 0
        if self.on_host and bool(flag):  # one 1-element read, free on the CPU
            self._count(flag)
            return StepOutcome(value, flag > 0, None)
        (loss / self.accum if self.accum > 1 else loss).backward()
        self.optimizer.collect_grads()
        self.unapplied = flag if self.unapplied is None else torch.maximum(self.unapplied, flag)
        if not boundary:
            self._count(flag)
            return StepOutcome(value, flag > 0, None)
        bad, norm = self.apply(self.unapplied)
        self.unapplied = None
        self._count(bad)
        return StepOutcome(value, bad > 0, norm)

    def apply(self, flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat optimizer's step on the gradients backward left: all-reduce, norm, guard
        (`flag`, or a non-finite norm, skips it), clipping, update, zeroed gradients. Returns
        (skip flag, gradient norm) as device tensors."""
        optimizer = self.optimizer
        optimizer.collect_grads()
        optimizer.reduce_gradients(distributed.world_size())
        norm = optimizer.grad_norm()
        bad = torch.maximum(flag, (~torch.isfinite(norm)).float())
        coef = (self.clip / (norm + 1e-6)).clamp(max=1.0) if self.clip else None
        if not self.on_host:
            optimizer.device_step(bad, 1.0 if coef is None else coef)
        elif not bool(bad):
            optimizer.step(coef=coef)
        else:
            optimizer.forget_used()
        optimizer.zero_grad()
        return bad, norm

    def _skip_on_device(self, flag: torch.Tensor) -> None:
        """Arm the fused optimizer's `found_inf` with every flag since its last step."""
        self.unapplied = flag if self.unapplied is None else torch.maximum(self.unapplied, flag)
        self.device_skip.found_inf = self.unapplied
        if self.engine.is_gradient_accumulation_boundary():
            self.unapplied = None

    def _count(self, flag: torch.Tensor) -> None:
        self.skipped.add_(flag)
        self.streak.add_(1).mul_(flag)
        torch.maximum(self.longest, self.streak, out=self.longest)

    def check(self) -> int:
        """Steps skipped so far, read from the device (one read: call it where the loop logs);
        raises NonFiniteLossError if `max_consecutive_skips` steps in a row were skipped since
        the previous check."""
        skipped, longest = (int(v) for v in torch.stack([self.skipped, self.longest]).tolist())
        if skipped > self.reported:
            log.warning("%d step(s) with a non-finite loss on some rank skipped since the last "
                        "check (%d in all)", skipped - self.reported, skipped)
        self.reported = skipped
        if longest >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{longest} consecutive steps had a non-finite loss; the run is diverging "
                f"(last lr {self.lr:.3g}): lower optim.base_lr or check the data")
        self.longest.copy_(self.streak)
        return skipped

    def _norm_not_tracked(self) -> bool:
        """DeepSpeed reports no gradient norm for a plain (ZeRO-0, fp32) optimizer."""
        return (self.engine.zero_optimization_stage() == 0 and self.dtype == torch.float32
                and self.engine.is_gradient_accumulation_boundary())

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads)


class CapturedStep:
    """One training step at one input shape, replayed as a CUDA graph.

    The graph reads its inputs from static buffers (each call copies the batch in) and the lr
    from the flat optimizer's device tensor; it holds the forward (the compiled objective), the
    backward into the flat gradients, the all-reduce, the non-finite guard, the update and the
    skip counts. The first `WARMUP` calls run the step for real on a side stream (compiling it
    and initialising the libraries, as capture needs); the next captures it — capture records,
    it does not run — and every call from then on replays it once, so each call is exactly one
    step. The router noise draws from torch's CUDA generator, whose state advances with every
    replay (and is what a checkpoint saves).

    What the forward leaves on modules (the MoAE's aux loss and last routing) refers to the
    graph's tensors after each replay, as after an eager forward, even if an evaluation in
    between left its own there.
    """

    WARMUP = 2

    def __init__(self, stepper: Stepper, compiled: Objective,
                 inputs: Sequence[torch.Tensor]) -> None:
        self.stepper, self.compiled = stepper, compiled
        self.static = [torch.empty_like(t, device=stepper.device) for t in inputs]
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.left_on_modules: list[tuple[nn.Module, dict]] = []

    def _body(self) -> torch.Tensor:
        stepper = self.stepper
        loss = self.compiled(*self.static)
        value = loss.detach().float()
        flag = distributed.any_rank((~torch.isfinite(value)).float())
        loss.backward()
        bad, norm = stepper.apply(flag)
        stepper._count(bad)
        return torch.stack([value, bad, norm.float()])

    def __call__(self, inputs: Sequence[torch.Tensor], lr: float) -> StepOutcome:
        stepper = self.stepper
        stepper.lr = lr
        stepper.optimizer.set_lr(lr)
        for static, tensor in zip(self.static, inputs):
            static.copy_(tensor, non_blocking=True)
        if self.calls < self.WARMUP:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._body()
            torch.cuda.current_stream().wait_stream(side)
            return self._outcome(out)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        for module, attributes in self.left_on_modules:
            vars(module).update(attributes)
        return self._outcome(self.out.clone())

    def _capture(self) -> None:
        modules = list(self.stepper.engine.module.modules())
        before = [dict(vars(m)) for m in modules]
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data pipeline's threads may use CUDA while this thread captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = self._body()
        for module, old in zip(modules, before):
            now = {k: v for k, v in vars(module).items() if k != "training"}
            if any(old.get(k, now) is not v for k, v in now.items()):
                self.left_on_modules.append((module, now))

    @staticmethod
    def _outcome(out: torch.Tensor) -> StepOutcome:
        return StepOutcome(out[0], out[1] > 0, out[2])
