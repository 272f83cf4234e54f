"""A clip is one clip whatever its storage chunks (issue 26 item 1): clips longer than
`--chunk-frames` are stored as several samples, but evaluation scores each clip once with its
temporal views spread over the whole clip, metrics count clips, and training draws each clip as
often as any other (a clip, then a window within it), as the official sampler does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import data_shards as ds
from s4d_dist.data.catalog import open_catalog, shard_paths
from s4d_dist.data.loaders import eval_loader, train_loader
from s4d_dist.data.plan import EvalPlan, TrainPlan
from s4d_dist.data.recipes import eval_view_indices, recipe_from_config
from s4d_dist.shards.synthetic import build_synthetic
from s4d_dist.train.evaluate import evaluate

CLIPS, FRAMES, CHUNK = 7, 24, 9  # 24-frame clips in chunks of at most 9: 3 chunks (8 + 8 + 8)


@pytest.fixture(scope="module", params=["frames", "vp9"])
def chunked(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    build_synthetic(root / "video", "video", {"train": 1, "test": 1}, size=32, frames=FRAMES, chunk_frames=CHUNK,
                    video_codec=request.param)
    build_synthetic(root / "image", "image", {"train": 1, "test": 1}, size=32)
    return {"video": root / "video", "image": root / "image"}


def cfg_for(paths, task, *extra):
    return ds.make_cfg(paths, task, f"data.video_shards={paths['video']}", "data.fold=null",
                       "data.sampling_rate=2", "data.test_temporal_views=2", "data.test_spatial_crops=2", *extra)


def test_the_catalog_groups_chunks_into_clips(chunked):
    catalog = open_catalog(shard_paths(str(chunked["video"]), "test"))
    clips = catalog.clips
    assert len(catalog) == 3 * CLIPS and len(clips.keys) == CLIPS and clips.chunked
    assert all("__c" not in key for key in clips.keys)
    for clip in range(CLIPS):
        samples = clips.samples(clip)
        assert [catalog.keys[s] for s in samples] == [f"{clips.keys[clip]}__c{c:03d}" for c in range(3)]
        assert clips.start[samples].tolist() == [0, 8, 16] and clips.frames[clip] == FRAMES


def test_evaluation_scores_each_clip_once_with_views_over_the_whole_clip(chunked):
    cfg = cfg_for(chunked, "finetune")
    loader = eval_loader(cfg, "test", "video", backend="torch")
    assert loader.num_samples == CLIPS
    plan: EvalPlan = loader.plan
    clips, catalog = catalog_clips(plan)
    # The official test's temporal views over the 24-frame clip: strided frames 0, 2, ..., 22,
    # windows of 4 at the first and the last start — in the first chunk and in the last.
    expected = eval_view_indices(FRAMES, 4, 2, 2)
    for clip in range(CLIPS):
        chunk_of_view = []
        for view in range(4):
            sample, params = plan.params(clip, view)
            chunk_of_view.append(int(np.flatnonzero(clips.samples(clip) == sample)[0]))
            whole = params.frames + clips.start[sample]
            assert np.array_equal(whole, expected[view // 2])
        assert chunk_of_view[0] == 0 and chunk_of_view[-1] == 2  # views spread over the whole clip
    rows = []
    for batch in loader.batches():
        valid = batch["valid"].numpy()
        rows += list(zip(batch["index"].numpy()[valid].tolist(), batch["view"].numpy()[valid].tolist(),
                         [k for k, v in zip(batch["key"], valid) if v]))
    assert sorted((i, v) for i, v, _ in rows) == [(c, v) for c in range(CLIPS) for v in range(4)]
    assert {k for _, _, k in rows} == set(clips.keys)
    loader.close()

    class Guess(nn.Module):  # any model: the denominators are what is checked
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, pixels, modality):
            return pixels.flatten(1)[:, :7].float() * self.scale

    loader = eval_loader(cfg, "test", "video", backend="torch")
    metrics = evaluate(Guess(), loader, 7, torch.float32)
    loader.close()
    assert metrics["samples"] == metrics["clips"] == CLIPS  # one row per clip, 3 chunks each


def catalog_clips(plan):
    return plan.catalog.clips, plan.catalog


def test_training_draws_each_clip_once_per_epoch(chunked):
    cfg = cfg_for(chunked, "finetune", "data.image_shards=", "data.video_batch_size=2")
    recipe = recipe_from_config(cfg, "finetune", "video")
    catalog = open_catalog(shard_paths(str(chunked["video"]), "train"))
    plan = TrainPlan(catalog, recipe, 2, 0, 0, 1)
    assert plan.batches_per_pass == CLIPS // 2  # clips, not the 21 chunks
    draws = np.zeros(CLIPS, int)
    chunk_draws = np.zeros(3, int)
    for epoch in range(30):
        in_epoch = []
        for position in range(plan.batches_per_pass):
            mine, _ = plan.candidates((epoch, 0, position))
            samples, params = plan.first_params((epoch, 0, position))
            for clip, sample, p in zip(mine, samples, params):
                draws[clip] += 1
                in_epoch.append(int(clip))
                assert catalog.clips.of_sample[sample] == clip  # the window is in one of its chunks
                assert p.frames.max() < catalog.table(np.array([sample]))[0, 0]
                chunk_draws[int(np.flatnonzero(catalog.clips.samples(clip) == sample)[0])] += 1
        assert len(in_epoch) == len(set(in_epoch))  # no clip twice in an epoch, whatever its chunks
    per_epoch = plan.batches_per_pass * 2
    assert draws.sum() == 30 * per_epoch and draws.min() > 0  # every clip, the dropped tail rotating
    assert (chunk_draws > 0).all()  # windows anywhere in the clip
    loader = train_loader(cfg, backend="torch")
    batches = list(loader.epoch(0))
    loader.close()
    drawn = [int(catalog.clips.of_sample[i]) for b in batches for i in b["index"].tolist()]
    assert len(drawn) == len(set(drawn)) == per_epoch


def test_a_window_across_a_chunk_boundary_moves_into_one_chunk(chunked):
    from s4d_dist.data.plan import locate
    from s4d_dist.data.recipes import SampleParams

    catalog = open_catalog(shard_paths(str(chunked["video"]), "train"))
    clips = catalog.clips
    window = SampleParams(np.zeros((1, 4), np.float32), frames=np.array([6, 8, 10, 12]))  # chunks at 0, 8, 16
    sample, moved = locate(catalog, 0, window)
    assert sample == clips.samples(0)[1]  # the chunk holding the middle frame (10)
    assert (moved.frames + clips.start[sample]).tolist() == [8, 10, 12, 14]  # moved by 2 frames, within it
