"""timm RandAugment ("rand-m7-n4-mstd0.5-inc1", §2.10) as data: which ops, how strong, which sign.

§ numbers refer to docs/method.md.

The official fine-tuning uses timm's RandAugment with the *increasing* op suite: N ops drawn
with replacement from 15, each applied with probability 0.5 at a magnitude drawn from
N(M, mstd) clipped to [0, 10], some with a random sign. Here those draws are made in numpy —
(op id, magnitude bin, sign) per op — so DALI (through `nvidia.dali.auto_aug.core.select`) and
the torch fallback (torch_backend) apply the same ops at the same strengths to the same sample,
and a clip gets one draw for all its frames (clip-consistent, as the official video transform).

A skipped op (the 0.5 probability) is the identity op. Magnitudes are quantised to 0.1
(`NUM_BINS` = 101 bins over timm's 0..10 level scale), far below the mstd 0.5 noise.

`arguments` turns the draws into what the pixel kernels take — one value per op and, for the
geometric ops, the 2×3 matrix mapping output to input pixels (PIL's / timm's conventions:
rotation counter-clockwise about the centre, shear about the origin, translation as a
fraction of the side) — so both backends warp with the very same matrix.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

OPS: tuple[str, ...] = (
    "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
    "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
    "identity",
)
"""timm's `_RAND_INCREASING_TRANSFORMS` in order, plus the identity for a skipped op."""
IDENTITY = OPS.index("identity")
NUM_BINS = 101
MAX_LEVEL = 10.0  # timm _LEVEL_DENOM
SIGNED = frozenset({"rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
                    "translate_x", "translate_y"})
GEOMETRIC = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
ENHANCE = frozenset({"color", "contrast", "brightness", "sharpness"})
FILL = 128  # fill of the geometric ops (DALI auto_aug's; timm fills with the ImageNet mean colour)


@dataclass(frozen=True)
class RandAugmentSpec:
    """Parsed timm config string: magnitude M, N ops, magnitude std, per-op probability."""

    magnitude: float
    num_ops: int
    magnitude_std: float = 0.0
    prob: float = 0.5


def parse(config: str) -> RandAugmentSpec:
    """`rand-m7-n4-mstd0.5-inc1` → RandAugmentSpec(7, 4, 0.5). Only the increasing suite
    (`inc1`) is implemented: it is what both official recipes use."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {config!r} must start with 'rand-'")
    values = {"m": 10.0, "n": 2, "mstd": 0.0, "inc": 0, "p": 0.5}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+)", part)
        if not match:
            raise ValueError(f"RandAugment config {config!r}: cannot read {part!r}")
        values[match[1]] = float(match[2])
    if int(values["inc"]) != 1:
        raise ValueError(f"RandAugment config {config!r}: only the increasing suite (inc1) is implemented")
    return RandAugmentSpec(values["m"], int(values["n"]), values["mstd"], values["p"])


def draw(spec: RandAugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """(num_ops, 3) int32 rows (op id, magnitude bin, sign bit), in timm's order of draws."""
    rows = np.zeros((spec.num_ops, 3), np.int32)
    ops = rng.integers(0, IDENTITY, spec.num_ops)
    for i, op in enumerate(ops):
        applied = rng.random() <= spec.prob
        magnitude = rng.normal(spec.magnitude, spec.magnitude_std) if spec.magnitude_std > 0 else spec.magnitude
        magnitude = min(max(magnitude, 0.0), MAX_LEVEL)
        sign = int(rng.random() > 0.5) if OPS[op] in SIGNED else 0
        rows[i] = (op if applied else IDENTITY, round(magnitude * (NUM_BINS - 1) / MAX_LEVEL), sign)
    return rows


def level(magnitude_bin: int) -> float:
    """The timm level (0..10) of a magnitude bin."""
    return magnitude_bin * MAX_LEVEL / (NUM_BINS - 1)


def magnitude(op: str, magnitude_bin: int) -> float:
    """An op's unsigned parameter at a bin: timm's `*_level_to_arg` for the increasing suite.

    rotate: degrees; shear: factor; translate: fraction of the frame side; color / contrast /
    brightness / sharpness: distance of the enhance factor from 1; posterize: bits kept;
    solarize: threshold; solarize_add: added value.
    """
    fraction = level(magnitude_bin) / MAX_LEVEL
    table = {
        "rotate": 30.0 * fraction, "shear_x": 0.3 * fraction, "shear_y": 0.3 * fraction,
        "translate_x": 0.45 * fraction, "translate_y": 0.45 * fraction,
        "color": 0.9 * fraction, "contrast": 0.9 * fraction, "brightness": 0.9 * fraction,
        "sharpness": 0.9 * fraction,
        "posterize": float(4 - int(4 * fraction)), "solarize": float(256 - int(256 * fraction)),
        "solarize_add": float(int(110 * fraction)),
    }
    return table.get(op, 0.0)


def _inverse_matrix(op: str, value: float, height: int, width: int) -> np.ndarray:
    """Output → input pixel coordinates (x, y; pixel edges) of a geometric op."""
    if op == "rotate":
        a = -math.radians(value)
        c, s = math.cos(a), math.sin(a)
        cx, cy = width / 2, height / 2
        return np.array([[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy]])
    matrix = np.eye(2, 3)
    if op == "shear_x":
        matrix[0, 1] = value
    elif op == "shear_y":
        matrix[1, 0] = value
    elif op == "translate_x":
        matrix[0, 2] = value * width
    elif op == "translate_y":
        matrix[1, 2] = value * height
    return matrix


def arguments(rows: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drawn rows → per op: ids (n,) int32, values (n,) float32 — enhance factor, posterize
    mask, solarize threshold or added value — and matrices (n, 2, 3) float32 (identity for
    non-geometric ops), for frames of height × width."""
    ops = rows[:, 0].astype(np.int32)
    values = np.zeros(len(rows), np.float32)
    matrices = np.tile(np.eye(2, 3, dtype=np.float32), (len(rows), 1, 1))
    for i, (op, magnitude_bin, sign) in enumerate(rows.tolist()):
        name = OPS[op]
        value = magnitude(name, magnitude_bin) * (-1 if sign and name in SIGNED else 1)
        if name in GEOMETRIC:
            matrices[i] = _inverse_matrix(name, value, height, width)
        elif name in ENHANCE:
            values[i] = 1 + value
        elif name == "posterize":
            values[i] = (0xFF << (8 - int(value))) & 0xFF
        else:
            values[i] = value
    return ops, values, matrices
