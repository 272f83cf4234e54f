"""Ray orchestration without a cluster: search spaces checked before any trial, the cluster
launcher YAMLs against Ray's own schema, resource packing, and the command line's refusals."""
import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray import tune
from ray.autoscaler._private.util import prepare_config, validate_config

from s4d_dist import config
from s4d_dist.orchestrate import cluster, kfold_runs, runs, space, sweep

REPO = Path(__file__).resolve().parents[1]


def load(*overrides):
    return config.load("demo_finetune", list(overrides))


def checked(space_yaml: str, *overrides):
    """The dimensions of a space given as the YAML a preset would hold."""
    return space.check(runs.with_values(load(*overrides), "test space",
                                        {"sweep": {"space": yaml.safe_load(space_yaml)}}))


def test_space_dotted_and_nested_keys_become_tune_domains():
    dims = checked("""
        optim.base_lr: {loguniform: [1.0e-5, 1.0e-3]}
        optim.layer_decay: {uniform: [0.6, 0.9]}
        model.moae: {num_experts: {choice: [2, 4]}, top_k: {grid: [1, 2]}}
        mask.video_ratio: {quniform: [0.8, 0.95, 0.05]}
        data.image_rate: {choice: [0.25, 0.5]}
        model.moae.capacity_factor: {uniform: [1.0, 2.0]}
        """)
    assert [d.key for d in dims] == ["optim.base_lr", "optim.layer_decay", "model.moae.num_experts",
                                     "model.moae.top_k", "mask.video_ratio", "data.image_rate",
                                     "model.moae.capacity_factor"]
    params = space.param_space(dims)
    assert isinstance(params["optim"]["base_lr"], tune.search.sample.Float)
    assert params["model"]["moae"]["top_k"] == {"grid_search": [1, 2]}
    assert isinstance(params["model"]["moae"]["num_experts"], tune.search.sample.Categorical)


@pytest.mark.parametrize("space_yaml, message", [
    ("optim.base_l: {loguniform: [1.0e-5, 1.0e-3]}",
     r"sweep.space.optim.base_l .*unknown config key 'optim.base_l'; did you mean 'optim.base_lr'"),
    ("model: {moae: {topk: {choice: [1, 2]}}}", r"unknown config key 'model.moae.topk'"),
    ("model.moae.top_k: {choice: [1, 9]}",
     r"sweep.space.model.moae.top_k \(choice \[1, 9\]\), value 9: "
     r"model.moae.top_k 9 must be in 1..model.moae.num_experts \(4\)"),
    ("model.moae.num_experts: {uniform: [2, 8]}",
     r"sweep.space.model.moae.num_experts \(uniform \[2, 8\]\), value 4.29.*model.moae.num_experts"),
    ("mask.video_ratio: {uniform: [0.5, 1.0]}", r"mask.video_ratio must be in \[0, 1\)"),
    ("optim.base_lr: {loguniform: [0, 1.0e-3]}", r"loguniform needs low > 0"),
    ("optim.base_lr: {uniform: [1.0e-3, 1.0e-5]}", r"needs low < high"),
    ("optim.base_lr: {gaussian: [1.0e-3, 1.0e-5]}",
     r"sweep.space.optim.base_lr.gaussian: expected \{kind: \[values\]\} with kind one of loguniform"),
    ("optim.base_lr: 0.001", r"sweep.space.optim.base_lr: expected \{kind: \[values\]\}"),
    ("model.moae.top_k: {choice: []}", r"choice needs a non-empty list"),
    ("output_dir: {choice: [a, b]}", r"'output_dir' is set by the orchestrator"),
    ("ray.num_workers: {choice: [1, 2]}", r"'ray' is set by the orchestrator"),
    # each value alone fits the preset's top_k 2 / 4 experts; top_k 3 with 2 experts does not
    ("{model.moae.top_k: {choice: [1, 3]}, model.moae.num_experts: {choice: [2, 4]}}",
     r"the combination \{'model.moae.top_k': 3, 'model.moae.num_experts': 2\} is invalid"),
])
def test_bad_search_spaces_fail_naming_the_key(space_yaml, message):
    with pytest.raises(space.SpaceError, match=message):
        checked(space_yaml)


