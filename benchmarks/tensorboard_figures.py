"""The run's TensorBoard figures as a browser shows them at TensorBoard's default size.

    python benchmarks/tensorboard_figures.py [--out DIR] [--keep]

Trains a tiny pre-training and fine-tuning run on synthetic faces (32 px, 2 MoAE layers of 4
experts; a minute or two on a CPU), serves it with `tensorboard --logdir`, and takes
screenshots with headless Chromium (Debian's `chromium`) in a fresh profile:

1. a calibration image of `figures.CARD` size with a one-pixel checker on two edges, to
   measure the box TensorBoard's Time Series card scales images into, and whether an image
   of that size is shown pixel for pixel (the size figures.py draws at);
2. the Time Series dashboard filtered to the figures — test confusion matrix and per-class
   recall, MAE reconstructions (images and clips), expert load by modality — written to
   benchmarks/results/tensorboard_figures.png;
3. the legacy Images dashboard and the HParams dashboard (kept in --out only).

Writes benchmarks/results/tensorboard_figures.json: TensorBoard's and Chromium's versions, the
window size and the measured box.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from s4d_dist import config
from s4d_dist.shards.synthetic import build_synthetic
from s4d_dist.train import figures
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import train
from s4d_dist.train.pretrain import PretrainTask

RESULTS = Path(__file__).parent / "results"
WINDOW = (1600, 1300)  # px: two cards a row beside the runs list and the settings pane
FIGURES = r"^(test_last/(confusion|recall)|mae/|moae/expert_load)"
TINY = ["data.backend=torch", "data.workers=0", "data.image_batch_size=6",
        "data.video_batch_size=4", "data.video_repeats=2", "data.eval_batch_size=8",
        "data.val_fraction=0.3", "model.img_size=32", "model.patch=16", "model.num_frames=4",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16",
        "model.decoder_depth=1", "model.decoder_heads=2", "model.moae.layers=[0,1]",
        "model.moae.num_experts=4", "model.moae.top_k=1", "logging.log_every=1",
        "logging.image_every=1"]


def tiny_runs(out: Path) -> None:
    build_synthetic(out / "data" / "image", "image", {"train": 4, "test": 4}, size=32, seed=0,
                    workers=1)
    build_synthetic(out / "data" / "video", "video", {"train": 4, "test": 4}, size=32,
                    frames=8, seed=1, workers=1)
    shards = [f"data.image_shards={out / 'data' / 'image' / 'train'}",
              f"data.video_shards={out / 'data' / 'video' / 'train'}", f"output_dir={out}"]
    pre = config.load("demo", [*shards, *TINY, "run_name=pretrain", "optim.epochs=1"])
    train(pre, PretrainTask(pre))
    fine = config.load("demo_finetune", [*shards, *TINY, "run_name=finetune", "optim.epochs=2",
                                         f"init_checkpoint={out / 'pretrain' / 'weights_fp32.pt'}"])
    train(fine, FinetuneTask(fine))


def calibration(out: Path) -> None:
    """A CARD-sized image, black border, every other pixel black along two inner lines."""
    from torch.utils.tensorboard import SummaryWriter

    width, height = figures.CARD
    image = np.ones((height, width, 3), np.float32)
    image[[0, -1]] = image[:, [0, -1]] = 0
    image[::2, 5] = image[5, ::2] = 0
    with SummaryWriter(str(out / "calibration" / "tb")) as writer:
        writer.add_image("calibration", image.transpose(2, 0, 1), 0)


def shown_box(png: Path) -> dict:
    """Where the calibration image is on the screenshot, its size there, and whether its
    alternating pixels survived (shown 1:1)."""
    grey = np.asarray(Image.open(png).convert("L")).astype(int)
    dark = grey < 40
    rows = np.flatnonzero(dark.sum(1) > figures.CARD[0] // 2)
    cols = np.flatnonzero(dark.sum(0) > figures.CARD[1] // 2)
    top, left = int(rows.min()), int(cols.min())
    size = [int(cols.max() - left + 1), int(rows.max() - top + 1)]
    pattern = grey[top:top + 20, left + 5].tolist()
    return {"shown_size": size, "pixel_for_pixel": size == list(figures.CARD)
            and pattern == [0, 255] * 10}


def drawn(png: Path) -> bool:
    """Whether the dashboard's area shows something: cards still loading are blank."""
    grey = np.asarray(Image.open(png).convert("L"))
    height, width = grey.shape
    area = grey[height // 8:, width // 5:width * 3 // 4]
    return (area < 128).mean() > 0.01


def shown(name: str, png: Path, attempt: int) -> bool:
    """Whether a screenshot shows its page loaded (the HParams table: on a second visit)."""
    if name == "calibration":
        try:
            shown_box(png)
        except ValueError:  # not on the page yet
            return False
        return True
    return drawn(png) if name != "hparams" else attempt > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(browser: str, url: str, png: Path, profile: Path) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=30000",
                    "--hide-scrollbars", f"--screenshot={png}", url],
                   check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run and screenshot folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if browser is None:
        raise SystemExit("no chromium here: apt-get install -y chromium")
    out = Path(args.out or tempfile.mkdtemp(prefix="tb_figures_"))
    if not (out / "finetune" / "metrics.json").is_file():
        tiny_runs(out)
    calibration(out)
    port = free_port()
    server = subprocess.Popen(["tensorboard", "--logdir", str(out), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        seen = None
        for _ in range(60):  # until the server has read every run's images: the same twice
            time.sleep(5)
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/images/tags", timeout=5) as r:
                    tags = json.load(r)
            except OSError:
                continue
            if tags == seen and {"calibration/tb", "finetune/tb", "pretrain/tb"} <= set(tags):
                break
            seen = tags
        shots = {"calibration": f"{base}/?tagFilter=calibration#timeseries",
                 "figures": f"{base}/?tagFilter={FIGURES}#timeseries",
                 "images": f"{base}/#images", "hparams": f"{base}/#hparams"}
        for name, url in shots.items():  # again while the cards are still loading
            for attempt in range(6):
                screenshot(browser, url, out / f"{name}.png", Path(tempfile.mkdtemp()))
                if shown(name, out / f"{name}.png", attempt):
                    break
    finally:
        server.terminate()
        server.wait()
    box = shown_box(out / "calibration.png")
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout
    import tensorboard

    result = {"tensorboard": tensorboard.__version__, "browser": version.strip(),
              "window": list(WINDOW), "figure_size": list(figures.CARD), **box}
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(out / "figures.png", RESULTS / "tensorboard_figures.png")
    (RESULTS / "tensorboard_figures.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"screenshots in {out}; the figures' one in {RESULTS / 'tensorboard_figures.png'}")
    if not args.out and not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
