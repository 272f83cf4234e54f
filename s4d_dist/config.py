"""One typed config tree for every part of s4d_dist, loaded from a preset plus overrides.

The schema is a set of dataclasses (OmegaConf structured configs), so a typo in a preset or on
the command line is an error that names the key and suggests the closest valid one, instead of
a silently ignored setting; a field with a fixed set of values is a `Literal`, so a value
outside it is an error that names the key and the values allowed. Presets are YAML files in
`s4d_dist/presets/`; a preset may start from another with `inherit: <name>`. Section numbers
(§n.m) in this file refer to docs/method.md.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from s4d_dist import atomic

PRESET_DIR = Path(__file__).parent / "presets"

Task = Literal["pretrain", "finetune"]
MoAEBackend = Literal["auto", "loop", "torch", "triton"]  # auto: triton on CUDA, else torch
DataBackend = Literal["auto", "dali", "torch"]
DaliDevice = Literal["auto", "cpu", "mixed"]  # mixed: DALI decodes on the GPU (nvJPEG / NVDEC)
Precision = Literal["bf16", "fp16", "fp32"]
Resume = Literal["auto", "never"]  # auto: continue this run folder after a crash
SweepMode = Literal["max", "min"]
SweepScheduler = Literal["asha", "fifo"]  # asha: early stopping; fifo: every trial to the end
Recipe = Literal["default", "official"]  # official: the profile OFFICIAL_RECIPE sets
EvalOrder = Literal["sample", "view"]  # rows of an evaluation forward: views of few clips, or one view of many


@dataclass
class MoAEConfig:
    """Mixture of Adapter Experts in the fine-tuning encoder (§2.2-2.5)."""

    enabled: bool = True
    layers: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    num_experts: int = 8
    top_k: int = 2
    hidden_ratio: float = 0.25  # adapter width = int(embed_dim · hidden_ratio) = 192 for ViT-B
    capacity_factor: float = 1.0
    # Capacity is counted per group of this many clips (images: twice as many), the official
    # per-GPU batches, so a larger micro-batch drops what its official-size parts would (§2.4);
    # 0 counts it over the whole forward.
    capacity_group: int = 16
    aux_loss_coeff: float = 1e-3
    backend: MoAEBackend = "auto"


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
    fold: int | None = None  # k-fold datasets: which fold's parts form train and test
    image_batch_size: int = 192  # per rank
    video_batch_size: int = 192  # per rank, clips (after repeated augmentation)
    video_repeats: int = 4  # pre-training repeated augmentation (§1.6)
    sampling_rate: int = 4  # frame stride; 1 for FERV39K
    image_rate: float = 1.0  # fraction of the image loader consumed per epoch
    video_rate: float = 0.25  # fraction of the video loader consumed per epoch
    balance_images: bool = False  # class-balanced image sampling (fine-tuning AffectNet)
    val_fraction: float = 0.1  # held-out split carved from train to choose the best epoch
    backend: DataBackend = "auto"  # auto: DALI when it imports, else torch
    workers: int = 2
    eval_batch_size: int = 16  # (sample, view) rows per forward: MoAE capacity follows it (§2.11)
    # sample: every view of a sample in neighbouring rows; view: the official test order, one
    # view of `eval_batch_size` different samples a forward (§2.11, §3.7)
    eval_order: EvalOrder = "sample"
    test_temporal_views: int = 2
    test_spatial_crops: int = 2
    resize_ratio: float = 1.2  # side before random crops / crop side: 192 for 160 (§1.8 ShortSideScale, §2.10 Resize)
    eval_short_side: int = 0  # test frames' short side before the spatial crops; 0 = model.img_size (official scale)
    dali_device: DaliDevice = "auto"  # auto: mixed on a GPU machine, else cpu
    prefetch: int = 2  # batches decoded ahead (DALI queue depth; DataLoader prefetch_factor)
    skip_truncated: bool = False  # shards shorter than their index: stop (false) or train on the readable samples
    # Pre-training clips: fixed [y0, x0, y1, x1] cut from every frame before augmentation; the
    # official loader uses [0, 32, 160, 192] on VoxCeleb2's 224×224 frames (§1.8). Empty: none.
    video_source_crop: list[int] = field(default_factory=list)
    # [height, width] of the frames the crop is cut from, required with it: a clip of any other
    # size stops the run instead of being cut somewhere the crop was not meant for.
    video_source_frame: list[int] = field(default_factory=list)


@dataclass
class AugmentConfig:
    """Fine-tuning regularisation (§2.8)."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    # RandAugment, the official timm strings (§2.10; parsed by s4d_dist/data/randaug.py):
    video_rand_augment: str = "rand-m7-n4-mstd0.5-inc1"
    image_rand_augment: str = "rand-m9-n2-mstd0.5-inc1"
    erase_prob: float = 0.25  # RandomErasing probability, images and videos
    # RandomResizedCrop area ranges: pre-training images (§1.8), clips in both stages (§1.8, §2.10)
    image_crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    video_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])


