"""Collect: an experiment's finished benchmark runs -> {GroupKey: [Curves per method identity]}.

Runs (tagged ``method``) are grouped by every setting a comparison shares (:class:`GroupKey`:
task, K, H, rounds, local batch size B, clients). Inside a group a row is one *method identity*:
the optimizer, the meta-parameters it ran (shipped name, or the checkpoint file's hash) and every
setting except the seed, the number of seeds and bookkeeping. Runs of one identity are pooled over
their starting seeds (the newest run per starting seed); runs that differ in anything else are
separate rows, labelled by what differs. A run that cannot be read (a tag, a param or a curve
missing: killed early, logged by another tool) is left out with a one-line warning naming it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from lagg_pipeline.errors import UserError
from lagg_pipeline.report.curves import Curves, GroupKey
from lagg_pipeline.report.identity import describe, labels, meta_params_identity, settings_of, tuned_entry

BASELINE_ORDER = ("fedavg", "slowmo", "fedavgm", "diloco", "fedadam", "fedyogi", "sgd", "adam")
TAGS = ("method", "optimizer", "task", "K", "H", "seed")
CURVE_KEYS = ("train_loss", "eval_rounds", "test_loss", "test_accuracy", "outer_valid_loss")  # outer_valid_accuracy: newer runs


def open_experiment(tracking_cfg):
    """(MlflowClient, experiment) of the configured store, creating nothing: a missing store or
    experiment is a one-line error naming the experiments there are."""
    from mlflow.tracking import MlflowClient

    from lagg_pipeline import tracking

    uri = tracking.tracking_uri(tracking_cfg.uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}: run some benchmarks first (tracking.uri, "
                        f"MLFLOW_TRACKING_URI)")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"tracking.experiment={tracking_cfg.experiment}: no such experiment in {uri}; "
                        f"choose one of: {', '.join(names) or '(none)'}")
    return client, experiment


def _load_curves(client, run, method: str) -> dict[str, np.ndarray] | None:
    """The run's per-seed curves, or None when its artifact is missing or unreadable."""
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, f"curves/{method}_curves.npz", tmp)
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
    except (MlflowException, OSError, ValueError):
        return None


def group_of(run) -> GroupKey:
    tags, params = run.data.tags, run.data.params
    return GroupKey(tags["task"], int(tags["K"]), int(tags["H"]), int(params["num_rounds"]),
                    int(params["local_batch_size"]), tags.get("partition", "iid"))


def _unreadable(run) -> str | None:
    """What makes a benchmark run unreadable for the report, or None."""
    missing = [t for t in TAGS if t not in run.data.tags] + \
        [p for p in ("num_rounds", "local_batch_size") if p not in run.data.params]
    return f"lacks {', '.join(missing)}" if missing else None


def collect(client, experiment_name: str, warn: Callable[[str], None] = print) -> dict[GroupKey, list[Curves]]:
    """{GroupKey: [Curves per method identity]} from the experiment's finished benchmark runs."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per curve file otherwise
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {experiment_name!r}")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50000)
    newest: dict[tuple, object] = {}
    for run in runs:
        if "method" not in run.data.tags:
            continue  # not a benchmark run (a sweep's parent, a report, a meta-training)
        if (why := _unreadable(run)) is not None:
            warn(f"warning: run {run.info.run_id} ({run.data.tags['method']}) {why}: left out of the report")
            continue
        ident = (run.data.tags["method"], meta_params_identity(run), tuple(sorted(settings_of(run).items())))
        newest.setdefault((group_of(run), ident, int(run.data.tags["seed"])), run)  # newest first
    pooled: dict[GroupKey, dict[tuple, list]] = {}
    for (group, ident, _), run in newest.items():
        pooled.setdefault(group, {}).setdefault(ident, []).append(run)
    groups = {}
    for group, identities in sorted(pooled.items()):
        names = labels(list(identities))
        entries = [c for ident, ident_runs in identities.items()
                   if (c := _pool(client, names[ident], ident[0], ident_runs, warn)) is not None]
        if entries:
            groups[group] = sorted(entries, key=method_order)
    return groups


def _pool(client, label: str, method: str, runs: list, warn) -> Curves | None:
    """One row: the readable runs of one identity, seeds concatenated (None when none is readable)."""
    runs = sorted(runs, key=lambda r: int(r.data.tags["seed"]))
    arrays, seconds = [], 0.0
    for run in runs:
        curves = _load_curves(client, run, method)
        where = f"run {run.info.run_id} ({method}, seed {run.data.tags['seed']}) is finished but"
        if curves is None:
            warn(f"warning: {where} has no readable curves/{method}_curves.npz: left out of the report")
        elif missing := [k for k in CURVE_KEYS if k not in curves]:
            warn(f"warning: {where} its curves lack {', '.join(missing)}: left out of the report")
        else:
            arrays.append(curves)
            seconds += (run.info.end_time - run.info.start_time) / 1000
    if not arrays:
        return None
    cat = lambda key: np.concatenate([a[key] for a in arrays], axis=0)
    first = runs[0]
    learned = meta_params_identity(first) is not None
    shipped = (f"{first.data.tags['optimizer']}@{first.data.params['pretrained']}"
               if learned and first.data.params.get("pretrained") not in (None, "None") else None)
    valid_acc = cat("outer_valid_accuracy") if all("outer_valid_accuracy" in a for a in arrays) else None
    entry = None if learned else tuned_entry(first)
    return Curves(label, first.data.tags["optimizer"], describe(first), entry is not None,
                  cat("train_loss"), arrays[0]["eval_rounds"], cat("test_loss"), cat("test_accuracy"),
                  cat("outer_valid_loss"), valid_acc, shipped, seconds, entry and entry.get("rounds"))


def method_order(c: Curves):
    """Learned rows first, then the baselines in BASELINE_ORDER: the order every table reads."""
    order = BASELINE_ORDER.index(c.optimizer) if c.optimizer in BASELINE_ORDER else -1
    return (not c.learned, order, c.method)
