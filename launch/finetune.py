"""S4D finetune: `deepspeed launch/finetune.py --config <preset> [key=value ...]` (also torchrun, python)."""
from s4d_dist.train.cli import main

if __name__ == "__main__":
    main("finetune")
