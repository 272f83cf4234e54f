"""VoxCeleb2 (unlabelled pre-training videos): `<subset>/mp4/idNNNNN/<youtube id>/NNNNN.mp4`.

There is no list file: the tree is the dataset, so it is walked in sorted order. Anything in it
that does not fit the naming (a stray file, a `.txt` next to the clips) is skipped with a
reason; a tree with no recognisable clip at all means a wrong root, which fails.
"""
from __future__ import annotations

import os
import re

from .base import DatasetSource, SourceFormatError
from .collect import SourceCollector
from .files import Unusable, check_file, relative, safe_key
from .options import as_choice

SPEAKER = re.compile(r"id\d+")
UTTERANCE = re.compile(r"(\d+)\.mp4")
SPLIT_OF_SUBSET = {"dev": "train", "test": "test"}


def find_video_root(root: str, subset: str) -> str:
    """`root/<subset>/mp4`, or `root/mp4` when root already is the subset folder (the official
    code points at `/dev/shm/dev`)."""
    for candidate in (os.path.join(root, subset, "mp4"), os.path.join(root, "mp4")):
        if os.path.isdir(candidate):
            return candidate
    raise SourceFormatError(root, f"unknown VoxCeleb2 layout: neither {subset}/mp4/ nor mp4/ "
                                  "found")


def sorted_entries(folder: str) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                  key=lambda e: e.name)


def read_voxceleb2(root: str, *, subset: str = "dev") -> DatasetSource:
    """Read VoxCeleb2 videos as one unlabelled split: `train` for `dev`, `test` for `test`
    (named like every other dataset's splits, so configs say `train` for pre-training data).

    Keys are `<speaker>_<youtube id>_<utterance>` (`id00012_21Uxsk56VDQ_00001`): speaker and
    utterance ids contain no `_`, so the key is unambiguous even for YouTube ids that do.
    meta: source path, speaker, video, utterance.

    Options:
        subset: `dev` (default) or `test`.
    """
    subset = as_choice(subset, "subset", tuple(SPLIT_OF_SUBSET))
    root = os.path.abspath(root)
    videos = find_video_root(root, subset)
    split = SPLIT_OF_SUBSET[subset]
    out = SourceCollector("voxceleb2", "video", [], splits=[split])
    for speaker in sorted_entries(videos):
        if not (speaker.is_dir() and SPEAKER.fullmatch(speaker.name)):
            out.skip(speaker.path, "not a speaker folder (idNNNNN)")
            continue
        for video in sorted_entries(speaker.path):
            if not video.is_dir():
                out.skip(video.path, "not a video folder")
                continue
            for clip in sorted_entries(video.path):
                match = UTTERANCE.fullmatch(clip.name)
                if not match:
                    out.skip(clip.path, "not an utterance clip (NNNNN.mp4)")
                    continue
                try:
                    check_file(clip.path)
                except Unusable as reason:
                    out.skip(clip.path, str(reason))
                    continue
                out.record(split, safe_key(speaker.name, video.name, match.group(1)), None,
                           "video", (clip.path,),
                           {"source": relative(root, clip.path), "speaker": speaker.name,
                            "video": video.name, "utterance": match.group(1)},
                           clip.path)
    return out.finish(root)
