"""Choose each hand-designed method's best grid point from the MLflow store and record it.

:func:`select` picks, per (task, optimizer, H, K, clients), the grid point with the lowest
outer-valid loss along the judged part of the curve (``tuning.CRITERION``; the test split is
never read) among the points where no seed diverged, run at the newest budget (rounds, seeds,
batch size; a point run twice counts once, its newest run), and writes it with the sweep that
chose it to ``conf/tuned_hparams/<task>/<optimizer>.yaml``. A grid run at its recipe's budget is
chosen from only once all of its points finished.

A choice on the edge of its grid (a momentum at 0 is not an edge: nothing lies beyond) is
recorded with the sweep that tries one step past it; ``make tune-extend`` runs those and
selects again; on a fresh store, where only those sweeps ran, the recorded choice competes with
them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline.tuning import (CRITERION, DIVERGED_SEEDS, MOMENTA, _recipe, _typed, entry_name, grid_keys,
                                  grid_name, grid_size, missing_points, selection_score)


def score_of(client, run, num_rounds: int) -> float:
    """:func:`selection_score` of a logged run, from its outer-valid curve (NaN where it is incomplete)."""
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "outer_valid_loss"))
    if not history or history[-1][0] != num_rounds:
        return float("nan")
    rounds, values = zip(*history)
    return selection_score(rounds, values)


def budget(run) -> tuple[int, int, int]:
    """(rounds, seeds, batch size) a grid point ran with: points compare only within one budget."""
    params = run.data.params
    return tuple(int(params.get(k, 0)) for k in ("num_rounds", "num_runs", "local_batch_size"))


def grid_points(members: list, keys: list[str]) -> dict[tuple, object]:
    """{point (the values of ``keys``): its newest run}, among runs of the newest run's budget."""
    members = sorted(members, key=lambda r: r.info.start_time, reverse=True)
    newest_budget = budget(members[0])
    points = {}
    for run in members:
        if budget(run) == newest_budget:
            points.setdefault(tuple(_typed(run.data.params[k]) for k in keys), run)  # a repeat counts once
    return points


def grid_minutes(runs: list) -> float:
    """The grid's wall time: its points' run durations summed (what `make tune` spends on it)."""
    return round(sum(r.info.end_time - r.info.start_time for r in runs) / 60_000, 1)


def neighbours(points, keys: list[str], best: tuple, key: str) -> list:
    """The values tried along ``key`` with every other key at the best point's value."""
    i = keys.index(key)
    return sorted({p[i] for p in points if all(p[j] == best[j] for j in range(len(keys)) if j != i)})


class Selection(NamedTuple):
    written: list[Path]  # the tuned files written
    unfinished: list[str]  # one line per grid the store holds only part of at its recipe's budget: not chosen


