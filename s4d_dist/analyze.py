"""Routing and SFER ↔ DFER analyses of a fine-tuned S4D model, as a report.

    python -m s4d_dist.analyze RUN_DIR                 # one fine-tuning run folder
    python -m s4d_dist.analyze RUN_A RUN_B ... --out D  # several: + a comparison table

The paper presents "a systematic correlation analysis between SFER and DFER tasks" (abstract of
arXiv 2409.06154v2); how it computes it is not reproduced here. These views are this project's
own, on the questions the paper's argument raises (docs/method.md §5). For each run, on its
test splits with the evaluation settings (multi-view, no router noise unless
official.router_noise_at_eval):
- expert routing by task: per MoAE layer, the share of image tokens and of video tokens each
  expert receives, the drop rate (capacity) and router entropy per modality, from each
  token's own routing (MoAE.record_routing) over the valid rows;
- SFER ↔ DFER transfer: per-class recall of the image head on the image test split and of the
  video head on the video test split, matched by class name (CLASS_SYNONYMS documents how the
  datasets' names map onto each other), their correlation, and both confusion matrices;
and across runs (an ablation, a k-fold): WAR/UAR/F1 mean ± std and per-class recall
differences against the first run, from each run's metrics.json.
Writes report.json (strict JSON: null where a value is undefined, e.g. the recall of a class
with no test sample), routing.png, transfer.png and report.md (linking them) to `--out`
(default RUN_DIR/analysis for one run).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4d_dist.train.metrics import per_class_recall

# Dataset class names → one canonical name, so that heads trained on different datasets can be
# compared class by class (AffectNet-7 and DFEW use the nouns, FERV39K the adjectives; MAFW's
# extra classes — contempt, anxiety, helplessness, disappointment — have no image counterpart).
CLASS_SYNONYMS = {"happy": "happiness", "sad": "sadness", "angry": "anger", "surprised": "surprise",
                  "fearful": "fear", "disgusted": "disgust", "neutrality": "neutral"}


def canonical(name: str) -> str:
    key = name.strip().lower()
    return CLASS_SYNONYMS.get(key, key)


class RoutingCounter:
    """Per MoAE layer and modality: how many (token, choice) pairs went to each expert, how many
    were kept under the capacity, and the summed router entropy, over valid rows only."""

    def __init__(self, layers: dict[int, Any], num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        self.counts: dict[tuple[int, str], dict[str, Any]] = {}

    def __call__(self, batch: dict) -> None:
        valid = batch["valid"].bool().cpu()
        for index, layer in self.layers.items():
            routing = layer.routing
            rows = valid.numel()
            per_row = routing.topk_idx.shape[0] // rows
            keep = valid.repeat_interleave(per_row)  # tokens of valid rows
            chosen = routing.topk_idx.cpu()[keep]
            kept = routing.kept.cpu()[keep]
            probs = routing.noisy_logits.float().softmax(-1).cpu()[keep]
            entry = self.counts.setdefault((index, batch["modality"]), {
                "chosen": np.zeros(self.num_experts), "kept": np.zeros(self.num_experts),
                "entropy": 0.0, "tokens": 0})
            entry["chosen"] += np.bincount(chosen.flatten().numpy(), minlength=self.num_experts)
            entry["kept"] += np.bincount(chosen[kept].numpy(), minlength=self.num_experts)
            entry["entropy"] += float(-(probs * probs.clamp_min(1e-12).log()).sum())
            entry["tokens"] += int(keep.sum())

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (index, modality), c in sorted(self.counts.items()):
            out.setdefault(f"layer{index}", {})[modality] = {
                "share": (c["chosen"] / c["chosen"].sum()).tolist(),
                "drop_rate": float(1 - c["kept"].sum() / c["chosen"].sum()),
                "router_entropy": c["entropy"] / max(c["tokens"], 1), "tokens": c["tokens"]}
        return out


def transfer(image: dict, video: dict, names: dict[str, list[str]]) -> dict[str, Any]:
    """Per-class recall of both heads on the classes they share (by canonical name)."""
    image_recall = dict(zip(map(canonical, names["image"]), per_class_recall(image["confusion"])))
    video_recall = dict(zip(map(canonical, names["video"]), per_class_recall(video["confusion"])))
    shared = [c for c in video_recall if c in image_recall]
    a = np.array([image_recall[c] for c in shared])
    b = np.array([video_recall[c] for c in shared])
    ok = ~(np.isnan(a) | np.isnan(b))
    correlation = float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 and a[ok].std() and \
        b[ok].std() else None
    return {"classes": shared, "image_recall": a.tolist(), "video_recall": b.tolist(),
            "correlation": correlation, "mapping": CLASS_SYNONYMS}


def json_ready(value: Any) -> Any:
    """`value` as plain JSON types, every non-finite number as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def analyze_run(folder: Path, split: str = "test") -> dict[str, Any]:
    """Routing and transfer of one fine-tuning run, on `split` with its evaluation settings."""
    from s4d_dist import config
    from s4d_dist.data.loaders import eval_loader
    from s4d_dist.predict.model import load
    from s4d_dist.train.evaluate import evaluate

    cfg = config.load(str(folder / "config.yaml"))
    model = load(str(folder))
    network = model.network
    layers = network.moae_layers()
    for layer in layers.values():
        layer.record_routing = True
    counter = RoutingCounter(layers, cfg.model.moae.num_experts)
    results = {}
    for modality in ("image", "video"):
        if not (cfg.data.image_shards if modality == "image" else cfg.data.video_shards):
            continue
        loader = eval_loader(cfg, split, modality)
        classes = cfg.model.num_image_classes if modality == "image" else cfg.model.num_video_classes
        try:
            results[modality] = evaluate(network, loader, classes, torch.float32,
                                         counter if layers else None)
        finally:
            loader.close()
    report: dict[str, Any] = {"run": str(folder), "split": split, "classes": model.classes,
                              "metrics": results, "routing": counter.summary()}
    if {"image", "video"} <= results.keys():
        report["transfer"] = transfer(results["image"], results["video"], model.classes)
    return report