@dataclass
class OptimConfig:
    """AdamW and the per-iteration schedule.

    lr = base_lr · global_batch / lr_batch_divisor, where the global batch counts every rank on
    every node (the official pre-training ignored nodes, §3.17).
    """

    base_lr: float = 1.6e-3
    lr_batch_divisor: int = 512
    min_lr: float = 0.0
    # Set: min_lr is scaled by global batch / this, like base_lr (official fine-tuning: 256).
    min_lr_batch_divisor: int | None = None
    warmup_epochs: float = 5.0
    warmup_start_lr: float = 1e-6
    epochs: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # 1.0 = off; 0.75 for fine-tuning (§2.9)
    clip_grad: float | None = None
    max_nonfinite_steps: int = 20  # abort after this many NaN/inf losses in a row


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of each epoch
    keep: int = 2  # newest step checkpoints kept (the best one is kept apart)
    # Steps between checks for SIGTERM / SIGUSR1 (preemption: checkpoint, then exit 75); each
    # check all-reduces one int over gloo and waits for no GPU work.
    signal_check_every: int = 1


@dataclass
class DeepSpeedConfig:
    """What the generated DeepSpeed config contains (never edited by hand at run time)."""

    # 0: every rank holds the whole optimizer state and steps it with the flat AdamW of
    # train/flat_adamw.py (no per-group host loops); 1/2: DeepSpeed's ZeRO partitions it, for a
    # model whose 16 bytes of state per parameter do not fit (docs/design.md "The training step").
    zero_stage: int = 0
    precision: Precision = "bf16"  # why bf16, what stays fp32 under fp16: §1.10
    grad_accum: int = 1
    activation_checkpointing: bool = False
    # torch.compile the training step (forward + loss, and the flat AdamW's update); null: on a
    # GPU only. With ZeRO-1/2 the model alone (DeepSpeed's engine.compile).
    compile: bool | None = None
    # With compile on a GPU (ZeRO-0, grad_accum 1): each batch shape's whole step — forward,
    # backward, all-reduce, optimizer — replayed as one CUDA graph.
    cuda_graphs: bool = True
    # ZeRO buckets, in elements. Gradients are reduced bucket by bucket as backward produces
    # them, so a bucket must be a fraction of the model to overlap backward (the ViT-B MAE has
    # ~94M parameters: DeepSpeed's default 5e8 makes one bucket, reduced after backward ends);
    # buckets also size the staging buffers (5e7 bf16 elements: 100 MB; 5e8: 1 GB).
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    overlap_comm: bool = True  # reduce each bucket on a side stream while backward goes on (ZeRO-2)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = 10
    image_every: int = 200  # steps between figures: MAE reconstructions, expert load
    # The GPU's dense bf16 peak for MFU; null: looked up from the device name (train/flops.py).
    peak_tflops: float | None = None


@dataclass
class RayConfig:
    """How s4d_dist.orchestrate runs the loops on a Ray cluster (launch/sweep.py).

    Every run is a Ray Train TorchTrainer of `num_workers` ranks; its run folder under
    `output_dir` is also Ray's storage, so on several nodes `output_dir` must be shared storage.
    """

    address: str = ""  # empty: RAY_ADDRESS, else start a local cluster
    num_workers: int = 1  # ranks per run (per trial in a sweep)
    cpus_per_worker: int = 1
    # null: one GPU per worker where the cluster has GPUs, none where it has not (decided on
    # joining it, orchestrate/cluster.py); 0 trains on CPUs on purpose
    gpus_per_worker: float | None = None
    max_failures: int = 3  # restarts after a worker or node dies; each resumes from the last checkpoint
    check_resources: bool = True  # refuse up front what the cluster cannot hold; false on autoscaling clusters
    local_cpus: int = 0  # CPUs of a cluster started here; 0 = all of this machine's
    dashboard_host: str = "127.0.0.1"  # of a cluster started here; 0.0.0.0 exposes it (and job submission)
    dashboard_port: int = 8265


