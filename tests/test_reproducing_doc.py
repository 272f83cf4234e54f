"""Every command of docs/reproducing.md and of the README's "Reproducing S4D" section, run at toy
scale in a temporary folder standing for the repository root: a command that no longer works,
or a path that no longer leads from one command to the next, fails here.

The commands are read out of the documents' bash blocks by bash itself (continuations,
comments, variables, loops and brace expansion as a user's shell treats them), with `python`,
`deepspeed`, `ray` and `tensorboard` defined as functions that record their arguments and no
other command available. Each distinct command then runs in this process:

- the official repository (`git clone https://github.com/MSA-LMC/S4D /data/S4D`, `git -C
  /data/S4D checkout <commit>`): a fixture with its AffectNet-7 lists where the clone would be;
- dataset shards (`python -m s4d_dist.shards <dataset>`): built in full from the fixture
  datasets of tests/fixtures_datasets.py, put where `--root /data/<Name>` (or a list option's
  `/data/<Name>/...`) points, with `--workers 1` (the output does not depend on it:
  test_shards_build.py); `verify`, `inspect` in full;
- the toy-scale run (§7): in full, on fewer synthetic samples (SPLITS) for one epoch
  (TOY_OVERRIDES); `python -m s4d_dist.demo` likewise;
- paper-scale training (`launch/pretrain.py`, `launch/finetune.py` with the paper presets,
  under `deepspeed` or not): too slow here, so resolved as `--print-config` would and checked
  as far as the run would before its first step — its training and test shards are the ones
  built above, its `init_checkpoint` is the file a pre-training command writes or the released
  official checkpoint the document says to download; `--print-config` runs in full;
- Ray (`launch/sweep.py`): resolved and checked as the driver does before it starts Ray
  (config, every fold's training shards); `ray up` / `ray down` read the cluster file, `ray
  submit` resolves the driver's own arguments;
- a run that was only checked is then stood in for by a finished tiny fine-tuning run, copied
  to the folder the run would have written, so that `python -m s4d_dist.analyze` runs in full
  on every folder a document names;
- `tensorboard --logdir`: the event files there are read (`--inspect`) instead of served.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import fixtures_datasets as fx
from conftest import tiny_overrides

pytest.importorskip("matplotlib")  # the analysis figures

REPO = Path(__file__).resolve().parents[1]
DOCS = [(REPO / "docs" / "reproducing.md", None), (REPO / "README.md", "## Reproducing S4D")]
RECORDED = ("python", "deepspeed", "ray", "tensorboard", "git")
PAPER_WEIGHTS = "weights_fp32.pt"  # what a finished run exports (train/loop.py), fine-tuning loads
# The released pre-trained MAE, which the documents have the reader download by hand.
OFFICIAL_WEIGHTS = "checkpoints/vit_base_voxceleb2+affectnet_100.pt"
OFFICIAL_REPO = "https://github.com/MSA-LMC/S4D"
OFFICIAL_LISTS = "finetune/data/AffectNetdataset"  # in the official repository

# Fixture datasets standing for the raw ones at /data/<Name>.
RAW = {"VoxCeleb2": fx.make_voxceleb2, "DFEW": fx.make_dfew, "FERV39K": fx.make_ferv39k,
       "MAFW": fx.make_mafw, "RAF-DB": fx.make_rafdb}
# Toy scale: fewer synthetic samples per class (the documented count → the one built here), and
# for both stages alike one epoch of the test suite's tiny ViT without loader processes; the
# split names, presets and everything else as documented.
SPLITS = {"train=300,test=20": "train=5,test=1", "train=100,test=20": "train=3,test=1",
          "part1=20,part2=20,part3=20": "part1=2,part2=2,part3=2"}
TOY_OVERRIDES = ["optim.epochs=1", "data.workers=0", *(
    o for o in tiny_overrides(Path(), Path(), "finetune") if o.startswith("model."))]
TOY_PRESETS = ("demo", "demo_finetune")


def commands(path: Path, section: str | None) -> list[list[str]]:
    """The argument lists of every command in the document's bash blocks (within `section`,
    up to the next heading of its level, when given), as bash would run them."""
    text = path.read_text()
    if section is not None:
        start = text.index(section + "\n")
        level = section.split()[0] + " "
        end = text.find("\n" + level, start + len(section))
        text = text[start:end if end >= 0 else None]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert blocks and 2 * len(blocks) == text.count("```"), (
        f"{path.name}: a code block that is not bash, whose commands this test would miss")
    functions = "".join(f"{name}() {{ record {name} \"$@\"; }}\n" for name in RECORDED)
    script = ("record() { printf '%s\\x1f' \"$@\"; printf '\\x1e'; }\n"
              "command_not_found_handle() { record UNKNOWN \"$@\"; }\n" + functions
              + "\n".join(blocks))
    done = subprocess.run(["bash", "-c", script], env={"PATH": ""}, capture_output=True,
                          text=True, timeout=30, executable=shutil.which("bash"))
    assert done.returncode == 0 and not done.stderr, done.stderr
    argvs = [record.split("\x1f")[:-1] for record in done.stdout.split("\x1e")[:-1]]
    unknown = [argv for argv in argvs if argv[0] == "UNKNOWN"]
    assert not unknown, f"{path.name}: commands this test does not know how to run: {unknown}"
    return argvs


class Session:
    """The folder the commands run in, what they built, and what a checked run would write."""

    def __init__(self, root: Path, stand_in: Path, monkeypatch) -> None:
        self.root, self.stand_in, self.monkeypatch = root, stand_in, monkeypatch
        # weights a checked pre-training run would write, or the reader downloads (absolute)
        self.exports: set[str] = {os.path.abspath(OFFICIAL_WEIGHTS)}

    # ---- datasets and shards -------------------------------------------------------------

    def raw(self, path: str) -> str:
        """`/data/<Name>[/...]` → the same path in the fixture standing for /data/<Name>, made
        on first use; `/data/S4D` is the official repository with the AffectNet-7 lists of the
        AffectNet fixture."""
        name, _, rest = path.removeprefix("/data/").partition("/")
        root = self.root / "raw" / name
        if not root.exists():
            if name == "AffectNet":  # its 8-class pre-training list and the 7-class lists
                facts = fx.make_affectnet(str(root), classes=8)
                (root / "lists").mkdir()
                shutil.copy(facts["label_files"]["train"], root / "lists" / "affectnet_pretrain.txt")
                fx.make_affectnet(str(root), classes=7)
            elif name == "S4D":
                affectnet = Path(self.raw("/data/AffectNet"))
                (root / OFFICIAL_LISTS).mkdir(parents=True)
                for split in ("train", "test"):
                    shutil.copy(affectnet / f"{split}_affectnet7_2w.txt", root / OFFICIAL_LISTS)
            else:
                RAW[name](str(root))
        return str(root / rest) if rest else str(root)

    def git(self, argv: list[str]) -> None:
        """`git clone <official repository> /data/S4D`, `git -C /data/S4D checkout <commit>`."""
        if argv[0] == "clone":
            assert argv[1] == OFFICIAL_REPO and argv[2].startswith("/data/"), argv
            self.raw(argv[2])
        else:
            assert argv[0] == "-C" and argv[2] == "checkout" and len(argv) == 4, argv
            assert os.path.isdir(self.raw(argv[1])), f"{argv[1]} was not cloned first"

    def shards(self, argv: list[str]) -> None:
        from s4d_dist.shards.__main__ import main

        if argv[0] not in ("verify", "inspect"):
            argv = [self.raw(a) if a.startswith("/data/") else SPLITS.get(a, a) for a in argv]
            argv = [f"{a.split('=', 1)[0]}={self.raw(a.split('=', 1)[1])}"
                    if "=/data/" in a else a for a in argv]  # list options: train=/data/...
            for flag in ("--workers", "--video-crop"):  # the fixture's clips are 16 × 16: no cut to take
                if flag in argv:
                    del argv[argv.index(flag):argv.index(flag) + 2]
            argv += ["--workers", "1", "--no-progress"]
        assert main(argv) == 0, argv

    # ---- training ------------------------------------------------------------------------

    def train(self, script: str, argv: list[str]) -> None:
        """`launch/{pretrain,finetune}.py ARGS`: in full at toy scale, else checked."""
        from s4d_dist.train import cli
        from s4d_dist.train.loop import run_dir

        task = {"launch/pretrain.py": "pretrain", "launch/finetune.py": "finetune"}[script]
        if "--print-config" in argv:
            with pytest.raises(SystemExit) as printed:
                cli.parse(task, argv)
            assert printed.value.code == 0, argv
            return
        cfg = cli.parse(task, argv)
        if argv[argv.index("--config") + 1] in TOY_PRESETS:
            cli.main(task, argv + TOY_OVERRIDES)
            return
        self.check_run(cfg)
        if task == "pretrain":
            self.exports.add(os.path.abspath(run_dir(cfg) / PAPER_WEIGHTS))

    def check_run(self, cfg) -> None:
        """What a run reads before its first step: its training shards, its test split, the
        checkpoint it starts from; then the stand-in run where it would have finished."""
        from s4d_dist.data.loaders import eval_catalog
        from s4d_dist.orchestrate import runs
        from s4d_dist.train.loop import run_dir

        if cfg.task == "finetune":
            start = os.path.abspath(cfg.init_checkpoint)
            assert start in self.exports or os.path.isfile(start), (
                f"init_checkpoint={cfg.init_checkpoint} is neither there nor what a checked "
                f"pre-training command writes ({sorted(self.exports)})")
            if not os.path.isfile(start):  # the checked pre-training's export, stood in for
                os.makedirs(os.path.dirname(start), exist_ok=True)
                shutil.copy(self.stand_in / PAPER_WEIGHTS, start)
        runs.check_data(cfg)  # preflight.check included: init_checkpoint must be a file
        if cfg.task == "finetune":
            eval_catalog(cfg, "test", "video")
            self.stand_in_at(run_dir(cfg))

    def stand_in_at(self, folder: Path) -> None:
        if not folder.exists():
            shutil.copytree(self.stand_in, folder, ignore=shutil.ignore_patterns("checkpoints", "tb"))

    def deepspeed(self, argv: list[str]) -> None:
        from deepspeed.launcher import runner

        args = runner.parse_args(argv)
        self.train(args.user_script, args.user_args)

    def sweep(self, argv: list[str], check_data: bool = True) -> None:
        """`launch/sweep.py ARGS` up to where the driver would start Ray."""
        from s4d_dist.orchestrate import cli, kfold_runs, runs

        mode, cfg = cli.parse(argv)
        if not check_data:
            return
        cfg = runs.absolute_paths(cfg)
        for fold_cfg in (kfold_runs.fold_configs(cfg).values() if mode == "kfold" else [cfg]):
            self.check_run(fold_cfg)

    def ray(self, argv: list[str]) -> None:
        """`ray up|down CLUSTER.yaml`, `ray submit CLUSTER.yaml launch/sweep.py -- ARGS`."""
        cluster = yaml.safe_load((self.root / argv[1]).read_text())
        assert cluster["cluster_name"], argv
        if argv[0] == "submit":
            assert argv[2:4] == ["launch/sweep.py", "--"], argv
            self.sweep(argv[4:], check_data=False)  # its paths are on the cluster's storage
        else:
            assert argv[0] in ("up", "down") and len(argv) == 2, argv

    # ---- results -------------------------------------------------------------------------

    def python(self, argv: list[str]) -> None:
        if argv[:2] == ["-m", "s4d_dist.shards"]:
            self.shards(argv[2:])
        elif argv[:2] == ["-m", "s4d_dist.analyze"]:
            from s4d_dist.analyze import main
            assert main(argv[2:]) == 0, argv
        elif argv[:2] == ["-m", "s4d_dist.demo"]:
            from s4d_dist import demo
            from s4d_dist.shards import synthetic

            build = synthetic.build_synthetic
            self.monkeypatch.setattr(synthetic, "build_synthetic",
                                     lambda *args, **kwargs: build(*args, **{**kwargs, "workers": 1}))
            self.monkeypatch.setattr(demo, "IMAGE_SPLITS", {"train": 5, "test": 1})
            self.monkeypatch.setattr(demo, "VIDEO_SPLITS", {"train": 3, "test": 1})
            assert demo.main(argv[2:] + TOY_OVERRIDES)["last"]["samples"] == 7
        elif argv[0] == "launch/sweep.py":
            self.sweep(argv[1:])
        else:
            self.train(argv[0], argv[1:])

    def tensorboard(self, argv: list[str]) -> None:
        from tensorboard.backend.event_processing import event_file_inspector

        assert argv[0] == "--logdir" and len(argv) == 2, argv
        assert list((self.root / argv[1]).rglob("events.out.tfevents.*")), argv
        event_file_inspector.inspect(logdir=argv[1], event_file="", tag="")


@pytest.mark.slow
def test_every_documented_command_runs(finished_finetune_runs, tmp_path, monkeypatch):
    shutil.copytree(REPO / "launch", tmp_path / "launch")  # the scripts and cluster files named
    monkeypatch.chdir(tmp_path)
    session = Session(tmp_path, finished_finetune_runs[0], monkeypatch)
    seen: set[tuple[str, ...]] = set()
    for doc, section in DOCS:
        for argv in commands(doc, section):
            if tuple(argv) in seen:
                continue
            seen.add(tuple(argv))
            run: Callable[[list[str]], None] = getattr(session, argv[0])
            try:
                run(argv[1:])
            except (Exception, SystemExit) as error:
                raise AssertionError(f"{doc.name}: `{' '.join(argv)}` failed: {error!r}") from error


def test_documented_step_counts_are_the_plans():
    """The steps per epoch the documents and the paper presets' comments tell a reader to expect
    on the official 2 GPUs are what the training plan gives (16 clips, 32 images a rank; image
    rate 0.5), for the official train sizes (method.md §4) and two AffectNet-7 list sizes."""
    from s4d_dist import config
    from s4d_dist.data.plan import step_counts, train_batches_per_rank

    def steps(clips: int, images: int, cfg) -> list[int]:
        d = cfg.data
        return step_counts([train_batches_per_rank(clips, 2, d.video_batch_size),
                            train_batches_per_rank(images, 2, d.image_batch_size)],
                           [d.video_rate, d.image_rate])

    for preset, train_sizes, video_steps in (("finetune_dfew", (9356, 9356, 9357, 9358, 9361), 292),
                                             ("finetune_ferv39k", (31088,), 971),
                                             ("finetune_mafw", (7333, 7335, 7339, 7340, 7341), 229)):
        cfg = config.load(preset)
        for clips in train_sizes:
            assert steps(clips, 20_000, cfg) == [video_steps, 156]
            assert steps(clips, 283_901, cfg) == [video_steps, 2_217]
        comment = (REPO / "s4d_dist" / "presets" / f"{preset}.yaml").read_text()
        assert f"{video_steps} : 156" in comment and f"{video_steps} : 2,217" in comment, preset
    text = (REPO / "docs" / "reproducing.md").read_text()
    assert "= **292**" in text and "156 at 20,000 images, 2,217 at all 283,901" in text
