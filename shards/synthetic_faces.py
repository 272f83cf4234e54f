"""Procedural expressive faces: images and short videos that stand in for real FER data.

No face dataset can be downloaded where this project is built and tested, yet the demo, the tests
and the benchmarks need images and clips that behave like facial-expression data: the class must
live in small facial details (mouth, brows, eyes, wrinkles) while most pixel variance comes from
things that carry no label (who the person is, where the face sits, background, lighting). This
generator draws exactly that, so that a nearest-class-mean on raw pixels sits near chance while a
small CNN learns the task; tests/test_synthetic.py holds it to both.

Everything is implicit shapes on a pixel grid: each facial part is a signed distance (negative
inside) in *face coordinates* (origin at the face centre, face half-height 1, y pointing down),
turned into anti-aliased coverage and alpha-blended onto the canvas. Moving, scaling or rotating
the head is just a different map from pixels to face coordinates, which is what makes video
frames cheap and smooth.

Determinism: a sample is a pure function of `sample_seed(base_seed, split, index)`, so sample i of
a split is identical whichever worker renders it and however many workers there are.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

AFFECTNET7: tuple[str, ...] = (
    "Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger",
)
"""Class names in AffectNet-7 order; `render_image`/`render_clip` labels index this tuple."""

Modality = Literal["image", "video"]
Framing = Literal["scene", "aligned"]


# --------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expression:
    """Displacements of the facial parts from the person's resting face, in face units.

    All zeros is the neutral face, and every field acts linearly, so a video ramps from neutral
    to apex by scaling one `Expression` (`scaled`). The fields loosely follow FACS action units,
    which is what lets neighbouring classes share parts (fear and surprise both raise the brows
    and widen the eyes) and differ only in a few of them.
    """

    mouth_curve: float = 0.0    # corner lift: + smile, - frown
    mouth_open: float = 0.0     # lip separation at the centre
    mouth_width: float = 0.0    # relative change of the mouth half-width: + stretched, - rounded
    lip_raise: float = 0.0      # upper lip pulled up at its centre, baring teeth (sneer)
    teeth: float = 0.0          # opacity of the upper teeth inside an open mouth
    brow_raise: float = 0.0     # both brows up (+) or down (-)
    brow_inner: float = 0.0     # inner ends up (+, sad / fear slant) or down (-, anger V)
    brow_squeeze: float = 0.0   # inner ends pulled toward the midline
    eye_open: float = 0.0       # relative change of the lid aperture: + wide, - narrowed
    cheek_raise: float = 0.0    # lower lid pushed up from below (smile, disgust)
    nose_wrinkle: float = 0.0   # opacity of wrinkles across the nose bridge
    cheek_lines: float = 0.0    # opacity of nasolabial folds
    furrow: float = 0.0         # opacity of vertical lines between the brows

    def scaled(self, k: float) -> Expression:
        """The same expression at intensity `k` (0 = neutral, 1 = this expression)."""
        return Expression(**{f.name: getattr(self, f.name) * k for f in fields(self)})


# Apex of each class at full intensity. Magnitudes are tuned so that the classes are separable
# by shape but change few pixels: see the module docstring and the learnability tests.
_PROTOTYPES: dict[str, Expression] = {
    "Neutral": Expression(),
    "Happiness": Expression(mouth_curve=0.26, mouth_open=0.1, mouth_width=0.3, teeth=1.0,
                            eye_open=-0.35, cheek_raise=0.6, cheek_lines=0.9),
    "Sadness": Expression(mouth_curve=-0.16, mouth_width=-0.1, brow_raise=0.02,
                          brow_inner=0.16, brow_squeeze=0.03, eye_open=-0.35, furrow=0.3),
    "Surprise": Expression(mouth_open=0.28, mouth_width=-0.38, brow_raise=0.16, eye_open=0.7),
    "Fear": Expression(mouth_curve=-0.04, mouth_open=0.11, mouth_width=0.28, teeth=0.7,
                       brow_raise=0.1, brow_inner=0.08, brow_squeeze=0.04, eye_open=0.6,
                       furrow=0.5),
    "Disgust": Expression(mouth_curve=-0.06, lip_raise=0.08, mouth_width=-0.05, teeth=1.0,
                          brow_raise=-0.06, brow_inner=-0.05, brow_squeeze=0.03,
                          eye_open=-0.45, cheek_raise=0.3, nose_wrinkle=1.0, cheek_lines=0.2),
    "Anger": Expression(mouth_curve=-0.04, mouth_width=-0.2, brow_raise=-0.08,
                        brow_inner=-0.18, brow_squeeze=0.05, eye_open=-0.3, cheek_raise=0.2,
                        nose_wrinkle=0.3, furrow=1.0),
}


def sample_expression(rng: np.random.Generator, label: int) -> Expression:
    """Apex expression for AffectNet-7 class `label`, with per-sample intensity and style.

    Intensity scales the whole prototype (weak expressions of neighbouring classes overlap) and
    each part gets its own jitter, so no two samples of a class share an exact geometry. Neutral
    faces get small random displacements of the same kind, so "neutral" is a region, not a point.
    """
    name = AFFECTNET7[label]
    prototype = _PROTOTYPES[name]
    intensity = rng.uniform(0.6, 1.0)
    values = {f.name: getattr(prototype, f.name) * intensity * (1.0 + 0.2 * rng.standard_normal())
              for f in fields(prototype)}
    if name == "Neutral":
        values.update(mouth_curve=0.015 * rng.standard_normal(),
                      brow_raise=0.012 * rng.standard_normal(),
                      eye_open=0.08 * rng.standard_normal())
    elif name == "Happiness" and rng.random() < 0.3:
        values.update(mouth_open=0.0, teeth=0.0)              # closed-mouth smile
    elif name == "Anger" and rng.random() < 0.35:
        values.update(mouth_open=rng.uniform(0.06, 0.12), teeth=0.9, mouth_width=0.05)  # shouting
    return Expression(**values)


# --------------------------------------------------------------------------------------------
# Identity: everything that stays fixed across a clip
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pose:
    """Where the face sits in the frame: centre in normalised image coordinates ([-1, 1], y
    down), face half-height as a fraction of the image half-size, and roll in radians."""

    cx: float
    cy: float
    scale: float
    roll: float


@dataclass(frozen=True)
class Identity:
    """A person, their resting geometry, and the scene they are filmed in."""

    # face shape and colours
    face_width: float           # horizontal semi-axis of the face (the vertical one is 1)
    jaw_taper: float            # how much the lower face narrows toward the chin
    skin: np.ndarray            # (3,) RGB, 0..255
    lips: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    hair_style: int             # 0 bald, 1 short, 2 long
    hairline: float             # y of the hairline at the midline
    # resting positions of the parts
    eye_x: float
    eye_y: float
    eye_width: float
    eye_aperture: float
    brow_y: float
    brow_thickness: float
    brow_arch: float
    nose_y: float
    mouth_y: float
    mouth_width: float
    lip_thickness: float
    gaze: float
    # scene
    pose: Pose
    background: np.ndarray      # (g, g, 3) low-resolution colour field, upsampled at render time
    clutter: np.ndarray         # (k, 7): kind, centre x, y, half sizes x, y, angle, opacity
    clutter_colors: np.ndarray  # (k, 3) RGB
    light_angle: float
    light_strength: float
    brightness: float
    noise: float


_HAIR_COLORS = np.array([[25, 20, 18], [70, 45, 30], [130, 90, 50], [200, 170, 110],
                         [150, 150, 150], [110, 35, 20]], float)
_IRIS_COLORS = np.array([[60, 40, 25], [40, 80, 120], [70, 100, 60], [30, 25, 20]], float)


def sample_identity(rng: np.random.Generator, framing: Framing = "scene") -> Identity:
    """Draw a person and a scene. Ranges are wide on purpose: identity, framing, background and
    lighting must dominate pixel variance so that the label is not readable from raw pixels.

    `framing="aligned"` frames the face the way face datasets ship it (a detector's crop after
    alignment: centred, upright, filling most of the frame, a little jitter), which is what a
    model sees in DFEW, MAFW or AffectNet; "scene" places it anywhere in a larger picture.
    """
    tone = rng.uniform()
    skin = (1 - tone) * np.array([238, 205, 178]) + tone * np.array([92, 58, 40])
    skin = skin * rng.uniform(0.92, 1.08, 3)
    lips = 0.5 * skin + np.array([75.0, 22, 28])   # redder and darker than any skin tone
    hair = _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))] * rng.uniform(0.8, 1.2)
    iris = _IRIS_COLORS[rng.integers(len(_IRIS_COLORS))]

    face_width = rng.uniform(0.66, 0.84)
    grid = int(rng.integers(2, 7))
    base = rng.uniform(20, 235, 3)
    background = np.clip(base + rng.normal(0, rng.uniform(10, 70), (grid, grid, 3)), 0, 255)
    n_clutter = int(rng.integers(0, 7))
    clutter = np.column_stack([
        rng.integers(0, 3, n_clutter),                  # 0 disc, 1 box, 2 stripe
        rng.uniform(-1.1, 1.1, (n_clutter, 2)),
        rng.uniform(0.08, 0.5, (n_clutter, 2)),
        rng.uniform(-np.pi, np.pi, n_clutter),
        rng.uniform(0.3, 1.0, n_clutter),               # opacity
    ])
    scale = rng.uniform(0.6, 0.85)
    room = 1.0 - 0.8 * scale
    return Identity(
        face_width=face_width,
        jaw_taper=rng.uniform(0.05, 0.35),
        skin=skin, lips=lips, hair=hair, iris=iris,
        hair_style=int(np.searchsorted([0.1, 0.6], rng.uniform())),  # bald 10%, short 50%, long
        hairline=rng.uniform(-0.72, -0.5),
        eye_x=face_width * rng.uniform(0.38, 0.46),
        eye_y=rng.uniform(-0.17, -0.07),
        eye_width=rng.uniform(0.15, 0.19),
        eye_aperture=rng.uniform(0.06, 0.08),
        brow_y=rng.uniform(-0.42, -0.36),
        brow_thickness=rng.uniform(0.035, 0.05),
        brow_arch=rng.uniform(0.0, 0.04),
        nose_y=rng.uniform(0.17, 0.25),
        mouth_y=rng.uniform(0.44, 0.52),
        mouth_width=rng.uniform(0.28, 0.34),
        lip_thickness=rng.uniform(0.03, 0.045),
        gaze=rng.uniform(-0.03, 0.03),
        pose=_frame(Pose(cx=rng.uniform(-room, room), cy=rng.uniform(-room, room) * 0.8,
                         scale=scale, roll=rng.uniform(-0.2, 0.2)), framing),
        background=background,
        clutter=clutter,
        clutter_colors=rng.uniform(0, 255, (n_clutter, 3)),
        light_angle=rng.uniform(-np.pi, np.pi),
        light_strength=rng.uniform(0.0, 0.4),
        brightness=rng.uniform(0.7, 1.25),
        noise=rng.uniform(1.0, 7.0),
    )


def _frame(scene_pose: Pose, framing: Framing) -> Pose:
    """The scene pose, or the aligned crop derived from the same draws (same RNG stream)."""
    if framing == "scene":
        return scene_pose
    if framing != "aligned":
        raise ValueError(f"framing must be 'scene' or 'aligned', got {framing!r}")
    return Pose(cx=0.1 * scene_pose.cx, cy=0.1 * scene_pose.cy,
                scale=0.95 + 0.2 * (scene_pose.scale - 0.725), roll=0.25 * scene_pose.roll)


# --------------------------------------------------------------------------------------------
# Rendering primitives
# --------------------------------------------------------------------------------------------

def _coverage(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance: a one-pixel linear ramp."""
    return np.minimum(np.maximum(0.5 - d / px, 0.0), 1.0)   # np.clip costs more on small arrays


