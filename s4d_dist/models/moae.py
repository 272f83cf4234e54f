"""Mixture of Adapter Experts (docs/method.md §2.2-2.5): the official SparseMoEWithCapacity,
NoisyTopkRouter and BlockMoEAdapters, with interchangeable backends.

Routing is the same everywhere: noisy logits → top-k → softmax over the k selected logits
(the gates). What differs between backends is only how each (token, expert) pair reaches its
expert and comes back, under a per-expert capacity that drops pairs in flat token order
(index b·L + l, so later samples of a batch lose tokens first, §3.7). Capacity is counted per
group of `capacity_group` samples (the official per-GPU batch), so a larger micro-batch drops
exactly the tokens its official-size parts would.

- `loop`:   the official formulation, one Python iteration per expert; the reference.
- `torch`:  vectorised, static shapes, no host synchronisation — cumsum gives each pair its
            queue position, kept pairs go into a padded (E, capacity, D) buffer, the experts run
            as two batched GEMMs, gate-weighted rows are scatter-added back.
- `triton`: the whole layer fused in Triton kernels (`s4d_dist.kernels.moae_triton`, loaded
            lazily): router GEMM, routing, grouped expert GEMMs that gather and combine, and the
            mirrored backward; falls back to `torch` where it cannot run.
- `auto`:   `triton` on a CUDA device, `torch` elsewhere (the default).

Given the same router values and noise all backends return the same RoutingResult and
gradients; the tests hold them to it. `router_noise_at_eval`, `aux_loss_on_logits` and
`stale_aux_loss` reproduce the official router noise at eval (§3.3), raw-logit aux loss (§3.2)
and stale aux value (§3.4); the defaults do the right thing.
"""
from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from s4d_dist.kernels.moae_contract import Backend, Capacity, RoutingResult, batched_experts
from s4d_dist.models.vit import Attention, Mlp, init_linear_trunc_normal

logger = logging.getLogger(__name__)