def compare(folders: list[Path]) -> dict[str, Any]:
    """WAR/UAR/F1 mean ± std (last and best epoch) and per-class recall vs the first run."""
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    table: dict[str, Any] = {}
    for which in ("last", "best"):
        rows = [m[which] for m in metrics if which in m]
        if len(rows) == len(metrics):
            table[which] = {k: {"mean": float(np.mean([r[k] for r in rows])),
                                "std": float(np.std([r[k] for r in rows])),
                                "runs": [r[k] for r in rows]}
                            for k in ("war", "uar", "f1_weighted", "f1_macro")}
    recalls = [per_class_recall(m["last"]["confusion"]) for m in metrics]
    table["recall_vs_first_last"] = [(r - recalls[0]).tolist() for r in recalls[1:]]
    table["runs"] = [str(f) for f in folders]
    return table


def figures(report: dict[str, Any], out: Path) -> list[str]:
    """routing.png (expert shares per layer, image vs video) and transfer.png (recalls and both
    confusion matrices); returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    routing = report["routing"]
    if routing:
        fig, axes = plt.subplots(1, len(routing), figsize=(3.2 * len(routing), 3), squeeze=False)
        for ax, (layer, by_modality) in zip(axes[0], routing.items()):
            for offset, (modality, entry) in zip((-0.2, 0.2), by_modality.items()):
                experts = np.arange(len(entry["share"]))
                ax.bar(experts + offset, entry["share"], width=0.4, label=modality)
            ax.set_title(layer)
            ax.set_xlabel("expert")
        axes[0][0].set_ylabel("share of routed tokens")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out / "routing.png", dpi=100)
        plt.close(fig)
        written.append("routing.png")
    if "transfer" in report:
        t, names = report["transfer"], report["classes"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        x = np.arange(len(t["classes"]))
        axes[0].bar(x - 0.2, t["image_recall"], width=0.4, label="image head, image test")
        axes[0].bar(x + 0.2, t["video_recall"], width=0.4, label="video head, video test")
        axes[0].set_xticks(x, t["classes"], rotation=45, ha="right")
        r = "n/a" if t["correlation"] is None else f"{t['correlation']:.2f}"
        axes[0].set_title(f"per-class recall (r = {r})")
        axes[0].legend(fontsize=7)
        for ax, modality in zip(axes[1:], ("image", "video")):
            confusion = np.array(report["metrics"][modality]["confusion"])
            ax.imshow(confusion, cmap="Blues")
            for (i, j), count in np.ndenumerate(confusion):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
            ticks = np.arange(len(names[modality]))
            ax.set_xticks(ticks, names[modality], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(ticks, names[modality], fontsize=7)
            ax.set_title(f"{modality} test confusion (rows: true)")
        fig.tight_layout()
        fig.savefig(out / "transfer.png", dpi=100)
        plt.close(fig)
        written.append("transfer.png")
    return written


def markdown(reports: list[dict[str, Any]], comparison: dict | None, images: list[str]) -> str:
    lines = ["# S4D analysis", ""]
    for report in reports:
        lines += [f"## {report['run']} ({report['split']} splits)", ""]
        for modality, m in report["metrics"].items():
            lines.append(f"- {modality}: WAR {m['war']:.2f}, UAR {m['uar']:.2f}, "
                         f"{m['samples']} samples")
        for layer, by_modality in report["routing"].items():
            for modality, entry in by_modality.items():
                shares = " ".join(f"{s:.2f}" for s in entry["share"])
                lines.append(f"- {layer} {modality}: shares [{shares}], drop "
                             f"{entry['drop_rate']:.3f}, entropy {entry['router_entropy']:.3f}")
        if "transfer" in report:
            lines.append(f"- image ↔ video per-class recall correlation: "
                         f"{report['transfer']['correlation']}")
        lines.append("")
    lines += [f"![{name}]({name})" for name in images]
    if comparison:
        lines += ["", "## Runs compared", "", "| metric | mean | std |", "|---|---|---|"]
        for which in ("last", "best"):
            for key, v in comparison.get(which, {}).items():
                lines.append(f"| {which} {key} | {v['mean']:.2f} | {v['std']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s4d_dist.analyze",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished fine-tuning run folders")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/analysis (one run)")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="the split scored: test (default), or val, the clips that chose "
                             "the best epoch (data.val_shards, or the part of train that "
                             "data.val_fraction holds out)")
    args = parser.parse_args(argv)
    for folder in args.runs:
        if not (folder / "metrics.json").is_file():
            parser.error(f"{folder}: not a finished run folder (no metrics.json)")
    if args.out is None and len(args.runs) > 1:
        parser.error("several runs need --out")
    out = args.out or args.runs[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    reports = [analyze_run(folder, args.split) for folder in args.runs]
    comparison = compare(args.runs) if len(args.runs) > 1 else None
    images = figures(reports[0], out)
    (out / "report.json").write_text(json.dumps(
        json_ready({"runs": reports, "comparison": comparison}), indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(reports, comparison, images))
    print(f"[s4d] analysis written to {out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
