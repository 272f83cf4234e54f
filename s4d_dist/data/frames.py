"""Which frames of a clip a sample uses: the official temporal sampling rules as pure functions.

Both backends (DALI and the torch fallback) call these, so a clip yields the same frame indices
whichever decodes it. Indices are relative to the stored sample: a long video is stored in
chunks (shards/media.py), a sample is one chunk, and sampling never leaves it.
"""
from __future__ import annotations

import numpy as np


def pretrain_indices(n_frames: int, num_frames: int, stride: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Pre-training window (docs/method.md §1.8; official path_dataset.py): `num_frames` frames
    `stride` apart.

    A clip of at least one window (num_frames · stride frames) starts uniformly in
    {0 .. n − window}; a shorter clip starts at 0 and repeats its last frame on the stride grid
    (the last *reachable* frame, not the last frame) to fill the window.

    The official loader (1-based offsets, `offset + step < duration`) stops one stride early
    when the clip's last frame is itself on the grid (n − 1 divisible by the stride); here that
    frame is reachable, as the rule intends.
    """
    window = num_frames * stride
    start = int(rng.integers(0, n_frames - window + 1)) if n_frames >= window else 0
    last_reachable = start + ((n_frames - 1 - start) // stride) * stride
    return np.minimum(start + stride * np.arange(num_frames), last_reachable).astype(np.int64)


def finetune_indices(n_frames: int, num_frames: int, stride: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Fine-tuning training window (docs/method.md §2.10; official kinetics.py `loadvideo_decord`,
    one segment).

    With W = num_frames · stride: a clip longer than W takes `num_frames` points of
    linspace(end − W, end) for end uniform in {W .. n − 1} (spacing W/(num_frames−1), so about
    4.27 for stride 4, not 4), truncated to integers and clipped to end − 1. A clip of at most W
    frames takes linspace(0, n, n // stride) padded with n to num_frames, clipped to n − 1: the
    whole clip, then its last frame repeated.
    """
    window = num_frames * stride
    if n_frames > window:
        end = int(rng.integers(window, n_frames))
        index = np.linspace(end - window, end, num=num_frames)
        return np.clip(index, end - window, end - 1).astype(np.int64)
    count = n_frames // stride
    index = np.concatenate([np.linspace(0, n_frames, num=count), np.full(num_frames - count, n_frames)])
    return np.clip(index, 0, n_frames - 1).astype(np.int64)


def eval_view_indices(n_frames: int, num_frames: int, stride: int, views: int) -> np.ndarray:
    """Test-time temporal views (docs/method.md §2.11; official kinetics.py test mode):
    (views, num_frames) indices.

    Every `stride`-th frame of the clip (padded with its last to at least `num_frames`), then
    view v takes `num_frames` consecutive ones from int(v · (K − num_frames) / (views − 1)):
    for 2 views the first and the last window, {0, K − num_frames} in strided frames. One view
    takes the middle window (the official code divides by zero there).
    """
    strided = np.arange(0, n_frames, stride)
    if len(strided) < num_frames:
        strided = np.concatenate([strided, np.full(num_frames - len(strided), strided[-1])])
    spare = len(strided) - num_frames
    if views == 1:
        starts = [spare // 2]
    else:
        starts = [int(v * (spare / (views - 1))) for v in range(views)]
    return np.stack([strided[s:s + num_frames] for s in starts]).astype(np.int64)
