"""Evaluation is exact across ranks: one rank and two ranks (torchrun, gloo) give the same
metrics and the same merged probabilities for every sample, with a corrupt test clip that one
of the two ranks meets (skipped and counted once, not per rank)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data_shards as ds
from s4d_dist.shards import layout

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def evaluate_with(ranks: int, shards: Path, out: Path) -> dict[str, dict]:
    """Both variants of tests/eval_ranks.py (MoAE off, on) evaluated with `ranks` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = str(REPO / "tests" / "eval_ranks.py")
    out.mkdir()
    if ranks == 1:
        command = [sys.executable, script, str(shards), str(out)]
    else:  # --standalone: the rendezvous binds a port the OS picks
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", script, str(shards), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = {}
    for variant in ("plain", "moae"):
        saved = np.load(out / f"{variant}.npz")
        results[variant] = {"ids": saved["ids"], "probs": saved["probs"], "labels": saved["labels"],
                            "metrics": json.loads(str(saved["metrics"])),
                            "num_samples": int(saved["num_samples"])}
    return results


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The data-plane shards with clip 3 of the fold-1 test split truncated."""
    paths = ds.build_all(tmp_path_factory.mktemp("shards"))
    root = tmp_path_factory.mktemp("damaged")
    test_part = layout.read_dataset(paths["video"])["folds"]["1"]["test"][0]
    bad = ds.corrupt_copy(paths["video"], root / "video", test_part, {3: "truncate"})
    assert len(bad) == 1
    (root / "image").symlink_to(paths["image"])
    return root


@pytest.fixture(scope="module")
def evaluated(damaged, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated")
    return {ranks: evaluate_with(ranks, damaged, out / f"ranks{ranks}") for ranks in (1, 2)}


def test_one_and_two_ranks_evaluate_identically_with_a_corrupt_clip(evaluated):
    # Without MoAE every clip's prediction is independent of its batch (see the xfail below).
    one, two = evaluated[1]["plain"], evaluated[2]["plain"]
    n = one["num_samples"]
    assert two["num_samples"] == n > 3
    expected_ids = [i for i in range(n) if i != 3]  # every clip once, the corrupt one dropped
    assert one["ids"].tolist() == two["ids"].tolist() == expected_ids
    assert one["labels"].tolist() == two["labels"].tolist()
    np.testing.assert_allclose(two["probs"], one["probs"], rtol=1e-5, atol=1e-7)
    assert one["metrics"] == two["metrics"]
    assert one["metrics"]["samples"] == n - 1


@pytest.mark.xfail(strict=True, reason=(
    "product bug: with MoAE, evaluation depends on how clips are batched, so it is not exact "
    "across world sizes: MoAE's expert capacity is computed per forward from the batch "
    "(int(B·L·top_k/E·capacity_factor)), padding rows included, and tokens over capacity are "
    "dropped at eval too; a clip's probabilities change with the rows it shares a batch with "
    "(up to ~5e-5 here; on one rank eval_batch_size 5 vs 3 gives 1.3e-4, and 0 with "
    "capacity_factor=100), enough to flip an argmax near a tie"))
def test_one_and_two_ranks_evaluate_identically_with_moae(evaluated):
    one, two = evaluated[1]["moae"], evaluated[2]["moae"]
    assert one["ids"].tolist() == two["ids"].tolist()
    np.testing.assert_allclose(two["probs"], one["probs"], rtol=1e-5, atol=1e-7)
