"""Faults as an operator meets them, on CPU: truncated shards, a disk too small up front, a disk
that fills during a save, a kill during export, and SIGTERM preemption of a 2-rank run — each
stops with one console line and its documented exit code, and resumes where it applies."""
import contextlib
import errno
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from conftest import tiny_overrides
from s4d_dist import atomic
from s4d_dist.data.catalog import open_catalog
from s4d_dist.train import checkpoint, cli, distributed
from s4d_dist.train.faults import (EXIT_DATA, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_STORAGE,
                                   EXIT_USAGE)
from test_train import ExplodingTask, _launch, run_two_ranks, scalars

REPO = Path(__file__).resolve().parents[1]


def _args(shards, out, *extra):
    return ["--config", "demo", *tiny_overrides(shards, out, "pretrain")[1:], "optim.epochs=1",
            *extra]


def _stop(capsys, args, task="pretrain") -> tuple[int, list[str], str]:
    """Exit code, console lines of ours, and all of stderr of a run that stops."""
    with pytest.raises(SystemExit) as stop:
        cli.main(task, args)
    err = capsys.readouterr().err
    return stop.value.code, [line for line in err.splitlines() if line.startswith("[s4d]")], err


def test_truncated_shard_stops_with_one_line_or_trains_on_the_rest(synthetic_shards, tmp_path,
                                                                    capsys):
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    tar = shards / "image" / "train" / "shard-000000.tar"
    lost = _truncate(tar)
    assert lost > 0

    code, lines, err = _stop(capsys, _args(shards, tmp_path))
    assert code == EXIT_DATA
    assert len(lines) == 1 and f"{tar} ({lost} samples)" in lines[0], err
    assert "data.skip_truncated=true" in lines[0] and "Traceback" not in err
    log = tmp_path / "tiny" / "logs" / "rank0.log"
    assert "TruncatedShardError" in log.read_text()  # the traceback went to the run's log

    final = cli.main("pretrain", _args(shards, tmp_path, "data.skip_truncated=true"))
    assert f"training without {lost} samples" in capsys.readouterr().out
    assert final["truncated_samples"] == lost
    assert json.loads((tmp_path / "tiny" / "metrics.json").read_text())["truncated_samples"] == lost
    assert all(v == v for _, v in scalars(tmp_path / "tiny")["loss/image"])  # finite losses


def _truncate(tar: Path) -> int:
    """Cut a shard to 60 % (a copy cut short); the samples it loses."""
    os.truncate(tar, int(tar.stat().st_size * 0.6))
    return open_catalog([str(tar)], skip_truncated=True).truncated[str(tar)]


def _bad_index(folder: Path) -> str:
    idx = folder / "shard-000000.idx"
    idx.write_text("v0.9 " + idx.read_text()[len("v1.2 "):])
    return f"{idx}: not a v1.2 DALI index"


@pytest.mark.parametrize("broken", ["missing test split", "unfinished test build",
                                    "truncated test shard", "bad val index"])
def test_evaluation_shards_that_cannot_be_opened_stop_the_run_before_step_0(
        synthetic_shards, tmp_path, capsys, broken):
    """The splits a fine-tuning run evaluates — after each epoch (val) and at the end (test) —
    are opened before step 0, through the training shards' path: one line, exit 65, nothing
    trained (the test split used to be opened only after the last epoch)."""
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    extra = []
    if broken == "missing test split":
        shutil.rmtree(shards / "video" / "test")
        said = f"{shards / 'video' / 'test' / 'manifest.json'}: no manifest"
    elif broken == "unfinished test build":
        manifest = shards / "video" / "test" / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
        said = f"{shards / 'video' / 'test'}: build not finished"
    elif broken == "truncated test shard":
        tar = shards / "video" / "test" / "shard-000000.tar"
        said = f"{tar} ({_truncate(tar)} samples)"
    else:
        shutil.copytree(shards / "video" / "test", shards / "video" / "val")
        said = _bad_index(shards / "video" / "val")
        extra = [f"data.val_shards={shards / 'video' / 'val'}"]
    args = ["--config", "demo", *tiny_overrides(shards, tmp_path, "finetune")[1:],
            "optim.epochs=1", *extra]
    code, lines, err = _stop(capsys, args, "finetune")
    assert code == EXIT_DATA
    assert len(lines) == 1 and lines[0].startswith("[s4d] error: ") and said in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "tiny" / "checkpoints").exists()  # stopped before the engine


