"""Timeline windows (`predict --window --stride`): which frames of a clip each window scores.

Windows are cut in frames; a length in seconds becomes frames at the clip's frame rate, and a
window's times are its frames over that rate, so the times reported are those of the frames
scored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One timeline window of a clip: frames [start_frame, end_frame), and the times they are at
    when the clip has a frame rate."""

    index: int
    start_frame: int
    end_frame: int
    fps: float | None = None

    @property
    def start(self) -> float | None:
        return None if not self.fps else round(self.start_frame / self.fps, 3)

    @property
    def end(self) -> float | None:
        return None if not self.fps else round(self.end_frame / self.fps, 3)


@dataclass(frozen=True)
class Timeline:
    """Windows `window` long, one every `stride`, both in seconds (`seconds`) or in frames."""

    window: float
    stride: float
    seconds: bool

    @classmethod
    def parse(cls, window: str, stride: str | None = None) -> Timeline:
        """From `--window` / `--stride` text: "2s", "0.5s" (seconds) or "48" (frames); the
        stride defaults to the window. ValueError saying what is wrong."""
        stride = stride or window
        values = []
        for name, text in (("--window", window), ("--stride", stride)):
            match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s?)\s*", text)
            if not match or float(match[1]) <= 0:
                raise ValueError(f"{name} {text!r}: give seconds (2s, 0.5s) or frames (48)")
            if not match[2] and not float(match[1]).is_integer():
                raise ValueError(f"{name} {text!r}: frames are whole numbers (or add s)")
            values.append((float(match[1]), bool(match[2])))
        (window_value, in_seconds), (stride_value, stride_seconds) = values
        if in_seconds != stride_seconds:
            raise ValueError(f"--window {window!r} and --stride {stride!r}: give both in "
                             "seconds or both in frames")
        return cls(window_value, stride_value, in_seconds)

    def windows(self, frames: int, fps: float | None) -> list[Window]:
        """A window starts every stride while it ends before the clip does; the last one ends
        with the clip (started earlier if need be, so that every window is as long; a clip
        shorter than a window is one window). ValueError when the timeline is in seconds and
        the clip has no frame rate."""
        if self.seconds:
            if not fps:
                raise ValueError("no frame rate, so no timeline in seconds: give --fps for frame "
                                 "folders, or --window/--stride in frames")
            size, step = max(1, round(self.window * fps)), max(1, round(self.stride * fps))
        else:
            size, step = int(self.window), int(self.stride)
        starts = list(range(0, max(frames - size, 0), step))
        starts.append(max(frames - size, 0))
        return [Window(k, start, min(start + size, frames), fps)
                for k, start in enumerate(starts)]
