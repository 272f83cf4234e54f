"""The prepared GPU run (benchmarks/gpu/) at toy sizes on this CPU: `run.sh --cpu-smoke` runs
every section through the same entry point as on a GPU, so the script cannot rot between GPU
visits. The figures mean nothing here; what is checked is that every section runs and passes
its own checks, and that the JSON meant for benchmarks/results/ names no path of this machine."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("nvidia.dali")


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "S4D_GPU_STAGE": str(tmp_path / "stage"), "OUT": str(tmp_path / "out")}
    # Tests that trained in this process left its process group's rendezvous here (RANK,
    # MASTER_PORT, ...); the kit's launches are jobs of their own, as on a GPU machine.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh"), "--cpu-smoke"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report_text = (tmp_path / "out" / "gpu_cpu_smoke.json").read_text()
    report = json.loads(report_text)
    assert sorted(report["sections"]) == ["A_environment", "B_triton_moae", "C_finetune_step",
                                          "D_moae_backends", "E_dali_mixed_vs_cpu",
                                          "F_data_throughput", "G_end_to_end"]
    assert all(section["ok"] for section in report["sections"].values())
    stress = report["sections"]["B_triton_moae"]["stress"]
    assert stress["cases"] == 12 and not stress["failures"]
    assert report["sections"]["B_triton_moae"]["tiles"]["candidates"]["default"]["ok"]
    recipes = report["sections"]["E_dali_mixed_vs_cpu"]["recipes"]
    assert len(recipes) == 12 and all(r["batches"] > 0 for r in recipes.values())  # 3 clip storages
    data_plane = report["sections"]["F_data_throughput"]
    assert set(data_plane["data_benchmark"]) == {"frames", "vp9"} and data_plane["run"]["steps_logged"] > 0
    for path in (str(REPO), str(tmp_path), str(Path.home())):
        assert path not in report_text
    assert (tmp_path / "out" / "logs.tgz").stat().st_size > 0
