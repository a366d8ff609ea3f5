"""Tuned baselines: the grid recipes, the recorded choices and applying them to a job.

A grid recipe (``conf/hparams_search/<optimizer>.yaml``) sweeps a method's keys into the
MLflow experiment ``tuning``; :mod:`lagg_pipeline.tuning_select` chooses each grid's best point
by ``CRITERION`` (outer-valid, never the test split) and writes it to
``conf/tuned_hparams/<task>/<optimizer>.yaml``. Jobs then apply those values (``tuned=true``, the
default) unless the command line sets the key. A job over clients (partition=dirichlet, ...)
uses the values tuned over those same clients when a grid ran there, else the i.i.d. ones.
"""
from __future__ import annotations

import contextlib
import math
from importlib import resources
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline.data.partition import partition_label, partition_slug

TUNED_ROOT = "tuned_hparams"  # under the config package (not "tuned": that is a config key)
DIVERGED_SEEDS = "diverged_seeds"
SELECTION_FROM_ROUND = 100  # the verdict's window: a setting must be good along the curve, not at one round
DIVERGENCE_FACTOR = 10.0  # a loss this many times the first round's has blown up, even if it comes back
CRITERION = (f"the mean over evaluations from round {SELECTION_FROM_ROUND} of the seed-mean outer-valid loss, "
             f"among grid points where no seed diverged (a train or outer-valid loss that is non-finite or above "
             f"{DIVERGENCE_FACTOR:g}x the seed's first-round train loss at any round)")
MOMENTA = ("optimizer.momentum", "beta")  # in [0, 1): 0 ends the method's range, not the grid's


def entry_name(num_local_steps: int, num_grads: int, partition: str = "iid") -> str:
    """"H4_K8" for i.i.d. data; "H4_K8_dirichlet_alpha0.1_M64" over clients."""
    return f"H{num_local_steps}_K{num_grads}{partition_slug(partition)}"


def _recipe(optimizer: str):
    recipe = resources.files("lagg_pipeline.conf").joinpath("hparams_search", f"{optimizer}.yaml")
    return OmegaConf.create(recipe.read_text()) if recipe.is_file() else None


def grid_keys(optimizer: str) -> list[str]:
    """The keys the optimizer's grid recipe sweeps (the keys its tuning chooses)."""
    return list(recipe_grid(optimizer))


def recipe_grid(optimizer: str) -> dict[str, list]:
    """{key: its values} of the optimizer's grid recipe ({} without one)."""
    recipe = _recipe(optimizer)
    return {} if recipe is None else {key: [_typed(str(v)) for v in str(values).split(",")]
                                      for key, values in recipe.hydra.sweeper.params.items()}


def grid_name(optimizer: str, task: str, h, k, partition: str) -> str:
    """"fedavg on mnist1d_mlp H=4 K=8" (and the clients when not i.i.d.): how messages name one grid."""
    return f"{optimizer} on {task} H={h} K={k}" + ("" if partition == "iid" else f" over clients {partition}")


def grid_size(optimizer: str) -> int:
    """How many points the optimizer's recipe grid has."""
    return math.prod(len(values) for values in recipe_grid(optimizer).values())


def missing_points(optimizer: str, held: set[tuple], rounds: int, seeds: int) -> list[tuple]:
    """The points of the optimizer's recipe grid that ``held`` (points run at ``rounds`` × ``seeds``) lacks,
    when the held points are at the recipe's budget and include part of its grid; [] otherwise (a grid run
    at another budget, or a store holding only the sweeps past an edge, is not the recipe's grid)."""
    from itertools import product

    recipe, grid = _recipe(optimizer), recipe_grid(optimizer)
    if recipe is None or (rounds, seeds) != (recipe.num_rounds, recipe.num_runs):
        return []
    every = list(product(*grid.values()))
    return [p for p in every if p not in held] if held.intersection(every) else []


def tuned_root() -> Path:
    """conf/tuned_hparams inside the config package (the repository's conf/ in an editable install)."""
    return Path(str(resources.files("lagg_pipeline.conf"))) / TUNED_ROOT


def tuned_file(task: str, optimizer: str, root: Path | None = None) -> Path:
    return (root or tuned_root()) / task / f"{optimizer}.yaml"


def lookup(task: str, optimizer: str, num_local_steps: int, num_grads: int, root: Path | None = None,
           partition: str = "iid") -> dict | None:
    """The recorded choice for this setting: {"values": {key: value}, "partition": the data it
    was tuned on, ...}, or None. Over clients without a grid of their own, the i.i.d. choice."""
    path = tuned_file(task, optimizer, root)
    if not path.is_file():
        return None
    entries = OmegaConf.load(path)
    for tuned_over in dict.fromkeys([partition, "iid"]):
        entry = entries.get(entry_name(num_local_steps, num_grads, tuned_over))
        if entry is not None:
            return {**OmegaConf.to_container(entry), "partition": tuned_over}
    return None


def apply(cfg, given: set[str], root: Path | None = None):
    """cfg with the tuned values of its task, optimizer, H, K and clients, except keys in
    ``given`` (those the command line set); returns (cfg, {key: value} applied, the partition
    label the values were tuned on)."""
    entry = lookup(cfg.task.name, cfg.optimizer.name, cfg.num_local_steps, cfg.num_grads, root,
                   partition_label(cfg.partition))
    if entry is None:
        return cfg, {}, None
    values = {k: v for k, v in entry["values"].items() if k not in given and OmegaConf.select(cfg, k) != v}
    if not values:
        return cfg, {}, entry["partition"]
    cfg = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg, values, entry["partition"]


def diverged_seeds(result) -> int:
    """Seeds whose train or outer-valid loss is ever non-finite or above DIVERGENCE_FACTOR x the
    seed's first-round train loss (a finite 1e16 spike that recovers still diverged)."""
    limit_S = DIVERGENCE_FACTOR * result.train_loss[:, :1]
    bad = lambda loss: ~(np.isfinite(loss) & (loss <= limit_S)).all(axis=1)
    return int((bad(result.train_loss) | bad(result.outer_valid_loss)).sum())


def selection_score(eval_rounds, outer_valid_loss_E) -> float:
    """The mean of the seed-mean outer-valid loss over evaluations from round SELECTION_FROM_ROUND (a
    run shorter than that: from its first evaluation after round 0); non-finite if a seed diverged."""
    rounds, loss_E = np.asarray(eval_rounds), np.asarray(outer_valid_loss_E, dtype=float)
    if len(rounds) != len(loss_E) or not (rounds > 0).any():
        return float("nan")  # a curve MLflow kept only in part (non-finite values are not logged)
    start = SELECTION_FROM_ROUND if rounds.max() >= SELECTION_FROM_ROUND else rounds[rounds > 0].min()
    return float(loss_E[rounds >= start].mean())


def _typed(text: str):
    """An MLflow param (always a string) back to the number it was."""
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return text