@dataclass
class SweepConfig:
    """Ray Tune sweeps (launch/sweep.py --mode sweep) and k-fold fan-out (--mode kfold).

    `space` maps config keys, dotted or nested, to one distribution each: {loguniform: [lo, hi]},
    {uniform: [lo, hi]}, {quniform: [lo, hi, q]}, {randint: [lo, hi]} (hi excluded),
    {choice: [...]} or {grid: [...]} (every value, times num_samples).
    """

    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1  # trials drawn from the space (grid: repeats of the grid)
    metric: str = "val_war"  # reported per epoch by the fine-tuning loop
    mode: SweepMode = "max"
    scheduler: SweepScheduler = "asha"
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent_trials: int = 0  # 0: as many as the cluster holds at once
    folds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])  # --mode kfold


@dataclass
class OfficialConfig:
    """The official code's bugs (docs/method.md §3), one switch each: false (the default) does
    the right thing, true does what the official code does. Each reads in one stage only."""

    aux_loss_not_applied: bool = False  # §3.1 fine-tuning: the MoAE load-balancing loss is not added
    aux_loss_on_logits: bool = False  # §3.2 its P is the mean raw noisy logit, not a probability
    router_noise_at_eval: bool = False  # §3.3 router noise in evaluation too
    stale_aux_loss: bool = False  # §3.4 refreshed only when the input requires grad, else kept
    select_on_test: bool = False  # §3.8 no validation split: the best epoch is chosen on test
    squash_test_frames: bool = False  # §3.9 test frames squashed to S×S: the spatial crops coincide
    squash_train_frames: bool = False  # §3.11 fine-tuning frames squashed to S×S before augmentation
    pretrain_decay_qv_bias: bool = False  # §3.17 weight decay on q_bias, v_bias and mask_token
    pretrain_global_cosine: bool = False  # §3.24 the cosine evaluated at the global progress


# `recipe=official`: every official behaviour, the official precision (fp16, with the official
# GradScaler's dynamic loss scaling: train/ds_config.py) and the official evaluation batches
# (the training clip batch a forward, one view of many clips: §2.11). Applied where `recipe` is
# set, so later layers and overrides still change any of it.
OFFICIAL_RECIPE: dict[str, Any] = {
    "official": {name: True for name in OfficialConfig.__dataclass_fields__},
    "deepspeed": {"precision": "fp16"},
    "data": {"eval_batch_size": "${data.video_batch_size}", "eval_order": "view"},
}
RECIPES: dict[str, dict[str, Any]] = {"default": {}, "official": OFFICIAL_RECIPE}


@dataclass
class S4DConfig:
    """The whole run. `task` picks the loop; `official` reproduces §3 bugs one by one, and
    `recipe=official` sets all of them with the official precision and evaluation batches."""

    task: Task = "pretrain"
    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    recipe: Recipe = "default"
    official: OfficialConfig = field(default_factory=OfficialConfig)
    init_checkpoint: str = ""  # fine-tuning: MAE checkpoint (ours or official)
    resume: Resume = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


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


def describe_presets() -> str:
    """One line per preset, its name and the first line of its leading comment (for --help)."""
    lines = []
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = (path.read_text().splitlines() or [""])[0]
        about = first.lstrip("# ").rstrip(",") if first.startswith("#") else ""
        lines.append(f"  {path.stem:<18} {about}".rstrip())
    return "\n".join(lines)


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
    return from_values(*_read_preset(preset), *[(f"override '{o}'", o) for o in overrides or []])


RETIRED_QUIRKS = "official_quirks"  # the one switch that `official.*` and `recipe` replaced


def _expand(source: str, values: dict | str) -> list[tuple[str, dict | str]]:
    """The layers one layer stands for: a `recipe` brings its profile first (so what follows,
    this layer included, can still change any of it); a config saved with the retired
    `official_quirks` gets its meaning, every `official.*` switch, and an override naming it is
    refused with what replaced it."""
    if isinstance(values, str):
        key, _, value = values.partition("=")
        if key.strip() == RETIRED_QUIRKS:
            raise ConfigError(
                f"{source}: '{RETIRED_QUIRKS}' is replaced by one switch per official behaviour: "
                "recipe=official sets them all, with fp16 and the official evaluation batches; "
                "official.<name>=true sets one (docs/method.md §3, --print-config lists them)")
        recipe = value.strip() if key.strip() == "recipe" else None
    else:
        if RETIRED_QUIRKS in values:
            values = dict(values)
            if values.pop(RETIRED_QUIRKS) in (True, "true", "True"):
                values["official"] = {**OFFICIAL_RECIPE["official"], **(values.get("official") or {})}
        recipe = values.get("recipe")
    profile = RECIPES.get(recipe) if isinstance(recipe, str) else None
    return ([(f"{source} (recipe={recipe})", profile)] if profile else []) + [(source, values)]


