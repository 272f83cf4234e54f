"""Corrupt samples inside shards: how they are recognised, and the count the trainer logs.

The builder only stores media that decoded, but bytes can still rot afterwards (a truncated
copy, a bad disk block). Such a sample is never allowed to stop or hang training: the loaders
skip it, fill its slot (training: with another sample, eval: marked invalid) and record it
here. Rules of the house: skipped and counted, never silent.

Two levels of checking, because DALI cannot skip: one undecodable sample makes a DALI
pipeline fail as a whole (and the pipeline object is unusable afterwards).
- The structural check is cheap (JPEG start/end markers, decode.check_jpeg; for clips a
  demux that counts packets and checks the markers of MJPEG frames, `check_clip`): both
  backends run it on every sample, DALI before it sees the bytes. It catches truncation, the
  usual corruption, including a zeroed tail that a lenient JPEG decoder would turn into a grey
  image without complaint.
- Full decoding in Python (decode.py) is the ground truth: the torch backend decodes there
  anyway, and the DALI backend uses it to find the culprit when a batch fails despite the
  structural check, then rebuilds its pipeline and goes on (dali_backend.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .catalog import RawSample
from .decode import CorruptSample, check_jpeg, demux

MAX_EXAMPLES = 20


@dataclass(frozen=True)
class CorruptEvent:
    """One corrupt sample: where it is and why it was skipped."""

    index: int
    where: str
    reason: str


@dataclass
class CorruptionLog:
    """How many corrupt samples the loaders met (each sample counted once), grouped by
    reason, with the first few named. The trainer reads `count` / `summary()` to log them."""

    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list[CorruptEvent] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    def record(self, event: CorruptEvent) -> None:
        if event.index in self.seen:
            return
        self.seen.add(event.index)
        self.count += 1
        self.by_reason[event.reason.split(":")[0]] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(event)

    def summary(self) -> str:
        if not self.count:
            return "no corrupt samples"
        reasons = ", ".join(f"{n}× {reason}" for reason, n in self.by_reason.most_common())
        first = "; ".join(f"{e.where} ({e.reason})" for e in self.examples[:3])
        return f"{self.count} corrupt samples skipped: {reasons}; first: {first}"


def check_clip(data: bytes, frames_needed: int) -> None:
    """The container demuxes, holds at least `frames_needed` frames, and MJPEG frames are
    whole JPEGs (no decoding: a demux costs about a millisecond)."""
    codec, packets = demux(data)
    if len(packets) < frames_needed:
        raise CorruptSample(f"truncated clip: {len(packets)} frames, needs {frames_needed}")
    if codec == "mjpeg":
        for packet in packets:
            check_jpeg(packet)


class MediaCheck:
    """The structural check of a loader's samples, run once per sample per process (a clip
    check demuxes; repeating it every epoch would be wasted)."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.passed: set[int] = set()

    def __call__(self, raw: RawSample) -> None:
        if raw.index in self.passed:
            return
        if self.modality == "image":
            check_jpeg(raw.media)
        else:
            check_clip(raw.media, int(raw.meta["frames"]))
        self.passed.add(raw.index)