def _blend(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    canvas += alpha[..., None] * (color.astype(np.float32) - canvas)


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """First-order signed distance to an axis-aligned ellipse (exact enough for a 1-px ramp)."""
    f = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) / f + 1e-6
    return (f - 1.0) / grad


def _segment(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
             radius: float) -> np.ndarray:
    """Signed distance to a capsule (a thick line segment with round ends)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * dx + (v - p0[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(u - p0[0] - t * dx, v - p0[1] - t * dy) - radius


def _parabola_stroke(u: np.ndarray, v: np.ndarray, x0: float, x1: float,
                     coeffs: tuple[float, float, float], radius: float) -> np.ndarray:
    """Signed distance to the curve y = c0 + c1 x + c2 x^2 for x in [x0, x1], thickened."""
    c0, c1, c2 = coeffs
    slope = c1 + 2 * c2 * u
    across = np.abs(v - (c0 + c1 * u + c2 * u * u)) / np.sqrt(1 + slope * slope) - radius
    return np.maximum(across, np.maximum(x0 - u, u - x1))


def _grid(size: int) -> np.ndarray:
    """Pixel centres along one axis in normalised image coordinates [-1, 1]."""
    return (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0


class _Frame:
    """A canvas seen through a pose: `part` crops the canvas to the pixels that a box in local
    coordinates can touch and returns them with their local coordinates. Drawing each facial part
    only inside its own box, instead of over the whole frame, is most of the rendering speed."""

    def __init__(self, canvas: np.ndarray, pose: Pose):
        self.canvas, self.pose = canvas, pose
        self.size = canvas.shape[0]
        self.px = (2.0 / self.size) / pose.scale   # one pixel, in local units
        self._cos, self._sin = math.cos(pose.roll), math.sin(pose.roll)
        self._grid = _grid(self.size)

    def part(self, u0: float, v0: float, u1: float, v1: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(canvas view, u, v) for the pixels that the local box [u0, u1] x [v0, v1] covers."""
        pose, size, cos, sin = self.pose, self.size, self._cos, self._sin
        corners = [(u, v) for u in (u0, u1) for v in (v0, v1)]
        xs = [pose.cx + pose.scale * (cos * u - sin * v) for u, v in corners]
        ys = [pose.cy + pose.scale * (sin * u + cos * v) for u, v in corners]
        half = size / 2.0   # pixel index of a normalised coordinate t is (t + 1) * half - 0.5
        c0 = min(max(math.floor((min(xs) + 1) * half) - 1, 0), size)
        c1 = min(max(math.ceil((max(xs) + 1) * half) + 1, 0), size)
        r0 = min(max(math.floor((min(ys) + 1) * half) - 1, 0), size)
        r1 = min(max(math.ceil((max(ys) + 1) * half) + 1, 0), size)
        x = (self._grid[c0:c1] - pose.cx)[None, :]
        y = (self._grid[r0:r1] - pose.cy)[:, None]
        u = (cos * x + sin * y) / pose.scale
        v = (cos * y - sin * x) / pose.scale
        return self.canvas[r0:r1, c0:c1], u, v

    def fill(self, box: tuple[float, float, float, float],
             shape: Callable[[np.ndarray, np.ndarray], np.ndarray], color: np.ndarray,
             opacity: float = 1.0) -> None:
        """Blend `color` over the pixels inside `shape` (a signed distance of u, v)."""
        canvas, u, v = self.part(*box)
        if canvas.size:
            _blend(canvas, opacity * _coverage(shape(u, v), self.px), color)

    def line(self, a: tuple[float, float], b: tuple[float, float], radius: float,
             color: np.ndarray, opacity: float = 1.0) -> None:
        """Blend a straight stroke from `a` to `b` with round ends."""
        pad = radius + 0.01
        box = (min(a[0], b[0]) - pad, min(a[1], b[1]) - pad,
               max(a[0], b[0]) + pad, max(a[1], b[1]) + pad)
        self.fill(box, lambda u, v: _segment(u, v, a, b, radius), color, opacity)


