"""One typed config tree for every part of s4d_dist, loaded from a preset plus overrides.

The schema is a set of dataclasses (OmegaConf structured configs), so a typo in a preset or on
the command line is an error that names the key and suggests the closest valid one, instead of
a silently ignored setting. Presets are YAML files in `s4d_dist/presets/`; a preset may start
from another with `inherit: <name>`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class MoAEConfig:
    """Mixture of Adapter Experts in the fine-tuning encoder (reference §2.2-2.5)."""

    enabled: bool = True
    layers: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    num_experts: int = 8
    top_k: int = 2
    hidden_ratio: float = 0.25  # adapter width = int(embed_dim · hidden_ratio) = 192 for ViT-B
    capacity_factor: float = 1.0
    aux_loss_coeff: float = 1e-3
    backend: str = "torch"  # loop | torch | triton


@dataclass
class ModelConfig:
    """ViT-B/16 with tubelet 2 at 160 px and 16 frames, as in the official code (§1.1, §2.1)."""

    img_size: int = 160
    num_frames: int = 16
    tubelet: int = 2
    patch: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    num_image_classes: int = 7
    num_video_classes: int = 7
    moae: MoAEConfig = field(default_factory=MoAEConfig)


@dataclass
class MaskConfig:
    """MAE masking ratios (§1.4): images 90 % of 100 tokens, videos 95 % of 800, not tube."""

    image_ratio: float = 0.9
    video_ratio: float = 0.95


@dataclass
class DataConfig:
    """Where shards live and how batches are drawn from them (§1.6, §2.7, §2.10)."""

    image_shards: str = ""  # folder of an image shard split (AffectNet for S4D)
    video_shards: str = ""  # folder of a video shard split (VoxCeleb2 / DFEW / ...)
    val_shards: str = ""
    test_shards: str = ""
    fold: Optional[int] = None  # k-fold datasets: which fold's parts form train and test
    image_batch_size: int = 192  # per rank
    video_batch_size: int = 192  # per rank, clips (after repeated augmentation)
    video_repeats: int = 4  # pre-training repeated augmentation (§1.6)
    sampling_rate: int = 4  # frame stride; 1 for FERV39K
    image_rate: float = 1.0  # fraction of the image loader consumed per epoch
    video_rate: float = 0.25  # fraction of the video loader consumed per epoch
    balance_images: bool = False  # class-balanced image sampling (fine-tuning AffectNet)
    val_fraction: float = 0.1  # held-out split carved from train to choose the best epoch
    backend: str = "auto"  # auto | dali | torch
    workers: int = 2
    eval_batch_size: int = 24
    test_temporal_views: int = 2
    test_spatial_crops: int = 2


@dataclass
class AugmentConfig:
    """Fine-tuning regularisation (§2.8)."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class OptimConfig:
    """AdamW and the per-iteration schedule.

    lr = base_lr · global_batch / lr_batch_divisor, where the global batch counts every rank on
    every node (the official pre-training ignored nodes, §3.17).
    """

    base_lr: float = 1.6e-3
    lr_batch_divisor: int = 512
    min_lr: float = 0.0
    warmup_epochs: float = 5.0
    warmup_start_lr: float = 1e-6
    epochs: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # 1.0 = off; 0.75 for fine-tuning (§2.9)
    clip_grad: Optional[float] = None


@dataclass
class DeepSpeedConfig:
    """What the generated DeepSpeed config contains (never edited by hand at run time)."""

    zero_stage: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32
    grad_accum: int = 1
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = 10
    image_every: int = 200


@dataclass
class RayConfig:
    address: str = ""  # empty: start or join a local cluster
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0


@dataclass
class S4DConfig:
    """The whole run. `task` picks the loop; `official_quirks` reproduces reference §3 bugs."""

    task: str = "pretrain"  # pretrain | finetune
    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    official_quirks: bool = False
    init_checkpoint: str = ""  # fine-tuning: MAE checkpoint (ours or official)
    resume: str = "auto"  # auto | never | <checkpoint dir>
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


