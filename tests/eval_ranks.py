"""Evaluate seeded tiny classifiers (without and with MoAE) on the test split of `shards` with
however many ranks this was launched with (torchrun, or one plain process) and write, from rank
0, the metrics and the merged per-sample probabilities to OUT/<variant>.npz. Used by
test_evaluate_ranks.py.

    torchrun --standalone --nproc_per_node 2 tests/eval_ranks.py SHARDS OUT
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import data_shards as ds  # noqa: E402
from s4d_dist.data.loaders import eval_loader  # noqa: E402
from s4d_dist.models.factory import build_classifier  # noqa: E402
from s4d_dist.train import distributed  # noqa: E402
from s4d_dist.train.evaluate import evaluate, predict  # noqa: E402
from s4d_dist.train.metrics import merge_views  # noqa: E402

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.moae.layers=[1]",
        "model.moae.num_experts=2", "model.moae.top_k=1", "data.eval_batch_size=5"]


VARIANTS = {"plain": ["model.moae.enabled=false"], "moae": []}


def main(shards: Path, out: Path) -> None:
    distributed.init()
    for variant, overrides in VARIANTS.items():
        evaluate_variant(shards, out / f"{variant}.npz", overrides)


def evaluate_variant(shards: Path, out: Path, overrides: list[str]) -> None:
    paths = {"image": shards / "image", "video": shards / "video"}
    cfg = ds.make_cfg(paths, "finetune", *TINY, *overrides)
    torch.manual_seed(0)
    model = build_classifier(cfg)
    loader = eval_loader(cfg, "test", "video", distributed.rank(), distributed.world_size(), backend="torch")
    metrics = evaluate(model, loader, cfg.model.num_video_classes, torch.float32)
    rows = {k: distributed.gather_arrays(v) for k, v in predict(model, loader, torch.float32).items()}
    ids, probs, labels = merge_views(rows["index"], rows["view"], rows["probs"].reshape(len(rows["index"]), -1),
                                     rows["label"])
    if distributed.rank() == 0:
        np.savez(out, ids=ids, probs=probs, labels=labels, metrics=json.dumps(metrics),
                 num_samples=loader.num_samples)
    distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
