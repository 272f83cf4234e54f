"""Ray orchestration without a cluster: search spaces checked before any trial, the cluster
launcher YAMLs against Ray's own schema, resource packing, and the command line's refusals."""
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray import tune
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import ray_cluster_env, tiny_overrides
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


def test_relative_paths_are_named_when_joining_a_running_cluster(tmp_path, monkeypatch, capsys):
    """`ray submit` runs the driver from the head's home folder: relative paths resolve there."""
    monkeypatch.chdir(tmp_path)
    runs.absolute_paths(load("output_dir=runs"))
    assert capsys.readouterr().err == ""  # a cluster started here: this folder is the user's
    cfg = runs.absolute_paths(load("ray.address=auto", "output_dir=runs", "data.video_shards=/v",
                                   "data.image_shards=shards/i", "init_checkpoint=~/w.pt"))
    assert cfg.output_dir == str(tmp_path / "runs")  # resolved all the same
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and note.startswith("[s4d] note: relative output_dir=runs, ")
    assert "data.image_shards=shards/i resolved against the driver's folder " + str(tmp_path) in note
    assert "/v" not in note and "w.pt" not in note  # absolute, and the user's home, are kept
    runs.absolute_paths(load("ray.address=auto", "output_dir=/runs", "data.video_shards=/v",
                             "data.image_shards=/i", "init_checkpoint=/w.pt"))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("nodes, bundle, fits", [
    ([{"CPU": 2.0}], {"CPU": 1.0}, 2),
    ([{"CPU": 1.0}, {"CPU": 1.0}], {"CPU": 1.0}, 2),
    ([{"CPU": 3.0}, {"CPU": 1.0}], {"CPU": 2.0}, 1),  # a bundle never spans two nodes
    ([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 64.0}], {"CPU": 4.0, "GPU": 1.0}, 2),
    ([{"CPU": 64.0}], {"CPU": 1.0, "GPU": 1.0}, 0),
])
def test_worker_bundles_are_packed_per_node(nodes, bundle, fits):
    assert cluster._workers_fitting(nodes, bundle) == fits


# No GPU exists on this machine: the cluster's resources are given as ray.cluster_resources()
# would report them on a GPU cluster, or on a CPU one.
GPU_CLUSTER = {"CPU": 64.0, "GPU": 8.0, "memory": 2.0**38}
CPU_CLUSTER = {"CPU": 2.0, "memory": 2.0**33}


@pytest.mark.parametrize("overrides, resources, gpus", [
    ([], GPU_CLUSTER, 1.0),  # unset (null): a GPU cluster trains on its GPUs
    ([], CPU_CLUSTER, 0.0),
    (["ray.gpus_per_worker=0"], GPU_CLUSTER, 0.0),  # CPUs on purpose
    (["ray.gpus_per_worker=2"], CPU_CLUSTER, 2.0),  # as asked: runs_at_once refuses what is missing
    (["ray.gpus_per_worker=1", "ray.check_resources=false"], {}, 1.0),
])
def test_gpus_per_worker_follow_the_cluster_unless_set(overrides, resources, gpus):
    assert load().ray.gpus_per_worker is None
    assert cluster.gpus_per_worker(load(*overrides), resources) == gpus


def test_unset_gpus_are_refused_where_the_cluster_is_not_asked():
    """An autoscaling cluster (ray.check_resources=false) may have no GPU node yet: null would
    silently train on the head's CPUs, so it is refused, naming the setting — before joining."""
    cfg = load("ray.check_resources=false")
    with pytest.raises(cluster.ClusterError, match=r"set ray.gpus_per_worker=1 to train on GPUs, or 0"):
        cluster.gpus_per_worker(cfg, GPU_CLUSTER)
    with pytest.raises(cluster.ClusterError, match="ray.gpus_per_worker is null"):
        cluster.connect(cfg)  # would start a local Ray cluster if it got that far


def test_connect_decides_unset_gpus_from_the_cluster(monkeypatch, capsys):
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)  # a session already open
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: dict(GPU_CLUSTER))
    resolved = cluster.connect(load("ray.num_workers=2"))
    assert resolved.ray.gpus_per_worker == 1.0
    assert cluster.worker_bundle(resolved) == {"CPU": 1.0, "GPU": 1.0}
    assert "the cluster has 8 GPUs, so each worker takes 1" in capsys.readouterr().out
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: dict(CPU_CLUSTER))
    assert cluster.connect(load()).ray.gpus_per_worker == 0.0
    assert capsys.readouterr().out == ""
    explicit = load("ray.gpus_per_worker=0")
    assert cluster.connect(explicit) is explicit


