"""MoAE: official parameter names, backend agreement, token dropping, gates, aux loss, quirks."""
from __future__ import annotations

import copy
import logging
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s4d_dist.models import moae
from s4d_dist.models.moae import (BACKEND_NAMES, MoAE, MoAEBlock, get_backend, loop_backend,
                                  vectorised_backend)
from s4d_dist.models.vit import Mlp

B, L, D, E, H, K = 3, 20, 32, 4, 8, 2
BACKENDS_UNDER_TEST = ("loop", "torch")


def make_moae(num_experts: int = E, top_k: int = K, capacity_factor: float = 1.0,
              **kwargs) -> MoAE:
    torch.manual_seed(0)
    return MoAE(D, num_experts, top_k, H, capacity_factor, **kwargs)


def backend_inputs(m: MoAE, h: torch.Tensor, noise: torch.Tensor) -> tuple:
    """The arguments MoAE.forward hands its backend, detached, for direct backend calls."""
    with torch.no_grad():
        x = h.reshape(-1, D)
        logits, noise_std = m.router(x)
        capacity = int(h.shape[0] * h.shape[1] * m.top_k / m.num_experts * m.capacity_factor)
        return (x, logits, noise_std, noise.reshape(x.shape[0], -1), *m.expert_weights(),
                m.top_k, capacity)


def expert_module(m: MoAE, e: int) -> Mlp:
    """Expert e as the official per-expert module, loaded from m's state dict (official keys)."""
    expert = Mlp(D, m.fc1_weight.shape[1])
    prefix = f"experts.{e}."
    expert.load_state_dict({k[len(prefix):]: v for k, v in m.state_dict().items()
                            if k.startswith(prefix)})
    return expert


def test_moae_state_dict_keys_in_official_order():
    keys = list(make_moae().state_dict())
    expected = ["router.topkroute_linear.weight", "router.topkroute_linear.bias",
                "router.noise_linear.weight", "router.noise_linear.bias"]
    for e in range(E):
        expected += [f"experts.{e}.fc1.weight", f"experts.{e}.fc1.bias",
                     f"experts.{e}.fc2.weight", f"experts.{e}.fc2.bias"]
    assert keys == expected
    shapes = make_moae().state_dict()
    assert shapes["router.topkroute_linear.weight"].shape == (E, D)
    assert shapes["experts.0.fc1.weight"].shape == (H, D)
    assert shapes["experts.0.fc2.weight"].shape == (D, H)


def test_experts_are_stacked_parameters_that_read_and_write_official_keys():
    m = make_moae()
    assert [n for n, _ in m.named_parameters()][:4] == list(moae.STACKED_EXPERTS)
    assert all(w is getattr(m, n) for w, n in zip(m.expert_weights(), moae.STACKED_EXPERTS))
    sd = m.state_dict()
    assert torch.equal(sd["experts.2.fc2.weight"], m.fc2_weight[2])
    assert torch.equal(sd["experts.3.fc1.bias"], m.fc1_bias[3])

    # Official per-expert keys load into the stacks; a missing expert is named by the load.
    other = make_moae()
    other.load_state_dict({k: v + 1 for k, v in sd.items()})
    assert torch.equal(other.fc1_weight[1], sd["experts.1.fc1.weight"] + 1)
    with pytest.raises(RuntimeError, match="fc2_weight"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "experts.0.fc2.weight"})

    # A whole model's state named as its parameters (DeepSpeed's zero_to_fp32) → official keys.
    flat = {f"blocks.6.moe_layer.{n}": p.detach() for n, p in m.named_parameters()}
    moae.split_all_experts(flat)
    assert list(flat) == [f"blocks.6.moe_layer.{k}" for k in sd]
    assert all(torch.equal(flat[f"blocks.6.moe_layer.{k}"], v) for k, v in sd.items())


