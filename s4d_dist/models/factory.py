"""Models from the config tree: the only place that maps config keys to constructor arguments."""
from __future__ import annotations

from omegaconf import DictConfig

from s4d_dist.models.classifier import S4DClassifier
from s4d_dist.models.mae import PretrainMAE


def _encoder_args(m: DictConfig) -> dict:
    return dict(img_size=m.img_size, patch=m.patch, tubelet=m.tubelet, num_frames=m.num_frames,
                in_chans=m.in_chans, embed_dim=m.embed_dim, depth=m.depth,
                num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)


def build_mae(cfg: DictConfig) -> PretrainMAE:
    m = cfg.model
    return PretrainMAE(**_encoder_args(m), decoder_dim=m.decoder_dim,
                       decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads)


def build_classifier(cfg: DictConfig) -> S4DClassifier:
    m, moae = cfg.model, cfg.model.moae
    return S4DClassifier(**_encoder_args(m), num_image_classes=m.num_image_classes,
                         num_video_classes=m.num_video_classes,
                         moae_layers=tuple(moae.layers) if moae.enabled else (),
                         num_experts=moae.num_experts, top_k=moae.top_k,
                         hidden_ratio=moae.hidden_ratio, **moae_options(cfg))


def moae_options(cfg: DictConfig) -> dict:
    """How the MoAE layers route, whatever checkpoint the classifier is built for: capacity,
    backend, capacity groups and the switches for official bugs (§3.2-3.4)."""
    moae, o = cfg.model.moae, cfg.official
    return dict(capacity_factor=moae.capacity_factor, moae_backend=moae.backend,
                capacity_group=moae.capacity_group, router_noise_at_eval=o.router_noise_at_eval,
                aux_loss_on_logits=o.aux_loss_on_logits, stale_aux_loss=o.stale_aux_loss)
