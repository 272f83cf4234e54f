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


def test_build_engine_uses_plain_adamw_on_cpu_and_keeps_lr_scales(tmp_path):
    distributed.init()
    cfg = tiny_cfg(tmp_path, "optim.layer_decay=0.75")
    engine = build_engine(cfg, build_mae(cfg))
    assert not engine.client_optimizer.defaults["fused"]  # CPU runs reproduce earlier ones
    assert Stepper(engine).device_skip is None  # so a non-finite step is skipped on the host
    set_lr(engine, 1.0)
    scales = [g["lr_scale"] for g in engine.optimizer.param_groups]
    assert len(set(scales)) > 1 and [g["lr"] for g in engine.optimizer.param_groups] == scales


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
