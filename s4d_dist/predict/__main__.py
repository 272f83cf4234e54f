"""``python -m s4d_dist.predict --model RUN_OR_CHECKPOINT INPUT ...`` (also ``s4d-predict``)

Expression probabilities for images, video files (mp4, webm, avi, mov, mkv) and frame
folders, from a fine-tuning run folder or an official S4D checkpoint.

Output: one line per input, in input order — JSON lines (default) or CSV (--format csv):
  {"input", "kind": image|video|frames, "head": image|video, "crop": centre|face,
   "box": [left, top, right, bottom] (the square scored, in the input's pixels),
   "decoder": dali|python, "frames", "views", "top1", "top1_prob", "probs": {class: p}}
  or   {"input", "kind", "error"}
and "warning" where an input was scored but not as given (a video whose container declares
more frames than decode is scored on those that do). A bad input (unreadable, no face found,
too short) gets an "error" line and the rest go on.

Timeline (--window, --stride): a video or frame folder gives one line per window instead,
windows of --window every --stride, in seconds ("2s") or frames ("48"), the last one ending
with the video, each scored as a clip of its own and cropped on its own; its line adds
"window" (0, 1, ...), "start_frame", "end_frame" (exclusive), and "start", "end" in seconds
(null for a frame folder without --fps).
A progress bar goes to a terminal (not to a pipe or a file), and several inputs end with a
one-line summary on standard error.

Decoding (--decoder): `python` is Pillow / PyAV in threads; `dali` is NVIDIA DALI, a chunk of
inputs per batch, on the GPU (nvJPEG, NVDEC) when the model runs on one, else on the CPU; an
input DALI cannot decode (on the CPU: H.264, HEVC, AV1 video) is decoded in Python, and the
"decoder" field says which one did. `auto` (default) is DALI on a GPU, Python on the CPU,
where DALI's decoders are no faster (predict/dali.py).

Exit status: 0 every input scored; 1 some lines have an "error"; 2 bad command line, no
inputs, or a model that cannot be loaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # --help and argument errors stay fast: torch is imported after them
    from .core import Prediction
    from .inputs import Input

EXAMPLES = """examples:
  python -m s4d_dist.predict --model runs/demo_finetune demo_data/test/*.jpg
  python -m s4d_dist.predict --model runs/dfew/fold1 --face-detect --format csv --out p.csv videos/
  python -m s4d_dist.predict --model checkpoint-best.pth \\
      --classes happy,sad,neutral,angry,surprise,disgust,fear clip.mp4 frames/ --clip-folders
  python -m s4d_dist.predict --model runs/dfew/fold1 --temporal-views 1 --spatial-crops 1 list.csv
  python -m s4d_dist.predict --model runs/dfew/fold1 --face-detect --window 2s --stride 1s talk.mp4
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s4d_dist.predict", description=__doc__.split("\n\n")[1],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image or video files, folders (of images, videos, frame folders), "
                             "globs, or CSV lists (a 'path' column, else the first)")
    parser.add_argument("--model", required=True,
                        help="a fine-tuning run folder, or an official checkpoint (.pth)")
    parser.add_argument("--classes", type=_names, help="video head class names, comma-separated "
                        "(required for an official checkpoint)")
    parser.add_argument("--image-classes", type=_names,
                        help="image head class names (default: --classes if the sizes match)")
    parser.add_argument("--config", help="preset or YAML for an official checkpoint's "
                        "architecture and evaluation recipe (default finetune_base)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.sampling_rate=1 (repeatable)")
    parser.add_argument("--temporal-views", type=int, help="clip windows (default: the run's)")
    parser.add_argument("--spatial-crops", type=int, help="crops per window (default: the run's)")
    parser.add_argument("--face-detect", action="store_true",
                        help="crop to the face found by OpenCV's Haar cascade (pip install "
                             "'s4d_dist[face]'); default: the largest centred square")
    parser.add_argument("--clip-folders", action="store_true",
                        help="each folder given is one clip's frames")
    parser.add_argument("--photo-folders", action="store_true",
                        help="every image in a folder's subfolders is a photo of its own (by "
                             "default a subfolder of numbered frames is one clip)")
    parser.add_argument("--window", help="score videos per window of this length: seconds "
                        "(2s) or frames (48); one line per window")
    parser.add_argument("--stride", help="start a window every ... (default: --window)")
    parser.add_argument("--fps", type=float,
                        help="frame rate of frame folders, for their times on a timeline")
    parser.add_argument("--min-frames", type=int, default=2,
                        help="shorter videos are reported, not scored (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--decoder", choices=("auto", "dali", "python"), default="auto",
                        help="dali (NVIDIA DALI, on the GPU when --device is one) or python "
                             "(Pillow / PyAV); default: dali on a GPU, else python")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="one JSON object per input (default), or CSV with a prob_<class> "
                             "column per class")
    parser.add_argument("--out", help="output file (default: standard output)")
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


WINDOW_FIELDS = ["window", "start", "end", "start_frame", "end_frame"]


def as_record(p: Prediction) -> dict:
    record = {"input": p.input, "kind": p.kind}
    if p.window is not None:
        w = p.window
        record.update(window=w.index, start=w.start, end=w.end, start_frame=w.start_frame,
                      end_frame=w.end_frame)
    if p.error is not None:
        record["error"] = p.error
    else:
        record.update(head=p.head, crop=p.crop, box=p.box, decoder=p.decoder, frames=p.frames,
                      views=p.views, top1=p.top1, top1_prob=p.probs[p.top1], probs=p.probs)
    if p.warning is not None:
        record["warning"] = p.warning
    return record


def write_jsonl(predictions: Iterable[Prediction], out: IO[str]) -> None:
    for p in predictions:
        out.write(json.dumps(as_record(p)) + "\n")
        out.flush()


def write_csv(predictions: Iterable[Prediction], out: IO[str], classes: list[str],
              timeline: bool = False) -> None:
    """One column per class name of either head (`prob_<name>`), empty where the input's head
    has no such class; the box as "left top right bottom"."""
    fields = ["input", "kind", *(WINDOW_FIELDS if timeline else []), "head", "crop", "box",
              "decoder", "frames", "views", "top1", "top1_prob"]
    writer = csv.DictWriter(out, fields + [f"prob_{c}" for c in classes] + ["error", "warning"])
    writer.writeheader()
    for p in predictions:
        record = as_record(p)
        probs = record.pop("probs", {})
        if record.get("box"):
            record["box"] = " ".join(map(str, record["box"]))
        writer.writerow({**record, **{f"prob_{c}": v for c, v in probs.items()}})
        out.flush()


def summary(items: list[Input], done: list[list[Prediction]], seconds: float) -> str:
    """One line: inputs by kind, how many scored, rows, errors and warnings, time."""
    kinds = Counter(item.kind for item in items)
    named = {"image": "image", "video": "video", "frames": "frame folder"}
    listed = ", ".join(f"{n} {named[k]}{'s' if n > 1 else ''}" for k, n in kinds.items())
    rows = [p for predictions in done for p in predictions]
    unscored = sum(all(p.error is not None for p in predictions) for predictions in done)
    failed_rows = sum(p.error is not None for p in rows)
    warned = sum(any(p.warning for p in predictions) for predictions in done)
    line = f"{len(items) - unscored} of {len(items)} inputs scored ({listed})"
    windows = [p for p in rows if p.window is not None]
    if windows:
        scored = sum(p.error is None for p in windows)
        line += f", {scored} of {len(windows)} timeline windows"
    line += f" in {seconds:.1f} s"
    if failed_rows:
        line += f"; {failed_rows} line{'s' if failed_rows > 1 else ''} with an 'error'"
    if warned:
        line += f"; {warned} input{'s' if warned > 1 else ''} with a 'warning'"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_intermixed_args(argv)
    timeline = None
    if args.window or args.stride:
        from .timeline import Timeline

        try:
            timeline = Timeline.parse(args.window or args.stride, args.stride)
        except ValueError as error:
            parser.error(str(error))
    if args.fps is not None and args.fps <= 0:
        parser.error(f"--fps {args.fps}: a frame rate is positive")
    import torch  # heavy imports after argument errors are reported
    from tqdm import tqdm

    from .core import Predictor
    from .inputs import choose_decoder, expand
    from .model import ModelError, load

    items = expand(args.inputs, args.clip_folders, args.photo_folders)
    if not items:
        parser.error(f"no images, videos or frame folders in {' '.join(args.inputs)}")
    try:
        model = load(args.model, args.classes, args.image_classes, args.config, tuple(args.set))
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                              if args.device == "auto" else args.device)
        predictor = Predictor(model, device, args.batch_size, args.face_detect, args.min_frames,
                              args.temporal_views, args.spatial_crops, args.workers,
                              choose_decoder(args.decoder, device), timeline, args.fps)
    except (ModelError, ImportError, ValueError) as error:  # ValueError: config.ConfigError
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    started, done = time.monotonic(), []

    def rows() -> Iterable[Prediction]:
        # tqdm draws only on a terminal (disable=None): a piped or redirected stderr stays clean
        for predictions in tqdm(predictor.score(items), total=len(items), unit="input",
                                disable=None, file=sys.stderr):
            done.append(predictions)
            yield from predictions

    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "csv":
            classes = list(dict.fromkeys(model.classes["video"] + model.classes["image"]))
            write_csv(rows(), out, classes, timeline is not None)
        else:
            write_jsonl(rows(), out)
    finally:
        if args.out:
            out.close()
    failed = any(p.error is not None for predictions in done for p in predictions)
    if len(items) > 1 or failed:
        print(f"{parser.prog}: {summary(items, done, time.monotonic() - started)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