@pytest.mark.parametrize("path, head, workers", [
    ("launch/sweep.yaml", "setup_node.sh cpu", "setup_node.sh gpu"),  # CPU head, GPU workers
    ("launch/sweep_local.yaml", "setup_node.sh auto", "setup_node.sh auto"),  # any machines
])
def test_cluster_yamls_validate_against_rays_schema(path, head, workers):
    """What `ray up` does with the file before touching a cloud or a machine. Each kind of node
    installs the project as launch/setup_node.sh does (test_node_setup_*)."""
    raw = yaml.safe_load((REPO / path).read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    # Ray has put setup_commands (every node) in front of both.
    head_commands = " ; ".join(prepared["head_setup_commands"])
    worker_commands = " ; ".join(prepared["worker_setup_commands"])
    assert head in head_commands and head_commands.count("setup_node.sh") == 1
    assert workers in worker_commands and worker_commands.count("setup_node.sh") == 1
    for commands in (head_commands, worker_commands):  # the venv, then its activation
        assert commands.index("setup_node.sh") < commands.index(".venv/bin/activate' >> ~/.bashrc")
    if prepared["provider"]["type"] == "aws":  # Ray's default head setup is replaced: keep boto3
        assert "boto3" in head_commands
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
    # Not Ray's default image (Ubuntu 18.04, Python 3.6): Ubuntu 24.04 everywhere, so one Python
    # (3.12) on every node; the workers' image brings the NVIDIA driver.
    images = {name: t["node_config"]["ImageId"] for name, t in types.items()}
    assert all(i.startswith("resolve:ssm:/aws/service/") and "24.04" in i for i in images.values())
    assert all("nvidia-driver-gpu" in images[name] for name in types if name != raw["head_node_type"])


NVIDIA_SMI = "| NVIDIA-SMI 595.91.07    Driver Version: 595.91.07    CUDA Version: {} |"


def setup_node(kind, tmp_path, driver_cuda=None, **env):
    """launch/setup_node.sh's commands (dry run) on a node whose nvidia-smi reports
    `driver_cuda`, or fails (None: no GPU, as on this machine)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir(exist_ok=True)
    smi.write_text("#!/bin/sh\n" + (f"echo '{NVIDIA_SMI.format(driver_cuda)}'\n" if driver_cuda
                                     else "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"))
    smi.chmod(0o755)
    done = subprocess.run(["bash", "launch/setup_node.sh", kind], cwd=REPO, capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": f"{smi.parent}:/usr/bin:/bin", "S4D_SETUP_DRY_RUN": "1", **env})
    lines = [line.removeprefix("+ ") for line in done.stdout.splitlines()]
    return done.returncode, lines, done.stderr


def readme_pip_lines(constraints):
    """The README's install commands with `constraints`, unquoted as the shell passes them."""
    found = re.findall(rf'pip install -c {re.escape(constraints)} -e "([^"]+)"',
                       (REPO / "README.md").read_text())
    return {f"pip install -c {constraints} -e {extras}" for extras in found}


def test_node_setup_installs_a_cpu_node_like_the_readme(tmp_path):
    code, lines, _ = setup_node("cpu", tmp_path)
    assert code == 0
    pip = [line.removeprefix(".venv/bin/python -m ") for line in lines if " pip " in line]
    assert pip == ["pip install -c constraints.txt -e .[dev,dali]"]
    assert set(pip) <= readme_pip_lines("constraints.txt")
    assert setup_node("auto", tmp_path)[1] == lines  # no GPU answers: a CPU node


@pytest.mark.parametrize("driver_cuda, wheels, dali", [("13.2", "cu130", "dali-cu13"),
                                                       ("12.4", "cu128", "dali-cu12")])
def test_node_setup_installs_a_gpu_node_like_the_readme(tmp_path, driver_cuda, wheels, dali):
    """GPU nodes: torch's CUDA build for the driver first, then constraints-gpu.txt (which leaves
    torch alone) and the DALI wheel of torch's CUDA major; the node fails unless torch sees a GPU."""
    for kind in ("gpu", "auto"):
        code, lines, _ = setup_node(kind, tmp_path, driver_cuda)
        assert code == 0
        pip = [line.removeprefix(".venv/bin/python -m ") for line in lines if " pip " in line]
        assert pip == [f"pip install torch --index-url https://download.pytorch.org/whl/{wheels}",
                       f"pip install -c constraints-gpu.txt -e .[dev,{dali}]"]
        assert pip[1] in readme_pip_lines("constraints-gpu.txt")
        assert "torch.cuda.is_available()" in lines[-1]
    code, lines, _ = setup_node("gpu", tmp_path, driver_cuda,
                                S4D_TORCH_INDEX="https://example.org/whl/cu129")
    assert code == 0 and "constraints-gpu.txt -e .[dev,dali-cu12]" in " ".join(lines)


def test_node_setup_refuses_a_gpu_node_without_a_usable_driver(tmp_path):
    code, lines, err = setup_node("gpu", tmp_path)
    assert code == 1 and not lines and "no NVIDIA GPU answers nvidia-smi" in err
    code, lines, err = setup_node("gpu", tmp_path, "11.8")
    assert code == 1 and not lines and "DALI's wheels need CUDA 12 or 13" in err
    assert setup_node("tpu", tmp_path)[0] == 2


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


def test_a_stop_of_the_workers_is_the_drivers_exit_code(monkeypatch, capsys):
    """Once Ray Train stops restarting a run, the stop that ended its workers (Ray hands back
    each rank's exception wrapped with its traceback) is the driver's: one line and the exit
    code of s4d_dist.train.faults — 75 for a preemption, so a scheduler requeues the command."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from s4d_dist.orchestrate import cli, ray_train
    from s4d_dist.train.faults import EXIT_PREEMPTED, DataError, Preempted

    said = "preempted (SIGTERM): checkpoint step000000004 (step 4) saved in /runs/x/checkpoints"
    error = WorkerGroupError("workers failed", {
        1: UserExceptionWithTraceback(DataError("rank 1 only"), "Traceback ..."),
        0: UserExceptionWithTraceback(Preempted(said), "Traceback ...")})
    assert str(ray_train.run_stopped(error)) == said  # the lowest rank's
    crashed = WorkerGroupError("workers failed", {0: UserExceptionWithTraceback(
        RuntimeError("a bug"), "Traceback ...")})
    assert ray_train.run_stopped(crashed) is None

    def preempted(cfg):
        raise ray_train.run_stopped(error)

    monkeypatch.setattr(ray_train, "fit", preempted)
    assert cli.main(["--config", "demo_finetune", "--mode", "train"]) == EXIT_PREEMPTED
    assert capsys.readouterr().err == f"launch/sweep.py: {said} (exit 75)\n"


def test_driver_checks_every_split_a_run_reads_and_only_those(synthetic_shards, tmp_path):
    """runs.check_data: a DFER-only run (no image shards) passes; a broken test split is refused
    in the driver, before Ray starts any worker."""
    cfg = config.load("demo", tiny_overrides(synthetic_shards, tmp_path, "finetune")
                      + ["data.image_shards="])
    runs.check_data(cfg)
    shutil.copytree(synthetic_shards / "video", tmp_path / "video", ignore=shutil.ignore_patterns("test"))
    broken = config.load("demo", tiny_overrides(synthetic_shards, tmp_path, "finetune")
                         + [f"data.video_shards={tmp_path / 'video' / 'train'}"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'video' / 'test'}"):
        runs.check_data(broken)


def test_trials_are_refused_on_a_cluster_without_the_state_api():
    """Without the dashboard's state API Ray Train cannot release a finished trial's placement
    group, and the next trials would wait forever: refused up front (in a child process, which
    starts a 1-CPU cluster without dashboard, under a temp folder and token of its own)."""
    temp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: Ray's socket paths
    probe = ("import ray\n"
             "from s4d_dist.orchestrate import cluster\n"
             f"ray.init(address='local', num_cpus=1, include_dashboard=False, _temp_dir={temp!r})\n"
             "try:\n"
             "    cluster.require_state_api()\n"
             "except cluster.ClusterError as error:\n"
             "    print('refused:', error)\n"
             "ray.shutdown()\n")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **ray_cluster_env()})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert "refused: this Ray cluster has no dashboard (state API)" in done.stdout, done.stderr[-2000:]
