"""Run a training entry point and kill -9 its whole process group when rank 0 is about to take
optimizer step number `S4D_TEST_KILL_AT_STEP` (counted in this process), so a test can crash a
multi-rank run at a chosen point instead of racing a poll of the checkpoint folder.

    deepspeed --num_gpus 2 tests/kill_at_step.py launch/pretrain.py --config demo ...
"""
import os
import runpy
import signal
import sys

from s4d_dist.train import engine

KILL_AT = int(os.environ["S4D_TEST_KILL_AT_STEP"])
_step = engine.Stepper.__call__
_calls = 0


def _counting_step(self, *args, **kwargs):
    global _calls
    _calls += 1
    if _calls == KILL_AT and os.environ.get("RANK", "0") == "0":
        print(f"[kill_at_step] kill -9 before step {KILL_AT}", flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return _step(self, *args, **kwargs)


engine.Stepper.__call__ = _counting_step
# The launcher puts its `--local_rank=N` first; LOCAL_RANK is in the environment anyway.
sys.argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
runpy.run_path(sys.argv[0], run_name="__main__")
