"""Ray orchestration: the training loops of s4d_dist.train launched on a Ray cluster.

    cluster.py    join or start a cluster; GPUs per worker from it; refuse up front what it cannot hold
    runs.py       a run's config made ready for Ray (absolute paths) and checked before launch
    ray_train.py  one run = one Ray Train TorchTrainer (DeepSpeed inside each worker)
    space.py      the search space written in the config (sweep.space), validated
    trials.py     many runs at once through Ray Tune, each trial a TorchTrainer
    sweep.py      hyperparameter sweeps with ASHA early stopping, results table, best preset
    kfold_runs.py the folds of a k-fold dataset in parallel, mean ± std summary
    cli.py        the command line: launch/sweep.py and `s4d-sweep`

Nothing here trains: every worker runs `s4d_dist.train.loop.train` unchanged.
"""
