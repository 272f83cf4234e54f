"""The fine-tuning classifier, official checkpoint import/export and optimizer parameter groups."""
import pickle

import pytest
import torch

from s4d_dist.models import official
from s4d_dist.models.classifier import S4DClassifier
from s4d_dist.models.mae import PretrainMAE
from s4d_dist.models.moae import MoAEBlock
from s4d_dist.models.param_groups import param_groups
from s4d_dist.models.vit import Block, count_params

TINY_ENCODER = dict(img_size=32, patch=16, tubelet=2, num_frames=4, embed_dim=64, depth=4,
                    num_heads=1)
TINY_CLASSIFIER = dict(TINY_ENCODER, moae_layers=(2, 3), num_experts=3, top_k=2,
                       num_video_classes=5)


@pytest.fixture(scope="module")
def vit_base_pair():
    return PretrainMAE(), S4DClassifier()


def test_classifier_vit_base_matches_official(vit_base_pair):
    _, model = vit_base_pair
    sd = model.state_dict()
    assert len(sd) == 380 and count_params(model) == 100_513_646
    assert count_params(S4DClassifier(num_video_classes=11)) == 100_516_722
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, MoAEBlock)] == [6, 7, 8, 9, 10, 11]
    assert isinstance(model.blocks[5], Block) and model.norm is None
    keys = list(sd)
    b6 = [k for k in keys if k.startswith("blocks.6.")]
    assert b6.index("blocks.6.norm2.bias") < b6.index("blocks.6.moe_layer.router.topkroute_linear.weight")
    assert b6.index("blocks.6.moe_layer.experts.7.fc2.bias") < b6.index("blocks.6.mlp.fc1.weight")
    assert tuple(sd["blocks.11.moe_layer.experts.3.fc1.weight"].shape) == (192, 768)
    assert tuple(sd["blocks.11.moe_layer.router.noise_linear.weight"].shape) == (8, 768)
    assert keys[-4:] == ["head.image.weight", "head.image.bias", "head.video.weight", "head.video.bias"]
    # One trunc-normal(.02) init everywhere, the experts included (docs/method.md §3.5).
    assert sd["blocks.6.moe_layer.experts.0.fc1.weight"].std().item() == pytest.approx(0.02, rel=0.05)


def test_classifier_routes_by_modality():
    torch.manual_seed(0)
    model = S4DClassifier(**TINY_CLASSIFIER).eval()
    assert model(torch.randn(2, 3, 32, 32), "image").shape == (2, 7)
    assert model(torch.randn(2, 3, 4, 32, 32), "video").shape == (2, 5)
    assert model(torch.randn(2, 3, 4, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="cannot be modality 'image'"):
        model(torch.randn(2, 3, 4, 32, 32), "image")


def test_classifier_eval_is_deterministic_and_aux_loss_only_in_training():
    torch.manual_seed(0)
    model = S4DClassifier(**TINY_CLASSIFIER)
    clip = torch.randn(2, 3, 4, 32, 32)
    model.eval()
    torch.testing.assert_close(model(clip), model(clip))
    assert model.aux_loss() is None
    assert model(clip, with_aux=True)[1] is None
    model.train()
    logits, aux = model(clip, with_aux=True)
    assert logits.shape == (2, TINY_CLASSIFIER["num_video_classes"])
    layers = model.moae_layers()
    assert sorted(layers) == [2, 3]
    torch.testing.assert_close(aux, layers[2].aux_loss + layers[3].aux_loss)


def test_official_round_trip(tmp_path):
    torch.manual_seed(0)
    for model in (PretrainMAE(**TINY_ENCODER, decoder_dim=64, decoder_depth=2, decoder_heads=1),
                  S4DClassifier(**TINY_CLASSIFIER)):
        path = tmp_path / f"{type(model).__name__}.pth"
        official.save(model, path, epoch=3)
        loaded = official.load(path, img_size=32, num_frames=4)
        assert type(loaded) is type(model)
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    assert loaded.moae_layers()[2].num_experts == 3 and loaded.head["video"].out_features == 5


def test_official_finetuned_file_with_args_namespace_loads(tmp_path):
    import argparse
    model = S4DClassifier(**TINY_CLASSIFIER)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "optimizer": None, "epoch": 7, "scaler": {},
                "args": argparse.Namespace(lr=1e-5, moe_layers=2)}, path)
    assert isinstance(official.load(path, img_size=32, num_frames=4), S4DClassifier)


class NotATensor:
    pass


