"""Learned aggregators meta-trained by this pipeline, shipped inside the package.

Each is ``<variant>-<name>.npz`` in this folder (the format of ``meta_params.npz``); its
metadata records the task, K, H, gamma, B, the meta-loss split, the outer steps, the
meta-training time and the exact command that produced it (``experiment=pretrain_<name>``).
Select one with ``optimizer=lagg_a pretrained=<name>``; ``pretrained=list`` lists them and
says which to use for what (``recommended.yaml``, from the report's test-split verdict).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def available() -> dict[tuple[str, str], Path]:
    """{(variant, name): file} of every shipped aggregator."""
    shipped = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".npz") and "-" in entry.name:
            variant, name = entry.name[:-len(".npz")].split("-", 1)
            shipped[(variant, name)] = Path(str(entry))
    return dict(sorted(shipped.items()))


def names(variant: str) -> list[str]:
    return [name for v, name in available() if v == variant]


def path(variant: str, name: str) -> Path:
    """The shipped file of ``variant`` called ``name`` (KeyError if there is none)."""
    return available()[(variant, name)]


def metadata(file: Path) -> dict:
    from lagg_pipeline.checkpoint import load_params

    return load_params(file)[1]


def matching(variant: str, task: str, num_grads: int, num_local_steps: int, meta_loss_split: str,
             partition: str = "iid", meta_init: str = "random") -> str | None:
    """The name of a shipped ``variant`` meta-trained with these settings, if one exists."""
    wanted = (task, num_grads, num_local_steps, meta_loss_split, partition, meta_init)
    for (v, name), file in available().items():
        meta = metadata(file) if v == variant else {}
        if (meta.get("task"), meta.get("num_grads"), meta.get("num_local_steps"), meta.get("meta_loss_split", "train"),
                meta.get("partition", "iid"), meta.get("meta_init", "random")) == wanted:
            return name
    return None


def recommendations() -> list[dict]:
    """The entries of ``recommended.yaml``: which shipped aggregator to use for which task and H."""
    import yaml

    return yaml.safe_load(resources.files(__name__).joinpath("recommended.yaml").read_text()) or []


def recommended(variant: str, task: str, num_grads: int, num_local_steps: int) -> str | None:
    """The shipped ``variant`` recommended for this task, K and H, if any."""
    for entry in recommendations():
        if (entry["variant"], entry["num_grads"]) == (variant, num_grads) and task in entry["tasks"] \
                and num_local_steps in entry["H"]:
            return entry["name"]
    return None


def meta_loss_label(meta: dict) -> str:
    """The meta-loss a shipped file was trained on: its split, and the training loss's share if mixed in."""
    weight = meta.get("meta_loss_train_weight")
    return meta.get("meta_loss_split", "train") + (f" + {weight:g}·train" if weight else "")


def describe() -> str:
    """Per shipped aggregator: what to use it for, what it was trained on, how to re-create it."""
    use_for: dict = {}
    for entry in recommendations():
        use_for.setdefault((entry["variant"], entry["name"]), []).append(entry)
    lines = []
    for (variant, name), file in available().items():
        meta = metadata(file)
        entries = use_for.get((variant, name))
        advice = ("use for: " + "; ".join(f"{', '.join(e['tasks'])} at K={e['num_grads']}, H={'/'.join(map(str, e['H']))}"
                                          f" ({e['why']})" for e in entries)
                  if entries else "no recommendation: kept for comparison")
        family = f" meta_tasks={','.join(meta['meta_tasks'])}" if meta.get("meta_tasks") else ""
        lines.append(f"{variant} pretrained={name}: {advice}\n"
                     f"    trained: task={meta.get('task')}{family} K={meta.get('num_grads')} "
                     f"H={meta.get('num_local_steps')} meta-loss={meta_loss_label(meta)} "
                     f"partition={meta.get('partition', 'iid')} meta_init={meta.get('meta_init', 'random')} "
                     f"outer_steps={meta.get('outer_steps')}\n    re-create: {meta.get('command', '?')}")
    return "\n".join(lines) or "no pretrained aggregators are shipped"