def route(logits: torch.Tensor, noise_std: torch.Tensor, noise: torch.Tensor | None,
          top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating (§2.3), shared by every backend so they route identically.

    The official softmax over the full logit row with −inf outside the top-k equals a softmax
    over the k selected values, in value and in gradient.
    """
    noisy = logits if noise is None else logits + noise * noise_std
    top_logits, topk_idx = noisy.topk(top_k, dim=-1)
    return noisy, topk_idx, top_logits.softmax(dim=-1)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> torch.Tensor:
    """One bottleneck expert, vit.Mlp written over explicit weights (exact-erf GELU)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def loop_backend(x: torch.Tensor, logits: torch.Tensor, noise_std: torch.Tensor,
                 noise: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, top_k: int,
                 capacity: int | Capacity) -> RoutingResult:
    """The official per-expert loop (videomae.py:254-287), run on each capacity group as on a
    forward of its own: the reference the others must match."""
    noisy, topk_idx, gates = route(logits, noise_std, noise, top_k)
    out = torch.zeros_like(x)
    kept = torch.zeros_like(topk_idx, dtype=torch.bool)
    groups = Capacity.of(capacity, x.shape[0])
    for start in range(0, x.shape[0], groups.group_tokens):
        last = start + groups.group_tokens >= x.shape[0]
        cap = groups.last_group if last else groups.per_group
        for e in range(w1.shape[0]):
            chose_e = topk_idx[start:start + groups.group_tokens] == e          # (Tg, k)
            tokens = start + chose_e.any(dim=-1).nonzero().squeeze(-1)[:cap]
            if tokens.numel() == 0:
                continue
            chose_e = topk_idx[tokens] == e
            gate = (gates[tokens] * chose_e).sum(dim=-1, keepdim=True)      # this expert's gate
            y = expert_mlp(x[tokens], w1[e], b1[e], w2[e], b2[e]) * gate
            out.index_add_(0, tokens, y.to(out.dtype))
            kept[tokens] |= chose_e
    return RoutingResult(out, noisy, topk_idx, gates, kept)


def vectorised_backend(x: torch.Tensor, logits: torch.Tensor, noise_std: torch.Tensor,
                       noise: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, top_k: int,
                       capacity: int | Capacity) -> RoutingResult:
    """The `torch` backend: vectorised dispatch with static shapes, no loop over experts, no
    host synchronisation.

    Every buffer has a size known from shapes alone, so the dispatch can be captured by CUDA
    graphs / torch.compile (no graph breaks) and never stalls the GPU stream. Empty buffer slots
    and dropped pairs go through one extra "trash" row (a zero input row / a discarded output
    row) instead of being filtered out, which would need data-dependent shapes.
    """
    noisy, topk_idx, gates = route(logits, noise_std, noise, top_k)
    num_tokens, dim = x.shape
    num_experts = w1.shape[0]
    num_pairs = num_tokens * top_k
    groups = Capacity.of(capacity, num_tokens)
    num_groups, group_tokens = groups.groups(num_tokens), groups.group_tokens
    slots = groups.slots() * num_groups  # per expert: each group's C slots one after the other

    # Queue position of each pair = how many lower-index tokens of its group chose the same
    # expert.
    chosen = torch.zeros_like(noisy, dtype=torch.long).scatter_(1, topk_idx, 1)
    if num_groups > 1:
        padded = F.pad(chosen, (0, 0, 0, num_groups * group_tokens - num_tokens))
        count = padded.view(num_groups, group_tokens, -1).cumsum(dim=1).view(-1, num_experts)
        count = count[:num_tokens]
    else:
        count = chosen.cumsum(dim=0)
    position = (count - 1).gather(1, topk_idx)                             # (T, k)
    if num_groups > 1:
        group = (torch.arange(num_tokens, device=x.device) // group_tokens).unsqueeze(1)
        limit = torch.where(group == num_groups - 1, groups.last_group, groups.per_group)
        kept = position < limit
        position = position + group * groups.slots()
    else:
        kept = position < groups.last_group
    trash = num_experts * slots
    slot = torch.where(kept, topk_idx * slots + position, trash)           # (T, k)

    # Inverse map: which pair fills each slot of the (E, slots) buffer; num_pairs = empty.
    pair_ids = torch.arange(num_pairs, device=x.device)
    slot_pair = torch.full((trash + 1,), num_pairs, dtype=torch.long, device=x.device)
    slot_pair = slot_pair.scatter_(0, slot.flatten(), pair_ids)[:trash]
    slot_token = slot_pair // top_k                                        # empty → num_tokens

    x_in = torch.cat([x, x.new_zeros(1, dim)]).index_select(0, slot_token)
    y = batched_experts(x_in.view(num_experts, slots, dim), w1, b1, w2, b2).view(trash, dim)
    slot_gate = torch.cat([gates.flatten(), gates.new_zeros(1)]).index_select(0, slot_pair)
    y = (y * slot_gate.unsqueeze(1)).to(x.dtype)
    out = x.new_zeros(num_tokens + 1, dim).index_add_(0, slot_token, y)[:num_tokens]
    return RoutingResult(out, noisy, topk_idx, gates, kept)


BACKENDS: dict[str, Backend] = {"loop": loop_backend, "torch": vectorised_backend}
BACKEND_NAMES = ("auto", *BACKENDS, "triton")


@functools.cache
def load_triton_backend() -> tuple[Callable | None, str]:
    """The fused layer (`moae_triton.fused_moae`), imported on first use so that CPU-only
    installs never import triton. Returns (function or None, reason). Cached, so the fallback
    warning is logged once per process however many layers ask.
    """
    try:
        kernels = importlib.import_module("s4d_dist.kernels.moae_triton")
    except ImportError as err:
        available, reason = False, f"cannot import s4d_dist.kernels.moae_triton: {err}"
    else:
        available, reason = kernels.triton_available()
    if available:
        return kernels.fused_moae, reason
    logger.warning("MoAE backend 'triton' unavailable (%s); using 'torch'", reason)
    return None, reason


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs on `device`: 'auto' is 'triton' on CUDA and 'torch' elsewhere;
    'triton' degrades to 'torch' (warning once) where its kernels cannot run."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown MoAE backend {name!r}; valid: {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton" and load_triton_backend()[0] is None:
        return "torch"
    return name


def get_backend(name: str) -> Backend:
    """The dispatch function of a backend that takes router logits ('loop', 'torch')."""
    if name not in BACKENDS:
        raise ValueError(f"MoAE dispatch backend {name!r} unknown; valid: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def load_balancing_loss(noisy_logits: torch.Tensor, topk_idx: torch.Tensor,
                        use_softmax: bool) -> torch.Tensor:
    """E² · mean_{b,e}(f·P) over (B, L, E) noisy logits (§2.5).

    f[b,e] (fraction of sample b's tokens whose top-k holds e) is a count, so it carries no
    gradient; P[b,e] is the mean router probability (Switch/GShard). The official code averages
    the raw logits instead (use_softmax=False, §3.2), which is unbounded below.
    """
    num_experts = noisy_logits.shape[-1]
    with torch.no_grad():
        chosen = torch.zeros_like(noisy_logits).scatter_(-1, topk_idx, 1.0)
        fraction = chosen.mean(dim=1)
    scores = noisy_logits.softmax(dim=-1) if use_softmax else noisy_logits
    return num_experts ** 2 * (fraction * scores.mean(dim=1)).mean()


@torch.no_grad()
def routing_stats(noisy_logits: torch.Tensor, topk_idx: torch.Tensor, kept: torch.Tensor,
                  num_experts: int) -> dict[str, torch.Tensor]:
    """Load, drop rate and router entropy for logging; tensors, so no host sync."""
    tokens_per_expert = torch.zeros(num_experts, device=topk_idx.device)
    tokens_per_expert.scatter_add_(0, topk_idx.flatten(),
                                   torch.ones_like(topk_idx.flatten(), dtype=torch.float))
    log_probs = noisy_logits.float().log_softmax(dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1).mean()
    return {"tokens_per_expert": tokens_per_expert,
            "drop_fraction": 1.0 - kept.float().mean(),
            "router_entropy": entropy}


class NoisyTopkRouter(nn.Module):
    """Router logits and noise scale (§2.3); top-k happens in the backend.

    Both come out in fp32 whatever the model's precision, as under the official fp16 autocast
    (softplus runs in fp32 there, and the fp32 noise scale promotes the noisy logits): the
    noise, top-k and gates are then fp32 too, so routing does not hinge on bf16/fp16 ties
    (§1.10)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.topkroute_linear = nn.Linear(dim, num_experts)
        self.noise_linear = nn.Linear(dim, num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.topkroute_linear(x).float(), F.softplus(self.noise_linear(x).float())

    def weights(self) -> tuple[torch.Tensor, ...]:
        """(W_r, b_r, W_n, b_n), as the fused backend runs both linears as one GEMM."""
        return (self.topkroute_linear.weight, self.topkroute_linear.bias,
                self.noise_linear.weight, self.noise_linear.bias)


# The experts' weights, one Parameter per kind stacked over experts (E, ...), and the official
# per-expert key each expert's slice has in a state dict (`experts.{e}.<key>`).
STACKED_EXPERTS = {"fc1_weight": "fc1.weight", "fc1_bias": "fc1.bias",
                   "fc2_weight": "fc2.weight", "fc2_bias": "fc2.bias"}


def split_experts(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Replace one layer's stacked expert weights (keys `prefix + fc1_weight`, ...) in `state`
    by the official per-expert keys, expert by expert, in place; appended, so after the router
    as in the official files."""
    stacked = {name: state.pop(prefix + name) for name in STACKED_EXPERTS if prefix + name in state}
    for e in range(len(next(iter(stacked.values()))) if stacked else 0):
        for name, tensor in stacked.items():
            state[f"{prefix}experts.{e}.{STACKED_EXPERTS[name]}"] = tensor[e].clone()


def split_all_experts(state: dict[str, torch.Tensor]) -> None:
    """split_experts for every MoAE layer of a model's flat state named as its parameters (what
    DeepSpeed's zero_to_fp32 returns); no other parameter's name ends in `.fc1_weight`."""
    for key in [k for k in state if k.endswith(".fc1_weight")]:
        split_experts(state, key[: -len("fc1_weight")])


def stack_experts(state: dict[str, torch.Tensor], prefix: str, num_experts: int) -> None:
    """The inverse of split_experts for one layer: official per-expert keys → stacked, in place.
    A kind whose keys are not all there is left alone (the load then names what is missing)."""
    for name, official in STACKED_EXPERTS.items():
        keys = [f"{prefix}experts.{e}.{official}" for e in range(num_experts)]
        if all(key in state for key in keys):
            state[prefix + name] = torch.stack([state.pop(key) for key in keys])


def _official_keys_out(module: MoAE, state: dict, prefix: str, _metadata) -> None:
    split_experts(state, prefix)


def _official_keys_in(module: MoAE, state: dict, prefix: str, *_) -> None:
    stack_experts(state, prefix, module.num_experts)


class MoAE(nn.Module):
    """Sparse mixture of bottleneck adapter experts with capacity (SparseMoEWithCapacity).

    After each forward: `aux_loss` holds this layer's load-balancing loss (the caller sums the
    layers and scales by the coefficient, 1e-3), `stats` the routing statistics and, with
    `record_routing`, `routing` each token's experts, gates and drops. The statistics are
    computed when read (at log steps), not in every training step: a dozen small kernels per
    layer that the step does not need.
    Initialised like the official model ends up (trunc-normal .02, zero bias, §3.5):
    its Kaiming init is overwritten by the model-level init, so noise std starts at softplus(0).

    The experts' weights are held stacked, one Parameter per kind (`fc1_weight` (E, H, D), ...):
    the backends read them without a copy, and an optimizer or ZeRO handles 4 tensors a layer
    instead of 4·E. State dicts keep the official per-expert keys (`experts.{e}.fc1.weight`),
    in both directions, so checkpoints are the official files.

    `capacity_group` (samples, 0 = the whole forward) splits a forward into groups whose
    capacities are counted separately, each as a forward of that many samples would; the
    classifier sets it per modality before each forward.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int,
                 capacity_factor: float = 1.0, backend: str = "auto", *,
                 capacity_group: int = 0, router_noise_at_eval: bool = False,
                 aux_loss_on_logits: bool = False, stale_aux_loss: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in [1, num_experts={num_experts}]")
        if backend == "triton":  # warn about a fallback at construction, not mid-run
            load_triton_backend()
        resolve_backend(backend, torch.device("cpu"))  # an unknown name fails here
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.capacity_group = capacity_group
        self.backend = backend
        self.router_noise_at_eval = router_noise_at_eval
        self.aux_loss_on_logits = aux_loss_on_logits
        self.stale_aux_loss = stale_aux_loss
        self.router = NoisyTopkRouter(dim, num_experts)
        # Built from per-expert layers, so that construction draws the official model's numbers.
        experts = [Mlp(dim, hidden) for _ in range(num_experts)]
        for name, official in STACKED_EXPERTS.items():
            self.register_parameter(name, nn.Parameter(torch.stack(
                [e.get_parameter(official).detach() for e in experts])))
        self.register_state_dict_post_hook(_official_keys_out)
        self.register_load_state_dict_pre_hook(_official_keys_in)
        self.apply(init_linear_trunc_normal)
        self.aux_loss: torch.Tensor | None = None
        self._last_routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._stats: dict[str, torch.Tensor] | None = None
        # Set by analyses that need each token's routing (s4d_dist.analyze): the last forward's
        # RoutingResult is then kept in `routing`.
        self.record_routing = False
        self.routing: RoutingResult | None = None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """routing_stats of the last forward ({} before the first), computed on first read."""
        if self._stats is None:
            self._stats = ({} if self._last_routing is None else
                           routing_stats(*self._last_routing, self.num_experts))
        return self._stats

    def expert_weights(self) -> tuple[torch.Tensor, ...]:
        """(w1, b1, w2, b2) stacked over experts, as the backends take them."""
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    def init_expert_weights(self, init_weight) -> None:
        """`init_weight` on each expert's weights in the official module order (expert by expert,
        fc1 then fc2, so the same random draws as per-expert Linear layers); zero biases."""
        with torch.no_grad():
            for e in range(self.num_experts):
                init_weight(self.fc1_weight[e])
                init_weight(self.fc2_weight[e])
            self.fc1_bias.zero_()
            self.fc2_bias.zero_()

    def capacity(self, samples: int, sample_tokens: int) -> Capacity:
        """Per-expert capacity int(n·L·k/E · capacity_factor) of a group of n samples (§2.4),
        per group of `capacity_group` samples; the last group holds what is left."""
        group = min(self.capacity_group or samples, samples)
        last = samples - (-(-samples // group) - 1) * group

        def of(n: int) -> int:
            return int(n * sample_tokens * self.top_k / self.num_experts * self.capacity_factor)

        return Capacity(group * sample_tokens, of(group), of(last))

    def forward(self, h: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) → (B, L, D). `noise` (B, L, E) replaces the standard-normal draw (tests,
        backend comparisons); it is ignored when no noise applies (eval, correct mode)."""
        B, L, D = h.shape
        x = h.reshape(B * L, D)
        noisy = self.training or self.router_noise_at_eval  # the official adds noise at eval (§3.3)
        noise = noise.reshape(B * L, -1) if noisy and noise is not None else None
        capacity = self.capacity(B, L)
        # The official refreshes the loss only when grad flows and keeps a stale one otherwise
        # (§3.4); the correct mode measures every training batch and clears it at eval.
        refresh = h.requires_grad if self.stale_aux_loss else self.training
        backend = resolve_backend(self.backend, h.device)
        if backend == "triton":
            fused = load_triton_backend()[0](
                x, self.router.weights(), self.expert_weights(), self.top_k, capacity, B,
                noise=noise, draw_noise=noisy,
                aux=("logits" if self.aux_loss_on_logits else "softmax") if refresh else None)
            result = fused.routing
            aux = fused.aux_terms.sum() if refresh else None
        else:
            logits, noise_std = self.router(x)
            if noisy and noise is None:
                noise = torch.randn_like(logits)
            result = get_backend(backend)(x, logits, noise_std, noise, *self.expert_weights(),
                                          self.top_k, capacity)
            aux = load_balancing_loss(result.noisy_logits.view(B, L, -1),
                                      result.topk_idx.view(B, L, -1),
                                      use_softmax=not self.aux_loss_on_logits) if refresh else None
        if refresh or not self.stale_aux_loss:
            self.aux_loss = aux
        self._last_routing = (result.noisy_logits.detach(), result.topk_idx, result.kept)
        self._stats = None
        self.routing = result if self.record_routing else None
        return result.out.view(B, L, D)


class MoAEBlock(nn.Module):
    """BlockMoEAdapters (§2.2): the MoAE runs in parallel to the pretrained FFN.

    Children are registered in the official order (moe_layer before mlp) so state-dict keys
    come out in checkpoint order.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, num_experts: int,
                 top_k: int, hidden: int, capacity_factor: float = 1.0, backend: str = "auto",
                 capacity_group: int = 0, **official: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.moe_layer = MoAE(dim, num_experts, top_k, hidden, capacity_factor, backend,
                              capacity_group=capacity_group, **official)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.mlp(h) + self.moe_layer(h)
