"""Section C of the prepared GPU run: the training step, every configuration that matters, and
the headline figures (`finetune_mfu`, `pretrain_mfu`) of the best one.

One rank, synthetic batches on the device, bf16, through `benchmarks/train_step.py` (one job per
configuration, the JSON rewritten after each, so a run cut short keeps what it measured). The
new step comes first — the flat AdamW, compiled and captured as CUDA graphs — for fine-tuning
(finetune_dfew, 16 clips, the official per-GPU batch) and pre-training (pretrain_vit_base's
192 masked clips); then what it is measured against: the same steps eager (what `compile=false`
runs), DeepSpeed's ZeRO-1 and ZeRO-2, the official DDP loop, a 64-clip fine-tuning batch, and
the Triton MoAE backend. Every configuration also gets the sync census (host syncs in 3 steps:
the flat step must have none) and 2 profiled steps (GPU busy fraction, kernels per step).
"""
from __future__ import annotations

import json
import os
import sys

# What section C measures, in order: the new step first, then what it is measured against.
# Each compiled configuration compiles for a minute or so, so the rest of the list runs where a
# call has the time: S4D_GPU_STEP_CONFIGS=all (or a comma-separated list of configurations). A
# CPU smoke runs eager ones at toy sizes (compiling costs it too much on two cores; compiled
# training is held to eager by tests/test_engine.py).
CONFIGS = ("ft:zero0+graphs@16", "pt:zero0+graphs", "ft:zero0@16", "pt:zero0", "ft:zero1@16",
           "ft:ddp@16")
MORE_CONFIGS = ("ft:zero2@16", "ft:zero0+graphs@64", "ft:zero0+graphs@16/triton",
                "ft:zero0+compile@16", "ft-image:zero0+graphs", "pt-image:zero0+graphs")
SMOKE_CONFIGS = ("ft:zero0", "pt:zero0")
TARGET_MFU = 0.45


def run(ctx, benchmarks, target) -> dict:
    report = ctx.out / "train_step.json"
    if ctx.smoke:
        size = ["--steps", "2", "--warmup", "2", "--precision", "fp32", "--profile-steps", "1",
                "--preset", "demo_finetune", "--pretrain-preset", "demo", "model.img_size=32",
                "model.num_frames=4", "data.video_batch_size=2", "data.image_batch_size=2"]
        configs = SMOKE_CONFIGS
    else:
        size = ["--steps", "20", "--warmup", "3", "--precision", "bf16", "--sync-steps", "3",
                "--profile-steps", "2", "--preset", "finetune_dfew",
                "--pretrain-preset", "pretrain_vit_base", "--timeout", "240", "seed=0"]
        chosen = os.environ.get("S4D_GPU_STEP_CONFIGS", "")
        configs = (CONFIGS + MORE_CONFIGS if chosen == "all" else
                   tuple(chosen.split(",")) if chosen else CONFIGS)
    result = ctx.run([sys.executable, str(benchmarks / "train_step.py"), "--ranks", "1",
                      "--configs", ",".join(configs), "--results", str(report), *size],
                     timeout=60 * 25, log="train_step.log")
    if not report.is_file():
        return {"ok": False, "error": "\n".join(result.stderr.strip().splitlines()[-15:])}
    data = json.loads(report.read_text())
    rows = data["results"]
    keep = ("step_ms", "host_ms_per_step", "samples_per_s", "batch", "mfu", "peak_gib",
            "host_syncs_per_step", "optimizer_and_grad_mib_per_rank", "error")
    summary = {name: {k: row.get(k) for k in keep if k in row} for name, row in rows.items()}
    for name, row in rows.items():
        ranks = row.get("ranks") or [{}]
        summary[name]["host_sync_sites"] = ranks[0].get("host_sync_sites")
        prof = ranks[0].get("profile", {})
        summary[name].update({k: prof.get(k) for k in ("device_busy_fraction",
                                                      "device_kernels_per_step",
                                                      "aten_calls_per_step") if k in prof})
    headline = {}
    for key, prefix in (("finetune_mfu", "ft:"), ("pretrain_mfu", "pt:")):
        measured = {n: r for n, r in rows.items() if n.startswith(prefix) and r.get("mfu")}
        best = max(measured, key=lambda n: measured[n]["mfu"], default=None)
        headline[key] = {**target(measured[best]["mfu"] if best else None, TARGET_MFU),
                         "config": best, "step_ms": measured[best]["step_ms"] if best else None,
                         "batch": measured[best]["batch"] if best else None}
    # The captured step must take the steps the eager one takes: the same first losses (the
    # same batch every step, from the same initial weights) to bf16 rounding. Pre-training has
    # no random draw in its step; fine-tuning's router noise comes from another generator
    # under compile, so its gap is reported, not judged.
    agreement = {}
    for captured in [n for n in rows if "+graphs" in n and "error" not in rows[n]]:
        eager = captured.replace("+graphs", "")
        if eager in rows and "error" not in rows[eager]:
            first, second = (rows[n]["ranks"][0] for n in (captured, eager))
            a, b = first["first_losses"], second["first_losses"]
            gap = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))
            moved = first["weight_movement"] / max(second["weight_movement"], 1e-12)
            agreement[captured] = {"max_relative_loss_gap": gap, "weight_movement_ratio": moved,
                                   "losses": a, "eager": b}
    flat = [n for n in rows if ":zero0" in n and "error" not in rows[n]]
    syncs = {n: summary[n].get("host_syncs_per_step") for n in flat}
    ok = all("error" not in r for r in rows.values()) and bool(rows)
    if not ctx.smoke:  # the census runs on a GPU only
        ok &= all(v == 0 for v in syncs.values())
        ok &= all(v["max_relative_loss_gap"] < 0.02 and abs(v["weight_movement_ratio"] - 1) < 0.05
                  for n, v in agreement.items() if n.startswith("pt"))
    return {"ok": ok, "precision": data["precision"], "configs": list(configs),
            "results": summary, "flat_step_host_syncs": syncs, "headline": headline,
            "captured_vs_eager": agreement,
            "targets": {k: {x: v[x] for x in ("value", "target", "met")}
                        for k, v in headline.items()}}
