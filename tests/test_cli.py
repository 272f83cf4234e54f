"""Command lines: overrides anywhere among the flags, --print-config, --help listing presets and
datasets with their options, ds_config's help; run as a user would, in subprocesses."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s4d_dist import config
from s4d_dist.shards.__main__ import main as shards_main
from s4d_dist.shards.sources.registry import READERS
from s4d_dist.train import cli

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_overrides_anywhere_among_the_flags():
    cfg = cli.parse("finetune", ["data.fold=1", "--config", "demo_finetune", "seed=2",
                                 "--local_rank", "0", "optim.epochs=3"])
    assert (cfg.task, cfg.data.fold, cfg.seed, cfg.optim.epochs) == ("finetune", 1, 2, 3)


@pytest.mark.parametrize("script", ["launch/pretrain.py", "launch/finetune.py", "launch/sweep.py"])
def test_print_config_prints_the_resolved_yaml_and_exits(script):
    done = run(script, "seed=7", "--config", "demo", "--print-config", "data.fold=2")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert (printed["seed"], printed["data"]["fold"]) == (7, 2)
    assert printed == yaml.safe_load(config.to_yaml(config.from_values(("printed", printed))))


def test_training_as_a_module_as_deepspeed_and_torchrun_start_it():
    done = run("-m", "s4d_dist.train", "--local_rank=0", "finetune", "--config", "demo", "seed=3",
               "--print-config")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert (printed["task"], printed["seed"]) == ("finetune", 3)
    assert run("-m", "s4d_dist.train", "--config", "demo").returncode == 2


def test_help_lists_presets_and_examples_and_bad_overrides_are_one_line():
    helped = run("launch/sweep.py", "--help")
    assert helped.returncode == 0
    assert "presets:" in helped.stdout and "examples:" in helped.stdout
    for preset in ("demo", "demo_finetune", "finetune_dfew", "pretrain_vit_base"):
        assert f"\n  {preset} " in helped.stdout
    bad = run("launch/finetune.py", "--config", "demo", "data.sed=1", "--print-config")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "unknown config key 'data.sed'" in bad.stderr
    bad_demo = run("-m", "s4d_dist.demo", "--output", "/nonexistent/demo", "data.sed=1")
    assert bad_demo.returncode == 2 and "Traceback" not in bad_demo.stderr
    assert "unknown config key 'data.sed'" in bad_demo.stderr


def test_shards_help_lists_every_dataset_and_its_options(capsys):
    assert shards_main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in READERS:
        assert f"\n  {name} " in listing
    assert shards_main(["affectnet", "--help"]) == 0
    affectnet = capsys.readouterr().out
    assert affectnet.startswith("usage: python -m s4d_dist.shards affectnet --root ROOT --out OUT")
    assert "--image-root   default: 'Manually_Annotated_Images'" in affectnet
    assert "Read AffectNet image lists" in affectnet  # the reader's docstring


def test_ds_config_help_and_errors_without_traceback():
    helped = run("-m", "s4d_dist.train.ds_config", "--help")
    assert helped.returncode == 0 and "world_size=N" in helped.stdout
    bad = run("-m", "s4d_dist.train.ds_config", "no_such_preset")
    assert bad.returncode == 2 and "unknown preset 'no_such_preset'" in bad.stderr
    assert "Traceback" not in bad.stderr


class _Parsing(Exception):
    """Raised where a module's `main` starts parsing, with the parser it built."""


def module_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `python -m module` builds: its make_parser(), or the one its main() parses with."""
    package = module in ("s4d_dist.predict", "s4d_dist.shards")  # their __main__.py
    entry = importlib.import_module(f"{module}.__main__" if package else module)
    if hasattr(entry, "make_parser"):
        return entry.make_parser()

    def stop(parser, *args, **kwargs):
        raise _Parsing(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    with pytest.raises(_Parsing) as parsing:
        entry.main(["--help"])
    return parsing.value.args[0]


@pytest.mark.parametrize("module", ["s4d_dist.demo", "s4d_dist.analyze", "s4d_dist.predict",
                                    "s4d_dist.shards", "s4d_dist.train.ds_config"])
def test_module_entry_points_name_themselves_and_explain_every_option(module, monkeypatch):
    """`python -m X --help` says `usage: python -m X` — not the file's name, which `-m` puts in
    sys.argv[0] (`demo.py`, `__main__.py`) — and has a line of help for every option."""
    parser = module_parser(module, monkeypatch)
    assert parser.prog == f"python -m {module}"
    assert [a.dest for a in parser._actions if not a.help] == []


def test_training_as_a_module_names_itself():
    helped = run("-m", "s4d_dist.train", "finetune", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m s4d_dist.train finetune ")
    assert run("launch/finetune.py", "--help").stdout.startswith("usage: launch/finetune.py ")


@pytest.mark.parametrize("command, args, expected", [
    ("s4d-shards", ["--help"], "\n  synthetic "),
    ("s4d-finetune", ["--config", "demo", "--print-config"], "task: finetune\n"),
    ("s4d-predict", ["--help"], "--face-detect"),
])
def test_installed_commands(command, args, expected):
    """The console scripts of setup.py (installed by `pip install -e .`) run and exit 0."""
    executable = Path(sys.executable).parent / command
    assert executable.exists(), f"{command} is not installed: pip install -e ."
    done = subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_demo_reuses_a_finished_stage_only_under_the_same_config(finished_finetune_runs,
                                                                 synthetic_shards, tmp_path,
                                                                 capsys, monkeypatch):
    """A rerun of the demo (or of a benchmark built on it) reuses a finished stage, but never
    one trained under other settings: that would report another experiment's scores."""
    import shutil

    from s4d_dist import demo
    from s4d_dist.train.faults import EXIT_USAGE
    from conftest import tiny_overrides

    shutil.copytree(finished_finetune_runs[0], tmp_path / "seed0")
    same = tiny_overrides(synthetic_shards, tmp_path, "finetune") + [
        "run_name=seed0", "seed=0", "optim.epochs=1", "data.backend=torch"]
    monkeypatch.setattr(demo, "train", lambda *_: pytest.fail("a finished stage was trained again"))

    # Settings that change nothing the run computed (where it logs, how it checkpoints) reuse it.
    for overrides in (same, same + ["logging.log_every=3", "checkpoint.keep=5"]):
        assert demo.stage("demo_finetune", overrides, None) == tmp_path / "seed0"
        assert "reusing the finished run" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:
        demo.stage("demo_finetune", same + ["optim.min_lr=1e-7", "model.moae.top_k=2"], None)
    assert stop.value.code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(tmp_path / "seed0") in err[0] and "another config" in err[0]
    assert "model.moae.top_k: 1 → 2" in err[0] and "optim.min_lr:" in err[0], err[0]
