"""Command line of the training entry points (launch/pretrain.py, launch/finetune.py).

    deepspeed launch/pretrain.py --config pretrain_vit_base [key=value ...]
    torchrun --nproc_per_node 8 launch/finetune.py --config finetune_dfew data.fold=3
    python launch/finetune.py --config demo

`--config` is a preset name or a YAML path; the rest are dotlist overrides. The launcher's
own `--local_rank` is accepted and ignored (LOCAL_RANK is read from the environment).

A run that stops prints one line saying why — once, from rank 0, for the stops every rank
meets alike (s4d_dist.train.faults: bad data, storage, preemption, a refused resume,
divergence), from the rank concerned for anything else — and exits with the code that
faults.py documents. Each rank logs to `<run>/logs/rank<k>.log`, tracebacks included; the
console keeps rank 0's progress and those lines.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from s4d_dist import config
from s4d_dist.train.logs import run_logs


def parse(task: str, argv: list[str] | None = None, prog: str | None = None):
    """The resolved config of the command line; `--print-config` prints it and exits. `prog`:
    the command as typed, in usage and errors (default: the launch script)."""
    demo, full = {"pretrain": ("demo", "pretrain_vit_base"),
                  "finetune": ("demo_finetune", "finetune_dfew data.fold=3")}[task]
    examples = (f"  python launch/{task}.py --config {demo} optim.epochs=1 --print-config\n"
                f"  deepspeed --num_gpus 8 launch/{task}.py --config {full}\n"
                f"  torchrun --nproc_per_node 8 -m s4d_dist.train {task} --config {full}\n"
                f"  s4d-{task} --config my_run.yaml output_dir=/runs seed=1")
    parser = argparse.ArgumentParser(
        prog=prog or f"launch/{task}.py", description=f"S4D {task} under DeepSpeed (also torchrun, python)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{config.describe_presets()}\n\nexamples:\n{examples}")
    parser.add_argument("--config", required=True, help="preset name (below) or YAML file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, anywhere among the flags")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = config.load(args.config, [f"task={task}", *args.overrides])
    except config.ConfigError as error:
        parser.error(str(error))
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def main(task: str, argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Train; on a stop, one line on the console and SystemExit with the documented code."""
    cfg = parse(task, argv, prog)
    rank = int(os.environ.get("RANK", "0"))
    from s4d_dist.train import preflight
    from s4d_dist.train.run_folder import run_dir

    try:  # before torch and DeepSpeed are imported, and before the run folder is made
        preflight.check(cfg)
    except Exception as error:  # noqa: BLE001 - one line and an exit code, as below
        raise SystemExit(report(error, rank, None)) from None
    from s4d_dist.train.loop import train  # heavy imports after the checks

    with run_logs(run_dir(cfg) / "logs" / f"rank{rank}.log", rank) as log_file:
        try:
            return train(cfg, make_task(cfg))
        except Exception as error:  # noqa: BLE001 - every stop becomes one line and an exit code
            raise SystemExit(report(error, rank, log_file)) from None


def exit_code(error: BaseException) -> int:
    """The code faults.py documents for what stopped the run."""
    from s4d_dist.train.faults import (EXIT_DATA, EXIT_DIVERGED, EXIT_FAILED, EXIT_PEERS,
                                       EXIT_USAGE, RunStopped, peer_failure)

    if isinstance(error, RunStopped):
        return error.exit_code
    if isinstance(error, config.ConfigError):  # before the imports below: preflight is fast
        return EXIT_USAGE
    from s4d_dist.data.catalog import ShardError  # a shard cut short or broken while the run trains
    from s4d_dist.models.official import CheckpointError  # an init_checkpoint that does not fit
    from s4d_dist.train.engine import NonFiniteLossError

    if peer_failure(error):
        return EXIT_PEERS
    if isinstance(error, NonFiniteLossError):
        return EXIT_DIVERGED
    if isinstance(error, ShardError):
        return EXIT_DATA
    return EXIT_USAGE if isinstance(error, CheckpointError) else EXIT_FAILED


def report(error: BaseException, rank: int, log_file: Path | None) -> int:
    """Write the traceback to `log_file`, print the one line (see the module docstring) and
    return the exit code. Where the log cannot take the traceback (the full disk it reports),
    an unexpected error's traceback goes to the console instead."""
    from s4d_dist.train.faults import EXIT_FAILED, EXIT_PEERS, EXIT_PREEMPTED

    trace = "".join(traceback.format_exception(error))
    try:
        with open(log_file, "a") as log:  # type: ignore[arg-type]
            log.write(trace)
        where = f"; details in {log_file}"
    except (OSError, TypeError):
        where = ""
    code = exit_code(error)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if code == EXIT_FAILED:
        line = f"rank {rank} failed: {type(error).__name__}: {message} (exit {code}{where})"
        if not where:
            print(trace, file=sys.stderr, end="")
    elif code == EXIT_PREEMPTED:
        line = f"{message} (exit {code})"
    elif code == EXIT_PEERS:
        line = (f"rank {rank} lost the other ranks ({message}): one died, hangs or cannot be "
                f"reached; read every rank's log in its logs/ folder (exit {code}{where})")
    else:
        line = f"error: {message} (exit {code}{where})"
    if where:  # the rank's log ends with what its console said (a Ray worker has no console)
        with open(log_file, "a") as log:  # type: ignore[arg-type]
            log.write(f"[s4d] {line}\n")
    if code in (EXIT_FAILED, EXIT_PEERS) or rank == 0:
        print(f"[s4d] {line}", file=sys.stderr, flush=True)
    return code


def make_task(cfg):
    """The loop's task for `cfg.task`, imported only when needed (each pulls in models, data)."""
    if cfg.task == "pretrain":
        from s4d_dist.train.pretrain import PretrainTask
        return PretrainTask(cfg)
    from s4d_dist.train.finetune import FinetuneTask
    return FinetuneTask(cfg)
