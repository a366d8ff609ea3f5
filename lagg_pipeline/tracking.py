"""MLflow tracking: one run per job, metrics written in batches, sweeps as parent runs.

With no ``MLFLOW_TRACKING_URI`` (and no ``tracking.uri``) runs go to a local sqlite store
``outputs/mlflow.db`` with artifacts in ``outputs/mlartifacts`` -- no server needed;
``make ui`` serves it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

LOCAL_STORE = Path("outputs")
_BATCH = 1000  # MLflow accepts at most 1000 metrics (and 100 params) per log_batch call


def tracking_uri(uri: str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the configured uri, else the local sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    return uri or f"sqlite:///{(LOCAL_STORE / 'mlflow.db').resolve()}"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_info() -> dict[str, str]:
    """Commit and dirty flag of the source tree (or of the working directory)."""
    for where in (Path(__file__).resolve().parents[1], Path.cwd()):
        try:
            commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
            status = subprocess.run(["git", "-C", str(where), "status", "--porcelain"], capture_output=True,
                                    text=True, check=True).stdout
            return {"git_commit": commit, "git_dirty": str(bool(status.strip()))}
        except (OSError, subprocess.CalledProcessError):
            continue
    return {"git_commit": "unknown", "git_dirty": "unknown"}


class Run:
    """One MLflow run, addressed by id (no global active-run state)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, series: Mapping[str, tuple[Iterable[int], Iterable[float]]]) -> None:
        """{name: (steps, values)}, written in batches of 1000."""
        import time as _time

        from mlflow.entities import Metric

        now = int(_time.time() * 1000)
        metrics = [Metric(name, float(v), now, int(s))
                   for name, (steps, values) in series.items()
                   for s, v in zip(steps, np.asarray(values, dtype=np.float64)) if np.isfinite(v)]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _BATCH])

    def log_metric(self, name: str, value: float, step: int = 0) -> None:
        self.log_metrics({name: ([step], [value])})

    def last_step(self, name: str) -> int:
        """The highest step logged for metric ``name`` (0 if none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, name)), default=0)

    def metric_total(self, name: str) -> float:
        """The sum of every value logged for metric ``name``."""
        return float(sum(m.value for m in self.client.get_metric_history(self.run_id, name)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class NullRun:
    """Stands in for a Run when tracking is off."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _client_and_experiment(tracking_cfg):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking_cfg.uri)
    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ and not tracking_cfg.uri:
        LOCAL_STORE.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is not None:
        return client, experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client, client.create_experiment(tracking_cfg.experiment, artifact_location=artifact_location)


def client(tracking_cfg):
    """(MlflowClient, experiment id) of the configured store and experiment."""
    return _client_and_experiment(tracking_cfg)


def start_run(tracking_cfg, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None):
    """Start a run (a child of ``parent_run_id`` if given); a NullRun if tracking is off."""
    if not tracking_cfg.enabled:
        return NullRun()
    client, experiment_id = _client_and_experiment(tracking_cfg)
    all_tags = {**git_info(), **{k: str(v) for k, v in (tags or {}).items()}}
    all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return Run(client, run.info.run_id)


def resume_run(tracking_cfg, run_id: str):
    """Reopen an existing run (meta-training resumed with resume=true)."""
    if not tracking_cfg.enabled:
        return NullRun()
    client, _ = _client_and_experiment(tracking_cfg)
    client.update_run(run_id, status="RUNNING")
    return Run(client, run_id)
