"""Data plane end to end on the torch fallback: synthetic shards in, contract batches out —
mixing, ranks, resumption, folds, chunks, evaluation views, corrupt samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import data_shards as ds
from s4d_dist.data.catalog import open_catalog, shard_paths
from s4d_dist.data.loaders import eval_loader, train_loader
from s4d_dist.data.recipes import Recipe
from s4d_dist.shards import layout
from s4d_dist.shards.synthetic import build_synthetic

BACKEND = "torch"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return ds.build_all(tmp_path_factory.mktemp("shards"))


def epoch_batches(cfg, epoch=0, rank=0, world=1, **kwargs):
    loader = train_loader(cfg, rank, world, backend=kwargs.pop("backend", BACKEND))
    try:
        return list(loader.epoch(epoch)), loader
    finally:
        loader.close()


def test_pretrain_contract(paths):
    cfg = ds.make_cfg(paths, "pretrain")
    batches, loader = epoch_batches(cfg)
    assert len(batches) == loader.steps_per_epoch == sum(loader.counts)
    seen = set()
    for b in batches:
        seen.add(b["modality"])
        x = b["pixels"]
        assert x.dtype == torch.float32 and -2.2 < x.min() and x.max() < 2.7
        if b["modality"] == "image":
            assert x.shape == (4, 3, 32, 32) and b["mask"].shape == (4, 4)
            assert (b["mask"].sum(1) == int(0.9 * 4)).all()
        else:
            assert x.shape == (4, 3, 4, 32, 32) and b["mask"].shape == (4, 8)  # 2 videos × 2 repeats
            assert (b["mask"].sum(1) == int(0.95 * 8)).all()
            assert b["index"][0] == b["index"][1] and not torch.equal(x[0], x[1])  # repeated, re-cropped
        assert b["mask"].dtype == torch.bool and "label" not in b
    assert seen == {"image", "video"}


def test_finetune_contract_and_labels(paths):
    cfg = ds.make_cfg(paths, "finetune", "data.balance_images=true")
    batches, loader = epoch_batches(cfg)
    catalogs = {s.modality: s.plan.catalog for s in loader.streams}
    for b in batches:
        assert b["label"].dtype == torch.int64 and "mask" not in b
        expected = catalogs[b["modality"]].labels[b["index"].numpy()]
        assert b["label"].tolist() == expected.tolist()
        keys = [catalogs[b["modality"]].keys[i] for i in b["index"].tolist()]
        assert b["label"].tolist() == [ds.builder_label(k) for k in keys]  # the builder's own rule
        assert b["pixels"].shape[0] == 4


def test_mixing_follows_official_order(paths):
    cfg = ds.make_cfg(paths, "pretrain", "data.video_rate=0.5")
    batches, loader = epoch_batches(cfg, epoch=2)
    image_batches, video_batches = (s.plan.batches_per_pass for s in loader.streams)
    assert loader.counts == [image_batches, int(video_batches * 0.5)]
    generator = torch.Generator()
    generator.manual_seed(2)
    ids = torch.cat([torch.zeros(loader.counts[0], dtype=torch.int64), torch.ones(loader.counts[1], dtype=torch.int64)])
    expected = ids[torch.randperm(len(ids), generator=generator)]
    assert [b["modality"] for b in batches] == [("image", "video")[i] for i in expected.tolist()]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_steps_disjoint_samples(paths, world):
    cfg = ds.make_cfg(paths, "finetune")
    runs = [epoch_batches(cfg, epoch=1, rank=r, world=world) for r in range(world)]
    lengths = {len(batches) for batches, _ in runs}
    assert len(lengths) == 1  # every rank steps the same number of times
    orders = {tuple(b["modality"] for b in batches) for batches, _ in runs}
    assert len(orders) == 1  # and runs the same modality at each step
    for modality in ("image", "video"):
        per_rank = [ds.gather_indices([b for b in batches if b["modality"] == modality]) for batches, _ in runs]
        total = len(runs[0][1].streams[0 if modality == "video" else 1].plan.catalog)
        padding = -(-total // world) * world - total
        flat = np.concatenate(per_rank)
        assert len(flat) - len(np.unique(flat)) <= padding


def test_resume_mid_epoch_continues_with_next_batch(paths):
    cfg = ds.make_cfg(paths, "pretrain")
    full, _ = epoch_batches(cfg, epoch=1)
    loader = train_loader(cfg, backend=BACKEND)
    state, rest = ds.resume_after(loader, epoch=1, consumed=3)
    assert state == {"epoch": 1, "step": 3}
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest):
        assert a["modality"] == b["modality"]
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["pixels"], b["pixels"])


def test_workers_do_not_change_batches(paths):
    cfg = ds.make_cfg(paths, "finetune", "data.video_rate=0.5", "data.image_rate=0.5")
    serial, _ = epoch_batches(cfg)
    parallel, _ = epoch_batches(ds.make_cfg(paths, "finetune", "data.video_rate=0.5", "data.image_rate=0.5",
                                            "data.workers=2"))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixels"], b["pixels"])


def test_fold_union_read_back(paths):
    root = paths["video"]
    dataset = layout.read_dataset(root)
    assert dataset["folds"]["1"] == {"train": ["part2", "part3"], "test": ["part1"]}
    train = open_catalog(shard_paths(str(root), "train", fold=1))
    test = open_catalog(shard_paths(str(root), "test", fold=1))
    parts = {p: set(open_catalog(layout.split_shards(root, p)).keys) for p in ("part1", "part2", "part3")}
    assert set(train.keys) == parts["part2"] | parts["part3"] and set(test.keys) == parts["part1"]
    assert not set(train.keys) & set(test.keys)
    cfg = ds.make_cfg(paths, "finetune")
    loader = eval_loader(cfg, "test", "video", backend=BACKEND)
    assert set(loader.plan.catalog.keys) == parts["part1"]
    loader.close()


def test_validation_carved_from_train(paths):
    cfg = ds.make_cfg(paths, "finetune", "data.val_fraction=0.3")
    loader = train_loader(cfg, backend=BACKEND)
    train_keys = set(loader.streams[0].plan.catalog.keys)
    val = eval_loader(cfg, "val", "video", backend=BACKEND)
    val_keys = set(val.plan.catalog.keys)
    assert val_keys and not train_keys & val_keys
    assert train_keys | val_keys == set(open_catalog(shard_paths(str(paths["video"]), "train", 1)).keys)
    loader.close(), val.close()


def test_chunked_clips_sample_within_chunk(paths):
    catalog = open_catalog(shard_paths(str(paths["chunked"]), "train"))
    assert len(catalog) == 14 and all("__c" in k for k in catalog.keys)  # 7 clips × 2 chunks
    recipe = Recipe("pretrain", "video", 32, num_frames=4, stride=2)
    rng = np.random.default_rng(0)
    for i in range(len(catalog)):
        meta = catalog.read_meta(i)
        assert meta["frames"] == 6 and meta["clip_frames"] == 12
        assert recipe.sample_params(meta, rng).frames.max() < 6


@pytest.mark.parametrize("world", [1, 2])
def test_eval_views_identify_rows(paths, world):
    cfg = ds.make_cfg(paths, "finetune", "data.test_temporal_views=2", "data.test_spatial_crops=2",
                      "data.sampling_rate=1")  # 8 frames: windows 0-3 and 4-7
    loaders = [eval_loader(cfg, "test", "video", r, world, backend=BACKEND) for r in range(world)]
    results = [list(loader.batches()) for loader in loaders]
    assert len({len(r) for r in results}) == 1
    rows, by_row = [], {}
    for batches in results:
        for b in batches:
            assert b["pixels"].shape[1:] == (3, 4, 32, 32)
            for i in range(len(b["index"])):
                if b["valid"][i]:
                    row = (int(b["index"][i]), int(b["view"][i]))
                    rows.append(row)
                    by_row[row] = b["pixels"][i]
                    assert int(b["label"][i]) == ds.builder_label(b["key"][i])  # the builder's rule
                else:
                    assert b["index"][i] == -1 and b["key"][i] == ""
    n = loaders[0].num_samples
    assert sorted(rows) == [(s, v) for s in range(n) for v in range(4)]
    # Temporal views differ; on square frames at the official scale the two crops coincide.
    assert not torch.equal(by_row[(0, 0)], by_row[(0, 2)])
    assert torch.equal(by_row[(0, 0)], by_row[(0, 1)])
    for loader in loaders:
        loader.close()


def test_eval_crops_differ_above_official_scale(paths):
    cfg = ds.make_cfg(paths, "finetune", "data.eval_short_side=48")
    batch = next(eval_loader(cfg, "test", "video", backend=BACKEND).batches())
    assert batch["view"][:4].tolist() == [0, 1, 2, 3]
    assert not torch.equal(batch["pixels"][0], batch["pixels"][1])


def test_corrupt_samples_skipped_and_counted(paths, tmp_path):
    bad_images = ds.corrupt_copy(paths["image"], tmp_path / "image", "train", {2: "truncate", 9: "header"})
    bad_clips = ds.corrupt_copy(paths["video"], tmp_path / "video", "part2", {1: "truncate"})
    damaged = {"image": tmp_path / "image", "video": tmp_path / "video"}
    cfg = ds.make_cfg(damaged, "finetune")
    loader = train_loader(cfg, backend=BACKEND)
    bad_keys = set(bad_images.values()) | set(bad_clips.values())
    for epoch in range(3):  # the shuffled tail that is dropped differs per epoch
        for b in loader.epoch(epoch):
            assert b["pixels"].shape[0] == 4  # slots refilled, batch size kept
            catalog = loader.streams[0 if b["modality"] == "video" else 1].plan.catalog
            assert not {catalog.keys[i] for i in b["index"].tolist()} & bad_keys
    assert loader.corrupt.count == 3, loader.corrupt.summary()
    assert {e.where.rsplit(":", 1)[1] for e in loader.corrupt.examples} == bad_keys
    assert "truncated JPEG" in loader.corrupt.summary()
    loader.close()
    # Evaluation drops them as invalid rows instead.
    cfg = ds.make_cfg(damaged, "pretrain", f"data.image_shards={damaged['image']}")
    test = eval_loader(cfg, "train", "image", backend=BACKEND)
    valid = sum(int(b["valid"].sum()) for b in test.batches())
    assert valid == test.num_samples - 2 and test.corrupt.count == 2


def test_synthetic_cli_builds_like_a_converter(tmp_path):
    from s4d_dist.shards.__main__ import main

    out = tmp_path / "out"
    argv = ["synthetic", "--root", str(tmp_path / "raw"), "--out", str(out), "--modality", "video",
            "--splits", "a=1,b=1", "--folds", "true", "--size", "32", "--frames", "4", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    assert layout.read_dataset(out)["folds"]["2"] == {"train": ["a"], "test": ["b"]}
    catalog = open_catalog(shard_paths(str(out), "test", fold=2))
    assert len(catalog) == 7 and catalog.modality == "video"
    assert catalog.read_meta(0)["frames"] == 4


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_every_rank_resumes_mid_epoch(paths, task, world):
    # Each rank abandons epoch 1 half-way and resumes from its own state: every rank's
    # remaining batches (indices, labels, masks, pixels) equal its uninterrupted ones.
    cfg = ds.make_cfg(paths, task)
    for rank in range(world):
        full, loader = epoch_batches(cfg, epoch=1, rank=rank, world=world)
        assert len(full) == loader.steps_per_epoch >= 2
        half = len(full) // 2
        state, rest = ds.resume_after(train_loader(cfg, rank, world, backend=BACKEND), epoch=1, consumed=half)
        assert state == {"epoch": 1, "step": half}
        assert len(rest) == len(full) - half, rank
        for a, b in zip(full[half:], rest):
            assert a["modality"] == b["modality"]
            for key in ("index", "pixels", "label" if task == "finetune" else "mask"):
                assert torch.equal(a[key], b[key]), (rank, key)


def test_every_fold_of_a_five_part_dataset(tmp_path):
    # DFEW / MAFW: fold k tests on part k and trains on the other four. The oracle is the part
    # named in each key by the builder ("video_part3_0000012"), not the fold table under test.
    root = tmp_path / "five"
    build_synthetic(root, "video", {f"part{k}": 1 for k in range(1, 6)}, size=16, frames=4,
                    folds=True, video_codec="mjpeg")
    for fold in range(1, 6):
        cfg = ds.make_cfg({"image": root, "video": root}, "finetune", f"data.fold={fold}",
                          "data.image_shards=", "model.img_size=16", "model.patch=8",
                          "data.sampling_rate=1", "data.video_batch_size=2")
        train = train_loader(cfg, backend=BACKEND)
        test = eval_loader(cfg, "test", "video", backend=BACKEND)
        train_parts = {k.split("_")[1] for k in train.streams[0].plan.catalog.keys}
        assert train_parts == {f"part{k}" for k in range(1, 6)} - {f"part{fold}"}
        assert len(train.streams[0].plan.catalog) == 4 * 7
        seen = [test.plan.catalog.keys[i] for b in test.batches() for i in b["index"][b["valid"]].tolist()]
        assert set(seen) == set(test.plan.catalog.keys) and len(test.plan.catalog) == 7
        assert len(seen) == 7 * test.plan.recipe.views  # every view of every clip once
        assert {k.split("_")[1] for k in seen} == {f"part{fold}"}
        train.close(), test.close()
