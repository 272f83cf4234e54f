"""The installed commands (setup.py `console_scripts`) that have no `main` returning an exit
status of their own: the training entry points and the demo return their results, which a
console script would print and turn into exit status 1.

    s4d-pretrain / s4d-finetune   = launch/pretrain.py / launch/finetune.py (s4d_dist.train.cli)
    s4d-demo                      = python -m s4d_dist.demo
    s4d-shards, s4d-sweep, s4d-predict: their modules' `main` (setup.py)
"""
from __future__ import annotations


def pretrain() -> None:
    from s4d_dist.train.cli import main

    main("pretrain")


def finetune() -> None:
    from s4d_dist.train.cli import main

    main("finetune")


def demo() -> None:
    from s4d_dist.demo import main

    main()
