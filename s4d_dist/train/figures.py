"""The figures a run shows in TensorBoard, drawn with Pillow: confusion matrix, per-class
recall, MAE reconstructions, expert load by modality.

TensorBoard's Time Series dashboard shows an image in a card, scaled with nearest-neighbour
sampling to fill a box 215 px high and, at the narrowest card, 301 px wide (TensorBoard 2.21,
measured in Chromium; `benchmarks/tensorboard_figures.py`): an image of exactly `CARD` size is
shown pixel for pixel at the default card size, a smaller one is blown up in blocks, a larger
one loses rows and columns of pixels, and with them its text. So every figure is drawn on a
`CARD`-sized canvas, its text at `FONT` px and whole class names; only content that cannot fit
(many classes, many experts) makes a larger canvas of the same shape, which TensorBoard shows
scaled down evenly (and pixel for pixel with the card's "actual size" button).

Each figure's `Canvas` keeps every label it writes (its text, box and direction) beside the
pixels, so that what a figure says can be read back and checked without reading pixels.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CARD = (300, 215)  # (width, height) px: TensorBoard's image box at the default card size
FONT = 12          # px, names and titles
SMALL = 11         # px, numbers
PAD = 6
MODALITY_COLOURS = {"image": (31, 119, 180), "video": (214, 96, 0)}
BAR_COLOUR = (31, 119, 180)


@functools.cache
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's own scalable font (Aileron) at `size` px, the bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def text_width(text: str, size: int = FONT) -> int:
    return math.ceil(font(size).getlength(text))


@dataclass(frozen=True)
class Label:
    """A text on a figure: its box (left, top, right, bottom) on the canvas, whether it reads
    upwards, and its size in px."""

    text: str
    box: tuple[int, int, int, int]
    vertical: bool = False
    size: int = FONT


class Canvas:
    """A white RGB image of at least `CARD` size, `CARD`'s shape if larger, and the labels
    written on it."""

    def __init__(self, width: float, height: float) -> None:
        scale = max(1.0, width / CARD[0], height / CARD[1])
        size = (math.ceil(CARD[0] * scale), math.ceil(CARD[1] * scale))
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.labels: list[Label] = []

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def text(self, xy: tuple[float, float], text: str, anchor: str = "la", size: int = FONT,
             fill="black", background=None) -> Label:
        """Horizontal text at `xy` by Pillow's `anchor` (la: left-ascender, mm: middle, ...),
        on a box of `background` if given."""
        box = self.draw.textbbox(xy, text, font=font(size), anchor=anchor)
        if background is not None:
            self.draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill=background)
        self.draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)
        label = Label(text, tuple(int(round(v)) for v in box), False, size)
        self.labels.append(label)
        return label

    def upward_text(self, centre_x: float, bottom: float, text: str, size: int = FONT,
                    fill="black") -> Label:
        """Text reading upwards (turned 90° anticlockwise), starting at `bottom`, centred on
        `centre_x`: a column's label."""
        left, top, right, low = font(size).getbbox(text)
        strip = Image.new("L", (math.ceil(right - left), math.ceil(low - top)), 0)
        ImageDraw.Draw(strip).text((-left, -top), text, fill=255, font=font(size))
        turned = strip.rotate(90, expand=True)
        x, y = int(round(centre_x - turned.width / 2)), int(round(bottom - turned.height))
        self.image.paste(Image.new("RGB", turned.size, fill), (x, y), turned)
        label = Label(text, (x, y, x + turned.width, y + turned.height), True, size)
        self.labels.append(label)
        return label

    def array(self) -> np.ndarray:
        """(3, H, W) float in [0, 1], what SummaryWriter.add_image takes."""
        return np.asarray(self.image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _names(names: list[str] | None, count: int) -> list[str]:
    return list(names) if names and len(names) == count else [str(i) for i in range(count)]


def _blue(fraction: float) -> tuple[int, int, int]:
    """White (0) to a saturated blue (1)."""
    return tuple(int(255 * c) for c in (1 - fraction, 1 - 0.6 * fraction, 1 - 0.2 * fraction))


def confusion(cm: np.ndarray, names: list[str] | None = None) -> Canvas:
    """Rows are true classes, columns predicted; each cell its count on a blue scaled by the
    row-normalised fraction; whole class names on the left and, upwards, over the columns."""
    cm = np.asarray(cm)
    k = len(cm)
    names = _names(names, k)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    title = "rows: true class, columns: predicted"
    widest = max(text_width(n) for n in names)
    left, top = PAD + widest + 6, PAD + FONT + 6 + widest + 4
    cell_w = max(text_width(str(int(cm.max(initial=0))), SMALL) + 6, 18)
    cell_w = max(cell_w, min(40, (CARD[0] - PAD - left) // k))
    cell_h = max(15, min(26, (CARD[1] - PAD - top) // k))
    canvas = Canvas(max(left + k * cell_w, text_width(title) + PAD) + PAD, top + k * cell_h + PAD)
    canvas.text((PAD, PAD), title, anchor="lt")
    for j, name in enumerate(names):
        canvas.upward_text(left + j * cell_w + cell_w / 2, top - 4, name)
    for i in range(k):
        y = top + i * cell_h
        canvas.text((left - 6, y + cell_h / 2), names[i], anchor="rm")
        for j in range(k):
            x = left + j * cell_w
            canvas.draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=_blue(frac[i, j]),
                                  outline=(204, 204, 204))
            canvas.text((x + cell_w / 2, y + cell_h / 2), str(int(cm[i, j])), anchor="mm",
                        size=SMALL, fill="white" if frac[i, j] > 0.5 else "black")
    return canvas


def recall_bars(values: list[float], names: list[str] | None, title: str = "per-class recall"
                ) -> Canvas:
    """A horizontal bar per class, its whole name on the left and its value on the right; a
    class with no samples (NaN) says so instead of a bar."""
    names = _names(names, len(values))
    left = PAD + max(text_width(n) for n in names) + 6
    top = PAD + FONT + 6
    row = max(16, min(26, (CARD[1] - PAD - top) // len(values)))
    number = text_width("0.00", SMALL) + 4
    length = max(80, CARD[0] - PAD - left - number - 4)
    canvas = Canvas(left + length + 4 + number + PAD, top + len(values) * row + PAD)
    canvas.text((PAD, PAD), title, anchor="lt")
    for i, (value, name) in enumerate(zip(values, names)):
        y = top + i * row
        canvas.text((left - 6, y + row / 2), name, anchor="rm")
        if not np.isfinite(value):
            canvas.text((left, y + row / 2), "no samples", anchor="lm", size=SMALL, fill="gray")
            continue
        end = left + round(length * min(max(value, 0.0), 1.0))
        canvas.draw.rectangle([left, y + 3, max(end, left + 1), y + row - 4], fill=BAR_COLOUR)
        canvas.text((end + 4, y + row / 2), f"{value:.2f}", anchor="lm", size=SMALL)
    return canvas


RECONSTRUCTION_ROWS = ("original", "masked", "reconstruction")


def reconstruction_grid(rows: list[np.ndarray], title: str = "") -> Canvas:
    """Rows of (N, 3, h, w) [0, 1] images (original, masked, reconstruction), each named on
    the left, every tile as large as the card allows (square pixel blocks when that is a whole
    multiple of the image, bilinear otherwise)."""
    n, _, h, w = rows[0].shape
    gap = 3
    left = PAD + max(text_width(name) for name in RECONSTRUCTION_ROWS) + 8
    top = PAD + (FONT + 6 if title else 0)
    side = min((CARD[1] - PAD - top - 2 * gap) // 3, (CARD[0] - PAD - left - (n - 1) * gap) // n)
    side = max(side, 32)
    th, tw = (side, round(side * w / h)) if h >= w else (round(side * h / w), side)
    canvas = Canvas(left + n * (tw + gap) - gap + PAD, top + 3 * (th + gap) - gap + PAD)
    if title:
        canvas.text((PAD, PAD), title, anchor="lt")
    for r, (name, images) in enumerate(zip(RECONSTRUCTION_ROWS, rows)):
        y = top + r * (th + gap)
        canvas.text((left - 8, y + th / 2), name, anchor="rm")
        for i, tile_pixels in enumerate(np.asarray(images, dtype=np.float32)):
            canvas.image.paste(tile(tile_pixels, (tw, th)), (left + i * (tw + gap), y))
    return canvas


def tile(pixels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A (3, h, w) [0, 1] image as a picture of `size` (width, height)."""
    rgb = (np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    whole = size[0] % rgb.shape[1] == 0 and size[1] % rgb.shape[0] == 0
    return Image.fromarray(rgb).resize(size, Image.NEAREST if whole else Image.BILINEAR)


@dataclass
class LayerLoad:
    """One MoAE layer's routing in the last logged batch of one modality."""

    share: np.ndarray          # (E,) share of the routed tokens per expert
    step: int


def expert_load(layers: dict[int, dict[str, LayerLoad]], modalities=("image", "video")
                ) -> Canvas:
    """A table: a row per MoAE layer, a column per expert under each modality, each cell the
    expert's share of that modality's routed tokens in its last logged batch, on a blue that
    deepens with the share (even: 1/E); "n/a" until a batch of the modality is logged."""
    experts = max(len(m.share) for per in layers.values() for m in per.values())
    title = "share of routed tokens per expert"
    steps = ", ".join(f"{m} step {next(per[m].step for per in layers.values() if m in per)}"
                      for m in modalities if any(m in per for per in layers.values()))
    note = f"last batch: {steps}; even {1 / experts:.2f}"
    left = PAD + max(text_width(f"layer {i}") for i in layers) + 6
    cell_w = max(text_width("0.00", SMALL) + 6, 26)
    gap = 8
    top = PAD + FONT + 6 + 2 * (FONT + 4)
    row = max(16, min(26, (CARD[1] - top - SMALL - 8 - PAD) // len(layers)))
    width = left + len(modalities) * (experts * cell_w + gap)
    canvas = Canvas(max(width, text_width(title) + PAD, text_width(note, SMALL) + PAD) + PAD,
                    top + len(layers) * row + 6 + SMALL + PAD)
    canvas.text((PAD, PAD), title, anchor="lt")
    top_share = max(float(m.share.max()) for per in layers.values() for m in per.values())
    for g, modality in enumerate(modalities):
        x0 = left + g * (experts * cell_w + gap)
        canvas.text((x0 + experts * cell_w / 2, PAD + FONT + 6), modality, anchor="mt",
                    fill=MODALITY_COLOURS[modality])
        for e in range(experts):
            canvas.text((x0 + e * cell_w + cell_w / 2, PAD + 2 * FONT + 10), f"e{e}",
                        anchor="mt", size=SMALL)
        for r, (layer, per) in enumerate(sorted(layers.items())):
            y = top + r * row
            if g == 0:
                canvas.text((left - 6, y + row / 2), f"layer {layer}", anchor="rm")
            for e in range(experts):
                x = x0 + e * cell_w
                share = float(per[modality].share[e]) if modality in per else None
                fill = _blue(0.8 * share / max(top_share, 1e-9)) if share is not None else "white"
                canvas.draw.rectangle([x, y, x + cell_w - 1, y + row - 1], fill=fill,
                                      outline=(204, 204, 204))
                canvas.text((x + cell_w / 2, y + row / 2), "n/a" if share is None else
                            f"{share:.2f}", anchor="mm", size=SMALL,
                            fill="gray" if share is None else "white"
                            if share > 0.6 * top_share else "black")
    canvas.text((PAD, top + len(layers) * row + 6), note, anchor="lt", size=SMALL, fill="gray")
    return canvas
