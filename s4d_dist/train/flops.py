"""Model FLOPs per training step, for the MFU estimate logged to TensorBoard.

Counts matrix multiplies only (2 FLOPs per multiply-add), forward ×3 for forward + backward, as
is usual for MFU (PaLM appendix B). Attention counts QKᵀ and AV over the tokens a block sees.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from s4d_dist.data.masking import num_masked

# Dense bf16 peak per GPU (no sparsity) from the vendor's datasheets, matched against the device
# name in this order (the first substring found wins, so variants precede their family): the
# PCIe and NVL parts run lower clocks, fewer SMs or a lower power limit than the SXM parts.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
    ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("A10", 125e12))


def transformer_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` pre-norm blocks over one sequence of `tokens`."""
    dense = 2 * tokens * (4 * dim * dim + 2 * mlp_ratio * dim * dim)
    attention = 2 * 2 * tokens * tokens * dim
    return depth * (dense + attention)


def mae_step_flops(cfg: DictConfig, tokens: int, mask_ratio: float, batch: int) -> float:
    """Patch embedding and encoder blocks of the visible tokens, decoder on all of them, for
    fwd + bwd."""
    m = cfg.model
    visible = tokens - num_masked(tokens, mask_ratio)
    encoder = 2 * visible * m.in_chans * m.tubelet * m.patch ** 2 * m.embed_dim + \
        transformer_flops(visible, m.embed_dim, m.depth, m.mlp_ratio)
    decoder = 2 * visible * m.embed_dim * m.decoder_dim + \
        transformer_flops(tokens, m.decoder_dim, m.decoder_depth, m.mlp_ratio) + \
        2 * tokens * m.decoder_dim * m.in_chans * m.tubelet * m.patch ** 2
    return 3 * batch * (encoder + decoder)


def classifier_step_flops(cfg: DictConfig, tokens: int, batch: int) -> float:
    """Encoder on all tokens plus the k active adapter experts in each MoAE layer, fwd + bwd."""
    m, moae = cfg.model, cfg.model.moae
    flops = 2 * tokens * m.in_chans * m.tubelet * m.patch ** 2 * m.embed_dim + \
        transformer_flops(tokens, m.embed_dim, m.depth, m.mlp_ratio)
    if moae.enabled:
        hidden = int(m.embed_dim * moae.hidden_ratio)
        per_token = 2 * 2 * m.embed_dim * moae.num_experts + moae.top_k * 2 * 2 * m.embed_dim * hidden
        flops += len(moae.layers) * tokens * per_token
    return 3 * batch * flops


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPU, a part not in the
    table): MFU is then not reported. `override_tflops` (logging.peak_tflops) wins, for parts
    not listed or run with capped clocks or power."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)