def test_a_refused_resume_and_a_diverging_run_stop_with_one_line(synthetic_shards, tmp_path,
                                                                  capsys, monkeypatch):
    args = _args(synthetic_shards, tmp_path)
    cli.main("pretrain", args)
    capsys.readouterr()
    code, lines, err = _stop(capsys, args)
    assert code == EXIT_USAGE and len(lines) == 1, err
    assert lines[0].startswith(f"[s4d] error: {tmp_path / 'tiny'} holds a finished run; pick")

    monkeypatch.setattr(cli, "make_task", lambda cfg: ExplodingTask(cfg, start=1))
    code, lines, err = _stop(capsys, _args(synthetic_shards, tmp_path, "run_name=nan",
                                           "optim.max_nonfinite_steps=2"))
    assert code == EXIT_DIVERGED and len(lines) == 1, err
    assert "error: 2 consecutive steps had a non-finite loss; the run is diverging" in lines[0]
    assert "Traceback" not in err
    assert "NonFiniteLossError" in (tmp_path / "nan" / "logs" / "rank0.log").read_text()


def test_too_small_a_disk_is_refused_before_training(synthetic_shards, tmp_path, capsys,
                                                     monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    code, lines, err = _stop(capsys, _args(synthetic_shards, tmp_path))
    assert code == EXIT_STORAGE
    assert len(lines) == 1, err
    assert f"not enough space for checkpoints in {tmp_path / 'tiny' / 'checkpoints'}" in lines[0]
    assert "1 KB free" in lines[0]
    assert not (tmp_path / "tiny" / "tb").exists() or "loss/image" not in scalars(tmp_path / "tiny")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(synthetic_shards, tmp_path,
                                                              capsys, monkeypatch):
    """The second step checkpoint fails part-way with ENOSPC (DeepSpeed's writer), as on a full
    disk: one line, the first checkpoint intact and resumable, the partial one gone."""
    real_save, tags = TorchCheckpointEngine.save, []

    def fills_up(self, state_dict, path):
        tag = Path(path).parent.name
        tags.append(tag) if tag not in tags else None
        if len(tags) > 1:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", fills_up)
    args = _args(synthetic_shards, tmp_path, "checkpoint.every_steps=1")
    code, lines, err = _stop(capsys, args)
    ckpt = tmp_path / "tiny" / "checkpoints"
    assert code == EXIT_STORAGE
    assert len(lines) == 1, err
    assert lines[0].startswith(f"[s4d] error: could not write checkpoint {tags[1]} to {ckpt} "
                               f"(disk full): it needs about ")
    assert f"the previous checkpoint {tags[0]} is intact" in lines[0]
    assert (ckpt / "latest_complete").read_text() == tags[0]
    assert not (ckpt / tags[1]).exists()

    monkeypatch.setattr(TorchCheckpointEngine, "save", real_save)
    (ckpt / "step000000999").mkdir()  # as if killed while saving: newer than the pointer
    cli.main("pretrain", args)
    out = capsys.readouterr().out
    assert (f"ignoring incomplete checkpoint step000000999 in {ckpt} (its save was cut short); "
            f"resuming from {tags[0]}") in out
    assert f"from checkpoint {tags[0]}" in out
    assert (tmp_path / "tiny" / "finished.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (room for one tiny checkpoint of ~1.3 MB, not two), where mounting works."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2000k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_real_full_disk_is_named_and_resumable_after_freeing_space(synthetic_shards, small_disk,
                                                                      capsys):
    args = _args(synthetic_shards, small_disk, "checkpoint.every_steps=1", "checkpoint.keep=1")
    code, lines, err = _stop(capsys, args)
    ckpt = small_disk / "tiny" / "checkpoints"
    assert code == EXIT_STORAGE, err
    assert len(lines) == 1 and "(disk full): it needs about 1.6" in lines[0], err
    first = (ckpt / "latest_complete").read_text()
    assert f"the previous checkpoint {first} is intact" in lines[0]
    assert sorted(p.name for p in ckpt.glob("step*")) == [first]  # the partial one removed

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    cli.main("pretrain", args)
    assert f"from checkpoint {first}" in capsys.readouterr().out
    assert (small_disk / "tiny" / "finished.json").is_file()


def test_atomic_writes_leave_no_truncated_file(tmp_path):
    target = tmp_path / "weights_fp32.pt"
    target.write_bytes(b"old and complete")
    with pytest.raises(OSError):
        with atomic.replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old and complete" and os.listdir(tmp_path) == [target.name]

    fresh = tmp_path / "metrics.json"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from s4d_dist import atomic
with atomic.replacing({str(fresh)!r}) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()  # kill -9 in the middle of the export
    writer.wait()
    assert not fresh.exists()  # only a hidden temporary name holds the partial bytes


KILLED_IN_EXPORT = """
import io, os, signal, sys, torch
from s4d_dist.train import cli
real_save = torch.save

def save(obj, f, *args, **kwargs):  # the fp32 export is killed half written, wherever it goes
    if "weights_fp32" not in str(f):
        return real_save(obj, f, *args, **kwargs)
    data = io.BytesIO()
    real_save(obj, data, *args, **kwargs)
    with open(f, "wb") as out:
        out.write(data.getvalue()[: data.tell() // 2])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
cli.main("pretrain", sys.argv[1:])
"""


def test_a_kill_while_exporting_zero_weights_leaves_no_truncated_export(synthetic_shards,
                                                                          tmp_path, capsys):
    """ZeRO-1: the fp32 weights are gathered from the checkpoint's optimizer partitions
    (DeepSpeed's zero_to_fp32) and written by rank 0; kill -9 half-way through that write
    leaves no weights file, nor any later export, under its name. The rerun exports them whole:
    the fp32 master weights that DeepSpeed reads back from the last checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args = _args(synthetic_shards, tmp_path, "deepspeed.zero_stage=1")
    with open(tmp_path / "killed.txt", "w") as log:  # _launch: a process of its own (solo)
        code = _launch([sys.executable, "-c", KILLED_IN_EXPORT, *args], {}, log).wait(timeout=600)
    assert code == -signal.SIGKILL, (tmp_path / "killed.txt").read_text()[-3000:]
    run = tmp_path / "tiny"
    exports = ["weights_fp32.pt", "weights_official.pth", "model.safetensors", "model.json",
               "metrics.json", "finished.json"]
    assert not [name for name in exports if (run / name).exists()]
    assert [p.name for p in run.glob(".weights_fp32.pt.tmp*")]  # the half-written bytes

    cli.main("pretrain", args)  # the same command: nothing left to train, exports written
    assert "from checkpoint" in capsys.readouterr().out
    tag = (run / "checkpoints" / "latest_complete").read_text()
    want = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    got = torch.load(run / "weights_fp32.pt", weights_only=True)
    assert got.keys() <= want.keys() and len(got) > 10
    assert all(torch.equal(got[k], want[k].float()) for k in got)


NODE = """
import sys
import threading
import torch.distributed as dist
from s4d_dist.train.faults import StorageError
from s4d_dist.train.storage import check_shared
# A rendezvous through a file: no port to choose (gloo's own sockets take the ones the OS gives)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]),
                        world_size=2)
try:
    check_shared(sys.argv[3], sys.argv[4:])
except StorageError as error:
    print(error)
"""


def test_a_rank_that_sees_another_run_folder_or_other_shards_is_refused(synthetic_shards,
                                                                         tmp_path):
    """Two ranks as two "nodes": rank 1's view of the run folder (or of a shard) differs."""
    shards = sorted(str(p) for p in (synthetic_shards / "image" / "train").glob("*.tar"))

    def nodes(folders, shard_views, rendezvous):
        procs = [subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path / rendezvous), str(r),
                                   str(folders[r]), *shard_views[r]],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True) for r in (0, 1)]
        return [p.communicate(timeout=120)[0].strip() for p in procs]

    shared, local = tmp_path / "run", tmp_path / "node1_local_disk" / "run"
    shared.mkdir()
    local.mkdir(parents=True)
    assert nodes([shared, shared], [shards, shards], "store1") == ["", ""]
    said = nodes([shared, local], [shards, shards], "store2")
    assert said[0] == said[1]
    assert said[0].startswith(f"rank 1 on {os.uname().nodename}: the run folder {local} is not "
                              f"the one rank 0 writes to: output_dir must be storage shared")
    elsewhere = tmp_path / "node1_shard.tar"
    elsewhere.write_bytes(b"x")
    said = nodes([shared, shared], [shards, [str(elsewhere)] + shards[1:]], "store3")
    assert said[0] == said[1] and f"{elsewhere} is 1 bytes here" in said[0]
    assert not (shared / ".shared_storage_check").exists()


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"rank {rank} not found")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_the_same_curve(synthetic_shards, tmp_path):
    """Two ranks under the deepspeed launcher; only rank 1 receives SIGTERM (twice): both agree,
    save at the next step, exit 75; the rerun resumes and logs the uninterrupted run's losses."""
    common = ["launch/pretrain.py", "--config", "demo",
              *tiny_overrides(synthetic_shards, tmp_path, "pretrain")[1:], "optim.epochs=3",
              "checkpoint.every_steps=2", "deepspeed.zero_stage=1"]
    run_two_ranks(common + ["run_name=whole"], tmp_path / "whole.txt")
    ckpt = tmp_path / "preempted" / "checkpoints" / "latest_complete"
    log_path = tmp_path / "preempted.txt"
    for _ in range(3):  # as run_two_ranks: a port lost between choosing and binding it is retried
        with open(log_path, "w") as log:
            proc = _launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                            "--master_port", str(distributed.free_port()), *common,
                            "run_name=preempted"], {}, log)
        while proc.poll() is None and not ckpt.is_file():
            time.sleep(0.05)
        if ckpt.is_file():
            break
        assert "address already in use" in log_path.read_text().lower(), log_path.read_text()[-3000:]
    rank1 = _rank_process(proc, 1)
    rank1.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    with contextlib.suppress(psutil.NoSuchProcess):  # it may already have exited 75
        rank1.send_signal(signal.SIGTERM)  # a second signal: during the save, or after it
    assert proc.wait(timeout=300) == EXIT_PREEMPTED
    console = (tmp_path / "preempted.txt").read_text()
    said = [line for line in console.splitlines() if "[s4d] preempted" in line]
    assert len(said) == 1 and "preempted (SIGTERM): checkpoint step" in said[0], console[-3000:]
    tag = ckpt.read_text()
    assert f"checkpoint {tag} (step {int(tag[4:])})" in said[0]
    assert not (tmp_path / "preempted" / "finished.json").exists()

    run_two_ranks(common + ["run_name=preempted"], tmp_path / "resumed.txt")
    assert f"from checkpoint {tag}" in (tmp_path / "resumed.txt").read_text()

    def curve(run):
        logged = scalars(tmp_path / run)
        return sorted(logged["loss/image"] + logged["loss/video"])

    whole, resumed = curve("whole"), curve("preempted")
    assert [s for s, _ in resumed] == [s for s, _ in whole]  # every step logged once
    assert [v for _, v in resumed] == pytest.approx([v for _, v in whole], rel=1e-5)


