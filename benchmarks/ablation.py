"""The paper's comparisons at toy scale, on the demo's synthetic faces.

    python benchmarks/ablation.py            # 3 seeds, about 45 minutes on 2 CPU cores
    python benchmarks/ablation.py --quick    # 1 seed, short runs: a smoke test of the grid

S4D argues two things (docs/method.md): dual-modal MAE pre-training beats image-only,
video-only and none, and MoAE multi-task fine-tuning beats vanilla multi-task (one shared FFN)
and DFER-only fine-tuning. This script runs both rows of that argument with the demo's code
path and data (few labelled clips, many labelled images; the pre-training sees the same
images and clips without labels):

  pre-training  scratch · image MAE · video MAE · dual MAE      (fine-tuning: MoAE multi-task)
  fine-tuning   DFER only · vanilla multi-task · MoAE multi-task (pre-training: dual MAE)

Each cell is run for every seed (the seed drives initialisation, masks, augmentation and batch
order; the data are the same), and scored on the synthetic DFER test split (WAR/UAR, last
epoch) and, where an image head is trained, the SFER test split. Routing statistics (share of
image and video tokens per expert per MoAE layer) come from `s4d_dist.analyze` on the test
splits. Nothing here is tuned per cell: every cell uses the demo presets, fine-tuned for 15
epochs instead of the demo's 20 so that three seeds fit in under an hour.

Writes benchmarks/results/ablation_cpu.json (ablation_quick_cpu.json with --quick) and a PNG
chart beside it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from s4d_dist import config, demo
from s4d_dist.analyze import analyze_run
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.pretrain import PretrainTask

RESULTS = Path(__file__).parent / "results"
PRETRAINING = {  # name → overrides of the pre-training stage (None: no pre-training)
    "scratch": None,
    "image MAE": ["data.video_shards="],
    "video MAE": ["data.image_shards="],
    "dual MAE": [],
}
FINETUNING = {  # name → overrides of the fine-tuning stage
    "DFER only": ["data.image_shards="],
    "vanilla multi-task": ["model.moae.layers=[]"],
    "MoAE multi-task": [],
}
S4D = ("dual MAE", "MoAE multi-task")
CELLS = [(p, S4D[1]) for p in PRETRAINING] + [(S4D[0], f) for f in FINETUNING if f != S4D[1]]


def run_cell(out: Path, data: dict[str, Path], seed: int, pre: str, fine: str,
             epochs: dict[str, list[str]]) -> dict:
    shards = [f"data.image_shards={data['image'] / 'train'}",
              f"data.video_shards={data['video'] / 'train'}", f"output_dir={out}",
              f"seed={seed}"]
    init = []
    if PRETRAINING[pre] is not None:
        name = f"pre_{pre.replace(' ', '_')}_s{seed}"
        folder = demo.stage("demo", [*shards, f"run_name={name}", *PRETRAINING[pre],
                                     *epochs["pretrain"]], PretrainTask)
        init = [f"init_checkpoint={folder / 'weights_fp32.pt'}"]
    name = f"ft_{pre.replace(' ', '_')}_{fine.replace(' ', '_')}_s{seed}"
    folder = demo.stage("demo_finetune", [*shards, f"run_name={name}", *init, *FINETUNING[fine],
                                          *epochs["finetune"]], FinetuneTask)
    metrics = json.loads((folder / "metrics.json").read_text())
    routing = analyze_run(folder)["routing"]
    cell = {"pretraining": pre, "finetuning": fine, "seed": seed, "run": name,
            "dfer": {k: metrics["last"][k] for k in ("war", "uar")}, "routing": routing}
    if "image" in metrics:
        cell["sfer"] = {k: metrics["image"]["last"][k] for k in ("war", "uar")}
    return cell


def summarise(cells: list[dict]) -> list[dict]:
    """Mean ± std over seeds of each (pre-training, fine-tuning) cell."""
    rows = []
    for pre, fine in CELLS:
        runs = [c for c in cells if (c["pretraining"], c["finetuning"]) == (pre, fine)]
        row = {"pretraining": pre, "finetuning": fine, "seeds": len(runs)}
        for task in ("dfer", "sfer"):
            if all(task in r for r in runs) and runs:
                for metric in ("war", "uar"):
                    values = [r[task][metric] for r in runs]
                    row[f"{task}_{metric}"] = {"mean": float(np.mean(values)),
                                               "std": float(np.std(values)), "runs": values}
        rows.append(row)
    return rows


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    groups = ((f"pre-training (fine-tuning: {S4D[1]})", [r for r in rows if r["finetuning"] == S4D[1]],
               "pretraining"),
              (f"fine-tuning (pre-training: {S4D[0]})", [r for r in rows if r["pretraining"] == S4D[0]],
               "finetuning"))
    for ax, (title, group, key) in zip(axes, groups):
        x = np.arange(len(group))
        for offset, task in ((-0.2, "dfer"), (0.2, "sfer")):
            means = [r.get(f"{task}_war", {}).get("mean", np.nan) for r in group]
            stds = [r.get(f"{task}_war", {}).get("std", 0.0) for r in group]
            ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, label=f"{task.upper()} test WAR")
        ax.set_xticks(x, [r[key] for r in group], rotation=15)
        ax.set_title(title)
        ax.axhline(100 / 7, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("test WAR %, mean ± std (dashed: chance)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/ablation.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 1 pre-training and 4 fine-tuning epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    parser.add_argument("--output", default=None,
                        help="data and runs (default runs/ablation, runs/ablation_quick)")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = ({"pretrain": ["optim.epochs=1"], "finetune": ["optim.epochs=4"]} if args.quick
              else {"pretrain": [], "finetune": ["optim.epochs=15"]})
    out = Path(args.output or ("runs/ablation_quick" if args.quick else "runs/ablation"))
    data = demo.build_data(out / "data", config.load("demo"))
    started = time.time()
    cells = []
    for seed in seeds:
        for pre, fine in CELLS:
            print(f"[ablation] seed {seed}: {pre} → {fine}", flush=True)
            cells.append(run_cell(out, data, seed, pre, fine, epochs))
    name = "ablation_quick_cpu" if args.quick else "ablation_cpu"
    result = {"device": f"CPU ({platform.machine()}), 2 cores", "seeds": seeds, "quick": args.quick,
              "data": {"image": demo.IMAGE_SPLITS, "video": demo.VIDEO_SPLITS},
              "wall_s": round(time.time() - started), "rows": summarise(cells), "cells": cells}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    chart(result["rows"], RESULTS / f"{name}.png")
    print(f"{'pre-training':12s} {'fine-tuning':20s} {'DFER WAR':>14s} {'SFER WAR':>14s}")
    for r in result["rows"]:
        cols = [f"{r[k]['mean']:5.1f} ± {r[k]['std']:4.1f}" if k in r else f"{'-':>12s}"
                for k in ("dfer_war", "sfer_war")]
        print(f"{r['pretraining']:12s} {r['finetuning']:20s} {cols[0]:>14s} {cols[1]:>14s}")
    print(f"-> {RESULTS / name}.json, .png ({result['wall_s']} s)")
    return result


if __name__ == "__main__":
    main()
