"""Frame storage (shards/media.py "frames", the default for clips): every frame an independent
JPEG at an offset the shard's frame index records. A window reads and decodes exactly its
frames; the DALI path decodes a whole batch's frames at once and both backends augment them
with the same code; bad input is skipped and counted, a broken shard stops the run naming it,
and `shards verify` finds every problem without training."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data_shards as ds
from s4d_dist import seeds
from s4d_dist.data.catalog import ShardError, open_catalog, shard_paths
from s4d_dist.data.loaders import eval_loader, train_loader
from s4d_dist.data.plan import TrainPlan
from s4d_dist.data.recipes import recipe_from_config
from s4d_dist.shards import layout
from s4d_dist.shards.__main__ import main as shards_main
from s4d_dist.shards.tools import verify_dataset
from s4d_dist.train.cli import exit_code
from s4d_dist.train.faults import EXIT_DATA


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return ds.build_all(tmp_path_factory.mktemp("shards"))


def frames_cfg(paths, task, *extra):
    return ds.make_cfg(paths, task, f"data.video_shards={paths['frames']}", *extra)


def test_the_frame_index_addresses_every_frame(paths):
    catalog = open_catalog(shard_paths(str(paths["frames"]), "part1"))
    assert catalog.frame_storage and not catalog.bad
    mjpeg = open_catalog(shard_paths(str(paths["video"]), "part1"))  # the same clips as MJPEG
    assert catalog.keys == mjpeg.keys
    for sample in range(len(catalog)):
        frames, height, width = catalog.table(np.array([sample]))[0]
        assert (frames, height, width) == (8, 32, 32)
        jpegs = catalog.read_frames(sample, np.arange(frames))
        assert sum(map(len, jpegs)) == catalog.members.media[sample, 1]  # nothing else in the member
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(j))) for j in jpegs])
        from s4d_dist.data.decode import decode_frames
        reference = decode_frames(mjpeg.read(sample).media, np.arange(frames))  # same encoder, same quality
        assert np.array_equal(decoded, reference)


def test_a_window_reads_and_decodes_only_its_frames(paths):
    cfg = frames_cfg(paths, "pretrain", "data.image_shards=")
    loader = train_loader(cfg, backend="dali")
    runner = loader.streams[0].runner
    planned, jpegs, rows = runner.feed((0, 0, 0))
    used = {(slot.index, int(f)) for slot in planned.slots for f in slot.params.frames}
    assert len(jpegs) == len(used)  # one decode per distinct frame of the batch: decoded/used = 1
    assert rows.shape == (len(planned.slots), cfg.model.num_frames)
    catalog = runner.plan.catalog
    table = catalog.table(np.array([s.index for s in planned.slots]))
    read = sum(len(j) for slot in planned.slots for j in slot.payload.jpegs)
    assert read < catalog.members.media[[s.index for s in planned.slots], 1].sum()  # not the whole clips
    assert (table[:, 0] == 8).all()
    loader.close()


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_dali_and_torch_give_the_same_batches(paths, task):
    # Both backends decode the same JPEGs with libjpeg-turbo and run the same pixel ops.
    cfg = frames_cfg(paths, task, "data.image_shards=")
    batches = {}
    for backend in ("dali", "torch"):
        loader = train_loader(cfg, backend=backend)
        batches[backend] = list(loader.epoch(1))
        loader.close()
    assert len(batches["dali"]) == len(batches["torch"]) > 0
    for a, b in zip(batches["dali"], batches["torch"]):
        assert torch.equal(a["index"], b["index"])
        assert a["pixels"].dtype == torch.float32 and a["pixels"].shape == b["pixels"].shape
        assert (a["pixels"] - b["pixels"]).abs().max() < 1e-5


def test_eval_views_of_frame_storage_match_the_mjpeg_clips(paths):
    cfg = frames_cfg(paths, "finetune")
    framed = list(eval_loader(cfg, "test", "video", backend="dali").batches())
    legacy = list(eval_loader(ds.make_cfg(paths, "finetune"), "test", "video", backend="torch").batches())
    assert len(framed) == len(legacy) > 0
    for a, b in zip(framed, legacy):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["view"], b["view"])
        assert (a["pixels"] - b["pixels"]).abs().max() < 1e-5  # same JPEGs, same pixel ops


def test_pretrain_parameters_are_arrays_over_the_batch(paths):
    cfg = frames_cfg(paths, "pretrain", "data.image_shards=")
    recipe = recipe_from_config(cfg, "pretrain", "video")
    plan = TrainPlan(open_catalog(shard_paths(str(paths["frames"]), "train", 1)), recipe, 4, 0, 0, 1)
    _, first = plan.first_params((0, 0, 0))
    again = recipe.batch_params(plan.catalog.table(plan.rows(0, 0)[0]), seeds.batch_rng((0, 0, 0, 0, 0)))
    for a, b in zip(first, again):
        assert np.array_equal(a.rois, b.rois) and np.array_equal(a.frames, b.frames)
    # Row j depends on its position alone: the first two rows of a smaller batch are the same draws.
    table = plan.catalog.table(plan.rows(0, 0)[0])
    two = recipe.batch_params(table[:2], seeds.batch_rng((0, 0, 0, 0, 0)))
    assert not np.array_equal(two[1].rois, first[1].rois)  # shapes, not values, fix the rows
    many = recipe.batch_params(np.tile(table[:1], (4000, 1)), np.random.default_rng(0))
    assert all(p.pre_size.tolist() == [38, 38] and p.region.tolist() == [0, 0, 32, 32] for p in many)
    boxes = np.stack([p.rois for p in many]).reshape(-1, 4)  # whole pixels of the 38 × 38 resized frame
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (38 * 38)
    assert (boxes >= 0).all() and (boxes[:, 2:] <= 38).all() and (boxes == np.round(boxes)).all()
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.4 < area.mean() < 0.65  # ~U(.08, 1) area
    starts = np.array([p.frames[0] for p in many])
    assert set(np.unique(starts)) <= {0, 1}  # 8 frames, window 4 × stride 2: starts 0..1 (official)


def _damage_frame(folder, split, sample, frame, how):
    """Zero the tail of (truncate) one stored frame, in place."""
    catalog = open_catalog(shard_paths(str(folder), split))
    ends = catalog.members.ends[catalog.members.first_part[sample]:][:8]
    start = 0 if frame == 0 else int(ends[frame - 1])
    end = int(ends[frame])
    offset = int(catalog.members.media[sample, 0])
    with open(catalog.tars[int(catalog.members.shard[sample])], "r+b") as f:
        f.seek(offset + end - (end - start) // 3)
        f.write(bytes((end - start) // 3))
    return catalog.keys[sample]


def _shift_frame_index(folder, split, shard=0):
    """Make the first sample's last frame end past its member (a frame index that disagrees)."""
    tar = shard_paths(str(folder), split)[shard]
    path = layout.frame_index_path(tar)
    table, ends = layout.read_frame_index(path)
    ends = ends.copy()
    ends[table[0, 0] - 1] += 1000
    rows = [(int(t[1]), int(t[2]), int(t[3]), ends[a:a + t[0]].tolist())
            for t, a in zip(table, np.concatenate([[0], np.cumsum(table[:, 0])[:-1]]))]
    with open(path, "wb") as f:
        f.write(layout.encode_frame_index(rows))
    return open_catalog([tar]).keys[0]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_truncated_frame_and_a_wrong_offset_are_skipped_and_counted(paths, tmp_path, backend):
    damaged = tmp_path / "frames"
    shutil.copytree(paths["frames"], damaged)
    truncated = _damage_frame(damaged, "part2", 1, 3, "truncate")
    shifted = _shift_frame_index(damaged, "part3")
    cfg = ds.make_cfg(paths, "pretrain", f"data.video_shards={damaged}", "data.image_shards=",
                      "data.sampling_rate=1")  # windows of frames 0..3 or later: frame 3 is read
    loader = train_loader(cfg, backend=backend)
    seen = set()
    for epoch in range(3):
        for batch in loader.epoch(epoch):
            catalog = loader.streams[0].plan.catalog
            seen |= {catalog.keys[i] for i in batch["index"].tolist()}
    assert not seen & {truncated, shifted}
    assert loader.corrupt.count == 2, loader.corrupt.summary()
    reasons = loader.corrupt.summary()
    assert "truncated JPEG" in reasons and "frame index disagrees" in reasons
    loader.close()