@pytest.mark.parametrize("make_error", [
    lambda: RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                         "by peer [127.0.0.1]:29513"),
    lambda: __import__("torch").distributed.DistNetworkError("Timed out after 1800 seconds "
                                                             "waiting for clients. 1/2 clients joined."),
])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_lost_peer_is_one_line_from_every_rank(make_error, rank, tmp_path, capsys):
    """A dead or hung rank surfaces on the others as a gloo/NCCL error or timeout: every rank
    that meets it says so in one line (rank 0 may be the one that died), exit 69."""
    from s4d_dist.train.faults import EXIT_PEERS

    log = tmp_path / f"rank{rank}.log"
    try:
        raise make_error()
    except Exception as error:  # noqa: BLE001 - what cli.main catches
        code = cli.report(error, rank, log)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_PEERS and len(err) == 1
    assert err[0].startswith(f"[s4d] rank {rank} lost the other ranks (") and "exit 69" in err[0]
    assert "Traceback" in log.read_text()


def test_signal_check_interval_must_be_positive():
    from s4d_dist import config

    with pytest.raises(config.ConfigError, match="signal_check_every must be >= 1"):
        config.load("demo", ["checkpoint.signal_check_every=0"])


def test_a_repeated_signal_after_the_stop_does_not_kill_the_exiting_process():
    """Once a preemption is noted the process is on its way to exit 75; a scheduler that repeats
    SIGTERM, or DeepSpeed's launcher terminating the ranks still exiting, must not turn that into
    a death by signal. A Python handler would not last: the interpreter resets its handlers to
    the default while it shuts down (how the 2-rank test above once got exit 241 = -SIGTERM), so
    leaving the context ignores the signals at the OS level."""
    from s4d_dist.train import faults

    before = signal.getsignal(signal.SIGTERM)
    try:
        with faults.Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert preemption.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # would end this test process under SIG_DFL
        time.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        # A rank that noted nothing but agreed with the others to stop (`requested` sets the
        # agreed signal from the all-reduce; set here as it would be) ignores them too.
        signal.signal(signal.SIGTERM, before)
        with faults.Preemption() as preemption:
            preemption.signal = "SIGTERM"
        assert preemption.received == 0
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)

    with faults.Preemption() as preemption:  # no signal: the previous handlers come back
        assert preemption.received == 0  # the earlier run's note is forgotten
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_loop_off_the_main_thread_listens_through_the_main_thread_it_is_given():
    """Where the loop runs in a thread of its own (a Ray Train worker), the handlers are
    installed by the `main_thread` it is given (there: the actor's); with none to ask, a signal
    keeps its effect and nothing is noted."""
    import threading

    from s4d_dist.train import faults

    calls, ran = queue.SimpleQueue(), []

    def main_thread(call):  # like the actor's: the call runs there, and is waited for
        done = threading.Event()
        calls.put((call, done))
        done.wait(timeout=60)
        return True

    def loop(given, seen):
        with faults.Preemption(main_thread=given) as preemption:
            seen.append(preemption.received)
            if given is main_thread:
                signal.raise_signal(signal.SIGUSR1)  # Python runs handlers on the main thread
                for _ in range(1000):
                    if preemption.received:
                        break
                    time.sleep(0.01)
                seen.append(preemption.received)
        calls.put((None, None))

    before = signal.getsignal(signal.SIGUSR1)
    seen: list[int] = []
    try:
        threading.Thread(target=loop, args=(main_thread, seen)).start()
        for _ in range(6000):  # the main thread serves the loop's calls until it ends, and
            try:               # runs Python signal handlers between its waits
                call, done = calls.get(timeout=0.01)
            except queue.Empty:
                continue
            if call is None:
                break
            call()
            ran.append(call)
            done.set()
        assert seen == [0, signal.SIGUSR1]
        assert ran == [faults.listen, faults.ignore_further]
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # the process is exiting
    finally:
        signal.signal(signal.SIGUSR1, before)

    seen = []
    threading.Thread(target=loop, args=(faults.on_this_thread, seen)).start()
    assert calls.get(timeout=60) == (None, None)
    assert seen == [0] and signal.getsignal(signal.SIGUSR1) == before


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_run(tmp_path, monkeypatch,
                                                                            caplog):
    # A process killed while DeepSpeed JIT-loads its CPU op leaves torch's build lock; the next
    # run on the machine would wait for it forever. A live build's lock is waited for; a lock
    # older than any build is removed, with a warning.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(distributed, "STALE_BUILD_LOCK_S", 60.0)
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    released = threading.Timer(1.5, lock.unlink)  # a live build finishing
    released.start()
    started = time.monotonic()
    distributed.wait_for_build_lock("deepspeed_shm_comm")
    assert time.monotonic() - started >= 1.0 and not lock.exists()
    lock.touch()
    os.utime(lock, (time.time() - 61, time.time() - 61))  # left by a process killed a minute ago
    with caplog.at_level(logging.WARNING):
        distributed.wait_for_build_lock("deepspeed_shm_comm")
    assert not lock.exists() and f"removing {lock}" in caplog.text
