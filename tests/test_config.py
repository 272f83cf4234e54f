"""Config loading: presets carry the reference values; mistakes fail with the key named."""
import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from s4d_dist import config
from s4d_dist.config import ConfigError, load


def test_pretrain_preset_has_reference_values():
    cfg = load("pretrain_vit_base")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (768, 12, 12)
    assert (cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads) == (384, 4, 6)
    assert (cfg.model.img_size, cfg.model.num_frames, cfg.model.tubelet, cfg.model.patch) == (160, 16, 2, 16)
    assert (cfg.mask.image_ratio, cfg.mask.video_ratio) == (0.9, 0.95)
    # 1.6e-3 · (2 GPUs · 192) / 512 = 1.2e-3 on the official setup.
    assert cfg.optim.base_lr * 2 * cfg.data.image_batch_size / cfg.optim.lr_batch_divisor == pytest.approx(1.2e-3)
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.warmup_epochs == 5
    assert cfg.data.video_repeats == 4 and cfg.data.video_rate == 0.25


@pytest.mark.parametrize("preset,classes,stride,fold", [
    ("finetune_dfew", 7, 4, 1), ("finetune_ferv39k", 7, 1, None), ("finetune_mafw", 11, 4, 1)])
def test_finetune_presets(preset, classes, stride, fold):
    cfg = load(preset)
    assert cfg.task == "finetune" and cfg.model.num_video_classes == classes
    assert cfg.data.sampling_rate == stride and cfg.data.fold == fold
    assert list(cfg.model.moae.layers) == [6, 7, 8, 9, 10, 11]
    assert (cfg.model.moae.num_experts, cfg.model.moae.top_k) == (8, 2)
    assert cfg.model.moae.aux_loss_coeff == 1e-3
    # 1e-5 · (16 clips · 2 GPUs) / 8 = 4e-5 peak, official rule (docs/method.md §2.9).
    assert cfg.optim.base_lr * 16 * 2 / cfg.optim.lr_batch_divisor == pytest.approx(4e-5)
    assert cfg.optim.layer_decay == 0.75 and list(cfg.optim.betas) == [0.9, 0.999]
    assert (cfg.data.video_batch_size, cfg.data.image_batch_size) == (16, 32)
    assert (cfg.data.image_rate, cfg.data.video_rate) == (0.5, 1.0)


def test_overrides_apply_and_config_is_frozen():
    cfg = load("demo", ["optim.base_lr=3e-4", "model.moae.layers=[1,3]", "official.select_on_test=true"])
    assert cfg.optim.base_lr == 3e-4 and list(cfg.model.moae.layers) == [1, 3]
    assert cfg.official.select_on_test is True and cfg.official.router_noise_at_eval is False
    with pytest.raises(ReadonlyConfigError, match=r"read-only config(.|\n)*full_key: optim.base_lr"):
        cfg.optim.base_lr = 1.0
    assert cfg.optim.base_lr == 3e-4


@pytest.mark.parametrize("override,message", [
    ("model.depht=3", r"unknown config key 'model.depht'; did you mean 'model.depth'\?"),
    ("optim.weight_decy=0.1", r"did you mean 'optim.weight_decay'"),
    ("model.moae.top_k=two", r"invalid value for 'model.moae.top_k'"),
    ("model.moae.top_k=9", r"model.moae.top_k 9 must be in 1..model.moae.num_experts"),
    ("deepspeed.zero_stage=3", r"ZeRO-3"),
    ("deepspeed.reduce_bucket_size=0", r"deepspeed.reduce_bucket_size .* must be > 0"),
    ("model.num_heads=5", r"model.embed_dim 96 must divide by model.num_heads 5"),
    ("data.backend=dalli",
     r"invalid value for 'data.backend': .*expected one of \['auto', 'dali', 'torch'\]"),
    ("deepspeed.precision=fp8", r"'deepspeed.precision': .*expected one of \['bf16', 'fp16', 'fp32'\]"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load("demo", [override])


def test_preset_files_are_validated_too(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("inherit: demo\nmodel:\n  embed_dimm: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown config key 'model.embed_dimm'"):
        load(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"inherit: {loop}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load(str(loop))
    with pytest.raises(ConfigError, match="unknown preset 'demoo'; presets: demo"):
        load("demoo")


def test_inherit_chain_and_save_round_trip(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("inherit: finetune_dfew\ndata: {fold: 3}\n")
    cfg = load(str(child), ["seed=7"])
    assert cfg.data.fold == 3 and cfg.model.moae.num_experts == 8 and cfg.seed == 7
    config.save(cfg, tmp_path / "run" / "config.yaml")
    assert OmegaConf.load(tmp_path / "run" / "config.yaml") == cfg


def test_deepspeed_config_takes_zero_buckets_from_the_config():
    from s4d_dist.train.ds_config import deepspeed_config

    assert deepspeed_config(load("pretrain_vit_base"), 16)["zero_optimization"] == {"stage": 0}
    zero = deepspeed_config(load("pretrain_vit_base", ["deepspeed.zero_stage=1"]),
                            16)["zero_optimization"]
    # The default buckets are a fraction of ViT-B's ~94M parameters, so reduction overlaps backward.
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    assert zero["overlap_comm"] is True
    cfg = load("pretrain_vit_base", ["deepspeed.zero_stage=2", "deepspeed.reduce_bucket_size=20000000",
                                     "deepspeed.allgather_bucket_size=30000000", "deepspeed.overlap_comm=false"])
    zero = deepspeed_config(cfg, 8)["zero_optimization"]
    assert (zero["stage"], zero["reduce_bucket_size"], zero["allgather_bucket_size"],
            zero["overlap_comm"]) == (2, 20_000_000, 30_000_000, False)
