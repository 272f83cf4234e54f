"""``python -m s4d_dist.train {pretrain,finetune} --config X [key=value ...]``: launch/pretrain.py
and launch/finetune.py as a module, which `deepspeed --module s4d_dist.train finetune ...` and
`torchrun -m s4d_dist.train finetune ...` can start from any folder once s4d_dist is installed.

The task may stand anywhere among the arguments: DeepSpeed's launcher puts its own
`--local_rank=N` before the script's.
"""
import sys

from s4d_dist.train.cli import main

TASKS = ("pretrain", "finetune")

if __name__ == "__main__":
    argv = sys.argv[1:]
    task = next((a for a in argv if a in TASKS), None)
    if task is None:
        print(f"usage: python -m s4d_dist.train {{{','.join(TASKS)}}} --config PRESET "
              "[KEY=VALUE ...] (--help after the task for more)", file=sys.stderr)
        sys.exit(2)
    argv.remove(task)
    main(task, argv, prog=f"python -m s4d_dist.train {task}")
