"""``python -m s4d_dist.shards <dataset> --root R --out O [options] [dataset options]``

Builds one dataset's shards. Dataset options are the keyword arguments of that dataset's
reader, as ``--some-option value`` or ``some_option=value`` (see the reader's docstring).
Re-running the same command after an interruption resumes; re-running it after success
only checks and prints the summary.

``python -m s4d_dist.shards --help`` lists the datasets; ``... <dataset> --help`` shows that
dataset's options. ``python -m s4d_dist.shards inspect OUT`` describes a built dataset (counts,
codec, clip lengths, a preview PNG); ``... verify OUT`` checks every shard's checksum, every
index and every sample's decoding (exit 1 when something differs from the build).

Exit status: 0 built; 1 the dataset or a previous build is not as expected (the message
names the file and, where there is one, the line); 2 bad command line or dataset option;
130 interrupted.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROG = "python -m s4d_dist.shards"


def make_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: `--help` and argument errors stay fast and need neither
    # the encoders nor the dataset readers.
    from .build import DEFAULT_SHARD_MB
    from .media import (DEFAULT_CHUNK_FRAMES, DEFAULT_JPEG_QUALITY, DEFAULT_KEYFRAME_INTERVAL,
                        DEFAULT_VIDEO_CODEC, DEFAULT_VP9_CRF, VIDEO_CODECS)

    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[1],
        allow_abbrev=False,  # a dataset option must never be taken for an abbreviation of ours
        epilog="Example: python -m s4d_dist.shards dfew --root /data/DFEW --out /shards/dfew")
    parser.add_argument("dataset", help="one of the datasets below")
    parser.add_argument("--root", required=True, help="the dataset's root folder")
    parser.add_argument("--out", required=True,
                        help="output folder (dataset.json and one folder per split)")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoding processes (default: all cores)")
    parser.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_MB, metavar="MiB",
                        help="target shard size (default %(default)s)")
    parser.add_argument("--video-codec", choices=sorted(VIDEO_CODECS), default=DEFAULT_VIDEO_CODEC,
                        help="video encoding (default %(default)s; shards/media.py says why)")
    parser.add_argument("--chunk-frames", type=int, default=None,
                        help="split longer videos into chunks of at most this many frames; 0: never "
                             f"(default: {DEFAULT_CHUNK_FRAMES} for vp9 / mjpeg, never for frames)")
    parser.add_argument("--video-crop", default=None, metavar="Y0,X0,Y1,X1",
                        help="store this cut of every clip frame (VoxCeleb2 for pre-training: "
                             "0,32,160,192, the preset's data.video_source_crop); default: whole frames")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="JPEG quality of images and MJPEG frames (default %(default)s)")
    parser.add_argument("--vp9-crf", type=int, default=DEFAULT_VP9_CRF,
                        help="VP9 constant quality, 0 best .. 63 (default %(default)s)")
    parser.add_argument("--keyframe-interval", type=int, default=DEFAULT_KEYFRAME_INTERVAL,
                        help="VP9 frames per keyframe (default %(default)s)")
    parser.add_argument("--face-crop", action="store_true",
                        help="store the square around the face OpenCV's detector finds in each "
                             "photo or clip (predict's --face-detect), not the whole picture; "
                             "inputs without a face are skipped (pip install 's4d_dist[face]')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _summary(reader: Callable[..., Any]) -> str:
    """A reader's one-line description: the first line of its module's docstring."""
    return (inspect.getmodule(reader).__doc__ or reader.__doc__ or "").strip().splitlines()[0]


def _dataset_options(reader: Callable[..., Any]) -> list[inspect.Parameter]:
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in inspect.signature(reader).parameters.values()
            if p.name != "root" and p.kind in keywords]


def general_help(readers: dict[str, Callable[..., Any]]) -> str:
    width = max(map(len, readers))
    lines = [f"  {name:<{width}}  {_summary(reader)}" for name, reader in sorted(readers.items())]
    return (make_parser().format_help() + "\ndatasets (their options: " + PROG
            + " <dataset> --help):\n" + "\n".join(lines) + "\n\nbuilt datasets:\n"
            + f"  {PROG} inspect OUT   counts, codec, clip lengths, a preview PNG\n"
            + f"  {PROG} verify OUT    checksums, indexes, every sample decoded\n")


def dataset_help(name: str, reader: Callable[..., Any]) -> str:
    """Usage, the reader's docstring and its options with defaults, read off its signature."""
    options = _dataset_options(reader)
    flags = " ".join(f"[--{p.name.replace('_', '-')} VALUE]" for p in options)
    lines = [f"usage: {PROG} {name} --root ROOT --out OUT [build options] {flags}".rstrip(), "",
             _summary(reader), "", inspect.getdoc(reader) or "", "",
             "dataset options (--name value or name=value; build options: "
             f"{PROG} --help):"]
    width = max([len(p.name) for p in options], default=0) + 2
    for p in options:
        default = "" if p.default is inspect.Parameter.empty else f"default: {p.default!r}"
        lines.append(f"  --{p.name.replace('_', '-'):<{width}} {default}".rstrip())
    return "\n".join(lines) + "\n"


