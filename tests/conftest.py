"""Session-wide test environment.

No GPU here: Triton kernels run in its interpreter, which `triton.jit` picks when a kernel is
first decorated, so the variable must be set before any test module imports s4d_dist.kernels.
DeepSpeed is told to use its CPU accelerator (gloo) for the same reason.
"""
import contextlib
import os
import secrets
from collections.abc import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Tiny synthetic image and video shard datasets (32 px, 8-frame clips), built once."""
    from s4d_dist.shards.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    build_synthetic(root / "image", "image", {"train": 3, "test": 1}, size=32, seed=0, workers=1)
    build_synthetic(root / "video", "video", {"train": 3, "test": 1}, size=32, frames=8, seed=1,
                    workers=1)
    return root


@pytest.fixture(scope="session")
def finished_finetune_runs(synthetic_shards, tmp_path_factory):
    """Two finished tiny fine-tuning run folders (seeds 0 and 1, one epoch), built once: what
    the analyses read, and what stands in for the runs too slow to train in a test."""
    from s4d_dist import config
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.loop import train

    out = tmp_path_factory.mktemp("finished")
    folders = []
    for seed in (0, 1):
        cfg = config.load("demo_finetune", tiny_overrides(synthetic_shards, out, "finetune") + [
            f"run_name=seed{seed}", f"seed={seed}", "optim.epochs=1", "data.backend=torch"])
        train(cfg, FinetuneTask(cfg))
        folders.append(out / f"seed{seed}")
    return folders


def tiny_overrides(shards, output_dir, task: str = "pretrain") -> list[str]:
    """A ViT small enough to take a DeepSpeed step in well under a second on one core."""
    return [f"task={task}", f"output_dir={output_dir}", "run_name=tiny",
            f"data.image_shards={shards / 'image' / 'train'}",
            f"data.video_shards={shards / 'video' / 'train'}",
            "data.backend=torch", "data.workers=0", "data.image_batch_size=6",
            "data.video_batch_size=4", "data.video_repeats=2", "data.eval_batch_size=8",
            "data.val_fraction=0.3",
            "model.img_size=32", "model.patch=16", "model.num_frames=4", "model.embed_dim=32", "model.depth=2",
            "mask.image_ratio=0.9", "mask.video_ratio=0.95",
            "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
            "model.decoder_heads=2", "model.moae.layers=[1]", "model.moae.num_experts=2",
            "model.moae.top_k=1", "optim.epochs=2", "optim.warmup_epochs=1",
            "logging.log_every=1", "logging.image_every=4"]


def ray_cluster_env() -> dict[str, str]:
    """The environment of a Ray cluster a test starts, and of its clients: token authentication
    with a token of that cluster's own, so that nothing is read from or left in
    ~/.ray/auth_token, whatever an earlier test (or anyone else here) put there; and no memory
    monitor, which kills workers once the machine's memory is 95 % used by anyone — on a shared
    machine, not by the tests' workers of a few hundred MB."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_memory_monitor_refresh_ms": "0"}


@contextlib.contextmanager
def ray_cluster_environment() -> Iterator[None]:
    """ray_cluster_env() in this process's environment while the block runs, for a cluster
    started in this process and its ray.init. Ray caches the mode and the token per process:
    the cache is dropped on the way in and on the way out."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    env = ray_cluster_env()
    saved = {name: os.environ.pop(name, None) for name in [*env, "RAY_AUTH_TOKEN_PATH"]}
    os.environ.update(env)
    reset_auth_token_state()
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        reset_auth_token_state()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process, end-to-end or learning runs of seconds to minutes "
                                       "(run by default; `-m 'not slow'` is the quick loop)")
    config.addinivalue_line("markers", f"machine: changes the machine (apt-get, useradd, sshd on "
                                       f"port 22); runs only with {MACHINE_TESTS}=1 (.ci/run sets it)")


MACHINE_TESTS = "S4D_MACHINE_TESTS"


def pytest_collection_modifyitems(config, items):
    """Tests marked `machine` are opt-in: a developer's `pytest tests` never installs packages or
    adds logins on their machine; CI's throwaway machine opts in."""
    if os.environ.get(MACHINE_TESTS) == "1":
        return
    skip = pytest.mark.skip(reason=f"changes the machine; set {MACHINE_TESTS}=1 to run it")
    for item in items:
        if "machine" in item.keywords:
            item.add_marker(skip)