def select(client, experiment_name: str, out_root: Path) -> Selection:
    """Write the best grid point of every (task, optimizer, H, K, clients) swept in ``experiment_name``,
    chosen among the points of the newest budget (rounds, seeds, batch size); a grid run at its recipe's
    budget is chosen from only when all of its points finished (running it again runs the rest)."""
    from lagg_pipeline.config import HAND_OPTIMIZERS

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {experiment_name!r}: run a grid recipe first")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=50000)
    groups: dict[tuple, list] = {}
    for run in runs:
        tags = run.data.tags
        if tags.get("optimizer") in HAND_OPTIMIZERS and "mlflow.parentRunId" in tags:
            key = (tags["task"], tags["optimizer"], int(tags["H"]), int(tags["K"]), tags.get("partition", "iid"))
            groups.setdefault(key, []).append(run)
    written, unfinished = {}, []
    for (task, optimizer, h, k, partition), members in sorted(groups.items()):
        keys = grid_keys(optimizer)
        if not keys:
            continue
        points = grid_points(members, keys)
        rounds, seeds, _ = budget(next(iter(points.values())))
        missing = missing_points(optimizer, set(points), rounds, seeds)
        if missing:  # a choice from part of a grid would look as final as one from all of it
            total = grid_size(optimizer)
            unfinished.append(f"{grid_name(optimizer, task, h, k, partition)}: {total - len(missing)} of {total} "
                              f"grid points finished, not chosen until the rest are")
            continue
        path = out_root / task / f"{optimizer}.yaml"
        name = entry_name(h, k, partition)
        recorded = OmegaConf.to_container(OmegaConf.load(path)).get(name) if path.is_file() else None
        entry = _choose(client, experiment_name, task, optimizer, h, k, partition, members, points, keys, recorded)
        if entry is not None:
            written.setdefault(path, {})[name] = entry
    for path, entries in written.items():
        existing = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Tuned {path.stem} on {path.parent.name}: per H and K, the grid point of\n"
                  f"# conf/hparams_search/{path.stem}.yaml with the lowest outer-valid loss (`criterion`;\n"
                  f"# the test split is never read), written by `python -m lagg_pipeline\n"
                  f"# mode=select_tuned`. Applied when tuned=true (the default) unless the command line sets\n"
                  f"# the key. `sweep` is the command that produced the grid; `extend` the overrides of the\n"
                  f"# sweeps one step past a grid edge the choice sits on (`make tune-extend` runs them).\n")
        path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({**existing, **entries})))
    return Selection(sorted(written), unfinished)


def _choose(client, experiment_name, task, optimizer, h, k, partition, members, points, keys,
            recorded) -> dict | None:
    """The tuned entry of one (task, optimizer, H, K, clients) from its runs in the store (``points``: its
    grid_points). A recorded entry whose sweeps the store does not all hold (a fresh store ran only the
    sweeps past its edges) competes with the store's points at the same budget: the lower score wins; grids,
    sweeps and costs are the union."""
    scored = [(score_of(client, r, budget(r)[0]), point, r) for point, r in points.items()
              if r.data.metrics.get(DIVERGED_SEEDS, 0) == 0]
    scored = [item for item in scored if np.isfinite(item[0])]
    top = min(scored, key=lambda item: item[0]) if scored else None
    best = top[2] if top else next(iter(points.values()))  # the newest budget's points share its params
    rounds, seeds, batch = budget(best)
    here = {r.data.tags["mlflow.parentRunId"] for r in members}  # a recorded grid partly elsewhere competes
    rival = recorded if (recorded is not None and set(recorded.get("mlflow", {}).get("parent_runs", [])) - here
                         and tuple(recorded.get(k) for k in ("rounds", "seeds", "batch")) == (rounds, seeds, batch)) else None
    if top is None and rival is None:
        return None
    tried, chosen = {key: sorted({p[i] for p in points}) for i, key in enumerate(keys)}, list(points.values())
    parents = sorted({r.data.tags["mlflow.parentRunId"] for r in chosen})
    sweeps = [f"python -m lagg_pipeline --multirun {s}"
              for s in sorted({grid_overrides(client.get_run(p).data.params.get("sweep_overrides", "?"))
                               for p in parents})]
    if rival is not None and (top is None or rival["outer_valid_loss"] <= top[0]):
        values, score, best_run = rival["values"], rival["outer_valid_loss"], rival["mlflow"]["best_run"]
        best_point = tuple(values[key] for key in keys)  # every point past its edge diverged or scored worse
    else:
        (score, best_point, _), values, best_run = top, dict(zip(keys, top[1])), best.info.run_id

    def along(key):  # the values tried along key with every other key at the choice's
        near = set(neighbours(points, keys, best_point, key))
        if rival is not None and all(values[other] in rival["grid"][other] for other in keys if other != key):
            near |= set(rival["grid"][key])  # the recorded grid is a full product of its values
        return sorted(near)

    beyond = {key: beyond_edge(key, values[key], along(key)) for key in keys}
    edges = [key for key in keys if beyond[key] is not None]
    recipe = _recipe(optimizer)  # an extension keeps the budget the grid ran with
    extra = [f"{key}={best.data.params[key]}" for key in ("num_runs", "num_rounds")
             if key in best.data.params and _typed(best.data.params[key]) != recipe[key]]
    extra += partition_overrides(best.data.params) if partition != "iid" else []
    if rival is not None:  # the store's points the recorded entry does not count yet (selecting again adds none)
        chosen = [r for r in chosen if r.data.tags["mlflow.parentRunId"] not in rival["mlflow"]["parent_runs"]]
    good = {r.info.run_id for _, _, r in scored}
    grid_size, diverged, minutes = len(chosen), sum(r.info.run_id not in good for r in chosen), grid_minutes(chosen)
    if rival is not None:
        tried = {key: sorted(set(tried[key]) | set(rival["grid"][key])) for key in keys}
        grid_size, diverged = grid_size + rival["grid_points"], diverged + rival["diverged_points"]
        minutes = round(minutes + rival.get("grid_minutes", 0.0), 1)
        sweeps = list(dict.fromkeys([grid_overrides(s) for s in rival["sweep"]] + sweeps))
        parents = sorted(set(rival["mlflow"]["parent_runs"]) | set(parents))
    entry = {"values": values, "outer_valid_loss": float(score), "criterion": CRITERION, "grid_points": grid_size,
             "diverged_points": diverged, "grid": tried, "on_grid_edge": edges,
             "extend": [extension(optimizer, task, h, k, values, key, beyond[key], extra) for key in edges],
             "seeds": seeds, "rounds": rounds, "batch": batch, "grid_minutes": minutes, "sweep": sweeps,
             "mlflow": {"experiment": experiment_name, "parent_runs": parents, "best_run": best_run},
             "selected": time.strftime("%Y-%m-%d")}
    other_budgets = sorted({budget(r) for r in members} - {budget(best)})
    if other_budgets:
        entry["other_budgets_ignored"] = [f"{r} rounds x {s} seeds, batch {b}" for r, s, b in other_budgets]
    if partition != "iid":
        entry["clients"] = partition
    return entry