class ConfigError(ValueError):
    """A config problem, with the offending key (and source) in the message."""


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key path in a config node, for 'did you mean' suggestions."""
    keys = []
    for name in node:
        path = f"{prefix}{name}"
        keys.append(path)
        child = node[name]
        if isinstance(child, DictConfig):
            keys += _valid_keys(child, path + ".")
    return keys


def _explain(error: Exception, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or ""
    message = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return ConfigError(f"{source}: invalid value for '{key}': {message}")


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name}'; presets: {', '.join(known)}")
    return path


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The chain of (source, values) from the root preset down to `name`."""
    path = _preset_path(name)
    if str(path) in seen:
        raise ConfigError(f"{path}: 'inherit' loops back to itself")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of keys to values")
    parent = values.pop("inherit", None)
    chain = _read_preset(parent, seen + (str(path),)) if parent else []
    return chain + [(str(path), values)]


def load(preset: str, overrides: list[str] | None = None) -> DictConfig:
    """The resolved, validated config for a preset name or YAML path plus `key=value` overrides."""
    schema = OmegaConf.structured(S4DConfig)
    cfg = schema.copy()
    layers = _read_preset(preset) + [(f"override '{o}'", o) for o in overrides or []]
    for source, values in layers:
        try:
            update = OmegaConf.from_dotlist([values]) if isinstance(values, str) else \
                OmegaConf.create(values)
            cfg = OmegaConf.merge(cfg, update)
        except (ConfigKeyError, ValidationError) as error:
            raise _explain(error, schema, source) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that types alone cannot express; each message names the keys."""
    m = cfg.model
    _require(cfg.task in ("pretrain", "finetune"), f"task must be pretrain or finetune, got '{cfg.task}'")
    _require(m.img_size % m.patch == 0, f"model.img_size {m.img_size} must divide by model.patch {m.patch}")
    _require(m.num_frames % m.tubelet == 0,
             f"model.num_frames {m.num_frames} must divide by model.tubelet {m.tubelet}")
    _require(m.embed_dim % m.num_heads == 0,
             f"model.embed_dim {m.embed_dim} must divide by model.num_heads {m.num_heads}")
    _require(m.decoder_dim % m.decoder_heads == 0,
             f"model.decoder_dim {m.decoder_dim} must divide by model.decoder_heads {m.decoder_heads}")
    moae = m.moae
    _require(1 <= moae.top_k <= moae.num_experts,
             f"model.moae.top_k {moae.top_k} must be in 1..model.moae.num_experts ({moae.num_experts})")
    _require(all(0 <= i < m.depth for i in moae.layers),
             f"model.moae.layers {list(moae.layers)} must index blocks 0..{m.depth - 1}")
    _require(moae.backend in ("loop", "torch", "triton"),
             f"model.moae.backend must be loop, torch or triton, got '{moae.backend}'")
    _require(moae.capacity_factor > 0, "model.moae.capacity_factor must be > 0")
    for name in ("image_ratio", "video_ratio"):
        ratio = cfg.mask[name]
        _require(0.0 <= ratio < 1.0, f"mask.{name} must be in [0, 1), got {ratio}")
    _require(cfg.deepspeed.zero_stage in (0, 1, 2),
             f"deepspeed.zero_stage {cfg.deepspeed.zero_stage} is not supported: use 0, 1 or 2 "
             "(ZeRO-3 partitions parameters, which the MoAE experts' stacked GEMMs do not support)")
    _require(cfg.deepspeed.precision in ("bf16", "fp16", "fp32"),
             f"deepspeed.precision must be bf16, fp16 or fp32, got '{cfg.deepspeed.precision}'")
    _require(len(cfg.optim.betas) == 2, "optim.betas must hold two numbers")
    _require(cfg.data.backend in ("auto", "dali", "torch"),
             f"data.backend must be auto, dali or torch, got '{cfg.data.backend}'")


def save(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config; every run keeps one beside its outputs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
