"""What the tuned files record, read back for people and for make: the sweeps one step past
a grid edge (``make tune-extend`` runs them) and a table of every choice's budget
(``make tune-status``). ``python -m lagg_pipeline.tuning_records {extensions,status}``."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lagg_pipeline.tuning import tuned_root


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


if __name__ == "__main__":
    import sys

    commands = {"extensions": extension_sweeps, "status": status}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m lagg_pipeline.tuning_records {{{','.join(commands)}}}")
    print("\n".join(commands[sys.argv[1]]()))
