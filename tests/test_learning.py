"""Learning regression: the real pipeline must still *learn*, not just run.

A loss that falls a little proves little (a label permutation, a broken augmentation or an
inverted mask leave it falling). So both stages are scored on held-out data against facts
computed here, independently of the code under test:

- the MAE, trained on synthetic faces, must fill in patches it was not shown: its
  normalised-pixel error on hidden tokens of held-out images (hidden by a mask drawn here, error
  computed here) must be well below 1.0, the error of predicting each patch's mean;
- the classifier, fine-tuned from scratch on the same kind of data, must score the held-out
  test split well above chance (14.3 % for 7 classes).

Thresholds are the measured values over several seeds minus a margin (see each test); every run
is seeded, so a pass or a failure repeats.
"""
import pytest
import torch

from s4d_dist import config
from s4d_dist.data.loaders import eval_loader
from s4d_dist.models.factory import build_mae
from s4d_dist.pixels import unnormalize
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import train
from s4d_dist.train.pretrain import PretrainTask

SIZE, PATCH, TUBELET = 48, 8, 2


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Aligned synthetic face crops (as face datasets ship them), 48 px, 7 classes: many
    labelled images, few labelled clips."""
    from s4d_dist.shards.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("faces")
    build_synthetic(root / "image", "image", {"train": 150, "test": 10}, size=SIZE, seed=0,
                    workers=1, framing="aligned")
    build_synthetic(root / "video", "video", {"train": 16, "test": 10}, size=SIZE, frames=8,
                    seed=1, workers=1, framing="aligned")
    return root


def small(faces, out, preset: str, *extra: str):
    """The demo presets on a model small enough for seconds per epoch on one core."""
    return config.load(preset, [
        f"output_dir={out}", f"data.image_shards={faces / 'image' / 'train'}",
        f"data.video_shards={faces / 'video' / 'train'}", "data.backend=torch", "data.workers=0",
        "data.image_batch_size=32", "data.video_batch_size=16", "data.eval_batch_size=32",
        f"model.img_size={SIZE}", f"model.patch={PATCH}", "model.num_frames=4", "model.embed_dim=64",
        "model.depth=2", "model.num_heads=4", "model.decoder_dim=32", "model.decoder_depth=1",
        "model.decoder_heads=2", "model.moae.layers=[1]", "logging.tensorboard=false",
        "optim.warmup_epochs=1", *extra])


def hidden_patch_error(pred: torch.Tensor, images: torch.Tensor, hidden: torch.Tensor) -> float:
    """Mean squared error on hidden tokens against per-token, per-channel standardised pixels
    (unbiased variance, eps 1e-6), images repeated to one tubelet: the MAE target, recomputed
    here from its definition. 1.0 is what predicting every patch's mean scores."""
    x = unnormalize(images.float())  # (B, C, H, W) in [0, 1]
    B, C, H, W = x.shape
    blocks = x.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    blocks = blocks.reshape(B, -1, 1, PATCH * PATCH, C).expand(-1, -1, TUBELET, -1, -1)
    blocks = blocks.reshape(B, -1, TUBELET * PATCH * PATCH, C)  # (t, y, x) major, channel fastest
    target = (blocks - blocks.mean(2, keepdim=True)) / (blocks.var(2, keepdim=True) + 1e-6).sqrt()
    error = ((pred.reshape(target.shape) - target) ** 2).mean((2, 3))
    return float(error[hidden].mean())


@pytest.mark.slow
def test_mae_fills_in_hidden_patches_of_unseen_faces(faces, tmp_path):
    # Measured over seeds 0-2: 0.978-0.980 after 6 epochs (untrained 1.14-1.15). With the loss
    # taken on the visible tokens instead of the hidden ones (an inverted mask) it ends at 1.13.
    cfg = small(faces, tmp_path, "demo", "run_name=mae", "optim.epochs=6", "optim.base_lr=2e-3",
                "mask.image_ratio=0.75", "mask.video_ratio=0.9")
    train(cfg, PretrainTask(cfg))
    model = build_mae(cfg)
    untrained = build_mae(cfg)
    model.load_state_dict(torch.load(tmp_path / "mae" / "weights_fp32.pt", weights_only=True))
    test = config.load("demo", [f"{k}={v}" for k, v in (
        ("data.image_shards", faces / "image" / "train"), ("data.backend", "torch"),
        ("data.workers", 0), ("model.img_size", SIZE), ("data.eval_batch_size", 70))])
    loader = eval_loader(test, "test", "image", 0, 1)
    images = next(loader.batches())["pixels"]
    loader.close()
    tokens = (SIZE // PATCH) ** 2
    generator = torch.Generator().manual_seed(1234)
    hidden = torch.stack([torch.randperm(tokens, generator=generator) < tokens * 3 // 4
                          for _ in range(len(images))])  # 75 % hidden, drawn here
    scores = {}
    for name, net in (("trained", model), ("untrained", untrained)):
        net.eval()
        with torch.no_grad():
            scores[name] = hidden_patch_error(net(images, hidden), images, hidden)
    assert scores["untrained"] > 1.0, scores
    assert scores["trained"] < 0.99, scores


@pytest.mark.slow
def test_finetuning_from_scratch_recognises_unseen_faces(faces, tmp_path):
    # Measured over seeds 0-2: image test WAR 60-83 % (chance 14.3 %) in 14 epochs. The video
    # head, with 112 clips, is still near chance (19-21 %) at this size: the demo's own video
    # WAR is checked by CI (.ci/run) instead.
    cfg = small(faces, tmp_path, "demo_finetune", "run_name=ft", "optim.epochs=14",
                "data.image_rate=1.0")
    results = train(cfg, FinetuneTask(cfg))
    assert results["image"]["last"]["war"] >= 45.0, results["image"]["last"]
