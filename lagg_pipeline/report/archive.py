"""Committed results: each comparison group's pooled curves as one ``.npz`` in a folder of the
repository (``results_archive=``, ``make report``: docs/results/data), so a comparison outlives
the MLflow store that measured it. The tuning and the 5-seed runs of one group take hours on
2 cores; a session measures some groups, commits them, and the next session's report judges
them beside the groups it measures itself.

A group's file holds every row's per-seed curves (float32) and, as JSON, the group's settings
and each row's identity; it is read back with ``allow_pickle=False``. Merging: a row measured in
the store replaces the archived row of the same identity in its group (a baseline also its archived
namesake); archived rows and groups the store lacks are kept. With no runs in the store yet (a fresh clone), the archive is judged alone.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from lagg_pipeline.errors import UserError
from lagg_pipeline.report.collect import collect, method_order, open_experiment
from lagg_pipeline.report.curves import Curves, GroupKey
from lagg_pipeline.report.identity import same_value

ARRAYS = ("train_loss", "eval_rounds", "test_loss", "test_accuracy", "outer_valid_loss", "outer_valid_accuracy")
FIELDS = ("method", "optimizer", "settings", "tuned", "shipped", "run_seconds", "tuned_rounds")  # the last two: newer files
_META = "__rows__"


def file_name(key: GroupKey) -> str:
    """``mnist1d_large_mlp_K8_H4_R1000_B128_iid.npz`` (the clients' label made file-safe)."""
    clients = re.sub(r"[^\w.]+", "_", key.partition).strip("_")
    return f"{key.task}_K{key.K}_H{key.H}_R{key.rounds}_B{key.B}_{clients}.npz"


def save_group(folder: Path, key: GroupKey, rows: list[Curves]) -> Path:
    """Write one group's file atomically (a crash leaves the previous file)."""
    arrays = {}
    for i, row in enumerate(rows):
        for name in ARRAYS:
            value = getattr(row, name)
            if value is not None:
                arrays[f"{i}/{name}"] = np.asarray(value, np.int64 if name == "eval_rounds" else np.float32)
    meta = {"group": key._asdict(), "rows": [{f: getattr(row, f) for f in FIELDS} for row in rows]}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(key)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_group(path: Path) -> tuple[GroupKey, list[Curves]]:
    """One group's settings and rows (a one-line error for a file that is not an archive group)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data[_META].tobytes().decode())
            rows = []
            for i, fields in enumerate(meta["rows"]):
                curves = {name: (np.asarray(data[f"{i}/{name}"], np.float64) if name != "eval_rounds"
                                 else np.asarray(data[f"{i}/{name}"]))
                          for name in ARRAYS if f"{i}/{name}" in data.files}
                rows.append(Curves(**fields, **{"outer_valid_accuracy": None, **curves}))
            return GroupKey(**meta["group"]), rows
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"results archive file {path} is unreadable ({type(err).__name__}: {err}); "
                        f"remove it or restore it from git") from None


def load(folder: Path) -> dict[GroupKey, list[Curves]]:
    """Every archived group in ``folder`` (none when it does not exist yet)."""
    if not folder.is_dir():
        return {}
    return dict(load_group(path) for path in sorted(folder.glob("*.npz")))


def tuned_now(key: GroupKey, row: Curves) -> Curves:
    """An archived baseline row, tuned or not by the values conf/tuned_hparams/ records now (as a
    measured row is judged): a row archived at values a later grid replaced is no tuned baseline."""
    from lagg_pipeline import tuning

    if row.learned:
        return row
    entry = tuning.lookup(key.task, row.optimizer, key.H, key.K, None, key.partition)
    values = dict(part.split("=", 1) for part in row.settings.split(", ") if "=" in part)
    tuned = entry is not None and all(same_value(values.get(k.split(".")[-1]), v) for k, v in entry["values"].items())
    return row._replace(tuned=tuned, tuned_rounds=entry.get("rounds") if tuned else None)


def merge(archived: dict[GroupKey, list[Curves]], measured: dict[GroupKey, list[Curves]]):
    """(groups, labels of the archived rows kept per group): a measured row replaces the archived ones
    of its identity (optimizer, settings, meta-parameters), and a measured baseline its archived
    namesake (a baseline run again at values tuned since); everything else archived is kept, its
    baselines judged tuned or not by today's tuned files. A label names what differs from the other
    rows of its group in the run's own store, so a kept row and a measured one of another identity
    can share it (one shipped aggregator at a second step size): both are then relabelled apart."""
    groups, kept = {}, {}
    identity = lambda row: (row.optimizer, row.settings, row.shipped)
    for key in sorted(set(archived) | set(measured)):
        new = measured.get(key, [])
        baselines, identities = {row.method for row in new if not row.learned}, {identity(row) for row in new}
        old = [tuned_now(key, row) for row in archived.get(key, [])
               if identity(row) not in identities and (row.learned or row.method not in baselines)]
        if old:
            kept[key] = [row.method for row in old]
        groups[key] = sorted(_apart(old + new), key=method_order)
    return groups, kept


def _apart(rows: list[Curves]) -> list[Curves]:
    """Rows sharing a label get the parts of their settings that differ added to it.

    A learned row's label is compared before any such suffix (:func:`_unsuffixed`): archived rows
    keep the label an earlier merge gave them, and a row measured again under its plain label must
    meet them as a namesake, or one method would stand twice with two labels."""
    base = [_unsuffixed(row) for row in rows]
    out = []
    for row, label in zip(rows, base):
        namesakes = [other.settings.split(", ") for other, other_label in zip(rows, base) if other_label == label]
        if len(namesakes) == 1:
            out.append(row)
            continue
        common = set.intersection(*map(set, namesakes))
        differs = ", ".join(part for part in row.settings.split(", ") if part not in common)
        out.append(row._replace(method=f"{label} ({differs})" if differs else label))
    return out


def _unsuffixed(row: Curves) -> str:
    """A learned row's label without the " (parts of its settings)" suffix :func:`_apart` adds;
    a baseline's label as it is (its suffix marks an untuned value, and names its namesake)."""
    head, sep, tail = row.method.rpartition(" (")
    if row.learned and sep and tail.endswith(")") and set(tail[:-1].split(", ")) <= set(row.settings.split(", ")):
        return head
    return row.method


def gather(cfg, note) -> dict[GroupKey, list[Curves]]:
    """The experiment's measured groups merged with ``results_archive`` (when set), saying which rows
    came from it. With an archive, a store or experiment not created yet measures nothing: a fresh
    clone regenerates the report and the recommendation from the committed results alone."""
    try:
        client, _ = open_experiment(cfg.tracking)
    except UserError as missing:
        if not cfg.results_archive:
            raise
        print(missing)
        note(f"no runs of experiment {cfg.tracking.experiment} in this store: judged from the committed results "
             f"({cfg.results_archive}) alone")
        return merge(load(Path(cfg.results_archive)), {})[0]
    measured = collect(client, cfg.tracking.experiment, warn=note)
    if not cfg.results_archive:
        return measured
    groups, kept = merge(load(Path(cfg.results_archive)), measured)
    for key, names in kept.items():
        note(f"{key.title}: {', '.join(names)} read from the committed results ({cfg.results_archive}), "
             f"not measured in this store")
    return groups


def save(folder: Path, groups: dict[GroupKey, list[Curves]]) -> list[Path]:
    """Write every group (replacing each group's file)."""
    return [save_group(folder, key, rows) for key, rows in groups.items()]
