"""The optimisation step on its own: device placement at init, the optimizer build_engine picks,
and Stepper's non-finite guard — weights and optimizer state untouched by a skipped step,
counts kept on the device, no host read on the device-side path, the abort after a run of
skips. DeepSpeed runs on its CPU accelerator; where a GPU is needed it is said what stands in."""
from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from unittest import mock

import deepspeed
import pytest
import torch
from torch import nn

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.models.factory import build_mae
from s4d_dist.train import distributed
from s4d_dist.train.engine import NonFiniteLossError, Stepper, adamw, build_engine, set_lr


def test_init_sets_the_rank_device_before_the_process_group(monkeypatch):
    # No GPU can exist here: a patched torch.cuda stands in for an 8-GPU node, and a recording
    # deepspeed.init_distributed for NCCL (nothing is initialised).
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda dist_backend: calls.append(("init_distributed", dist_backend)))
    distributed.init()
    assert calls == [("set_device", 3), ("init_distributed", "nccl")]
    assert distributed.device() == torch.device("cuda", 3)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 3 but this process sees 2 GPU"):
        distributed.init()


def tiny_cfg(tmp_path, *extra):
    return config.load("demo", tiny_overrides(tmp_path, tmp_path, "pretrain") + list(extra))


def test_zero0_steps_with_the_flat_adamw_and_keeps_lr_scales(tmp_path):
    distributed.init()
    cfg = tiny_cfg(tmp_path, "optim.layer_decay=0.75", "deepspeed.precision=bf16")
    engine = build_engine(cfg, build_mae(cfg))
    optimizer = engine.flat_optimizer
    assert engine.optimizer is None  # DeepSpeed steps nothing
    assert len(optimizer.param_groups) == 2  # decay, no decay: not one per layer
    set_lr(engine, 1.0)
    scales = {s for group in optimizer.flat for s in group.scales}
    assert len(scales) > 1 and all(g["lr"] == 1.0 for g in optimizer.param_groups)
    assert optimizer.lr_t.item() == 1.0
    stepper = Stepper(engine)
    assert stepper.on_host and stepper.dtype == torch.bfloat16  # a CPU run: exact torch AdamW
    # the parameters are bf16 views into the flat buffer, their fp32 masters kept apart
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert optimizer.flat[0].master.dtype == torch.float32


def test_adamw_is_fused_for_cuda_parameters(tmp_path, monkeypatch):
    # A CUDA parameter cannot exist here: an object answering is_cuda stands in for one, and a
    # recording AdamW for torch's (which would refuse it).
    requested = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **kwargs: requested.append(kwargs))
    adamw([{"params": [SimpleNamespace(is_cuda=True)], "lr_scale": 0.5}], tiny_cfg(tmp_path))
    adamw([{"params": [torch.zeros(1)]}], tiny_cfg(tmp_path))
    assert requested[0]["fused"] is True and "fused" not in requested[1]


def fused_engine(precision: str = "fp32", grad_accum: int = 1):
    """A tiny model under DeepSpeed (ZeRO-0) with the fused AdamW. Torch's fused AdamW also runs
    on the CPU and honours `found_inf` as the CUDA kernel does: it stands in for the GPU path."""
    distributed.init()
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": grad_accum,
                 "zero_optimization": {"stage": 0}, "bf16": {"enabled": precision == "bf16"},
                 "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def snapshot(engine, optimizer) -> list[torch.Tensor]:
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in [*engine.module.parameters(), *state]]


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's value on the host raises (a sync on a GPU)."""
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor during the step")

    with contextlib.ExitStack() as stack:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse))
        yield


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_device_side_skip_leaves_weights_and_state_untouched(precision):
    engine, optimizer = fused_engine(precision)
    stepper = Stepper(engine, max_consecutive_skips=3)
    assert stepper.device_skip is optimizer
    x = torch.randn(2, 4)

    def loss():
        return engine(x.to(stepper.dtype)).float().pow(2).mean()

    stepper(loss(), 0.1)  # creates the optimizer state
    before = snapshot(engine, optimizer)
    # A NaN loss with finite gradients: DeepSpeed's own overflow check cannot see it.
    with no_host_reads() if precision == "fp32" else contextlib.nullcontext():
        outcome = stepper(loss() + float("nan"), 0.1)
    assert outcome.loss.isnan() and outcome.skipped
    # And one whose gradients are NaN too.
    stepper(loss() * float("nan"), 0.1)
    after = snapshot(engine, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert stepper.check() == 2
    outcome = stepper(loss(), 0.1)
    assert not outcome.skipped and torch.isfinite(outcome.grad_norm)
    assert not torch.equal(before[0], engine.module.weight)  # a finite step applies again


def test_device_side_skip_covers_the_accumulated_step():
    engine, optimizer = fused_engine(grad_accum=2)
    stepper = Stepper(engine)
    x = torch.randn(2, 4)

    def loss():
        return engine(x).pow(2).mean()

    stepper(loss(), 0.1), stepper(loss(), 0.1)
    before = snapshot(engine, optimizer)
    stepper(loss() * float("nan"), 0.1)  # poisons the accumulated gradients
    stepper(loss(), 0.1)  # the boundary: skipped with it
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(engine, optimizer)))
    stepper(loss(), 0.1), stepper(loss(), 0.1)
    assert not torch.equal(before[0], engine.module.weight)


