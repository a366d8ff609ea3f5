"""mode=report: one comparison across the MLflow benchmark runs of an experiment.

Runs (tagged ``method``) are grouped by task, K, H, number of rounds and clients. Inside a group
a row is one *method identity*: the optimizer, the meta-parameters it ran (shipped name, or the
checkpoint file's hash) and every setting except the seed, the number of seeds and bookkeeping
(tracking, where files go). Runs of one identity are pooled over their starting seeds (the
newest run per starting seed); runs that differ in anything else are separate rows, labelled by
what differs. ``lagg_pipeline.verdict`` judges the rows on the test split and
``lagg_pipeline.results_page`` writes the tables and plots; with ``readme=`` the page replaces
the part of that file between the Results markers, so no number there is typed by hand.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from lagg_pipeline.config import HAND_OPTIMIZERS
from lagg_pipeline.errors import UserError

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
_ORDER = ("fedavg", "slowmo", "fedavgm", "diloco", "fedadam", "fedyogi", "sgd", "adam")
# Keys that cannot change a benchmark's numbers: seeds, bookkeeping, where files go.
NOT_SETTINGS = {"seed", "num_runs", "progress", "mode", "tuned", "tuned_dir", "with_fedavg", "report_dir", "readme",
                "data_dir", "compile_cache_dir", "checkpoint_dir", "resume", "save_iter", "checkpoints_to_keep",
                "legacy_path", "output_path", "pes_devices", "pretrained", "checkpoint", "headline",
                "fedavg_local_learning_rate"}  # the last: a selector whose value a run logs as local_learning_rate
NOT_SETTINGS_PREFIXES = ("tracking.", "distributed.")
# Meta-training keys: settings only of a run that meta-trained its own aggregator.
META_TRAINING = {"hidden_size", "num_tasks", "trunc_length", "pes_std", "num_inner_steps", "weight_decay",
                 "truncation_schedule_min_length", "meta_loss_split", "meta_loss_train_weight", "meta_init",
                 "meta_init_scale", "num_outer_steps"}


class Curves(NamedTuple):
    """Pooled per-seed curves of one method identity in one group."""

    method: str  # the row's label: the run's method, plus what differs from its namesakes
    optimizer: str
    settings: str  # its tuned keys, or where its meta-parameters came from
    train_loss: np.ndarray  # [S, R]
    eval_rounds: np.ndarray  # [E]
    test_loss: np.ndarray  # [S, E]
    test_accuracy: np.ndarray  # [S, E]
    outer_valid_loss: np.ndarray  # [S, E]

    @property
    def learned(self) -> bool:
        return self.optimizer not in HAND_OPTIMIZERS


def meta_params_identity(run) -> str | None:
    """Which meta-parameters a learned run ran: "shipped <name>", "sha256 <hash>" of its checkpoint
    file (the run's ``meta_params_sha256`` tag when the job recorded one, else the file as it is now),
    the artifact URI, or the run itself when it meta-trained them; None for a hand-designed run."""
    params, tags = run.data.params, run.data.tags
    if tags.get("optimizer") in HAND_OPTIMIZERS:
        return None
    if params.get("pretrained") not in (None, "None"):
        return f"shipped {params['pretrained']}"
    location = params.get("checkpoint")
    if location in (None, "None"):
        return f"meta-trained in run {run.info.run_id[:8]}"
    if tags.get("meta_params_sha256"):
        return f"sha256 {tags['meta_params_sha256'][:12]}"
    if Path(location).is_file():  # hashed now: a file overwritten since the run cannot be told apart
        return f"sha256 {hashlib.sha256(Path(location).read_bytes()).hexdigest()[:12]}"
    return location


def settings_of(run) -> dict[str, str]:
    """The run's settings that make its method: every param but seeds and bookkeeping."""
    meta_trained = (meta_params_identity(run) or "").startswith("meta-trained in run")
    return {k: v for k, v in run.data.params.items()
            if k not in NOT_SETTINGS and not k.startswith(NOT_SETTINGS_PREFIXES)
            and (meta_trained or (k not in META_TRAINING and not k.startswith("schedule.")))}


def _describe(run) -> str:
    """The hyper-parameters a reader looks for: the tuned keys, or where the meta-parameters came from."""
    from lagg_pipeline import tuning

    params, optimizer = run.data.params, run.data.tags.get("optimizer", "")
    if optimizer in HAND_OPTIMIZERS:
        return ", ".join(f"{k.split('.')[-1]}={params.get(k)}" for k in tuning.grid_keys(optimizer))
    return f"local_learning_rate={params.get('local_learning_rate')}, meta-params: {meta_params_identity(run)}"


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


def _labels(identities: list[tuple]) -> dict[tuple, str]:
    """Row labels: the method, plus the settings in which it differs from rows of the same method."""
    labels = {}
    for ident in identities:
        method, meta, settings = ident[0], ident[1], dict(ident[2])
        namesakes = [(m, dict(s)) for name, m, s in identities if name == method]
        if len(namesakes) == 1:
            labels[ident] = method
            continue
        keys = sorted({k for _, s in namesakes for k in s} - {k for k in settings if all(
            s.get(k) == settings[k] for _, s in namesakes)})
        differs = [f"{k.split('.')[-1]}={settings.get(k, '—')}" for k in keys]
        if any(m != meta for m, _ in namesakes):
            differs.insert(0, f"meta-params {meta}")
        labels[ident] = f"{method} ({', '.join(differs[:3])}{', …' if len(differs) > 3 else ''})"
    return labels


def collect(client, experiment_name: str, warn: Callable[[str], None] = print) -> dict[tuple, list[Curves]]:
    """{(task, K, H, rounds, partition): [Curves per method identity]} from the experiment's
    finished benchmark runs; a run whose curves cannot be read is left out, said through ``warn``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per curve file otherwise
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {experiment_name!r}")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50000)
    newest: dict[tuple, object] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "method" not in tags or "num_rounds" not in params:
            continue
        group = (tags["task"], int(tags["K"]), int(tags["H"]), int(params["num_rounds"]), tags.get("partition", "iid"))
        ident = (tags["method"], meta_params_identity(run), tuple(sorted(settings_of(run).items())))
        newest.setdefault((group, ident, int(tags["seed"])), run)  # newest first
    pooled: dict[tuple, dict[tuple, list]] = {}
    for (group, ident, _), run in newest.items():
        pooled.setdefault(group, {}).setdefault(ident, []).append(run)
    groups = {}
    for group, identities in sorted(pooled.items()):
        labels, entries = _labels(list(identities)), []
        for ident, ident_runs in identities.items():
            ident_runs = sorted(ident_runs, key=lambda r: int(r.data.tags["seed"]))
            arrays = []
            for run in ident_runs:
                curves = _load_curves(client, run, ident[0])
                if curves is None:
                    warn(f"warning: run {run.info.run_id} ({ident[0]}, seed {run.data.tags['seed']}) is finished but "
                         f"has no readable curves/{ident[0]}_curves.npz: left out of the report")
                else:
                    arrays.append(curves)
            if arrays:
                cat = lambda key: np.concatenate([a[key] for a in arrays], axis=0)
                entries.append(Curves(labels[ident], ident_runs[0].data.tags["optimizer"], _describe(ident_runs[0]),
                                      cat("train_loss"), arrays[0]["eval_rounds"], cat("test_loss"),
                                      cat("test_accuracy"), cat("outer_valid_loss")))
        if entries:
            groups[group] = sorted(entries, key=_method_order)
    return groups


def _method_order(c: Curves):
    return (not c.learned, _ORDER.index(c.optimizer) if c.optimizer in _ORDER else -1, c.method)


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


def check_markers(readme: Path, begin: str = BEGIN, end: str = END) -> None:
    """A one-line error unless ``readme`` exists and holds the ``begin`` ... ``end`` markers."""
    if not readme.is_file():
        raise UserError(f"readme={readme}: no such file")
    content = readme.read_text()
    if begin not in content or end not in content or content.index(begin) > content.index(end):
        raise UserError(f"readme={readme} has no {begin} ... {end} markers to put the results between")


def splice_readme(readme: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``readme`` with ``text``."""
    check_markers(readme, begin, end)
    head, rest = readme.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")

