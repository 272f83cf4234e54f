"""Dual-modal masked autoencoder: one encoder and one decoder for images and clips
(docs/method.md §1.3-1.5).

The encoder sees only the visible tokens (only their tubelets are embedded). Their features are
projected to the decoder width and put back at their original raster positions, the masked
positions filled with a learned token, so the decoder predicts every token (100 for an image,
800 for a clip at ViT-B sizes). The loss keeps the masked ones only.
"""
from __future__ import annotations

import torch
from torch import nn

from s4d_dist.models.vit import Block, ViTEncoder, init_linear_xavier, sinusoid_table
from s4d_dist.pixels import unnormalize
from s4d_dist.tubelets import as_clip


class MAEDecoder(nn.Module):
    """Transformer over all tokens, then a linear head to tubelet pixels (tubelet·patch²·3)."""

    def __init__(self, num_tokens: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed[:, : x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class PretrainMAE(nn.Module):
    """`forward(pixels, mask)` → predictions (B, N, tubelet·patch²·3) for every token.

    `mask` is (B, N) bool with True = masked and the same visible count in every row.
    Children are registered in the official order (encoder, decoder, encoder_to_decoder) so
    state-dict keys line up with `vit_base_voxceleb2+affectnet_100.pt` (§6.2).
    """

    def __init__(self, img_size: int = 160, patch: int = 16, tubelet: int = 2,
                 num_frames: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, decoder_dim: int = 384,
                 decoder_depth: int = 4, decoder_heads: int = 6) -> None:
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.encoder = ViTEncoder(img_size, patch, tubelet, num_frames, in_chans, embed_dim,
                                  depth, num_heads, mlp_ratio, final_norm=True)
        out_dim = in_chans * tubelet * patch * patch
        self.decoder = MAEDecoder(self.encoder.patch_embed.num_tokens, decoder_dim,
                                  decoder_depth, decoder_heads, mlp_ratio, out_dim)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Only Linear and LayerNorm layers inside encoder and decoder are re-initialised; the
        # Conv3d and encoder_to_decoder keep PyTorch's default, as in the official code (§1.1).
        self.encoder.apply(init_linear_xavier)
        self.decoder.apply(init_linear_xavier)
        # Cut at ±1σ, not torch's default ±2 (i.e. ±100σ at std .02): the official pre-training
        # model wraps timm's trunc_normal_ with a = -std, b = std (§1.1).
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor,
                num_visible: int | None = None) -> torch.Tensor:
        """`num_visible`: the visible tokens per row, which a caller drawing masks knows on the
        host (masking.num_masked of the ratio). Given, nothing is read back from the device
        (a host sync each step on a GPU): the rows are checked by an asynchronous device-side
        assert instead. Omitted, it is read from the mask and checked on the host."""
        slots = pixels.shape[2] // self.tubelet if pixels.ndim == 5 else 1
        B, N = len(pixels), slots * (pixels.shape[-2] // self.patch) * (pixels.shape[-1] // self.patch)
        if mask.shape != (B, N):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the {N} tokens of "
                             f"input {tuple(pixels.shape)}")
        visible_counts = (~mask).sum(1)
        if num_visible is None:
            if not bool((visible_counts == visible_counts[0]).all()):
                raise ValueError("every row of the mask must leave the same number of visible "
                                 "tokens")
            num_visible = int(visible_counts[0])
        else:
            torch._assert_async((visible_counts == num_visible).all(),
                                f"every row of the mask must leave num_visible={num_visible} "
                                "visible tokens")
        # Visible token ids in raster order: a stable sort puts False (visible) first. Only
        # their tubelets are embedded.
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
        keep = order[:, :num_visible]
        visible = self.encoder.embed(pixels, keep)
        latent = self.encoder_to_decoder(self.encoder.run_blocks(visible))
        Dd = latent.shape[-1]
        tokens = self.mask_token.to(latent.dtype).expand(B, N, Dd)
        tokens = tokens.scatter(1, keep.unsqueeze(-1).expand(-1, -1, Dd), latent)
        return self.decoder(tokens)


def patchify(pixels: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, H, W) images (repeated to one tubelet) or (B, C, T, H, W) clips → (B, N,
    tubelet·patch², C) blocks: tokens in (t, h, w) raster order, pixels (t, y, x) within a block."""
    x = as_clip(pixels, tubelet)
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, tubelet * patch * patch, C)


def mae_targets(pixels: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """Per-token, per-channel normalised pixel targets (§1.5), shape (B, N, tubelet·patch²·C).

    Pixels are un-normalised to [0, 1] (images repeated to one tubelet, like the encoder input),
    cut into (tubelet, patch, patch) blocks, normalised per token and channel over the block's
    pixels with the unbiased variance, and flattened with the channel fastest:
    index = ((t·patch + y)·patch + x)·C + c.
    """
    x = patchify(unnormalize(pixels.float()), tubelet, patch)
    mean = x.mean(dim=2, keepdim=True)
    var = x.var(dim=2, keepdim=True)  # unbiased, as torch.var's default in the official loss
    return ((x - mean) / (var + 1e-6).sqrt()).flatten(2)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the per-token mean squared error, computed in fp32."""
    per_token = (pred.float() - target).pow(2).mean(dim=-1)
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum()


def reconstruct_pixels(pred: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor,
                       tubelet: int, patch: int) -> torch.Tensor:
    """[0, 1] clips (B, 3, T, H, W) showing the input's visible tokens and the model's masked ones.

    Predictions live in per-token normalised space; each is mapped back with the mean and
    standard deviation of the true token (what the loss normalised away), which is the usual way
    MAE reconstructions are displayed. Images come back as 2-frame clips.
    """
    x = as_clip(unnormalize(pixels.float()), tubelet)
    B, C, T, H, W = x.shape
    grid = (T // tubelet, H // patch, W // patch)
    blocks = patchify(x, tubelet, patch)
    mean, std = blocks.mean(2, keepdim=True), (blocks.var(2, keepdim=True) + 1e-6).sqrt()
    guess = pred.float().reshape(blocks.shape) * std + mean
    blocks = torch.where(mask[:, :, None, None], guess, blocks).clamp(0, 1)
    blocks = blocks.reshape(B, *grid, tubelet, patch, patch, C)
    return blocks.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, T, H, W)


def pixel_mask(mask: torch.Tensor, shape: torch.Size, tubelet: int, patch: int) -> torch.Tensor:
    """The (B, N) token mask as a (B, 1, T, H, W) pixel mask for clips of `shape`."""
    B, _, T, H, W = shape
    grid = mask.view(B, 1, T // tubelet, H // patch, W // patch)
    return grid.repeat_interleave(tubelet, 2).repeat_interleave(patch, 3).repeat_interleave(patch, 4)
