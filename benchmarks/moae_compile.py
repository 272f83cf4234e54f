"""Registers and spills of every fused MoAE kernel compiled for sm_90, without a GPU.

    python benchmarks/moae_compile.py

Records the kernel launches of a ViT-B-sized layer's forward + backward (bf16 model, fp32
under bf16 autocast, fp32 with k = 3), as tests/test_kernels_moae.py's
test_kernels_compile_for_hopper does, compiles each for sm_90 and keeps ptxas's report:
registers per thread (255 is the most; fewer lets more warps share an SM) and spill bytes
(must be 0). A variant reads "<first operand's dtype>→<compute dtype>". Results go to
benchmarks/results/moae_kernels_sm90.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the launches are recorded, not run

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_kernels_moae as kt  # noqa: E402


def main() -> None:
    def calls() -> None:
        kt.vit_b_layer(torch.bfloat16, 2, "philox", "softmax")
        kt.vit_b_layer(torch.float32, 2, "given", "logits", autocast=True)
        kt.vit_b_layer(torch.float32, 3, "none", None)

    launches = kt.record_launches(pytest.MonkeyPatch(), calls)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env |= {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache}
        proc = subprocess.run([sys.executable, "-c", kt.COMPILE_FOR_HOPPER], env=env, text=True,
                              input=json.dumps(launches), capture_output=True, timeout=900,
                              check=True)
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    rows = []
    for report, (_, signature, *_) in zip(reports, launches):
        c = report["constexprs"]
        loads = next(t for t in signature.values() if t.startswith("*")).lstrip("*")
        variant = f"{loads}→{c.get('CDT', '-')} k={c['K']}" + "".join(
            f" {key}={c[key]}" for key in ("NOISE", "AUX", "R") if key in c)
        rows.append({"kernel": report["kernel"].strip("_").removesuffix("_kernel"),
                     "variant": variant, "registers": report["registers"][0],
                     "spill_bytes": sum(report["spills"]),
                     "tiles": {k: v for k, v in c.items() if k.startswith("BLOCK")}})
    for row in rows:
        print(f"{row['kernel']:<20} {row['variant']:<38} {row['registers']:>4} registers, "
              f"{row['spill_bytes']} spill bytes")
    out = Path(__file__).parent / "results" / "moae_kernels_sm90.json"
    out.write_text(json.dumps({
        "benchmark": "fused MoAE kernels compiled for sm_90 (triton.compile, no GPU): ptxas report",
        "triton": __import__("triton").__version__, "target": "cuda sm_90, warp 32",
        "shapes": "ViT-B layer: D 768, H 192, E 8, 2 x 800 tokens (GPU_TILES; fp32: GPU_TILES_FP32)",
        "kernels": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
