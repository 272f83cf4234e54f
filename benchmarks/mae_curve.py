"""How far the demo's MAE gets with more time: its loss curve for several epoch budgets.

    python benchmarks/mae_curve.py                     # budgets 3 (the demo's) and 60 epochs
    python benchmarks/mae_curve.py --budgets 3 20 --finetune

The demo pre-trains for 3 epochs (24 s on 2 CPU cores, measured here) and its normalised-pixel loss
ends near 0.97, where 1.0 is what predicting each hidden patch's mean scores. This script
answers what a user asks next: is that the model, the faces, or the budget? It trains the demo's
MAE (`demo` preset, same data, same code path) once per budget — each budget its own run with
its own warm-up and cosine, as a user changing `optim.epochs` would get — and records the mean
training loss of every epoch. With `--finetune`, each MAE is also fine-tuned with the demo's
recipe (`demo_finetune`), to show whether a better reconstruction helps recognition.

Writes benchmarks/results/mae_curve_cpu.json and a PNG chart beside it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from s4d_dist import config, demo
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import run_dir, train
from s4d_dist.train.pretrain import PretrainTask

RESULTS = Path(__file__).parent / "results"


def pretrain_curve(shards: list[str], epochs: int, overrides: list[str]) -> dict:
    """Train one budget and return its per-epoch losses; a budget already measured in this
    output folder with the same config is read back instead of trained again (another config
    there is refused, see demo.finished)."""
    cfg = config.load("demo", [*shards, f"run_name=mae_{epochs}ep", f"optim.epochs={epochs}",
                               *overrides])
    record = run_dir(cfg) / "curve.json"
    if demo.finished(run_dir(cfg), cfg) and record.is_file():
        return json.loads(record.read_text())
    losses: list[float] = []
    started = time.time()
    train(cfg, PretrainTask(cfg), on_epoch_end=lambda _, m: losses.append(m["train_loss"]))
    result = {"epochs": epochs, "loss": losses, "wall_s": round(time.time() - started),
              "weights": str(run_dir(cfg) / "weights_fp32.pt")}
    record.write_text(json.dumps(result))
    return result


def chart(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for curve in sorted(curves, key=lambda c: -c["epochs"]):  # short budgets drawn on top
        label = f"{curve['epochs']} epochs ({curve['wall_s']} s)"
        if "dfer_war" in curve:
            label += f", DFER WAR {curve['dfer_war']:.1f}"
        ax.plot(range(1, curve["epochs"] + 1), curve["loss"], marker="o", ms=3, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.7, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MAE training loss (normalised pixels)")
    ax.set_title("demo MAE: loss per epoch by budget (dashed: patch mean, dotted: 0.7)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/mae_curve.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[3, 60],
                        help="pre-training epochs, one run each (default 3 60)")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune each MAE with the demo's recipe and score it")
    parser.add_argument("--output", default="runs/mae_curve", help="data and runs")
    parser.add_argument("overrides", nargs="*", help="config overrides for the pre-training")
    args = parser.parse_args(argv)
    out = Path(args.output)
    data = demo.build_data(out / "data", config.load("demo"))
    shards = [f"data.image_shards={data['image'] / 'train'}",
              f"data.video_shards={data['video'] / 'train'}", f"output_dir={out}"]
    curves = []
    for epochs in args.budgets:
        print(f"[mae_curve] {epochs} epochs", flush=True)
        curve = pretrain_curve(shards, epochs, args.overrides)
        if args.finetune:
            folder = demo.stage("demo_finetune", [*shards, f"run_name=ft_{epochs}ep",
                                                  f"init_checkpoint={curve['weights']}"],
                                FinetuneTask)
            scores = json.loads((folder / "metrics.json").read_text())
            curve["dfer_war"] = scores["last"]["war"]
            curve["sfer_war"] = scores["image"]["last"]["war"]
        curves.append(curve)
    result = {"device": f"CPU ({platform.machine()}), 2 cores", "overrides": args.overrides,
              "curves": [{k: v for k, v in c.items() if k != "weights"} for c in curves]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mae_curve_cpu.json").write_text(json.dumps(result, indent=1))
    chart(curves, RESULTS / "mae_curve_cpu.png")
    for c in curves:
        below = next((e + 1 for e, v in enumerate(c["loss"]) if v <= 0.7), None)
        print(f"{c['epochs']:4d} epochs {c['wall_s']:5d} s  final loss {c['loss'][-1]:.4f}  "
              f"≤ 0.7 from epoch {below or '-'}"
              + (f"  DFER/SFER WAR {c['dfer_war']:.1f}/{c['sfer_war']:.1f}" if args.finetune else ""))
    print(f"-> {RESULTS / 'mae_curve_cpu'}.json, .png")
    return result


if __name__ == "__main__":
    main()
