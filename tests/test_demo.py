"""`python -m s4d_dist.demo` as a user runs it, at a tiny size (fewer synthetic samples, the
suite's tiny ViT, one epoch a stage): everything it writes goes where `output_dir=` says, a piped
console gets no progress bars, every file it writes has the mode the umask gives, and each run
folder is one to share — a model card that says what the run did and whose load instructions
run as written, safetensors that carry their classes and model config, the final MAE loss."""
import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import tiny_overrides
from test_train import scalars

REPO = Path(__file__).resolve().parents[1]
UMASK = 0o002  # not the usual 022, so that a hard-coded 0644 would fail
TOY = ["optim.epochs=1", "data.workers=0", "logging.log_every=1", "data.video_rate=1.0",
       *(o for o in tiny_overrides(Path(), Path(), "finetune") if o.startswith("model."))]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(folder it ran in, its results, its console) of `python -m s4d_dist.demo
    output_dir=elsewhere/runs` at a tiny size, its console piped, under UMASK."""
    from s4d_dist import demo
    from s4d_dist.shards import synthetic

    root = tmp_path_factory.mktemp("demo")
    build = synthetic.build_synthetic
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "build_synthetic",
                      lambda *args, **kwargs: build(*args, **{**kwargs, "workers": 1}))
        patch.setattr(demo, "IMAGE_SPLITS", {"train": 5, "test": 1})
        patch.setattr(demo, "VIDEO_SPLITS", {"train": 3, "test": 1})
        patch.chdir(root)
        umask = os.umask(UMASK)
        try:
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                results = demo.main(["output_dir=elsewhere/runs", *TOY])
        finally:
            os.umask(umask)
    return root, results, console.getvalue()


def test_everything_goes_where_output_dir_says(demo_run):
    root, results, console = demo_run
    out = root / "elsewhere" / "runs"
    assert [p.name for p in root.iterdir()] == ["elsewhere"]  # no runs/demo beside it
    assert {p.name for p in out.iterdir()} == {"data", "pretrain", "finetune"}
    assert json.loads((out / "finetune" / "metrics.json").read_text()) == results
    assert yaml.safe_load((out / "finetune" / "config.yaml").read_text())["output_dir"] == \
        "elsewhere/runs"
    assert f"tensorboard --logdir {Path('elsewhere/runs')}" in console
    assert "\r" not in console  # no progress bars in a piped console
    assert "[demo] DFER  last" in console and "[demo] finished in" in console


def test_every_output_has_the_mode_the_umask_gives(demo_run):
    root, _, _ = demo_run
    wrong = []
    for path in root.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~UMASK
        mode = path.stat().st_mode & 0o777
        if mode != want:
            wrong.append(f"{path.relative_to(root)} {oct(mode)}")
    assert not wrong, wrong
    assert (root / "elsewhere" / "runs" / "finetune" / "model.safetensors").is_file()


def _card(folder: Path) -> str:
    return (folder / "README.md").read_text()


def test_pretraining_reports_its_final_mae_loss(demo_run):
    root, _, _ = demo_run
    folder = root / "elsewhere" / "runs" / "pretrain"
    loss = json.loads((folder / "metrics.json").read_text())["train_loss"]
    logged = scalars(folder)  # every step's loss (log_every=1), one epoch
    steps = {m: [v for _, v in logged[f"loss/{m}"]] for m in ("image", "video")}
    assert set(loss) == {"all", "image", "video"}
    for modality, values in steps.items():
        assert loss[modality] == pytest.approx(np.mean(values), rel=1e-6)
    assert loss["all"] == pytest.approx(np.mean(steps["image"] + steps["video"]), rel=1e-6)
    assert f"all {loss['all']:.4f}, " in _card(folder)


def test_model_card_says_what_the_run_did(demo_run):
    root, results, _ = demo_run
    out = root / "elsewhere" / "runs"
    folder = out / "finetune"
    card, meta = _card(folder), json.loads((folder / "model.json").read_text())
    names = json.loads((out / "data" / "video" / "dataset.json").read_text())["class_names"]
    assert f"| video | {', '.join(names)} ({len(names)}) |" in card
    # data: the sizes the manifests give (7 classes; 3 train clips a class, 15 % held out)
    manifest = json.loads((out / "data" / "video" / "train" / "manifest.json").read_text())
    held_out = 21 - int(re.search(r"\| train \| video \| synthetic-video \| (\d+) \|", card)[1])
    assert manifest["samples"] == 21 and 1 <= held_out < 21
    assert (f"| val (held out from train, 15% of its clips) | video | synthetic-video | "
            f"{held_out} |") in card
    assert "| train | image | synthetic-image | 35 |" in card
    test_split = Path("elsewhere/runs/data/video/test")  # as the demo named it, from its folder
    assert f"| test | video | synthetic-video | 7 | `{test_split}` |" in card
    # metrics with their split, as metrics.json has them
    last = results["last"]
    assert (f"| video | last epoch | {last['war']:.1f} | {last['uar']:.1f} | "
            f"{last['f1_weighted']:.1f} | {last['f1_macro']:.1f} | 7 |") in card
    assert f"| image | best epoch ({results['best_epoch']}, chosen on val video WAR) |" in card
    assert "Scored on the test split" in card
    # the safetensors describe themselves
    with safe_open(folder / "model.safetensors", "pt") as weights:
        stored = weights.metadata()
    assert json.loads(stored["classes"]) == meta["classes"] == {"image": names, "video": names}
    assert json.loads(stored["model"]) == meta["model"] and stored["task"] == "finetune"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_model_card_load_instructions_run_as_written(demo_run, stage, monkeypatch):
    """Every Python block of the card, run in the folder the demo ran in."""
    root, _, _ = demo_run
    folder = root / "elsewhere" / "runs" / stage
    monkeypatch.chdir(root)
    blocks = re.findall(r"```python\n(.*?)```", _card(folder), re.S)
    assert len(blocks) == 2
    done = [dict(), dict()]
    for block, namespace in zip(blocks, done):
        exec(block, namespace)
    ours, plain = done
    state = torch.load(folder / "weights_fp32.pt", weights_only=True)
    assert set(plain["state"]) == set(state)
    assert all(torch.equal(plain["state"][k], state[k]) for k in state)
    if stage == "finetune":
        assert plain["classes"] == ours["model"].classes
        assert ours["probs"].shape == (2, 7)
        assert torch.allclose(ours["probs"].sum(-1), torch.ones(2))
    else:
        assert type(ours["mae"]).__name__ == "PretrainMAE"


def test_demo_refuses_what_it_sets_itself_at_once(tmp_path, monkeypatch, capsys):
    from s4d_dist import demo

    monkeypatch.chdir(tmp_path)
    for args, said in ((["run_name=mine"], "run_name=mine: the demo sets"),
                       (["--output", "a", "output_dir=b"],
                        "--output a and output_dir=b name different folders; give one")):
        with pytest.raises(SystemExit) as stop:
            demo.main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and said in err, err
    assert not list(tmp_path.iterdir())
