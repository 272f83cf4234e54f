"""The ViT shared by S4D pre-training and fine-tuning (docs/method.md §1.1-1.2, §2.1).

One encoder reads both modalities. A video (B, 3, T, H, W) is cut into tubelets of
(tubelet, patch, patch), each projected to a token by the official Conv3d's weights (applied as
one GEMM). An image (B, 3, H, W) is first repeated to `tubelet` frames, so it becomes a single
temporal slot of (H/patch)·(W/patch) tokens and uses the t=0 rows of the same position table.
Parameter names follow the official checkpoints so that `models/official.py` can load and write
them without renaming.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from s4d_dist.tubelets import as_clip, num_tokens


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sinusoid position table of the official code, shape (1, num_positions, dim).

    Computed in float64 like the official NumPy code, then cast, so values match bit for bit.
    """
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    exponent = 2 * (np.arange(dim) // 2) / dim
    angles = position / np.power(10000, exponent)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.from_numpy(angles).float().unsqueeze(0)


def tubelets(pixels: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, H, W) images (repeated to one tubelet) or (B, C, T, H, W) clips → (B, N, C·tubelet·
    patch²): tokens in (t, h, w) raster order, each token's pixels in the order of a Conv3d
    weight's input dimensions (c, t, y, x). One copy."""
    x = as_clip(pixels, tubelet)
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, C * tubelet * patch * patch)


class PatchEmbed(nn.Module):
    """Tubelet tokenizer: the official Conv3d (kernel = stride = (tubelet, patch, patch)) as what
    it is, a Linear over each tubelet's pixels.

    The parameters stay a Conv3d's (`proj.weight` (dim, C, tubelet, patch, patch), `proj.bias`),
    so checkpoints and their initialisation are the official ones; the forward flattens the
    tubelets (`tubelets`) and runs one GEMM with the weight viewed as (dim, C·tubelet·patch²),
    the same sums as the convolution (cuDNN has slow bf16 paths for a kernel equal to its
    stride). `project` takes tubelets already cut, so the MAE embeds only the visible ones.
    """

    def __init__(self, img_size: int, patch: int, tubelet: int, num_frames: int,
                 in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch or num_frames % tubelet:
            raise ValueError(f"img_size {img_size} must divide by patch {patch} and "
                             f"num_frames {num_frames} by tubelet {tubelet}")
        self.tubelet, self.patch = tubelet, patch
        self.tokens_per_frame = num_tokens(img_size, patch, tubelet, num_frames, "image")
        self.num_tokens = num_tokens(img_size, patch, tubelet, num_frames, "video")
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch),
                              stride=(tubelet, patch, patch))

    def project(self, tubelet_pixels: torch.Tensor) -> torch.Tensor:
        """(..., C·tubelet·patch²) tubelets (`tubelets`' layout) → (..., dim) tokens."""
        return F.linear(tubelet_pixels, self.proj.weight.flatten(1), self.proj.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) image or (B,3,T,H,W) clip → (B, N, dim) tokens in (t, h, w) raster order."""
        return self.project(tubelets(pixels, self.tubelet, self.patch))


class Attention(nn.Module):
    """Multi-head self-attention with learnable q and v biases and a fixed zero k bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must divide by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self._k_bias: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, self._zero_k_bias(), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1)
        # q, k, v as (B, heads, N, d) views of qkv: their gradients stack back into qkv's
        # layout without a copy.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def _zero_k_bias(self) -> torch.Tensor:
        """The fixed zero k bias in the q/v biases' dtype and device, made once (a plain
        attribute: neither a parameter nor in the state dict)."""
        key = (self.v_bias.device, self.v_bias.dtype)
        zeros = self._k_bias.get(key)
        if zeros is None:
            zeros = self._k_bias[key] = torch.zeros_like(self.v_bias, requires_grad=False)
        return zeros


class Mlp(nn.Module):
    """Two-layer GELU MLP; also the shape of one MoAE bottleneck expert."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1 x); x += mlp(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Patch embedding + fixed sinusoid positions + transformer blocks (+ optional final norm).

    The position table is a non-persistent buffer: it follows `.to(device)` (the official plain
    attribute did not, §3.1) yet stays out of the state dict, as in the official files.
    Subclasses may replace entries of `self.blocks` (the fine-tuning model swaps in MoAE blocks).
    """

    def __init__(self, img_size: int, patch: int, tubelet: int, num_frames: int, in_chans: int,
                 dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 final_norm: bool) -> None:
        super().__init__()
        self.dim = dim
        self.patch_embed = PatchEmbed(img_size, patch, tubelet, num_frames, in_chans, dim)
        self.register_buffer("pos_embed", sinusoid_table(self.patch_embed.num_tokens, dim),
                             persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else None
        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)

    def num_tokens(self, modality: str) -> int:
        """Tokens per sample: one temporal slot for an image, all of them for a video."""
        pe = self.patch_embed
        return pe.tokens_per_frame if modality == "image" else pe.num_tokens

    def embed(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens plus positions; images take the t=0 slice of the table (§1.2). With `keep`
        (B, n) token ids, only those tokens (B, n, dim), each embedded from its own tubelet."""
        pe = self.patch_embed
        x = tubelets(pixels, pe.tubelet, pe.patch)
        pos = self.pos_embed[:, : x.shape[1]]
        if keep is not None:
            if keep.shape[0] != x.shape[0] or keep.ndim != 2:
                raise ValueError(f"keep {tuple(keep.shape)} must be (batch, tokens) for input "
                                 f"{tuple(pixels.shape)}")
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            pos = pos[0, keep]
        x = pe.project(x)
        return x + pos.to(x.dtype)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x) if self.norm is not None else x


def _init_linear_and_norm(module: nn.Module, init_weight) -> None:
    if isinstance(module, nn.Linear):
        init_weight(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif hasattr(module, "init_expert_weights"):  # MoAE: Linear weights held stacked
        module.init_expert_weights(init_weight)


def init_linear_xavier(module: nn.Module) -> None:
    """Pre-training init (§1.1): Linear xavier-uniform / zero bias, LayerNorm (1, 0)."""
    _init_linear_and_norm(module, nn.init.xavier_uniform_)


def init_linear_trunc_normal(module: nn.Module) -> None:
    """Fine-tuning init (§2.1, §3.5): Linear trunc-normal std .02 / zero bias, LN (1, 0)."""
    _init_linear_and_norm(module, lambda weight: nn.init.trunc_normal_(weight, std=0.02))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