def reader_options(reader: Callable[..., Any], dataset: str, args: list[str]) -> dict[str, str]:
    """``--name value``, ``--name=value`` or ``name=value`` → ``{"name": "value"}`` (dashes in
    names become underscores), checked against the reader's keywords so that a typo is named
    before anything is read. Values stay strings: the readers coerce them."""
    known = [p.name for p in _dataset_options(reader)]
    parameters = inspect.signature(reader).parameters.values()
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    options: dict[str, str] = {}
    tokens = iter(args)
    for token in tokens:
        name, has_value, value = token.removeprefix("--").partition("=")
        if token.startswith("--") and not has_value:
            value = next(tokens, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"dataset option {token} needs a value")
        elif not has_value:
            raise ValueError(f"unexpected argument {token!r} "
                             "(dataset options are --name value or name=value)")
        key = name.replace("-", "_")
        if key not in known and not accepts_any:
            names = ", ".join(f"--{n.replace('_', '-')}" for n in known) or "none"
            raise ValueError(f"dataset {dataset} has no option --{name}; its options: {names}")
        options[key] = value
    return options


def _error(message: str, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def tools_main(argv: list[str]) -> int:
    """``inspect OUT`` and ``verify OUT`` (tools.py)."""
    import json

    parser = argparse.ArgumentParser(prog=f"{PROG} {argv[0]}")
    parser.add_argument("out", help="a built dataset (the folder holding dataset.json)")
    if argv[0] == "inspect":
        parser.description = "What a built dataset holds, and a preview grid of its samples."
        parser.add_argument("--preview", help="PNG to write (default OUT/preview.png); '' for none")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
    else:
        parser.description = ("Every shard's checksum, every index and every sample decoded; "
                              "exit 1 when anything differs from the build.")
        parser.add_argument("--no-decode", action="store_true", help="checksums and indexes only")
    args = parser.parse_args(argv[1:])
    from . import tools as dataset_tools

    try:
        if argv[0] == "verify":
            report = dataset_tools.verify_dataset(args.out, decode=not args.no_decode)
            for split, entry in report["splits"].items():
                problems = entry["shards"] + entry["samples"]
                print(f"{split}: {entry['shards_checked']} shards, {entry['samples_decoded']} "
                      f"samples decoded, {len(problems)} problems")
                for problem in problems:
                    print(f"  {problem}")
            print("ok: the dataset is as built" if report["ok"] else "FAILED")
            return 0 if report["ok"] else 1
        report = dataset_tools.inspect_dataset(args.out)
        preview = Path(args.out) / "preview.png" if args.preview is None else args.preview
        if preview:
            report["preview"] = str(dataset_tools.preview(args.out, preview))
    except (FileNotFoundError, ValueError) as error:
        return _error(str(error).splitlines()[0], 2)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['dataset']} ({report['modality']}), classes: {', '.join(report['class_names'])}")
    for split, entry in report["splits"].items():
        extra = f", frames {entry['frames']}" if "frames" in entry else ""
        print(f"  {split}: {entry['samples']} samples in {entry['shards']} shards "
              f"({entry['bytes'] / 2**20:.1f} MiB), {entry['media']}, sizes "
              f"{', '.join(entry['frame_sizes'])}{extra}, skipped at build "
              f"{entry['skipped_inputs']}")
        print(f"    per class: {entry['per_class']}")
    print(f"  skipped inputs: {report['skipped_inputs']} ({report['reader_skipped']} by the reader, "
          "listed in dataset.json; the rest at build, in each split's manifest.json)")
    if "preview" in report:
        print(f"  preview: {report['preview']}")
    return 0


TOOLS = ("inspect", "verify")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return tools_main(argv)
    help_asked = "-h" in argv or "--help" in argv  # answered before parsing: no --root needed
    parser = make_parser()
    if not help_asked:
        args, extra = parser.parse_known_args(argv)
        if args.workers is not None and args.workers < 1:
            parser.error("--workers must be at least 1")
    try:
        from .sources.registry import READERS
    except ImportError as err:
        return _error(f"the dataset readers are not available ({err})")
    if help_asked:
        dataset = next((token for token in argv if token in READERS), None)
        print(dataset_help(dataset, READERS[dataset]) if dataset else general_help(READERS), end="")
        return 0
    if args.dataset not in READERS:
        parser.error(f"unknown dataset {args.dataset!r}; known: {', '.join(sorted(READERS))}")
    reader = READERS[args.dataset]
    try:
        options = reader_options(reader, args.dataset, extra)
    except ValueError as err:
        parser.error(str(err))

    from .build import BuildOptions, build_dataset, format_summary
    from .layout import BuildError
    from .media import EncodeOptions
    from .sources.base import SourceFormatError

    try:
        crop = tuple(int(v) for v in args.video_crop.split(",")) if args.video_crop else None
        encode = EncodeOptions(args.jpeg_quality, args.video_codec, args.vp9_crf,
                               args.keyframe_interval, args.chunk_frames, crop, args.face_crop)
    except ValueError as err:
        parser.error(f"--video-crop / encoding options: {err}")
    if args.face_crop:
        from .faces import detector

        try:
            detector()
        except ImportError as err:
            return _error(f"--face-crop: {err}", 2)
    build = BuildOptions(encode, int(args.shard_size * 2**20),
                         **({"workers": args.workers} if args.workers else {}))
    try:
        try:
            source = reader(args.root, **options)
        except SourceFormatError as err:
            return _error(str(err))
        except ValueError as err:  # the readers' signal for a bad option value (sources/options.py)
            parser.error(f"dataset option: {err}")
        summaries = build_dataset(source, args.out, build, progress=not args.no_progress)
    except (BuildError, FileNotFoundError) as err:
        return _error(str(err))
    except KeyboardInterrupt:
        return _error(f"interrupted; run the same command again to resume into {args.out}", 130)
    print(format_summary(source, summaries))
    empty = [s.split for s in summaries if s.samples == 0]
    if empty:
        return _error(f"no sample could be stored for split(s) {empty} of {args.out}; "
                      "the skip reasons are above and in their manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