def grid_overrides(sweep_overrides: str) -> str:
    """A sweep's command-line overrides without Hydra's own (``hydra.sweep.dir=...``): where a sweep
    wrote its folders is not part of the grid, and a machine's path does not belong in a tuned file."""
    return " ".join(o for o in sweep_overrides.split() if not o.lstrip("+~").startswith("hydra."))


def beyond_edge(key: str, best, tried: list):
    """The next value past the grid's edge when ``best`` sits on it, else None: learning rates
    step by 3x, momenta halve their distance to 0 or divide their distance to 1 by 10. ``tried``:
    the best point's neighbours along ``key`` (the other keys at their best values)."""
    if len(tried) < 2 or best not in (tried[0], tried[-1]):
        return None
    upward = best == tried[-1]
    if key in MOMENTA:
        if not upward:
            return None if best == 0 else 0.0 if best <= 0.25 else round(best / 2, 4)
        return round(1 - (1 - best) / 10, 6)
    return float(f"{best * 3 if upward else best / 3:.3g}")


def extension(optimizer: str, task: str, h: int, k: int, values: dict, key: str, value, extra: list[str]) -> str:
    """The sweep that tries one step past the edge along ``key``, the other keys at their best."""
    fixed = [f"{name}={value if name == key else best}" for name, best in values.items()]
    return " ".join([f"hparams_search={optimizer}", f"task={task}", f"H={h}", f"k={k}", *fixed, *extra])


def partition_overrides(params: dict) -> list[str]:
    """The overrides that rebuild a run's clients from its MLflow params (partition.*)."""
    return [f"partition={params['partition.name']}"] + sorted(
        f"{key}={value}" for key, value in params.items() if key.startswith("partition.") and key != "partition.name")
