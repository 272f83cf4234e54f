"""S4D pretrain: `deepspeed launch/pretrain.py --config <preset> [key=value ...]` (also torchrun, python)."""
from s4d_dist.train.cli import main

if __name__ == "__main__":
    main("pretrain")