def recipe_settings(cfg: DictConfig) -> list[str]:
    """`key=value` for every key the config's recipe sets, with the values the config has."""
    def dotted(node: dict, prefix: str = "") -> list[str]:
        return [item for key, value in node.items()
                for item in (dotted(value, f"{prefix}{key}.") if isinstance(value, dict)
                             else [f"{prefix}{key}"])]

    return [f"{key}={OmegaConf.select(cfg, key)}" for key in dotted(RECIPES[cfg.recipe])]


def from_values(*layers: tuple[str, dict | str]) -> DictConfig:
    """The validated, read-only config made of (source, mapping or `key=value`) layers in order.

    Besides presets and overrides (`load`), the layers are what crosses a process boundary: the
    resolved config a Ray worker receives, then a sweep trial's sampled values; each error
    names the layer it came from.
    """
    schema = OmegaConf.structured(S4DConfig)
    cfg = schema.copy()
    for source, values in (part for layer in layers for part in _expand(*layer)):
        if isinstance(values, str) and values.endswith("="):  # `data.image_shards=` clears a path
            values += "''"
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
    _require(moae.capacity_factor > 0, "model.moae.capacity_factor must be > 0")
    _require(moae.capacity_group >= 0, "model.moae.capacity_group must be >= 0 (0: whole forward)")
    for name in ("image_ratio", "video_ratio"):
        ratio = cfg.mask[name]
        _require(0.0 <= ratio < 1.0, f"mask.{name} must be in [0, 1), got {ratio}")
    _require(cfg.deepspeed.zero_stage in (0, 1, 2),
             f"deepspeed.zero_stage {cfg.deepspeed.zero_stage} is not supported: use 0, 1 or 2 "
             "(ZeRO-3 partitions parameters, which the MoAE experts' stacked GEMMs do not support)")
    _require(cfg.deepspeed.reduce_bucket_size > 0 and cfg.deepspeed.allgather_bucket_size > 0,
             "deepspeed.reduce_bucket_size and deepspeed.allgather_bucket_size must be > 0 "
             "(elements)")
    _require(len(cfg.optim.betas) == 2, "optim.betas must hold two numbers")
    _require(cfg.checkpoint.signal_check_every >= 1,
             f"checkpoint.signal_check_every must be >= 1 (steps between the ranks' checks for a "
             f"preemption signal), got {cfg.checkpoint.signal_check_every}")
    _require(cfg.optim.min_lr_batch_divisor is None or cfg.optim.min_lr_batch_divisor > 0,
             f"optim.min_lr_batch_divisor must be > 0 (or null), got {cfg.optim.min_lr_batch_divisor}")
    _require(not cfg.data.video_source_crop or len(cfg.data.video_source_frame) == 2,
             "data.video_source_crop needs data.video_source_frame, the [height, width] of the "
             "frames it is cut from (VoxCeleb2: [224, 224])")
    ray = cfg.ray
    _require(ray.num_workers >= 1, f"ray.num_workers must be >= 1, got {ray.num_workers}")
    _require(ray.cpus_per_worker >= 1 and (ray.gpus_per_worker is None or ray.gpus_per_worker >= 0),
             "ray.cpus_per_worker must be >= 1 and ray.gpus_per_worker >= 0 (or null)")
    _require(ray.max_failures >= -1, "ray.max_failures must be >= 0 (or -1: restart forever)")
    sweep = cfg.sweep
    _require(sweep.num_samples >= 1 and sweep.grace_period >= 1 and sweep.reduction_factor > 1,
             "sweep.num_samples and sweep.grace_period must be >= 1, sweep.reduction_factor > 1")


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as runs save it and `--print-config` shows it; a recipe's
    settings are listed in a comment on top."""
    settings = recipe_settings(cfg) if cfg.get("recipe", "default") != "default" else []
    header = "".join(f"# recipe={cfg.recipe} sets {item}\n" for item in settings)
    return header + OmegaConf.to_yaml(cfg, resolve=True)


def save(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (whole or not at all); every run keeps one beside its outputs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, to_yaml(cfg))
