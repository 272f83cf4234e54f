"""The S4D fine-tuning model: shared ViT with MoAE blocks, mean pooling, one head per modality.

Static (image) and dynamic (video) expression recognition share every encoder weight; the
MoAE adapters in the upper blocks (6-11 for ViT-B) let the two tasks route tokens to different
experts instead of fighting over the same FFN (docs/method.md §2.1-2.6). Images and clips differ
only in their token count and in which head reads the pooled feature.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from s4d_dist.models.moae import MoAE, MoAEBlock
from s4d_dist.models.vit import ViTEncoder, init_linear_trunc_normal

Modality = Literal["image", "video"]


class S4DClassifier(ViTEncoder):
    """`forward(pixels, modality)` → logits of that modality's head.

    State-dict keys match the official `vitmoe_base_patch16_160` (§6.1): `patch_embed.*`,
    `blocks.i.*` (with `moe_layer.*` in MoAE blocks), `fc_norm.*`, `head.image.*`, `head.video.*`.
    `moae_official` are MoAE's switches for official bugs (`router_noise_at_eval`,
    `aux_loss_on_logits`, `stale_aux_loss`; §3.2-3.4), all off by default.
    """

    def __init__(self, img_size: int = 160, patch: int = 16, tubelet: int = 2,
                 num_frames: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_image_classes: int = 7,
                 num_video_classes: int = 7, moae_layers: tuple[int, ...] = (6, 7, 8, 9, 10, 11),
                 num_experts: int = 8, top_k: int = 2, hidden_ratio: float = 0.25,
                 capacity_factor: float = 1.0, moae_backend: str = "auto",
                 capacity_group: int = 0, **moae_official: bool) -> None:
        super().__init__(img_size, patch, tubelet, num_frames, in_chans, embed_dim, depth,
                         num_heads, mlp_ratio, final_norm=False)
        for i in moae_layers:
            self.blocks[i] = MoAEBlock(embed_dim, num_heads, mlp_ratio, num_experts, top_k,
                                       int(embed_dim * hidden_ratio), capacity_factor,
                                       moae_backend, **moae_official)
        # MoAE capacity groups, in samples per modality (0: the whole forward): the official
        # per-GPU batches, `capacity_group` clips and twice as many images (§2.4, §2.10).
        self.capacity_groups = {"video": capacity_group, "image": 2 * capacity_group}
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.ModuleDict({"image": nn.Linear(embed_dim, num_image_classes),
                                   "video": nn.Linear(embed_dim, num_video_classes)})
        # One init for every Linear (experts and routers included), as the official model-level
        # init overwrites the MoE's own Kaiming init (§3.5); the Conv3d keeps PyTorch's default.
        self.apply(init_linear_trunc_normal)

    def forward(self, pixels: torch.Tensor, modality: Modality | None = None, with_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the modality's head; with `with_aux`, (logits, the MoAE load-balancing loss
        of this forward or None), so the training loss needs nothing but the forward's result."""
        expected = "image" if pixels.ndim == 4 else "video" if pixels.ndim == 5 else None
        if expected is None or modality not in (None, expected):
            raise ValueError(f"pixels of shape {tuple(pixels.shape)} cannot be modality "
                             f"'{modality}': images are (B,C,H,W), videos (B,C,T,H,W)")
        for layer in self.moae_layers().values():
            layer.capacity_group = self.capacity_groups[expected]
        x = self.run_blocks(self.embed(pixels))
        logits = self.head[expected](self.fc_norm(x.mean(dim=1)))
        return (logits, self.aux_loss()) if with_aux else logits

    def moae_layers(self) -> dict[int, MoAE]:
        return {i: b.moe_layer for i, b in enumerate(self.blocks) if isinstance(b, MoAEBlock)}

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the load-balancing losses of the last forward (None when none was computed)."""
        losses = [m.aux_loss for m in self.moae_layers().values() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None