def test_official_refuses_arbitrary_pickles_and_foreign_files(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": NotATensor()}, bad)
    with pytest.raises(official.CheckpointError, match="evil.pth: refused to unpickle"):
        official.load(bad)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(official.CheckpointError, match="resnet.pth: neither"):
        official.load(foreign)
    text = tmp_path / "notes.pth"
    text.write_bytes(pickle.dumps("hello")[:5])
    with pytest.raises(official.CheckpointError, match="notes.pth"):
        official.load(text)


def test_official_strict_key_check_names_the_difference(tmp_path):
    model = S4DClassifier(**TINY_CLASSIFIER)
    sd = model.state_dict()
    del sd["fc_norm.weight"]
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(official.CheckpointError, match=r"1 missing \['fc_norm.weight'\]"):
        official.load(path, img_size=32, num_frames=4)


def test_init_from_pretrained_vit_base_counts(vit_base_pair, tmp_path):
    mae, model = vit_base_pair
    path = tmp_path / "vit_base_voxceleb2+affectnet_100.pt"
    torch.save({"model": mae.state_dict(), "optimizer": None, "epoch": 99, "loss": 0.1,
                "steps": 1, "scaler": None}, path)
    report = official.init_from_pretrained(model, path)
    assert report == {"carried": 158, "left_behind": 60, "fresh": 222}
    sd = model.state_dict()
    assert torch.equal(sd["blocks.11.mlp.fc2.weight"], mae.state_dict()["encoder.blocks.11.mlp.fc2.weight"])
    assert torch.equal(sd["patch_embed.proj.weight"], mae.state_dict()["encoder.patch_embed.proj.weight"])
    assert torch.equal(sd["fc_norm.weight"], torch.ones(768))  # encoder.norm is discarded


def test_init_from_pretrained_rejects_wrong_encoder():
    small = PretrainMAE(**TINY_ENCODER, decoder_dim=64, decoder_depth=1, decoder_heads=1)
    sd = small.state_dict()
    del sd["encoder.blocks.1.attn.q_bias"]
    with pytest.raises(official.CheckpointError, match="1 keys absent.*blocks.1.attn.q_bias"):
        official.init_from_pretrained(S4DClassifier(**TINY_CLASSIFIER), sd)
    bigger = S4DClassifier(**dict(TINY_CLASSIFIER, embed_dim=128))
    with pytest.raises(official.CheckpointError, match="has shape"):
        official.init_from_pretrained(bigger, small.state_dict())


def _names_by_group(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g, {names[id(p)] for p in g["params"]}) for g in groups]


def test_finetune_layer_decay_and_no_decay(vit_base_pair):
    _, model = vit_base_pair
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75, depth=12)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]  # the flat AdamW's two groups
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for group in groups:
        assert group["names"] == [names[id(p)] for p in group["params"]]
        for n, s in zip(group["names"], group["lr_scales"]):
            scale[n], decay[n] = s, group["weight_decay"]
    by_layer = param_groups(model, weight_decay=0.05, layer_decay=0.75, depth=12, by_layer=True)
    assert len(by_layer) == 28  # one per (layer, decay): what DeepSpeed's ZeRO steps
    for group, members in _names_by_group(model, by_layer):
        assert {scale[n] for n in members} == {group["lr_scale"]}
        assert {decay[n] for n in members} == {group["weight_decay"]}
    assert len(scale) == 212  # 380 state-dict tensors: each MoAE layer's 32 expert ones are 4
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** 13)  # 0.0238
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.75 ** 12)  # 0.0317
    assert scale["blocks.6.moe_layer.fc1_weight"] == pytest.approx(0.75 ** 6)  # 0.178
    assert decay["blocks.6.moe_layer.fc1_weight"] == decay["blocks.6.moe_layer.fc2_weight"] == 0.05
    assert decay["blocks.6.moe_layer.fc1_bias"] == decay["blocks.6.moe_layer.fc2_bias"] == 0.0
    assert scale["blocks.11.mlp.fc1.weight"] == pytest.approx(0.75)
    assert scale["head.video.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["blocks.3.attn.q_bias"] == decay["blocks.3.norm1.weight"] == 0.0
    assert decay["head.image.bias"] == decay["patch_embed.proj.bias"] == 0.0
    assert decay["blocks.3.attn.qkv.weight"] == decay["blocks.7.moe_layer.router.noise_linear.weight"] == 0.05


def test_pretrain_decay_rules_correct_and_official(vit_base_pair):
    mae, _ = vit_base_pair
    for official_rule, decayed in ((False, 0.0), (True, 0.05)):
        groups = param_groups(mae, 0.05, official_pretrain_rule=official_rule)
        decay = {n: g["weight_decay"] for g, names in _names_by_group(mae, groups) for n in names}
        for name in ("mask_token", "encoder.blocks.0.attn.q_bias", "decoder.blocks.1.attn.v_bias"):
            assert decay[name] == decayed, name
        assert decay["encoder.blocks.0.norm1.weight"] == decay["decoder.head.bias"] == 0.0
        assert decay["encoder.blocks.0.mlp.fc1.weight"] == decay["encoder_to_decoder.weight"] == 0.05
        assert {s for g in groups for s in g["lr_scales"]} == {1.0}