def test_block_state_dict_keys_in_official_order():
    block = MoAEBlock(D, 4, 4.0, E, K, H, 1.0, "torch")
    moe_keys = ["moe_layer." + k for k in make_moae().state_dict()]
    expected = ["norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
                "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", *moe_keys,
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert list(block.state_dict()) == expected
    assert block.mlp.fc1.weight.shape == (4 * D, D)


CASES = {  # name: (num_experts, top_k, capacity_factor, starve_last_expert)
    "default": (E, K, 1.0, False),
    "heavy_drops": (E, K, 0.25, False),
    "top1": (E, 1, 1.0, False),
    "single_expert": (1, 1, 1.0, False),
    "expert_without_tokens": (E, K, 1.0, True),
    "no_drops": (E, K, 100.0, False),
    "zero_capacity": (E, K, 0.01, False),
}


@pytest.mark.parametrize("case", CASES)
def test_loop_and_torch_agree(case):
    num_experts, top_k, capacity_factor, starve = CASES[case]
    reference = make_moae(num_experts, top_k, capacity_factor, backend="loop")
    if starve:  # a bias no noise can overcome: the last expert never enters a top-k
        with torch.no_grad():
            reference.router.topkroute_linear.bias[-1] = -100.0
    vectorised = copy.deepcopy(reference)
    vectorised.backend = "torch"
    torch.manual_seed(1)
    h = torch.randn(B, L, D)
    noise = torch.randn(B, L, num_experts)
    grad_out = torch.randn(B, L, D)

    results, grads = {}, {}
    for m in (reference, vectorised):
        hh = h.clone().requires_grad_()
        out = m(hh, noise)
        (out * grad_out).sum().add(m.aux_loss).backward()
        results[m.backend] = get_backend(m.backend)(*backend_inputs(m, h, noise))
        grads[m.backend] = [hh.grad] + [p.grad for p in m.parameters()]
        torch.testing.assert_close(out.detach().view(-1, D), results[m.backend].out,
                                   rtol=0, atol=0)

    loop, vec = results["loop"], results["torch"]
    torch.testing.assert_close(vec.out, loop.out, rtol=1e-5, atol=1e-5)
    assert torch.equal(vec.topk_idx, loop.topk_idx)
    assert torch.equal(vec.kept, loop.kept)
    torch.testing.assert_close(vec.gates, loop.gates, rtol=0, atol=0)
    names = ["h"] + [n for n, _ in reference.named_parameters()]
    for name, g_loop, g_vec in zip(names, grads["loop"], grads["torch"]):
        if g_loop is None and case == "zero_capacity":  # the loop never touched the experts
            g_loop = torch.zeros_like(g_vec)
        assert g_loop is not None and g_vec is not None, name
        torch.testing.assert_close(g_vec, g_loop, rtol=1e-5, atol=1e-5, msg=name)

    # The case really exercises what its name says.
    if case in ("heavy_drops", "zero_capacity"):
        assert not loop.kept.all()
    if case == "no_drops":
        assert loop.kept.all()
    if case == "zero_capacity":
        assert not loop.kept.any() and not loop.out.any()
    if starve:
        assert vectorised.stats["tokens_per_expert"][-1] == 0
        assert not grads["loop"][names.index("fc2_bias")][-1].any()  # last expert's: zero


def test_drops_follow_flat_token_order_against_python_loops():
    m = make_moae(capacity_factor=0.5)
    torch.manual_seed(2)
    h, noise = torch.randn(B, L, D), torch.randn(B, L, E)
    args = backend_inputs(m, h, noise)
    x, logits, noise_std, flat_noise = args[:4]
    capacity = args[-1]
    noisy = (logits + flat_noise * noise_std).tolist()

    # Independent computation: per token in flat order, its experts by descending noisy logit;
    # each expert accepts pairs until its capacity is used up.
    used = [0] * E
    expected_kept, expected_out = [], torch.zeros(B * L, D)
    with torch.no_grad():
        for t, row in enumerate(noisy):
            experts = sorted(range(E), key=lambda e: -row[e])[:K]
            weights = [math.exp(row[e]) for e in experts]
            kept_row = []
            for e, w in zip(experts, weights):
                used[e] += 1
                kept_row.append(used[e] <= capacity)
                if kept_row[-1]:
                    expected_out[t] += w / sum(weights) * expert_module(m, e)(x[t])
            expected_kept.append(kept_row)
    expected_kept = torch.tensor(expected_kept)
    assert 0 < expected_kept.sum() < B * L * K  # some dropped, some kept

    for backend in (loop_backend, vectorised_backend):
        result = backend(*args)
        assert torch.equal(result.kept, expected_kept), backend.__name__
        torch.testing.assert_close(result.out, expected_out, rtol=1e-5, atol=1e-6)


def test_later_samples_lose_tokens_first():
    """All 2·3 tokens pick expert 0 (capacity int(6·1/2) = 3): sample 0 kept, sample 1 dropped."""
    m = make_moae(num_experts=2, top_k=1)
    with torch.no_grad():
        m.router.topkroute_linear.bias.copy_(torch.tensor([100.0, -100.0]))
    h = torch.randn(2, 3, D)
    for backend in BACKENDS_UNDER_TEST:
        m.backend = backend
        out = m.train()(h, torch.randn(2, 3, 2))
        assert out[0].abs().sum(dim=-1).gt(0).all()
        assert not out[1].any()
        assert m.stats["drop_fraction"] == 0.5



@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_gates_sum_to_one_and_are_not_renormalised_after_drops(backend):
    m = make_moae(capacity_factor=0.5)
    torch.manual_seed(3)
    args = backend_inputs(m, torch.randn(B, L, D), torch.randn(B, L, E))
    result = get_backend(backend)(*args)
    torch.testing.assert_close(result.gates.sum(dim=-1), torch.ones(B * L))

    x = args[0]
    one_dropped = (result.kept.sum(dim=-1) == 1).nonzero().squeeze(-1)
    both_dropped = (~result.kept).all(dim=-1).nonzero().squeeze(-1)
    assert one_dropped.numel() and both_dropped.numel()
    assert not result.out[both_dropped].any()  # dropped pairs contribute nothing
    with torch.no_grad():
        for t in one_dropped.tolist():
            j = int(result.kept[t].nonzero())
            gate = result.gates[t, j]
            assert gate < 1  # the surviving gate keeps its pre-drop value
            expert = expert_module(m, int(result.topk_idx[t, j]))
            torch.testing.assert_close(result.out[t], gate * expert(x[t]), rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_and_noise_free_in_correct_mode():
    m = make_moae()
    h = torch.randn(B, L, D)
    with torch.no_grad():
        first = m.eval()(h, torch.randn(B, L, E))  # given noise is ignored at eval
        second = m(h)
        noise_free = m.train()(h, torch.zeros(B, L, E))
    assert torch.equal(first, second)
    assert torch.equal(first, noise_free)


def test_quirk_mode_keeps_router_noise_at_eval():
    m = make_moae(router_noise_at_eval=True).eval()
    h = torch.randn(B, L, D)
    with torch.no_grad():
        assert not torch.equal(m(h), m(h))


def numpy_aux_loss(m: MoAE, h: torch.Tensor, noise: torch.Tensor, use_softmax: bool) -> float:
    """docs/method.md §2.5 in NumPy, from the raw weights."""
    def np64(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    route, scale = m.router.topkroute_linear, m.router.noise_linear
    hn = np64(h)
    z = (hn @ np64(route.weight).T + np64(route.bias)
         + np64(noise) * np.log1p(np.exp(hn @ np64(scale.weight).T + np64(scale.bias))))
    topk = np.argsort(-z, axis=-1)[..., :K]
    f = np.zeros_like(z)
    np.put_along_axis(f, topk, 1.0, axis=-1)
    f = f.mean(axis=1)
    if use_softmax:
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        z = p / p.sum(axis=-1, keepdims=True)
    return E ** 2 * float((f * z.mean(axis=1)).mean())


@pytest.mark.parametrize("aux_loss_on_logits", [False, True])
def test_aux_loss_matches_numpy(aux_loss_on_logits):
    m = make_moae(aux_loss_on_logits=aux_loss_on_logits).train()
    h = torch.randn(B, L, D, requires_grad=True)
    noise = torch.randn(B, L, E)
    m(h, noise)
    expected = numpy_aux_loss(m, h.detach(), noise, use_softmax=not aux_loss_on_logits)
    assert m.aux_loss.requires_grad
    assert m.aux_loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_aux_loss_correct_mode_is_never_stale():
    m = make_moae()
    h = torch.randn(B, L, D)
    assert m.aux_loss is None
    m.train()(h.requires_grad_())
    assert m.aux_loss is not None
    with torch.no_grad():  # training mode without grad still measures this batch
        m(h * 2)
    assert m.aux_loss is not None and not m.aux_loss.requires_grad
    m.eval()(h)
    assert m.aux_loss is None


def test_aux_loss_quirk_mode_is_stale_without_grad():
    m = make_moae(stale_aux_loss=True).train()
    h = torch.randn(B, L, D)
    m(h)
    assert m.aux_loss is None  # input does not require grad: never computed
    m(h.clone().requires_grad_())
    first = m.aux_loss
    with torch.no_grad():
        m(h * 3)
    assert m.aux_loss is first  # the official keeps the previous batch's value
    m.eval()(h.clone().requires_grad_())
    assert m.aux_loss is not first  # refreshed whenever grad flows, eval or not


def test_routing_stats():
    m = make_moae(capacity_factor=0.5).train()
    m(torch.randn(B, L, D), torch.randn(B, L, E))
    stats = m.stats
    assert stats["tokens_per_expert"].shape == (E,)
    assert stats["tokens_per_expert"].sum() == B * L * K
    capacity = int(B * L * K / E * 0.5)
    kept = stats["tokens_per_expert"].clamp(max=capacity).sum()
    torch.testing.assert_close(stats["drop_fraction"], 1 - kept / (B * L * K))
    assert 0 < stats["router_entropy"] <= math.log(E)
    assert not any(v.requires_grad for v in stats.values())

    # Computed when read, from the last forward: a later batch's routing replaces them.
    m.record_routing = True
    m(torch.randn(B, L, D), torch.randn(B, L, E) * 5)
    r = m.routing
    expected = torch.bincount(r.topk_idx.flatten(), minlength=E).float()
    torch.testing.assert_close(m.stats["tokens_per_expert"], expected)
    torch.testing.assert_close(m.stats["drop_fraction"], 1 - r.kept.float().mean())
    assert m.stats["router_entropy"] != stats["router_entropy"]


def test_torch_backend_has_static_shapes_and_no_host_sync():
    """On the meta device any .item(), nonzero or data-dependent shape raises, so running
    forward and backward there proves the torch backend never syncs with the host."""
    T = B * L
    meta = dict(device="meta", requires_grad=True)
    x, logits, std = torch.randn(T, D, **meta), torch.randn(T, E, **meta), torch.randn(T, E, **meta)
    weights = (torch.randn(E, H, D, **meta), torch.randn(E, H, **meta),
               torch.randn(E, D, H, **meta), torch.randn(E, D, **meta))
    args = (x, logits, std, torch.randn(T, E, device="meta"), *weights, K, 30)
    result = vectorised_backend(*args)
    result.out.sum().backward()
    assert result.out.shape == (T, D) and x.grad.shape == (T, D)
    with pytest.raises(NotImplementedError):  # sanity: the check does catch the loop's nonzero
        loop_backend(*args)


def test_autocast_bf16_backends_agree_and_keep_input_dtype():
    m = make_moae().train()
    h, noise = torch.randn(B, L, D), torch.randn(B, L, E)
    outs = []
    for backend in BACKENDS_UNDER_TEST:
        m.backend = backend
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(h, noise))
        assert outs[-1].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


@pytest.fixture
def fresh_triton_loader():
    """The loader is cached per process (one warning); each test needs a clean slate."""
    moae.load_triton_backend.cache_clear()
    yield
    moae.load_triton_backend.cache_clear()


def test_triton_falls_back_to_torch_when_kernels_missing(fresh_triton_loader, monkeypatch,
                                                         caplog):
    # A None entry in sys.modules makes the import fail, simulating an install without it.
    monkeypatch.setitem(sys.modules, "s4d_dist.kernels.moae_triton", None)
    with caplog.at_level(logging.WARNING, logger=moae.__name__):
        assert moae.resolve_backend("triton", torch.device("cpu")) == "torch"
        assert moae.resolve_backend("auto", torch.device("cuda")) == "torch"
        m = MoAE(D, E, K, H, backend="triton")
        m(torch.randn(B, L, D))  # runs on the torch backend
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per process, not once per call or layer
    message = warnings[0].getMessage()
    assert "triton" in message and "s4d_dist.kernels.moae_triton" in message


def test_triton_falls_back_to_torch_when_unavailable(fresh_triton_loader, monkeypatch, caplog):
    # A stand-in module, so the test does not depend on the real kernels or on a GPU.
    fake = types.ModuleType("s4d_dist.kernels.moae_triton")
    fake.triton_available = lambda: (False, "no CUDA device")
    fake.fused_moae = lambda *args, **kwargs: pytest.fail("unavailable backend was called")
    monkeypatch.setitem(sys.modules, "s4d_dist.kernels.moae_triton", fake)
    with caplog.at_level(logging.WARNING, logger=moae.__name__):
        assert moae.resolve_backend("triton", torch.device("cpu")) == "torch"
    assert "no CUDA device" in caplog.text


def test_auto_is_triton_on_cuda_and_torch_elsewhere(fresh_triton_loader, monkeypatch):
    fake = types.ModuleType("s4d_dist.kernels.moae_triton")
    fake.triton_available = lambda: (True, "ok")
    fake.fused_moae = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "s4d_dist.kernels.moae_triton", fake)
    assert moae.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert moae.resolve_backend("auto", torch.device("cpu")) == "torch"  # the demo, CPU runs
    assert moae.resolve_backend("triton", torch.device("cpu")) == "triton"  # asked for
    assert moae.load_triton_backend()[0] is fake.fused_moae
    assert MoAE(D, E, K, H).backend == "auto"


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="auto, loop, torch, triton"):
        moae.resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError):
        MoAE(D, E, K, H, backend="nope")
    with pytest.raises(ValueError, match="loop, torch"):
        get_backend("triton")  # the fused layer takes the router's weights, not its logits
    assert BACKEND_NAMES == ("auto", "loop", "torch", "triton")


