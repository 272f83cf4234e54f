"""S4D on a Ray cluster: `python launch/sweep.py --config <preset> --mode train|sweep|kfold
[key=value ...]` (also `s4d-sweep`; the command line is s4d_dist/orchestrate/cli.py)."""
import sys

from s4d_dist.orchestrate.cli import main

if __name__ == "__main__":
    sys.exit(main())
