"""RandAugment's pixel ops (data/torch_backend.py, the torch fallback; DALI is compared with it in
test_data_dali.py) against timm's own implementation of each op: Pillow's ImageOps and
ImageEnhance with timm's level → argument rules (timm/data/auto_augment.py, increasing suite),
written out here from timm, not from randaug.py. One op at a time, so a misimplemented op
cannot hide in a loose whole-batch tolerance.

Two deliberate differences from Pillow are checked against what they are instead: `equalize`
follows OpenCV's formula (as DALI does), and `sharpness` pads by reflection where Pillow keeps
the frame's 1-pixel border unsharpened, so only the interior is compared."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from s4d_dist.data import randaug
from s4d_dist.data.pixel_ops import rand_augment

BIN = 70  # magnitude 7 of 10 (rand-m7), timm level 7


def timm_level(name: str, level: float, negative: bool) -> float:
    """timm's *_level_to_arg, increasing suite, at `level` (0..10)."""
    f = level / 10
    if name in ("color", "contrast", "brightness", "sharpness"):  # _enhance_increasing_level_to_arg
        return 1.0 + (-0.9 * f if negative else 0.9 * f)
    return {"posterize": 4 - int(f * 4),  # _posterize_increasing_level_to_arg
            "solarize": 256 - int(f * 256),  # _solarize_increasing_level_to_arg
            "solarize_add": int(f * 110)}.get(name, 0)  # _solarize_add_level_to_arg


def solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    """timm auto_augment.solarize_add."""
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


def timm_op(img: Image.Image, name: str, arg: float) -> Image.Image:
    return {
        "auto_contrast": lambda: ImageOps.autocontrast(img),
        "equalize": lambda: ImageOps.equalize(img),
        "invert": lambda: ImageOps.invert(img),
        "posterize": lambda: ImageOps.posterize(img, int(arg)),
        "solarize": lambda: ImageOps.solarize(img, int(arg)),
        "solarize_add": lambda: solarize_add(img, int(arg)),
        "color": lambda: ImageEnhance.Color(img).enhance(arg),
        "contrast": lambda: ImageEnhance.Contrast(img).enhance(arg),
        "brightness": lambda: ImageEnhance.Brightness(img).enhance(arg),
        "sharpness": lambda: ImageEnhance.Sharpness(img).enhance(arg),
    }[name]()


def opencv_equalize(img: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist per channel: lut = round((cdf - cdf_min) · 255 / (N - cdf_min))."""
    out = np.empty_like(img)
    for c in range(img.shape[-1]):
        plane = img[..., c]
        cdf = np.bincount(plane.ravel(), minlength=256).cumsum()
        cdf_min = cdf[cdf > 0][0]
        lut = np.clip(np.round((cdf - cdf_min) * 255.0 / (plane.size - cdf_min)), 0, 255)
        out[..., c] = lut.astype(np.uint8)[plane]
    return out


def image(seed: int) -> np.ndarray:
    """A 32 × 40 RGB image with smooth structure, edges and noise, not using the full range
    (so auto-contrast and equalize have work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:40]
    base = 60 + 50 * np.sin(x / 5.0)[..., None] + 40 * (y > 16)[..., None] + np.array([0, 20, -15])
    return np.clip(base + rng.normal(0, 12, (32, 40, 3)), 20, 220).astype(np.uint8)


PIXEL_OPS = [op for op in randaug.OPS if op not in randaug.GEOMETRIC and op != "identity"]
# Pillow's enhancers and auto-contrast LUT round differently from the torch ops: one level.
EXACT = {"equalize", "invert", "posterize", "solarize", "solarize_add"}


@pytest.mark.parametrize("name,negative", [(op, neg) for op in PIXEL_OPS
                                           for neg in ([False, True] if op in randaug.SIGNED else [False])])
def test_pixel_op_matches_timm(name, negative):
    rows = np.array([[randaug.OPS.index(name), BIN, int(negative)]], np.int32)
    for seed in range(3):
        src = image(seed)
        ours = rand_augment(torch.from_numpy(src)[None], rows)[0].numpy()
        if name == "equalize":
            want = opencv_equalize(src)
        else:
            want = np.asarray(timm_op(Image.fromarray(src), name, timm_level(name, 7.0, negative)))
        assert ours.shape == want.shape and ours.dtype == np.uint8
        diff = np.abs(ours.astype(int) - want.astype(int))
        if name == "sharpness":
            diff = diff[1:-1, 1:-1]
        if name in EXACT:
            assert diff.max() == 0, (name, seed, diff.max(), (diff > 0).mean())
        else:
            assert diff.max() <= 1, (name, negative, seed, diff.max(), (diff > 0).mean())
        assert not np.array_equal(ours, src) or name == "identity"  # the op did something