# --------------------------------------------------------------------------------------------
# The scene and the face
# --------------------------------------------------------------------------------------------

def render_background(identity: Identity, size: int) -> np.ndarray:
    """The scene behind the head: an upsampled colour field plus clutter, float32 (H, W, 3)."""
    grid = identity.background.shape[0]
    # Separable bilinear upsampling of the low-resolution colour field.
    pos = np.clip((np.arange(size) + 0.5) * (grid / size) - 0.5, 0, grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = (pos - lo).astype(np.float32)
    weights = np.zeros((size, grid), np.float32)
    weights[np.arange(size), lo] = 1 - frac
    weights[np.arange(size), lo + 1] += frac
    rows = np.tensordot(weights, identity.background.astype(np.float32), axes=(1, 0))
    canvas = np.ascontiguousarray(np.tensordot(rows, weights, axes=(1, 1)).transpose(0, 2, 1))

    for (kind, cx, cy, sx, sy, angle, opacity), color in zip(identity.clutter,
                                                             identity.clutter_colors):
        frame = _Frame(canvas, Pose(cx, cy, 1.0, angle))
        if kind == 0:
            frame.fill((-sx, -sy, sx, sy), lambda u, v: _ellipse(u, v, sx, sy), color, opacity)
        elif kind == 1:
            frame.fill((-sx, -sy, sx, sy), lambda u, v: np.maximum(np.abs(u) - sx,
                                                                   np.abs(v) - sy),
                       color, opacity)
        else:
            frame.line((-3.0, 0.0), (3.0, 0.0), 0.25 * sy, color, opacity)
    return canvas


def _draw_head(f: _Frame, p: Identity) -> None:
    """Neck, ears, hair, and the face itself, rounded by darkening toward its rim."""
    fw = p.face_width
    f.fill((-0.5 * fw, 0.5, 0.5 * fw, 6.0),
           lambda u, v: np.maximum(np.abs(u) - 0.42 * fw, 0.6 - v), p.skin * 0.78)
    if p.hair_style == 2:
        f.fill((-fw - 0.2, -1.2, fw + 0.2, 0.9),
               lambda u, v: np.maximum(_ellipse(u, v + 0.05, fw + 0.17, 1.1), v - 0.85),
               p.hair * 0.85)
    for side in (-1, 1):
        ex, ey = side * fw * 0.98, p.eye_y + 0.08
        f.fill((ex - 0.1, ey - 0.18, ex + 0.1, ey + 0.18),
               lambda u, v: _ellipse(u - ex, v - ey, 0.09, 0.17), p.skin * 0.9)
    canvas, u, v = f.part(-fw - 0.02, -1.02, fw + 0.02, 1.02)
    # The jaw narrows below the cheekbones: stretch u by a factor that grows with v.
    face = _ellipse(u / (1.0 - p.jaw_taper * np.clip(v, 0.0, 1.0) ** 2), v, fw, 1.0)
    inside = _coverage(face, f.px)
    _blend(canvas, inside, p.skin)
    if p.hair_style > 0:
        hairline = p.hairline + 0.35 * (u / fw) ** 2
        cap = np.maximum(_ellipse(u, v + 0.04, fw + 0.05, 1.04), v - hairline)
        _blend(canvas, _coverage(cap, f.px), p.hair)
    rim = np.clip(1 + face / 0.35, 0.0, 1.0)
    canvas *= (1 - 0.25 * inside * rim**3)[..., None]


def _draw_brows(f: _Frame, p: Identity, e: Expression) -> None:
    color = np.minimum(p.hair, p.skin) * 0.5   # brows stay darker than the skin, even on blondes
    for side in (-1, 1):
        inner_x = side * (p.eye_x - p.eye_width * 0.9 - e.brow_squeeze)
        outer_x = side * (p.eye_x + p.eye_width * 1.25)
        inner_y = p.brow_y - e.brow_raise - e.brow_inner
        outer_y = p.brow_y - e.brow_raise * 0.8
        arch = p.brow_arch + 0.4 * max(e.brow_raise, 0.0)
        # The chord through both ends, lifted by `arch` at its middle: y = chord(x) + c2 *
        # ((x - mid)^2 - half^2), expanded into polynomial coefficients.
        mid, half = 0.5 * (inner_x + outer_x), 0.5 * abs(outer_x - inner_x)
        slope = (outer_y - inner_y) / (outer_x - inner_x)
        c2 = arch / half**2
        coeffs = (inner_y - slope * inner_x + c2 * (mid**2 - half**2), slope - 2 * c2 * mid, c2)
        pad = p.brow_thickness + 0.02
        box = (mid - half - pad, min(inner_y, outer_y) - arch - pad,
               mid + half + pad, max(inner_y, outer_y) + pad)
        f.fill(box, lambda u, v: _parabola_stroke(u, v, mid - half, mid + half, coeffs,
                                                  p.brow_thickness), color)


def _draw_eyes(f: _Frame, p: Identity, e: Expression) -> None:
    """Almond eyes from two parabolic lids; the aperture carries eye_open and cheek_raise."""
    upper = max(p.eye_aperture * (1 + e.eye_open), 0.006)
    lower = max(0.8 * p.eye_aperture * (1 + e.eye_open) * (1 - 0.6 * e.cheek_raise), 0.004)
    ew, ey = p.eye_width, p.eye_y
    for side in (-1, 1):
        cx = side * p.eye_x
        canvas, u, v = f.part(cx - ew - 0.03, ey - upper - 0.03, cx + ew + 0.03, ey + lower + 0.03)
        du = u - cx
        q = np.clip(1 - (du / ew) ** 2, 0.0, None)
        opening = np.maximum(np.maximum(ey - upper * q - v, v - ey - lower * q), np.abs(du) - ew)
        _blend(canvas, _coverage(opening, f.px), np.array([236.0, 232, 226]))
        centre = np.hypot(du - p.gaze, v - ey)
        _blend(canvas, _coverage(np.maximum(centre - 0.42 * ew, opening), f.px), p.iris)
        _blend(canvas, _coverage(np.maximum(centre - 0.18 * ew, opening), f.px),
               np.array([12.0, 10, 10]))
        c2 = upper / ew**2
        upper_lid = (ey - upper + c2 * cx * cx, -2 * c2 * cx, c2)
        lid = _parabola_stroke(u, v, cx - ew, cx + ew, upper_lid, 0.011)
        _blend(canvas, _coverage(lid, f.px), p.hair * 0.3 + 10)


def _draw_nose_and_lines(f: _Frame, p: Identity, e: Expression, mouth_half_width: float) -> None:
    """Nose, plus the wrinkles and folds whose opacity the expression controls."""
    shadow = p.skin * 0.45
    side = 1 if np.cos(p.light_angle) < 0 else -1   # the nose casts its line away from the light
    f.line((side * 0.05, p.eye_y + 0.06), (side * 0.07, p.nose_y - 0.05), 0.008, shadow, 0.5)
    for nostril in (-0.055, 0.055):
        f.fill((nostril - 0.04, p.nose_y - 0.03, nostril + 0.04, p.nose_y + 0.03),
               lambda u, v: _ellipse(u - nostril, v - p.nose_y, 0.03, 0.016), shadow)
    lines: list[tuple[float, tuple[float, float], tuple[float, float]]] = []
    for k in range(3):
        y = p.eye_y + 0.03 + 0.035 * k
        lines.append((e.nose_wrinkle, (-0.05, y), (0.05, y + 0.01 * (k - 1))))
    for s in (-1, 1):
        # Nasolabial folds run from the nose wings to just outside the (lifted) mouth corners.
        lines.append((e.cheek_lines, (s * 0.13, p.nose_y),
                      (s * (mouth_half_width + 0.06), p.mouth_y + 0.02 - 0.5 * e.mouth_curve)))
        lines.append((e.furrow, (s * 0.025, p.brow_y - 0.03), (s * 0.03, p.brow_y + 0.07)))
    for opacity, a, b in lines:
        if opacity > 0.01:
            f.line(a, b, 0.02, shadow, min(opacity, 1.0))


def _draw_mouth(f: _Frame, p: Identity, e: Expression, half_width: float) -> None:
    """Lips around a curved opening: the centre line bends with mouth_curve, the jaw opens the
    lower lip more than the upper one, and upper teeth show in the top of the opening."""
    opening = max(e.mouth_open, 0.0)
    raise_ = max(e.lip_raise, 0.0)
    reach = abs(e.mouth_curve) + opening + raise_ + 2 * p.lip_thickness + 0.03
    canvas, u, v = f.part(-half_width - 0.02, p.mouth_y - reach, half_width + 0.02,
                          p.mouth_y + reach)
    s = u / half_width
    q = np.sqrt(np.clip(1 - s * s, 0.0, 1.0))
    centre = p.mouth_y - e.mouth_curve * s * s
    top, bottom = centre - (0.3 * opening + raise_) * q, centre + 0.7 * opening * q
    outside = np.abs(u) - half_width
    lips = np.maximum(np.maximum(top - p.lip_thickness * (0.3 + 0.7 * q) - v,
                                 v - bottom - 1.3 * p.lip_thickness * (0.3 + 0.7 * q)), outside)
    _blend(canvas, _coverage(lips, f.px), p.lips)
    gap = np.maximum(np.maximum(top - v, v - bottom), outside)
    line = np.maximum(np.abs(v - centre) - 0.007, outside)
    _blend(canvas, _coverage(np.minimum(gap, line), f.px), np.array([70.0, 22, 28]))
    if opening + raise_ > 0 and e.teeth > 0.01:
        teeth = np.maximum(gap, v - top - (0.45 * opening + raise_) * q - 0.01)
        _blend(canvas, min(e.teeth, 1.0) * _coverage(teeth, f.px), np.array([238.0, 234, 220]))


def _light_field(identity: Identity, size: int) -> np.ndarray:
    """Image-space illumination: overall brightness and a linear gradient from the light side."""
    g = _grid(size)
    gradient = np.cos(identity.light_angle) * g[None, :] + np.sin(identity.light_angle) * g[:, None]
    return (identity.brightness * (1 + identity.light_strength * gradient))[..., None]


def _render(identity: Identity, expression: Expression, pose: Pose, background: np.ndarray,
            light: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One frame: the head over a pre-rendered background, lit, with sensor noise."""
    canvas = background.copy()
    frame = _Frame(canvas, pose)
    half_width = identity.mouth_width * (1 + expression.mouth_width)
    _draw_head(frame, identity)
    _draw_brows(frame, identity, expression)
    _draw_eyes(frame, identity, expression)
    _draw_nose_and_lines(frame, identity, expression, half_width)
    _draw_mouth(frame, identity, expression, half_width)
    canvas *= light
    # Uniform sensor noise of standard deviation `identity.noise`: drawn as raw bytes because
    # Gaussian draws would cost more than the whole face.
    noise = np.frombuffer(rng.bytes(canvas.size), np.uint8).reshape(canvas.shape)
    canvas += (noise - np.float32(127.5)) * np.float32(identity.noise / 73.9) + 0.5
    return np.clip(canvas, 0, 255).astype(np.uint8)


def render_face(identity: Identity, expression: Expression, size: int,
                rng: np.random.Generator, pose: Pose | None = None) -> np.ndarray:
    """Render `identity` wearing `expression` as a (size, size, 3) uint8 image.

    Exposed so that callers (and tests) can show the same person with different expressions,
    e.g. a neutral reference for a clip.
    """
    return _render(identity, expression, pose or identity.pose,
                   render_background(identity, size), _light_field(identity, size), rng)


def render_image(rng: np.random.Generator, label: int, size: int,
                 framing: Framing = "scene") -> np.ndarray:
    """A new person at the apex of AffectNet-7 class `label`: (size, size, 3) uint8."""
    identity = sample_identity(rng, framing)
    return render_face(identity, sample_expression(rng, label), size, rng)


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipPlan:
    """Everything a clip shows, decided before any pixel is drawn, so that the same plan can be
    rendered at any size and its timing reported in metadata."""

    identity: Identity
    apex: Expression
    intensity: np.ndarray       # (T,) expression intensity per frame, 0 → 1
    poses: tuple[Pose, ...]     # head pose per frame
    flicker: np.ndarray         # (T,) brightness multiplier per frame
    onset: int                  # last frame that is still neutral
    apex_frame: int             # first frame at full intensity


def plan_clip(rng: np.random.Generator, label: int, frames: int,
              framing: Framing = "scene") -> ClipPlan:
    """A clip of `frames` frames that starts neutral and reaches the apex by its last frame:
    the expression starts at a random onset and ramps smoothly (smoothstep) while the head
    drifts a little and the light flickers, as in a real face video."""
    identity = sample_identity(rng, framing)
    apex = sample_expression(rng, label)
    last = frames - 1
    onset = int(rng.integers(0, int(0.4 * last) + 1))
    apex_frame = min(last, onset + max(1, round(rng.uniform(0.3, 0.6) * last)))
    t = np.arange(frames)
    ramp = np.clip((t - onset) / max(apex_frame - onset, 1), 0.0, 1.0)
    intensity = ramp * ramp * (3 - 2 * ramp) if frames > 1 else np.ones(1)

    # Smooth drift that is exactly zero on the first frame: a slow sinusoid minus its start.
    phase = rng.uniform(0, 2 * np.pi, 4)
    speed = rng.uniform(1.0, 3.0, 4)
    drift = np.sin(speed[:, None] * t / max(last, 1) + phase[:, None]) - np.sin(phase)[:, None]
    amplitude = np.array([0.03, 0.03, 0.03, 0.05]) * rng.uniform(0.3, 1.0, 4)
    dx, dy, dscale, droll = amplitude[:, None] * drift
    base = identity.pose
    poses = tuple(Pose(base.cx + dx[i], base.cy + dy[i], base.scale * (1 + dscale[i]),
                       base.roll + droll[i]) for i in range(frames))
    flicker = 1 + 0.02 * rng.standard_normal(frames)
    return ClipPlan(identity, apex, intensity, poses, flicker, onset, apex_frame)


def render_plan(plan: ClipPlan, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a planned clip as (T, size, size, 3) uint8; `rng` draws only the sensor noise."""
    background = render_background(plan.identity, size)
    light = _light_field(plan.identity, size)
    return np.stack([
        _render(plan.identity, plan.apex.scaled(k), pose, background, light * f, rng)
        for k, pose, f in zip(plan.intensity, plan.poses, plan.flicker)
    ])


def render_clip(rng: np.random.Generator, label: int, frames: int, size: int,
                framing: Framing = "scene") -> np.ndarray:
    """A new person going from neutral to the apex of class `label`: (T, H, W, 3) uint8."""
    return render_plan(plan_clip(rng, label, frames, framing), size, rng)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def sample_seed(base_seed: int, split: str, index: int) -> int:
    """The seed of sample `index` of `split`: independent of worker count and render order.

    Built with SeedSequence (not Python's salted `hash`) so it is stable across processes and
    runs, and so neighbouring indices get statistically independent streams.
    """
    sequence = np.random.SeedSequence([base_seed, zlib.crc32(split.encode()), index])
    return int(sequence.generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic dataset: how many samples, how big, and which classes in which label order.

    `class_names` picks expressions by name, so a dataset can mimic another label order (DFEW
    lists Happy before Neutral, say) or a subset; label ids are positions in this tuple.
    """

    samples_per_class: int = 64   # in each split
    size: int = 160
    frames: int = 16
    seed: int = 0
    class_names: tuple[str, ...] = AFFECTNET7
    fps: float = 25.0
    framing: Framing = "scene"  # "aligned": face crops as the real datasets ship them

    def __post_init__(self) -> None:
        unknown = sorted(set(self.class_names) - set(AFFECTNET7))
        if unknown:
            raise ValueError(f"SyntheticSpec.class_names: unknown {unknown}; known {AFFECTNET7}")
        if len(set(self.class_names)) != len(self.class_names) or not self.class_names:
            raise ValueError(f"SyntheticSpec.class_names must be distinct and non-empty: "
                             f"{self.class_names}")
        for name in ("samples_per_class", "size", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticSpec.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_samples(self) -> int:
        """Samples in each split."""
        return self.samples_per_class * len(self.class_names)


def render_sample(spec: SyntheticSpec, modality: Modality, split: str,
                  index: int) -> tuple[str, int, np.ndarray, dict]:
    """Sample `index` of a split as (key, label, array, meta).

    Labels cycle through the classes, so every prefix of a split is balanced to within one
    sample. Images and videos of a split are different people (the modality is in the seed).
    """
    if not 0 <= index < spec.num_samples:
        raise IndexError(f"sample {index} outside split of {spec.num_samples}")
    label = index % len(spec.class_names)
    name = spec.class_names[label]
    seed = sample_seed(spec.seed, f"{split}/{modality}", index)
    rng = np.random.default_rng(seed)
    meta: dict = {"source": "synthetic", "split": split, "index": index, "seed": seed,
                  "label_name": name}
    if modality == "image":
        array = render_image(rng, AFFECTNET7.index(name), spec.size, spec.framing)
    elif modality == "video":
        plan = plan_clip(rng, AFFECTNET7.index(name), spec.frames, spec.framing)
        array = render_plan(plan, spec.size, rng)
        meta.update(frames=spec.frames, fps=spec.fps, onset=plan.onset,
                    apex_frame=plan.apex_frame)
    else:
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    return f"{modality}_{split}_{index:07d}", label, array, meta


def iter_samples(spec: SyntheticSpec, modality: Modality, split: str,
                 indices: Iterable[int] | None = None
                 ) -> Iterator[tuple[str, int, np.ndarray, dict]]:
    """Yield (key, label, array, meta) for a split, in index order or for given `indices`
    (a worker renders its own slice; every sample is the same whichever worker renders it).

    Arrays are uint8, (H, W, 3) for images and (T, H, W, 3) for videos.
    """
    for index in range(spec.num_samples) if indices is None else indices:
        yield render_sample(spec, modality, split, index)


def contact_sheet(seed: int = 0, per_class: int = 8, size: int = 96) -> np.ndarray:
    """A grid of apex images, one row per AffectNet-7 class: the quickest way to check by eye
    that the generator still draws faces whose expressions a person can read."""
    rows = [np.concatenate([render_image(np.random.default_rng(sample_seed(seed, "sheet", k)),
                                         label, size)
                            for k in range(label * per_class, (label + 1) * per_class)], axis=1)
            for label in range(len(AFFECTNET7))]
    return np.concatenate(rows, axis=0)


if __name__ == "__main__":
    import sys

    from PIL import Image

    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic_contact_sheet.png"
    Image.fromarray(contact_sheet()).save(out)
    print(f"rows, top to bottom: {', '.join(AFFECTNET7)} -> {out}")