def test_a_run_of_skips_aborts_at_the_next_check_even_if_it_ended():
    engine, _ = fused_engine()
    stepper = Stepper(engine, max_consecutive_skips=2)
    x = torch.randn(2, 4)
    stepper(engine(x).sum() * float("nan"), 0.1)
    assert stepper.check() == 1
    stepper(engine(x).sum() * float("nan"), 0.1)
    stepper(engine(x).sum(), 0.1)  # the run is over before anyone looks
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        stepper.check()


def test_solo_init_retries_a_port_taken_between_choice_and_bind(monkeypatch):
    """A plain `python` run picks its own rendezvous port; if another process binds it first,
    init picks another instead of failing with EADDRINUSE. The refusal is simulated — the one
    stand-in — so that the test does not depend on a real port race."""
    import deepspeed
    import torch.distributed as dist

    from s4d_dist.train import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    ports = []

    def init_distributed(dist_backend=None):
        ports.append(os.environ["MASTER_PORT"])
        if len(ports) == 1:
            raise dist.DistNetworkError("The server socket has failed to listen on any local "
                                        "network address. code: -98, name: EADDRINUSE")

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    distributed.init()
    assert len(ports) == 2 and ports[0] != ports[1]


def test_compiled_engine_trains_like_the_eager_one(tmp_path):
    """`deepspeed.compile=true` (torch.compile of the model; inductor's CPU code here, Triton on
    a GPU) takes the same steps as eager: losses and weights of a few ZeRO-1 steps of the MoAE
    classifier agree. Inductor draws random numbers its own way, so the router noise is made to
    come from eager's generator (fallback_random) for the comparison."""
    import torch._inductor.config as inductor_config
    import torch.nn.functional as F

    from s4d_dist.models.factory import build_classifier

    distributed.init()
    runs = {}
    for compiled in (False, True):
        cfg = config.load("demo_finetune", tiny_overrides(tmp_path, tmp_path, "finetune") + [
            f"deepspeed.compile={compiled}", "deepspeed.zero_stage=1"])
        torch.manual_seed(0)
        engine = build_engine(cfg, build_classifier(cfg))
        stepper, data = Stepper(engine), torch.Generator().manual_seed(1)
        losses = []
        with mock.patch.object(inductor_config, "fallback_random", True):
            for step in range(3):
                pixels = torch.randn(2, 3, 4, 32, 32, generator=data)
                labels = torch.randint(0, cfg.model.num_video_classes, (2,), generator=data)
                torch.manual_seed(100 + step)  # the router noise of this step
                logits, aux = engine(pixels, "video", with_aux=True)
                loss = F.cross_entropy(logits.float(), labels) + 1e-3 * aux.float()
                losses.append(float(stepper(loss, 1e-3).loss))
        runs[compiled] = losses, [p.detach().clone() for p in engine.module.parameters()]
    eager, compiled = runs[False], runs[True]
    assert eager[0][-1] != eager[0][0]  # the weights moved between steps
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_resume_refuses_optimizer_state_of_other_parameters(tmp_path, caplog):
    """ZeRO's optimizer state is flat partitions of the parameters in order: a checkpoint of a
    model whose parameters differ (order or shape) would load into the wrong places silently.
    Each checkpoint records its layout and a resume into another is refused."""
    from s4d_dist.train.checkpoint import Checkpoints, ResumeError

    distributed.init()
    cfg = tiny_cfg(tmp_path, "deepspeed.zero_stage=1")
    torch.manual_seed(0)
    checkpoints = Checkpoints(tmp_path, cfg)
    tag = checkpoints.save(build_engine(cfg, build_mae(cfg)), {"global_step": 1})
    assert checkpoints.load(build_engine(cfg, build_mae(cfg)), tag)["global_step"] == 1

    other = build_mae(cfg)
    other.register_parameter("extra", nn.Parameter(torch.zeros(3)))  # e.g. another version's
    with pytest.raises(ResumeError, match=r"optimizer state for other parameters.*extra"):
        checkpoints.load(build_engine(cfg, other), tag)

    # A checkpoint from before layouts were recorded is checked against ZeRO's own record of
    # its parameters (stage >= 1; ZeRO-0 has none: the resume goes on with a warning).
    trainer = checkpoints._trainer_file(checkpoints.dir, tag)
    saved = torch.load(trainer, weights_only=False)
    del saved["param_layout"]
    torch.save(saved, trainer)
    assert checkpoints.load(build_engine(cfg, build_mae(cfg)), tag)["global_step"] == 1
    with pytest.raises(ResumeError, match="optimizer state for other parameters"):
        checkpoints.load(build_engine(cfg, other), tag)
    cfg0 = tiny_cfg(tmp_path / "zero0", "deepspeed.zero_stage=0")
    checkpoints = Checkpoints(tmp_path / "zero0", cfg0)
    tag = checkpoints.save(build_engine(cfg0, build_mae(cfg0)), {"global_step": 2})
    trainer = checkpoints._trainer_file(checkpoints.dir, tag)
    saved = torch.load(trainer, weights_only=False)
    del saved["param_layout"]
    torch.save(saved, trainer)
    assert checkpoints.load(build_engine(cfg0, build_mae(cfg0)), tag)["global_step"] == 2
    assert "does not record its parameter layout" in caplog.text


