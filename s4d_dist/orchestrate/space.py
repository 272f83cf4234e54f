"""The search space of a sweep, written in the config and checked before any trial starts.

    sweep:
      space:
        optim.base_lr: {loguniform: [1.0e-5, 1.0e-3]}
        optim.layer_decay: {uniform: [0.6, 0.9]}
        model.moae: {num_experts: {choice: [4, 8]}, top_k: {choice: [1, 2]}}

A key is any config key, dotted or nested. A typo, a value the schema rejects (a float for an
integer key, a top_k above num_experts) or malformed bounds would otherwise surface as failed
trials after the cluster had started them — or, for values drawn at random, only in some. So
every value a dimension can take at its edges (each choice; each bound, plus an interior point
of continuous ranges) goes through the config's own validation, alone and, when the count is
small, in every combination with the other dimensions' edges.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray import tune

from s4d_dist import config
from s4d_dist.orchestrate import runs

DISTRIBUTIONS = {"loguniform": tune.loguniform, "uniform": tune.uniform,
                 "quniform": tune.quniform, "randint": tune.randint}
LISTS = {"choice": tune.choice, "grid": tune.grid_search}
ARITY = {"loguniform": 2, "uniform": 2, "quniform": 3, "randint": 2}
# Set by the orchestrator for every trial, so sweeping them would be meaningless or harmful.
RESERVED = ("task", "run_name", "output_dir", "resume", "ray", "sweep")
MAX_COMBINATIONS = 256


class SpaceError(config.ConfigError):
    """A search space that cannot be swept; the message names the `sweep.space` key."""


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key
    kind: str  # a DISTRIBUTIONS or LISTS name
    args: tuple

    @property
    def name(self) -> str:
        return f"sweep.space.{self.key} ({self.kind} {list(self.args)})"

    def edges(self) -> list[Any]:
        """Values that every sample lies between or among: all must be valid."""
        if self.kind in LISTS:
            return list(self.args)
        low, high = self.args[:2]
        if self.kind == "randint":
            return [low, high - 1]
        interior = low + 0.381966 * (high - low)  # not round: an integer key must refuse it
        return [low, interior, high]

    def domain(self) -> Any:
        maker = LISTS.get(self.kind) or DISTRIBUTIONS[self.kind]
        return maker(list(self.args)) if self.kind in LISTS else maker(*self.args)


def _dimension(key: str, spec: Mapping) -> Dimension:
    (kind, args), = spec.items()
    where = f"sweep.space.{key}"
    if not isinstance(args, (list, tuple)) or not args:
        raise SpaceError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ARITY:
        if len(args) != ARITY[kind] or not all(isinstance(a, (int, float)) for a in args):
            raise SpaceError(f"{where}: {kind} takes {ARITY[kind]} numbers, got {list(args)}")
        low, high = args[:2]
        if not low < high:
            raise SpaceError(f"{where}: {kind} needs low < high, got {list(args)}")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {list(args)}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SpaceError(f"{where}: randint takes integers [low, high), got {list(args)}")
        if kind == "quniform" and args[2] <= 0:
            raise SpaceError(f"{where}: quniform needs q > 0, got {list(args)}")
    return Dimension(key, kind, tuple(args))


def dimensions(space: Mapping, prefix: str = "") -> list[Dimension]:
    """The dimensions of a space whose keys may be dotted, nested, or both."""
    found = []
    for name, value in space.items():
        key = f"{prefix}{name}"
        if not isinstance(value, Mapping):
            raise SpaceError(f"sweep.space.{key}: expected {{kind: [values]}} with kind one of "
                             f"{', '.join([*DISTRIBUTIONS, *LISTS])}; got {value!r}")
        kinds = [k for k in value if k in DISTRIBUTIONS or k in LISTS]
        if kinds and len(value) > 1:
            raise SpaceError(f"sweep.space.{key}: one distribution per key, got {dict(value)}")
        found += [_dimension(key, value)] if kinds else dimensions(value, f"{key}.")
    return found


def _checked(base: dict, values: dict[str, Any], what: str) -> None:
    try:
        config.from_values(("resolved config", base), ("sweep.space", runs.nested(values)))
    except config.ConfigError as error:
        raise SpaceError(f"{what}: {error}") from None


def check(cfg: DictConfig) -> list[Dimension]:
    """The dimensions of `cfg.sweep.space`, each edge value valid alone and together."""
    dims = dimensions(OmegaConf.to_container(cfg.sweep.space))
    if not dims:
        raise SpaceError("sweep.space is empty: nothing to sweep")
    base = runs.as_dict(cfg)
    for dim in dims:
        owner = next((r for r in RESERVED if dim.key == r or dim.key.startswith(r + ".")), None)
        if owner:
            raise SpaceError(f"sweep.space.{dim.key}: '{owner}' is set by the orchestrator, "
                             f"not swept")
        for value in dim.edges():
            _checked(base, {dim.key: value}, f"{dim.name}, value {value!r}")
    edges = [dim.edges() for dim in dims]
    if len(dims) > 1 and math.prod(map(len, edges)) <= MAX_COMBINATIONS:
        for values in itertools.product(*edges):
            chosen = dict(zip((d.key for d in dims), values))
            _checked(base, chosen, f"sweep.space: the combination {chosen} is invalid")
    return dims


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Tune's param_space: the config's nesting, so a sampled trial merges as a config layer."""
    return runs.nested({dim.key: dim.domain() for dim in dims})
