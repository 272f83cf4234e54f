"""The ways a run reaches a real Ray cluster: `ray job submit` to a cluster started with
`ray start`, and `ray up` + `ray submit` with launch/sweep_local.yaml against this machine
over SSH.

Other people's Ray clusters may run on the same machine, so these tests never call
`ray stop` as root (it stops every Ray process of the user): the clusters started here are
stopped by the ids of their own processes, found through their own temp folder or user.
"""
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import ray_cluster_env, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("", 0))  # free on every interface, as Ray binds them (distributed.free_port)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# What Ray says when a port it was told to use is taken.
PORT_TAKEN = ("already occupied", "already in use", "eaddrinuse", "used by other")


def on_free_ports(n: int, start, clean_up) -> list[int]:
    """`start(ports)` (a CompletedProcess) on `n` ports the OS just handed out. They are chosen
    before Ray binds them, so a start that lost one to another process meanwhile is cleaned up
    (`clean_up()`) and retried on fresh ones; any other failure fails the test."""
    for _ in range(3):
        ports = free_ports(n)
        done = start(ports)
        if done.returncode == 0:
            return ports
        clean_up()
        output = done.stdout + done.stderr
        if not any(taken in output.lower() for taken in PORT_TAKEN):
            break
    raise AssertionError(output[-3000:])


def kill_tree(processes: list[psutil.Process]) -> None:
    """SIGKILL these processes and their descendants, by pid."""
    found = set(processes)
    for p in processes:
        try:
            found |= set(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in found:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(found), timeout=30)


def processes_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in p.info["cmdline"] or []):
            found.append(p)
    return found


def ray_env() -> dict[str, str]:
    """The environment of one cluster's `ray` commands (conftest.ray_cluster_env): Ray 2.60
    clusters use token authentication, and each cluster here has a token of its own."""
    return {**os.environ, **ray_cluster_env()}


def run(args, timeout=600, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture
def started_cluster():
    """Two nodes of 1 CPU each, started with `ray start` like an operator would, under a temp
    folder of their own (short: Ray's socket paths must fit in 107 characters) and with their
    own token."""
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = ray_env()
    common = ["--num-cpus", "1", "--disable-usage-stats"]

    def clean_up():
        kill_tree(processes_mentioning(temp))

    def start_head(ports):
        port, dashboard, client, agent = ports
        return run([ray_cli(), "start", "--head", "--port", str(port), "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
                    str(client), "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp,
                    *common], env=env)

    try:
        port, dashboard, _, _ = on_free_ports(4, start_head, clean_up)
        on_free_ports(1, lambda ports: run(
            [ray_cli(), "start", "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port",
             str(ports[0]), *common], env=env), clean_up=lambda: None)
        yield {"dashboard": dashboard, "temp": temp, "env": env}
    finally:
        clean_up()
        shutil.rmtree(temp, ignore_errors=True)
        assert not processes_mentioning(temp)


def test_ray_job_submit_runs_a_two_worker_finetune(started_cluster, synthetic_shards, tmp_path):
    dashboard = started_cluster["dashboard"]
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == dashboard}
    assert listening == {"127.0.0.1"}  # the dashboard (and job API) is not on the network
    job = run([ray_cli(), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
               "--working-dir", str(REPO), "--", "python", "launch/sweep.py", "--config", "demo",
               "--mode", "train", *tiny_overrides(synthetic_shards, tmp_path, "finetune"),
               "ray.num_workers=2", "optim.epochs=1"], cwd=REPO, timeout=900,
              env=started_cluster["env"])
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-5000:]
    assert '"samples": 7' in output  # the driver printed the final metrics of both ranks
    assert (tmp_path / "tiny" / "finished.json").is_file()


