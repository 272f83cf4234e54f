"""The FLOPs behind MFU: each step's count against torch's own FLOP counter run on the model,
and the bf16 peak — the device's own part, not its family's fastest. No GPU here, so
torch.cuda.get_device_name stands in for one (the only thing patched)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.data.masking import num_masked
from s4d_dist.models.factory import build_classifier, build_mae
from s4d_dist.train import flops
from s4d_dist.tubelets import model_tokens

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_step_flops_are_what_torch_counts_on_the_model(task, modality):
    """flops.py's count of a step is 3 × one forward (PaLM's convention for fwd + bwd); that
    forward must be what torch.utils.flop_counter counts running the model: matmuls,
    convolutions and attention (through the math SDPA kernel, whose matmuls the counter sees;
    the fused CPU kernel it does not count). The formulas leave out only the classification
    head, 2 × dim × classes per sample. 8 px patches: 16 tokens per image, 32 per clip."""
    cfg = config.load("demo", tiny_overrides(Path("unused"), Path("unused"), task)
                      + ["model.patch=8", "model.embed_dim=64"])
    m, batch = cfg.model, 2
    tokens = model_tokens(m, modality)
    size = (m.img_size, m.img_size) if modality == "image" else (m.num_frames, m.img_size, m.img_size)
    pixels = torch.randn(batch, 3, *size)
    torch.manual_seed(0)
    if task == "pretrain":
        ratio = cfg.mask.image_ratio if modality == "image" else cfg.mask.video_ratio
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        mask[:, : num_masked(tokens, ratio)] = True  # as the loaders mask
        model, inputs = build_mae(cfg), (pixels, mask)
        want = flops.mae_step_flops(cfg, tokens, ratio, batch) / 3
    else:
        model, inputs = build_classifier(cfg), (pixels, modality)
        classes = m.num_image_classes if modality == "image" else m.num_video_classes
        want = flops.classifier_step_flops(cfg, tokens, batch) / 3 + 2 * batch * m.embed_dim * classes
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counted:
        model(*inputs)
    assert counted.get_total_flops() == want


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = flops.peak_flops(CUDA)
    assert (peak and round(peak / 1e12)) == tflops


def test_override_wins_everywhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert flops.peak_flops(CUDA, 600.0) == 600e12
    assert flops.peak_flops(torch.device("cpu"), 1.5) == 1.5e12
    assert flops.peak_flops(torch.device("cpu")) is None