def flat_tiny_step(tmp_path, *extra):
    """A ZeRO-0 engine (the flat AdamW) on the tiny MoAE classifier and a clip batch."""
    from s4d_dist.models.factory import build_classifier
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.loop import Run

    distributed.init()
    cfg = config.load("demo_finetune", tiny_overrides(tmp_path, tmp_path, "finetune") + [
        "deepspeed.zero_stage=0", *extra])
    torch.manual_seed(0)
    engine = build_engine(cfg, build_classifier(cfg))
    run = Run(cfg, tmp_path, None, None, engine)
    task = FinetuneTask(cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    pixels = torch.randn(2, 3, 4, 32, 32).to(dtype)
    targets = torch.softmax(torch.randn(2, cfg.model.num_video_classes), -1)
    return engine, task.objective(run), (pixels, targets)


def test_flat_device_step_reads_nothing_and_skips_on_the_device(tmp_path):
    """The path a GPU runs (on_host False): no host read in a step, and a non-finite loss or
    gradient leaves weights, moments and step counts untouched, counted on the device."""
    engine, objective, inputs = flat_tiny_step(tmp_path)
    stepper = Stepper(engine, max_consecutive_skips=5)
    stepper.on_host = False  # what a CUDA device sets: the flags stay on the device
    stepper.step(objective, inputs, 1e-3)
    optimizer = engine.flat_optimizer

    def state():
        return [t.clone() for g in optimizer.flat
                for t in (g.data, g.exp_avg, g.exp_avg_sq, g.steps_t)]
    before = state()
    with no_host_reads():
        outcome = stepper.step(lambda *x: objective(*x) * float("nan"), inputs, 1e-3)
        stepper.step(lambda *x: objective(*x) * 0 + 1.0 + 0 * engine.module.head["video"].bias.sum()
                     * float("inf"), inputs, 1e-3)  # a finite loss, its gradient not finite
    assert all(torch.equal(a, b) for a, b in zip(before, state()))
    assert outcome.skipped and stepper.check() == 2
    outcome = stepper.step(objective, inputs, 1e-3)
    assert not outcome.skipped and torch.isfinite(outcome.grad_norm)
    assert not torch.equal(before[0], optimizer.flat[0].data)


def test_flat_resume_refuses_another_optimizers_state_and_exports_fp32_masters(tmp_path):
    from s4d_dist.models.factory import build_classifier
    from s4d_dist.train.checkpoint import Checkpoints, ResumeError, export_fp32

    engine, objective, inputs = flat_tiny_step(tmp_path, "deepspeed.precision=bf16")
    Stepper(engine).step(objective, inputs, 1e-2)
    cfg = config.load("demo_finetune", tiny_overrides(tmp_path, tmp_path, "finetune") + [
        "deepspeed.zero_stage=0", "deepspeed.precision=bf16"])
    checkpoints = Checkpoints(tmp_path / "flat", cfg)
    tag = checkpoints.save(engine, {"global_step": 1})
    masters = engine.flat_optimizer.master_weights()
    weights = export_fp32(engine, checkpoints.dir, tag)
    name = "blocks.1.moe_layer.experts.0.fc1.weight"  # official per-expert key, from the masters
    torch.testing.assert_close(weights[name], masters["blocks.1.moe_layer.fc1_weight"][0],
                               rtol=0, atol=0)
    assert not torch.equal(weights["head.video.weight"],
                           weights["head.video.weight"].bfloat16().float())  # not bf16 values
    torch.manual_seed(0)
    resumed = build_engine(cfg, build_classifier(cfg))
    assert checkpoints.load(resumed, tag)["global_step"] == 1
    for a, b in zip(engine.flat_optimizer.flat, resumed.flat_optimizer.flat):
        assert torch.equal(a.master, b.master) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
        assert torch.equal(a.data, b.data) and a.steps == b.steps

    zero1 = config.load("demo_finetune", tiny_overrides(tmp_path, tmp_path, "finetune") + [
        "deepspeed.zero_stage=1"])
    old = Checkpoints(tmp_path / "zero1", zero1)
    torch.manual_seed(0)
    old_tag = old.save(build_engine(zero1, build_classifier(zero1)), {"global_step": 1})
    torch.manual_seed(0)
    with pytest.raises(ResumeError, match="optimizer state of DeepSpeed's optimizer.*flat AdamW"):
        Checkpoints(tmp_path / "zero1", cfg).load(build_engine(cfg, build_classifier(cfg)), old_tag)


@pytest.mark.parametrize("task", ["finetune", "pretrain"])
def test_both_objectives_trace_without_graph_breaks(tmp_path, task):
    """What `deepspeed.compile` compiles (fullgraph) and a GPU captures: the fine-tuning
    objective (MoAE classifier, aux loss) and the pre-training one (visible tubelets, MAE loss),
    each one dynamo graph."""
    from s4d_dist.data.masking import random_masks
    from s4d_dist.models.factory import build_classifier
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.loop import Run
    from s4d_dist.train.pretrain import PretrainTask

    distributed.init()
    cfg = config.load("demo_finetune" if task == "finetune" else "demo",
                      tiny_overrides(tmp_path, tmp_path, task))
    torch.manual_seed(0)
    model = (build_classifier if task == "finetune" else build_mae)(cfg)
    engine = build_engine(cfg, model)
    run = Run(cfg, tmp_path, None, None, engine)
    pixels = torch.randn(2, 3, 4, 32, 32)
    if task == "finetune":
        objective = FinetuneTask(cfg).objective(run)
        inputs = (pixels, torch.softmax(torch.randn(2, cfg.model.num_video_classes), -1))
    else:
        objective = PretrainTask(cfg).objective(run)
        inputs = (pixels, random_masks(2, 8, cfg.mask.video_ratio))
    explained = torch._dynamo.explain(objective)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow
def test_compiled_flat_step_trains_like_the_eager_one(tmp_path):
    """`deepspeed.compile=true` with the flat AdamW (ZeRO-0): the objective through
    torch.compile (inductor's CPU code here) and the compiled device-side update take the same
    steps as the eager host path (torch's AdamW arithmetic), to float rounding: losses and
    weights of a few fine-tuning steps of the MoAE classifier, with image and clip steps (the
    other head left alone in each). The router noise comes from eager's generator
    (fallback_random) for the comparison."""
    import torch._inductor.config as inductor_config

    runs = {}
    for compiled in (False, True):
        engine, objective, _ = flat_tiny_step(tmp_path)
        stepper = Stepper(engine, compile=compiled)
        assert stepper.on_host is not compiled
        data = torch.Generator().manual_seed(1)
        losses = []
        with mock.patch.object(inductor_config, "fallback_random", True):
            for step in range(4):
                image = step == 2
                batch = torch.randn((2, 3, 32, 32) if image else (2, 3, 4, 32, 32), generator=data)
                classes = engine.module.head["image" if image else "video"].out_features
                soft = torch.softmax(torch.randn(2, classes, generator=data), -1)
                torch.manual_seed(100 + step)
                losses.append(float(stepper.step(objective, (batch, soft), 1e-3).loss))
        runs[compiled] = losses, [p.detach().clone() for p in engine.module.parameters()]
    eager, compiled = runs[False], runs[True]
    assert eager[0][-1] != eager[0][0]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
