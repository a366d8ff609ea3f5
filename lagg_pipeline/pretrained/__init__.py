"""Learned aggregators meta-trained by this pipeline, shipped inside the package.

Each is ``<variant>-<name>.npz`` in this folder (the format of ``meta_params.npz``); its
metadata records the task, K, H, gamma, B, the meta-loss split, the outer steps, the
meta-training time and the exact command that produced it (``experiment=pretrain_<name>``).
Select one with ``optimizer=lagg_a pretrained=<name>``; ``pretrained=list`` lists them.
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


def describe() -> str:
    """One line per shipped aggregator: what it was trained on and how to re-create it."""
    lines = []
    for (variant, name), file in available().items():
        meta = metadata(file)
        lines.append(f"{variant:7s} pretrained={name:18s} task={meta.get('task')} K={meta.get('num_grads')} "
                     f"H={meta.get('num_local_steps')} meta_loss_split={meta.get('meta_loss_split', 'train')} "
                     f"partition={meta.get('partition', 'iid')} meta_init={meta.get('meta_init', 'random')} "
                     f"outer_steps={meta.get('outer_steps')}  re-create: {meta.get('command', '?')}")
    return "\n".join(lines) or "no pretrained aggregators are shipped"
