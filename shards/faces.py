"""Where the face is: the square an image or clip is cut to, for the shards and for predict.

The models are trained on face crops (the datasets ship them, the shards store them), so a
whole photo or video frame must be cut down first: by `shards ... --face-crop` when the shards
are built, by `predict --face-detect` when a model scores it. Without a detector the cut is the
largest centred square — right for inputs that already are face crops and for centred talking
heads. OpenCV's Haar cascade (its weights ship inside the `opencv-python-headless` wheel:
`pip install s4d_dist[face]`) finds the face on a few frames and the clip is cut to one square
around the median box, enlarged by a margin to include the chin and brows as the datasets'
crops do. One box for the whole clip, like the datasets' crops, so a face that moves a little
stays a steady crop.

Boxes are (top, left, bottom, right) in pixels, bottom and right exclusive; `xyxy` gives the
(left, top, right, bottom) order that outputs report.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), pixels

CASCADE = "haarcascade_frontalface_default.xml"
DETECT_FRAMES = 5   # frames looked at per clip, evenly spread
MARGIN = 1.25       # side of the crop / side of the detected box


def xyxy(box: Box) -> list[int]:
    """[left, top, right, bottom]: a box in the order image tools (Pillow, OpenCV) use."""
    top, left, bottom, right = box
    return [left, top, right, bottom]


def centre_box(height: int, width: int) -> Box:
    """The largest centred square."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return top, left, top + side, left + side


def square_around(box: tuple[float, float, float, float], height: int, width: int,
                  margin: float = MARGIN) -> Box:
    """A square `margin` times the box's larger side, on the box's centre, moved (not shrunk)
    to stay inside the frame; shrunk only if the frame is smaller than the square."""
    y0, x0, y1, x1 = box
    side = min(round(max(y1 - y0, x1 - x0) * margin), height, width)
    top = int(np.clip(round((y0 + y1 - side) / 2), 0, height - side))
    left = int(np.clip(round((x0 + x1 - side) / 2), 0, width - side))
    return top, left, top + side, left + side


class FaceDetector:
    """OpenCV's frontal-face Haar cascade, one per thread: a CascadeClassifier used by two
    threads at once aborts the process."""

    def __init__(self) -> None:
        try:
            import cv2
        except ImportError:
            raise ImportError("face detection needs OpenCV: pip install 's4d_dist[face]' "
                              "(opencv-python-headless)") from None
        self.cv2 = cv2
        self.path = cv2.data.haarcascades + CASCADE
        self.local = threading.local()
        if self.cascade.empty():
            raise ImportError(f"OpenCV found no {CASCADE} in {cv2.data.haarcascades}")

    @property
    def cascade(self):
        if not hasattr(self.local, "cascade"):
            self.local.cascade = self.cv2.CascadeClassifier(self.path)
        return self.local.cascade

    def _largest(self, frame: np.ndarray) -> tuple[float, float, float, float] | None:
        gray = self.cv2.equalizeHist(self.cv2.cvtColor(frame, self.cv2.COLOR_RGB2GRAY))
        minimum = max(24, min(gray.shape) // 10)
        faces = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                              minSize=(minimum, minimum))
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        return float(y), float(x), float(y + h), float(x + w)

    def box(self, frames: np.ndarray) -> Box | None:
        """The crop of a clip (T, H, W, 3): a square around the median face over a few frames,
        or None when no frame shows a face."""
        picks = np.unique(np.linspace(0, len(frames) - 1, DETECT_FRAMES).round().astype(int))
        found = [b for b in (self._largest(frames[i]) for i in picks) if b is not None]
        if not found:
            return None
        return square_around(tuple(np.median(np.array(found), axis=0)), *frames.shape[1:3])


@functools.cache
def detector() -> FaceDetector:
    """The process's detector (its cascades are per thread): for code that has no object to keep
    one in, such as the shard builder's worker processes."""
    return FaceDetector()


def opencv_version() -> str:
    """The version of the OpenCV that detects faces (it decides the crops: part of a shard
    build's fingerprint)."""
    return detector().cv2.__version__