def test_sweep_metric_must_be_one_the_task_reports(tmp_path):
    cfg = load("sweep.metric=val_acc", "sweep.space.optim.base_lr.choice=[0.001]")
    with pytest.raises(config.ConfigError, match="sweep.metric 'val_acc' is not reported.*val_uar, val_war"):
        sweep.check(cfg)
    pre = config.load("demo", ["sweep.space.optim.base_lr.choice=[0.001]"])
    with pytest.raises(config.ConfigError, match="reported each epoch: train_loss"):
        sweep.check(pre)


def test_new_config_fields_are_validated():
    with pytest.raises(config.ConfigError,
                       match=r"'sweep.mode': Invalid value 'best', expected one of \['max', 'min'\]"):
        load("sweep.mode=best")
    with pytest.raises(config.ConfigError, match="ray.cpus_per_worker must be >= 1"):
        load("ray.cpus_per_worker=0")
    with pytest.raises(config.ConfigError, match="unknown config key 'sweep.grace'"):
        load("sweep.grace=2")
    with pytest.raises(config.ConfigError, match="task is 'pretrain'"):
        kfold_runs.fold_configs(config.load("demo"))


def test_absolute_paths_resolve_against_the_driver_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = runs.absolute_paths(load("output_dir=runs", "data.video_shards=shards/v"))
    assert cfg.output_dir == str(tmp_path / "runs")
    assert cfg.data.video_shards == str(tmp_path / "shards" / "v")
    assert cfg.data.val_shards == ""  # unset paths stay unset


@pytest.mark.parametrize("nodes, bundle, fits", [
    ([{"CPU": 2.0}], {"CPU": 1.0}, 2),
    ([{"CPU": 1.0}, {"CPU": 1.0}], {"CPU": 1.0}, 2),
    ([{"CPU": 3.0}, {"CPU": 1.0}], {"CPU": 2.0}, 1),  # a bundle never spans two nodes
    ([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 64.0}], {"CPU": 4.0, "GPU": 1.0}, 2),
    ([{"CPU": 64.0}], {"CPU": 1.0, "GPU": 1.0}, 0),
])
def test_worker_bundles_are_packed_per_node(nodes, bundle, fits):
    assert cluster._workers_fitting(nodes, bundle) == fits


@pytest.mark.parametrize("path", ["launch/sweep.yaml", "launch/sweep_local.yaml"])
def test_cluster_yamls_validate_against_rays_schema(path):
    """What `ray up` does with the file before touching a cloud or a machine."""
    raw = yaml.safe_load((REPO / path).read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    commands = " ".join(raw["setup_commands"])
    assert 'pip install -c constraints.txt -e ".[dev,dali]"' in commands  # like the README
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    assert raw["file_mounts"] == {"~/s4d_dist": "."}
    broken = copy.deepcopy(prepared)
    broken["head_start_ray_commandz"] = []
    with pytest.raises(jsonschema.ValidationError):  # the schema check is not vacuous
        validate_config(broken)


def test_aws_yaml_has_gpu_worker_types():
    raw = yaml.safe_load((REPO / "launch/sweep.yaml").read_text())
    types = raw["available_node_types"]
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("p4d", "g5")) for t in workers)


def _sweep_cli(*args):
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_command_line_refuses_bad_input_before_ray_starts():
    bad_key = _sweep_cli("--config", "demo_finetune", "--mode", "sweep", "ray.num_workerz=2")
    assert bad_key.returncode == 2 and "did you mean 'ray.num_workers'" in bad_key.stderr
    bad_space = _sweep_cli("--config", "demo_finetune", "--mode", "sweep",
                           "sweep.space.optim.base_lr.loguniform=[0,1]", "data.video_shards=x",
                           "data.image_shards=y")
    assert bad_space.returncode == 2
    assert "launch/sweep.py: error:" in bad_space.stderr and "loguniform needs low > 0" in bad_space.stderr
    assert "Started a local Ray instance" not in bad_space.stderr


def test_trials_are_refused_on_a_cluster_without_the_state_api():
    """Without the dashboard's state API Ray Train cannot release a finished trial's placement
    group, and the next trials would wait forever: refused up front (in a child process, which
    starts a 1-CPU cluster without dashboard)."""
    probe = ("import ray\n"
             "from s4d_dist.orchestrate import cluster\n"
             "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
             "try:\n"
             "    cluster.require_state_api()\n"
             "except cluster.ClusterError as error:\n"
             "    print('refused:', error)\n"
             "ray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert "refused: this Ray cluster has no dashboard (state API)" in done.stdout, done.stderr[-2000:]