def test_capacity_per_group_of_samples():
    m = make_moae(num_experts=8, top_k=2)
    m.capacity_group = 16
    assert m.capacity(16, 800) == (12800, 3200, 3200)   # the official batch: one group
    assert m.capacity(64, 800) == (12800, 3200, 3200)   # four official batches
    assert m.capacity(20, 800) == (12800, 3200, 800)    # 16 + 4: the last group as a batch of 4
    assert m.capacity(3, 800) == (2400, 600, 600)       # smaller than a group: the forward
    m.capacity_group = 0
    assert m.capacity(64, 800) == (51200, 12800, 12800)  # counted over the whole forward
    m.capacity_factor = 0.3
    assert m.capacity(5, 7)[1] == int(5 * 7 * 2 / 8 * 0.3)  # the official rounding (§2.4)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("samples, group", [(64, 16), (7, 2)])
def test_micro_batch_drops_what_its_official_batches_would(backend, samples, group):
    """A forward of 64 samples in capacity groups of 16 keeps exactly the pairs, and returns
    the outputs, of four forwards of 16; 7 in groups of 2: of 2, 2, 2 and the 1 left over."""
    m = make_moae(capacity_factor=0.5, backend=backend).train()
    m.record_routing = True
    torch.manual_seed(5)
    h, noise = torch.randn(samples, L, D), torch.randn(samples, L, E)
    m.capacity_group = group
    with torch.no_grad():
        whole = m(h, noise)
    kept = m.routing.kept.view(samples, L, K)
    m.capacity_group = 0
    parts_kept, parts_out = [], []
    with torch.no_grad():
        for start in range(0, samples, group):
            parts_out.append(m(h[start:start + group], noise[start:start + group]))
            parts_kept.append(m.routing.kept.view(-1, L, K))
    assert torch.equal(kept, torch.cat(parts_kept))
    torch.testing.assert_close(whole, torch.cat(parts_out), rtol=1e-6, atol=1e-6)
    assert 0 < kept.sum() < kept.numel()
    m.capacity_group = 0  # one group: the later samples lose more than in smaller groups
    with torch.no_grad():
        m(h, noise)
    assert not torch.equal(m.routing.kept.view(samples, L, K), kept)


def test_classifier_sets_capacity_groups_per_modality():
    from s4d_dist.models.classifier import S4DClassifier
    model = S4DClassifier(img_size=32, num_frames=4, embed_dim=32, depth=2, num_heads=2,
                          moae_layers=(1,), num_experts=2, top_k=1, capacity_group=3,
                          moae_backend="torch").eval()
    layer = model.moae_layers()[1]
    with torch.no_grad():
        model(torch.randn(2, 3, 4, 32, 32), "video")
        assert layer.capacity_group == 3
        model(torch.randn(2, 3, 32, 32), "image")
        assert layer.capacity_group == 6  # the official image batch is twice the clips'


def test_block_forward_is_attention_then_parallel_ffn_and_moae():
    torch.manual_seed(4)
    block = MoAEBlock(D, 4, 4.0, E, K, H, 1.0, "torch").eval()
    x = torch.randn(B, L, D)
    with torch.no_grad():
        y = x + block.attn(block.norm1(x))
        h = F.layer_norm(y, (D,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        expected = y + block.mlp(h) + block.moe_layer(h)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
