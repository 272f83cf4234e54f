"""``python -m s4d_dist.predict --model RUN_OR_CHECKPOINT INPUT ...`` (also ``s4d-predict``)

Expression probabilities for images, video files (mp4, webm, avi, mov, mkv) and frame
folders, from a fine-tuning run folder or an official S4D checkpoint.

Output: one line per input, in input order — JSON lines (default) or CSV (--format csv):
  {"input", "kind": image|video|frames, "head": image|video, "crop": centre|face,
   "decoder": dali|python, "frames", "views", "top1", "top1_prob", "probs": {class: p}}
  or   {"input", "kind", "error"}
A bad input (unreadable, no face found, too short) gets an "error" line and the rest go on.

Decoding (--decoder): `python` is Pillow / PyAV in threads; `dali` is NVIDIA DALI, a chunk of
inputs per batch, on the GPU (nvJPEG, NVDEC) when the model runs on one, else on the CPU; an
input DALI cannot decode (on the CPU: H.264, HEVC, AV1 video) is decoded in Python, and the
"decoder" field says which one did. `auto` (default) is DALI on a GPU, Python on the CPU,
where DALI's decoders are no faster (predict/dali.py).

Exit status: 0 every input scored; 1 some inputs have an error line; 2 bad command line, no
inputs, or a model that cannot be loaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # --help and argument errors stay fast: torch is imported after them
    from .core import Prediction

EXAMPLES = """examples:
  python -m s4d_dist.predict --model runs/demo_finetune demo_data/test/*.jpg
  python -m s4d_dist.predict --model runs/dfew/fold1 --face-detect --format csv --out p.csv videos/
  python -m s4d_dist.predict --model checkpoint-best.pth \\
      --classes happy,sad,neutral,angry,surprise,disgust,fear clip.mp4 frames/ --clip-folders
  python -m s4d_dist.predict --model runs/dfew/fold1 --temporal-views 1 --spatial-crops 1 list.csv
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


def as_record(p: Prediction) -> dict:
    if p.error is not None:
        return {"input": p.input, "kind": p.kind, "error": p.error}
    return {"input": p.input, "kind": p.kind, "head": p.head, "crop": p.crop,
            "decoder": p.decoder, "frames": p.frames, "views": p.views, "top1": p.top1,
            "top1_prob": p.probs[p.top1], "probs": p.probs}


def write_jsonl(predictions: Iterable[Prediction], out: IO[str]) -> None:
    for p in predictions:
        out.write(json.dumps(as_record(p)) + "\n")
        out.flush()


def write_csv(predictions: Iterable[Prediction], out: IO[str], classes: list[str]) -> None:
    """One column per class name of either head (`prob_<name>`), empty where the input's head
    has no such class."""
    fields = ["input", "kind", "head", "crop", "decoder", "frames", "views", "top1",
              "top1_prob"]
    writer = csv.DictWriter(out, fields + [f"prob_{c}" for c in classes] + ["error"])
    writer.writeheader()
    for p in predictions:
        record = as_record(p)
        probs = record.pop("probs", {})
        writer.writerow({**record, **{f"prob_{c}": v for c, v in probs.items()}})
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_intermixed_args(argv)
    import torch  # heavy imports after argument errors are reported
    from tqdm import tqdm

    from .core import Predictor
    from .inputs import choose_decoder, expand
    from .model import ModelError, load

    items = expand(args.inputs, args.clip_folders)
    if not items:
        parser.error(f"no images, videos or frame folders in {' '.join(args.inputs)}")
    try:
        model = load(args.model, args.classes, args.image_classes, args.config, tuple(args.set))
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                              if args.device == "auto" else args.device)
        predictor = Predictor(model, device, args.batch_size, args.face_detect, args.min_frames,
                              args.temporal_views, args.spatial_crops, args.workers,
                              choose_decoder(args.decoder, device))
    except (ModelError, ImportError, ValueError) as error:  # ValueError: config.ConfigError
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    failed = 0

    def counted(predictions: Iterable[Prediction]) -> Iterable[Prediction]:
        nonlocal failed
        for p in tqdm(predictions, total=len(items), unit="input", disable=None, file=sys.stderr):
            failed += p.error is not None
            yield p

    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "csv":
            classes = list(dict.fromkeys(model.classes["video"] + model.classes["image"]))
            write_csv(counted(predictor(items)), out, classes)
        else:
            write_jsonl(counted(predictor(items)), out)
    finally:
        if args.out:
            out.close()
    if failed:
        print(f"{parser.prog}: {failed} of {len(items)} inputs could not be scored "
              "(their lines have an 'error')", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
