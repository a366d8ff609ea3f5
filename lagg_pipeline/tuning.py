"""Tuned baselines: choose each hand-designed method's best grid point, record it, reuse it.

A grid recipe (``conf/hparams_search/<optimizer>.yaml``) sweeps a method's keys into the
MLflow experiment ``tuning``. :func:`select` picks, per (task, optimizer, H, K), the grid
point with the lowest outer-valid loss at the last round (mean over seeds; the test split
is never read) and writes it with the sweep that chose it to
``conf/tuned_hparams/<task>/<optimizer>.yaml``. Jobs then apply those values (``tuned=true``, the
default) unless the command line sets the key.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

TUNED_ROOT = "tuned_hparams"  # under the config package (not "tuned": that is a config key)
SELECTION_METRIC = "final_outer_valid_loss"


def entry_name(num_local_steps: int, num_grads: int) -> str:
    return f"H{num_local_steps}_K{num_grads}"


def grid_keys(optimizer: str) -> list[str]:
    """The keys the optimizer's grid recipe sweeps (the keys its tuning chooses)."""
    recipe = resources.files("lagg_pipeline.conf").joinpath("hparams_search", f"{optimizer}.yaml")
    if not recipe.is_file():
        return []
    return list(OmegaConf.create(recipe.read_text()).hydra.sweeper.params)


def tuned_root() -> Path:
    """conf/tuned_hparams inside the config package (the repository's conf/ in an editable install)."""
    return Path(str(resources.files("lagg_pipeline.conf"))) / TUNED_ROOT


def tuned_file(task: str, optimizer: str, root: Path | None = None) -> Path:
    return (root or tuned_root()) / task / f"{optimizer}.yaml"


def lookup(task: str, optimizer: str, num_local_steps: int, num_grads: int, root: Path | None = None) -> dict | None:
    """The recorded choice for this setting: {"values": {key: value}, ...}, or None."""
    path = tuned_file(task, optimizer, root)
    if not path.is_file():
        return None
    entry = OmegaConf.load(path).get(entry_name(num_local_steps, num_grads))
    return None if entry is None else OmegaConf.to_container(entry)


def apply(cfg, given: set[str], root: Path | None = None):
    """cfg with the tuned values of its task, optimizer, H and K, except keys in ``given``
    (those the command line set); returns (cfg, {key: value} applied)."""
    entry = lookup(cfg.task.name, cfg.optimizer.name, cfg.num_local_steps, cfg.num_grads, root)
    if entry is None:
        return cfg, {}
    values = {k: v for k, v in entry["values"].items() if k not in given and OmegaConf.select(cfg, k) != v}
    if not values:
        return cfg, {}
    cfg = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg, values


def select(client, experiment_name: str, out_root: Path) -> list[Path]:
    """Write the best grid point of every (task, optimizer, H, K) swept in ``experiment_name``."""
    from lagg_pipeline.config import HAND_OPTIMIZERS

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {experiment_name!r}: run a grid recipe first")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=50000)
    groups: dict[tuple, list] = {}
    for run in runs:
        tags = run.data.tags
        # Tuned values are i.i.d. ones: grid points run over clients (partition=...) are not mixed in.
        if (tags.get("optimizer") in HAND_OPTIMIZERS and "mlflow.parentRunId" in tags
                and tags.get("partition", "iid") == "iid"):
            groups.setdefault((tags["task"], tags["optimizer"], int(tags["H"]), int(tags["K"])), []).append(run)
    written = {}
    for (task, optimizer, h, k), members in sorted(groups.items()):
        keys = grid_keys(optimizer)
        scored = [(r.data.metrics[SELECTION_METRIC], r) for r in members if SELECTION_METRIC in r.data.metrics]
        if not scored or not keys:
            continue
        score, best = min(scored, key=lambda pair: pair[0])
        values = {key: _typed(best.data.params[key]) for key in keys}
        tried = {key: sorted({_typed(r.data.params[key]) for r in members}) for key in keys}
        edges = [key for key in keys if len(tried[key]) > 1 and values[key] in (tried[key][0], tried[key][-1])]
        parents = sorted({r.data.tags["mlflow.parentRunId"] for r in members})
        sweeps = sorted({client.get_run(p).data.params.get("sweep_overrides", "?") for p in parents})
        entry = {"values": values, "outer_valid_loss": float(score), "grid_points": len(members),
                 "diverged_points": len(members) - len(scored), "grid": tried, "on_grid_edge": edges,
                 "seeds": int(best.data.params.get("num_runs", 0)), "rounds": int(best.data.params.get("num_rounds", 0)),
                 "sweep": [f"python -m lagg_pipeline --multirun {s}" for s in sweeps],
                 "mlflow": {"experiment": experiment_name, "parent_runs": parents, "best_run": best.info.run_id},
                 "selected": time.strftime("%Y-%m-%d")}
        path = out_root / task / f"{optimizer}.yaml"
        written.setdefault(path, {})[entry_name(h, k)] = entry
    for path, entries in written.items():
        existing = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Tuned {path.stem} on {path.parent.name}: per H and K, the grid point of\n"
                  f"# conf/hparams_search/{path.stem}.yaml with the lowest outer-valid loss at the last round\n"
                  f"# (mean over seeds; the test split is never read), written by `python -m lagg_pipeline\n"
                  f"# mode=select_tuned`. Applied when tuned=true (the default) unless the command line sets\n"
                  f"# the key. `sweep` is the command that produced the grid.\n")
        path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({**existing, **entries})))
    return sorted(written)


def _typed(text: str):
    """An MLflow param (always a string) back to the number it was."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