def test_a_broken_frame_index_stops_the_run_naming_the_shard(paths, tmp_path):
    broken = tmp_path / "frames"
    shutil.copytree(paths["frames"], broken)
    tar = shard_paths(str(broken), "part2")[0]  # fold 1 trains on parts 2 and 3
    path = layout.frame_index_path(tar)
    table, ends = layout.read_frame_index(path)
    rows = [(int(t[1]), int(t[2]), int(t[3]), ends[a:a + t[0]].tolist())
            for t, a in zip(table, np.concatenate([[0], np.cumsum(table[:, 0])[:-1]]))]
    with open(path, "wb") as f:
        f.write(layout.encode_frame_index(rows[:-1]))  # a sample fewer than the tar's index
    cfg = ds.make_cfg(paths, "pretrain", f"data.video_shards={broken}", "data.image_shards=")
    with pytest.raises(ShardError, match=str(path)) as stopped:
        train_loader(cfg)
    assert exit_code(stopped.value) == EXIT_DATA and "\n" not in str(stopped.value)


def test_verify_finds_every_problem(paths, tmp_path, capsys):
    assert verify_dataset(paths["frames"], progress=False)["ok"]
    damaged = tmp_path / "frames"
    shutil.copytree(paths["frames"], damaged)
    truncated = _damage_frame(damaged, "part2", 1, 3, "truncate")
    shifted = _shift_frame_index(damaged, "part3")
    missing = layout.frame_index_path(shard_paths(str(damaged), "part1")[0])
    (damaged / "part1" / missing.rsplit("/", 1)[1]).unlink()
    report = verify_dataset(damaged, progress=False)
    problems = {split: entry["shards"] + entry["samples"] for split, entry in report["splits"].items()}
    assert not report["ok"]
    assert any(truncated in p and "marker" in p for p in problems["part2"]), problems["part2"]
    assert any(shifted in p and "outside" in p for p in problems["part3"]), problems["part3"]
    assert any("frame index" in p and missing.rsplit("/", 1)[1] in p for p in problems["part1"]), problems["part1"]
    assert shards_main(["verify", str(damaged)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_clips_stored_cut_are_not_cut_again(tmp_path):
    # VoxCeleb2 for pre-training is stored cut to the preset's source crop (160 × 160 of 224 ×
    # 224): the loader reads the stored frames as they are; another cut in the config is refused.
    from s4d_dist.shards.build import BuildOptions, build_dataset
    from s4d_dist.shards.media import EncodeOptions
    from s4d_dist.shards.synthetic import read_synthetic

    source = read_synthetic(str(tmp_path / "raw"), modality="video", splits={"train": 1}, size=40, frames=8)
    build_dataset(source, tmp_path / "cut", BuildOptions(EncodeOptions(video_crop=(4, 6, 36, 38)), 1 << 20, 1),
                  progress=False)
    catalog = open_catalog(shard_paths(str(tmp_path / "cut"), "train"))
    assert catalog.stored_crop == [4, 6, 36, 38] and (catalog.table(np.arange(len(catalog)))[:, 1:] == 32).all()
    assert catalog.read_meta(0)["crop"] == [4, 6, 36, 38]
    paths = {"image": tmp_path, "video": tmp_path / "cut"}
    same = ds.make_cfg(paths, "pretrain", "data.image_shards=", "data.fold=null", "data.video_source_crop=[4,6,36,38]",
                       "data.video_source_frame=[40,40]")
    loader = train_loader(same, backend="torch")
    assert loader.streams[0].recipe.source_crop is None
    assert next(iter(loader.epoch(0)))["pixels"].shape[-1] == 32
    loader.close()
    other = ds.make_cfg(paths, "pretrain", "data.image_shards=", "data.fold=null", "data.video_source_crop=[0,0,32,32]",
                        "data.video_source_frame=[40,40]")
    with pytest.raises(ValueError, match=r"stored cut to \[4, 6, 36, 38\]"):
        train_loader(other)