def readme_ray_pair() -> list[str]:
    """The README's two commands that start a cluster and submit a run to it, as lines of bash
    (a continuation joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "ray start --head" in b)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_pair_starts_a_cluster_and_submits_to_it_from_a_fresh_home(synthetic_shards,
                                                                               tmp_path):
    """Exactly the README's pair, run by bash in the repository root with a HOME that has never
    seen Ray (no token, no ~/.ray) and no RAY_AUTH_* in the environment. Changed for a test: the
    cluster's ports are free ones and its temp folder its own (`ray start` flags added), the
    submit goes to that dashboard port, and the README's `...` becomes the tiny run's overrides
    (their output_dir, under tmp_path, overrides the README's)."""
    start, submit = readme_ray_pair()
    assert start.startswith("ray get-auth-token --generate") and "ray start --head" in start
    assert submit.startswith("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265")
    assert submit.endswith(" ...")
    home = tmp_path / "home"
    home.mkdir()
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0",
               # DeepSpeed's JIT-built CPU op, not rebuilt for the new home
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(
                   Path.home() / ".cache" / "torch_extensions")))

    def bash(line: str, **kwargs) -> subprocess.CompletedProcess:
        return run(["bash", "-c", line], env=env, cwd=REPO, **kwargs)

    def start_head(ports):
        port, dashboard, client, agent = ports
        return bash(start.replace("ray start --head", (
            f"ray start --head --port {port} --dashboard-port {dashboard} --ray-client-server-port "
            f"{client} --dashboard-agent-listen-port {agent} --temp-dir {temp} --num-cpus 2")))

    try:
        _, dashboard, _, _ = on_free_ports(4, start_head, lambda: kill_tree(processes_mentioning(temp)))
        assert (home / ".ray" / "auth_token").is_file()
        overrides = " ".join(tiny_overrides(synthetic_shards, tmp_path / "runs", "finetune")[1:])
        try:
            job = bash(submit.replace(":8265", f":{dashboard}")[:-len("...")]
                       + f"{overrides} optim.epochs=1", timeout=900)
        except subprocess.TimeoutExpired as late:
            pytest.fail(f"the job did not finish in 900 s: {str(late.output)[-3000:]}")
        output = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in output, output[-5000:]
        assert (tmp_path / "runs" / "tiny" / "finished.json").is_file()
    finally:
        kill_tree(processes_mentioning(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert not processes_mentioning(temp)


# --- ray up / ray submit over SSH to this machine ------------------------------------------------


def _ensure_installed() -> None:
    """Debian's openssh-server and rsync (`ray up` syncs file_mounts with it), or skip."""
    if Path("/usr/sbin/sshd").exists() and shutil.which("rsync"):
        return
    if not shutil.which("apt-get"):
        pytest.skip("openssh-server / rsync missing and no apt-get to install them")
    install = ["apt-get", "install", "-y", "-q", "openssh-server", "rsync"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = run(install, timeout=600, env=env)
    if done.returncode != 0:
        run(["apt-get", "update", "-q"], timeout=600, env=env)
        done = run(install, timeout=600, env=env)
    if done.returncode != 0:
        pytest.skip(f"cannot install openssh-server and rsync with apt-get: {done.stderr[-500:]}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def ssh_localhost(tmp_path_factory):
    """A throwaway login reachable as <user>@127.0.0.1 with a throwaway key, through an sshd of
    this test's own on the loopback interface.

    The login shares root's uid (this venv's interpreter lives under /root) but has a home of
    its own, whose ~/.bashrc activates this venv (what the YAML's setup commands arrange on a
    fresh machine) and points TMPDIR there, so the cluster's files, token and processes are
    told apart from anybody else's Ray on this machine by that home in their command lines.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to add a throwaway login and start sshd")
    _ensure_installed()
    if _port_open(22):
        pytest.skip("127.0.0.1:22 is taken by an SSH server this test did not start")
    user = f"s4dray{os.getpid()}"
    # Password "*": none that works, yet not "locked" (sshd without PAM refuses locked logins).
    made = run(["useradd", "--non-unique", "--uid", "0", "--gid", "0", "--create-home",
                "--shell", "/bin/bash", "--password", "*", user])
    if made.returncode != 0:
        pytest.skip(f"cannot add a throwaway login: {made.stderr.strip()}")
    keys = tmp_path_factory.mktemp("ssh")
    home = Path(pwd.getpwnam(user).pw_dir)
    sshd = None
    try:
        for name in ("client", "host"):
            made_key = run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)])
            assert made_key.returncode == 0, made_key.stderr
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text((keys / "client.pub").read_text())
        (home / ".ssh" / "authorized_keys").chmod(0o600)
        cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
        if cache.is_dir():  # DeepSpeed's JIT-built ops, not rebuilt for the new home
            # without the lock a build in progress holds: nobody would release the copy's
            shutil.copytree(cache, home / ".cache" / "torch_extensions",
                            ignore=shutil.ignore_patterns("lock"))
        with open(home / ".bashrc", "a") as rc:
            rc.write(f"\nexport TMPDIR=$HOME/tmp; mkdir -p $TMPDIR\n. {sys.prefix}/bin/activate\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-h", str(keys / "host"),
             "-o", "ListenAddress=127.0.0.1:22", "-o", f"AllowUsers={user}",
             "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
             "-o", "KbdInteractiveAuthentication=no", "-o", "UsePAM=no",
             "-o", f"PidFile={keys / 'sshd.pid'}"],
            stdout=subprocess.DEVNULL, stderr=open(keys / "sshd.log", "w"))
        deadline = time.time() + 30
        while not _port_open(22) and time.time() < deadline and sshd.poll() is None:
            time.sleep(0.2)
        login = run(["ssh", "-i", str(keys / "client"), "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                     f"{user}@127.0.0.1", "true"], timeout=60)
        if login.returncode != 0:
            pytest.skip(f"sshd on 127.0.0.1:22 did not accept the throwaway key: "
                        f"{login.stderr.strip()[-300:]} {(keys / 'sshd.log').read_text()[-300:]}")
        yield {"user": user, "home": home, "key": keys / "client"}
    finally:
        # The cluster (its files are under the home) and the SSH sessions to the login (ssh
        # ControlMaster clients, sshd session processes: all name it), then our sshd.
        kill_tree(processes_mentioning(str(home)) + processes_mentioning(f"{user}@"))
        if sshd is not None:
            kill_tree([psutil.Process(sshd.pid)])
            sshd.wait(timeout=30)
        run(["userdel", "--force", "--remove", user])
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.machine
def test_ray_up_and_ray_submit_with_the_local_cluster_yaml(ssh_localhost, synthetic_shards, tmp_path):
    """launch/sweep_local.yaml with head_ip 127.0.0.1 and the throwaway login. Changed for this
    machine: the setup commands (a pip install of the whole stack) become a check that the stack
    is importable; `ray stop` is dropped from the start commands and `ray down` is not called,
    since as root they would stop other people's Ray clusters here (the fixture stops this
    one by its processes' ids); the ports are free ones. Everything else — file mounts, the
    head's `ray start`, the driver that `ray submit` runs on the head — is the shipped file."""
    user, home = ssh_localhost["user"], ssh_localhost["home"]
    cfg = yaml.safe_load((REPO / "launch" / "sweep_local.yaml").read_text())
    cfg["cluster_name"] = f"s4d-test-{user}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {"ssh_user": user, "ssh_private_key": str(ssh_localhost["key"])}
    cfg["setup_commands"] = ["python -c 'import s4d_dist, ray, deepspeed'"]
    shipped = [c for c in cfg["head_start_ray_commands"] if c != "ray stop"]
    cluster_yaml = tmp_path / "cluster.yaml"
    env = ray_env()

    def up(ports):
        port, dashboard = ports
        cfg["head_start_ray_commands"] = [
            c.replace("--port=6379", f"--port={port} --dashboard-port={dashboard} --num-cpus=2")
            for c in shipped]
        assert len(shipped) == 1 and f"--port={port}" in cfg["head_start_ray_commands"][0]
        cluster_yaml.write_text(yaml.safe_dump(cfg))
        return run([ray_cli(), "up", "-y", "--no-config-cache", str(cluster_yaml)], cwd=REPO,
                   timeout=900, env=env)

    try:
        on_free_ports(2, up, clean_up=lambda: kill_tree(processes_mentioning(str(home))))
        assert (home / "s4d_dist" / "launch" / "sweep.py").is_file()  # file_mounts synced the repo
        submit = run([ray_cli(), "submit", str(cluster_yaml), "launch/sweep.py", "--", "--config", "demo",
                      "--mode", "train", *tiny_overrides(synthetic_shards, home / "runs", "finetune"),
                      "optim.epochs=1", "ray.address=auto"], cwd=REPO, timeout=900, env=env)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-5000:]
        assert '"samples": 7' in output
        assert (home / "runs" / "tiny" / "finished.json").is_file()
    finally:
        for suffix in ("state", "lock"):  # the local provider's record of the cluster
            Path(f"/tmp/ray/cluster-{cfg['cluster_name']}.{suffix}").unlink(missing_ok=True)
