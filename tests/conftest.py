"""Session-wide test environment.

No GPU here: Triton kernels run in its interpreter, which `triton.jit` picks when a kernel is
first decorated, so the variable must be set before any test module imports s4d_dist.kernels.
DeepSpeed is told to use its CPU accelerator (gloo) for the same reason.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
