"""What the tuned files record, read back for people and for make: the sweeps one step past
a grid edge (``make tune-extend`` runs them), a table of every choice's budget and the grids
the store holds only part of (``make tune-status``).
``python -m lagg_pipeline.tuning_records {extensions,status}``."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lagg_pipeline.tuning import _typed, grid_name, grid_size, missing_points, recipe_grid, tuned_root


def _entries(root: Path | None):
    """(task, optimizer, setting, entry) of every tuned file, in file order."""
    for path in sorted((root or tuned_root()).glob("*/*.yaml")):
        for name, entry in OmegaConf.to_container(OmegaConf.load(path)).items():
            yield path.parent.name, path.stem, name, entry


def extension_sweeps(root: Path | None = None) -> list[str]:
    """Every recorded extension sweep (overrides for ``python -m lagg_pipeline --multirun``)."""
    return [line for *_, entry in _entries(root) for line in entry.get("extend", [])]


def status(root: Path | None = None, judged_rounds: int = 1000) -> list[str]:
    """A markdown table of what is tuned: per task and setting, each baseline's budget
    ("1000×3": rounds × seeds), "edge" where its choice sits on a grid edge, "—" where none is
    recorded; and how many choices were made at the judged horizon."""
    from lagg_pipeline.config import HAND_OPTIMIZERS

    cells: dict[tuple[str, str], dict[str, str]] = {}
    at_horizon = total = 0
    for task, optimizer, name, entry in _entries(root):
        rounds, seeds = entry.get("rounds"), entry.get("seeds")
        cell = f"{rounds}×{seeds}" if rounds and seeds else "budget not recorded"
        cells.setdefault((task, name), {})[optimizer] = cell + (", edge" if entry.get("on_grid_edge") else "")
        total += 1
        at_horizon += (rounds or 0) >= judged_rounds and (seeds or 0) >= 3
    optimizers = [o for o in HAND_OPTIMIZERS if any(o in row for row in cells.values())]
    lines = ["| task | setting | " + " | ".join(optimizers) + " |", "|---|---|" + "---|" * len(optimizers)]
    lines += [f"| {task} | {name} | " + " | ".join(row.get(o, "—") for o in optimizers) + " |"
              for (task, name), row in sorted(cells.items())]
    return lines + ["", f"{at_horizon} of {total} choices made at the judged horizon ({judged_rounds} rounds × "
                        f"at least 3 seeds); the rest are re-made by `make tune`."]


def grid_progress(client, experiment: str = "tuning") -> list[str]:
    """The grids the store holds only part of: per task, optimizer, H, K and clients, how many of its
    recipe's points finished at the recipe's budget (rounds × seeds), and which are missing. Running
    the grid again (``skip_finished=true`` in every recipe) runs just those."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=50000)
    done: dict[tuple, set] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        grid = recipe_grid(tags.get("optimizer", ""))
        if not grid or "mlflow.parentRunId" not in tags:
            continue
        group = (tags["task"], tags["optimizer"], tags["H"], tags["K"], tags.get("partition", "iid"),
                 _typed(params.get("num_rounds", "")), _typed(params.get("num_runs", "")))
        done.setdefault(group, set()).add(tuple(_typed(params.get(key, "")) for key in grid))
    lines = []
    for (task, optimizer, h, k, partition, rounds, seeds), points in sorted(done.items(), key=str):
        missing = missing_points(optimizer, points, rounds, seeds)
        if missing:
            grid = recipe_grid(optimizer)
            shown = "; ".join(", ".join(f"{key}={value}" for key, value in zip(grid, p)) for p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            total = grid_size(optimizer)
            lines.append(f"- {grid_name(optimizer, task, h, k, partition)}: {total - len(missing)} of {total} "
                         f"points finished; missing {shown}{more}")
    return lines


def _store_progress() -> list[str]:
    """grid_progress of the configured MLflow store (MLFLOW_TRACKING_URI or the local one), if there is one."""
    from lagg_pipeline import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return []
    from mlflow.tracking import MlflowClient

    lines = grid_progress(MlflowClient(uri))
    return ["", f"Grids in progress in {uri} (running the same grid again runs only the missing points):", *lines] \
        if lines else []


if __name__ == "__main__":
    import sys

    commands = {"extensions": extension_sweeps, "status": lambda: status() + _store_progress()}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m lagg_pipeline.tuning_records {{{','.join(commands)}}}")
    print("\n".join(commands[sys.argv[1]]()))
