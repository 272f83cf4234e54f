"""The bf16 peak behind MFU: the device's own part, not its family's fastest. No GPU here, so
torch.cuda.get_device_name stands in for one (the only thing patched)."""
from __future__ import annotations

import pytest
import torch

from s4d_dist.train import flops

CUDA = torch.device("cuda", 0)


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
