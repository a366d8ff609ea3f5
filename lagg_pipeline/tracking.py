"""MLflow tracking: one run per job, metrics written in batches, sweeps as parent runs.

With no ``MLFLOW_TRACKING_URI`` (and no ``tracking.uri``) runs go to a local sqlite store
``outputs/mlflow.db`` with artifacts in ``outputs/mlartifacts`` -- no server needed;
``make ui`` serves it.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

LOCAL_STORE = Path("outputs")
_BATCH = 1000  # MLflow accepts at most 1000 metrics (and 100 params) per log_batch call
# MLflow 3's UI opens an experiment on its GenAI traces page unless the experiment says it
# holds model-training runs; with this tag `make ui` lands on the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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


def _retrying(call, attempts: int = 4, first_wait: float = 0.25):
    """``call()``, retried with exponential backoff: SQLite answers "database is locked" while
    another job of a sweep writes, and a server may be restarting."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception:  # MlflowException, requests' and sqlalchemy's errors
            if attempt == attempts - 1:
                raise
            time.sleep(first_wait * 2 ** attempt)


class Run:
    """One MLflow run, addressed by id (no global active-run state).

    Metrics never get lost to a tracking fault: a batch the store refuses (after retries) is
    kept, appended to ``outputs/mlflow_pending/<run id>.jsonl`` (the run says so once), and
    sent before the next batch once the store answers again."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: list = []  # metrics not yet accepted by the store
        self.store_down = False  # the last call failed after retries: try once per call until it answers

    def _call(self, call):
        """``call()`` with retries, or a single attempt while the store is known to be down (so
        that training goes on at full speed instead of waiting on a dead server)."""
        try:
            result = call() if self.store_down else _retrying(call)
        except Exception:
            self.store_down = True
            raise
        self.store_down = False
        return result

    @property
    def pending_file(self) -> Path:
        return LOCAL_STORE / "mlflow_pending" / f"{self.run_id}.jsonl"

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            _retrying(lambda: self.client.log_batch(self.run_id, params=items[i:i + 100]))

    def log_metrics(self, series: Mapping[str, tuple[Iterable[int], Iterable[float]]]) -> None:
        """{name: (steps, values)}, written in batches of 1000 (kept and resent on failure)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, int(s))
                   for name, (steps, values) in series.items()
                   for s, v in zip(steps, np.asarray(values, dtype=np.float64)) if np.isfinite(v)]
        self.pending.extend(metrics)
        self.flush_pending()

    def flush_pending(self) -> bool:
        """Send what the store has not accepted yet; True when nothing is left."""
        while self.pending:
            batch = self.pending[:_BATCH]
            try:
                self._call(lambda: self.client.log_batch(self.run_id, metrics=batch))
            except Exception as err:
                self._keep_locally(err)
                return False
            del self.pending[:len(batch)]
        if self.pending_file.exists():
            self.pending_file.unlink()
            print(f"tracking store reachable again: buffered metrics of run {self.run_id} sent")
        return True

    def _keep_locally(self, err: Exception) -> None:
        import json

        first = not self.pending_file.exists()
        self.pending_file.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self.pending]
        self.pending_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if first:
            print(f"tracking store unavailable ({str(err).splitlines()[0][:200]}); metrics are kept in "
                  f"{self.pending_file} and sent when it answers again")

    def log_metric(self, name: str, value: float, step: int = 0) -> None:
        self.log_metrics({name: ([step], [value])})

    def last_step(self, name: str) -> int:
        """The highest step logged for metric ``name`` (0 if none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, name)), default=0)

    def metric_total(self, name: str) -> float | None:
        """The sum of every value logged for metric ``name`` (None while the store is down)."""
        if not self.flush_pending():
            return None
        try:
            history = self._call(lambda: self.client.get_metric_history(self.run_id, name))
        except Exception:
            return None
        return float(sum(m.value for m in history))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            _retrying(lambda: self.client.set_tag(self.run_id, k, str(v)))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Upload a file or folder; when the store cannot take it, say so and go on (it stays on disk)."""
        path = Path(path)
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        if not path.exists():
            return
        try:
            self._call(lambda: upload(self.run_id, str(path), artifact_path))
        except Exception as err:
            print(f"artifact not uploaded ({str(err).splitlines()[0][:200]}); it stays at {path}")

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended. A store that does not answer then costs the job nothing: it says
        where the unsent metrics are and that the run still shows as running."""
        if not self.flush_pending():
            print(f"run {self.run_id} ended with metrics still in {self.pending_file} (the store did not answer)")
        try:
            _retrying(lambda: self.client.set_terminated(self.run_id, status))
        except Exception as err:
            print(f"run {self.run_id} could not be marked {status} ({str(err).splitlines()[0][:200]}); "
                  f"the store still shows it as running")


class NullRun:
    """Stands in for a Run when tracking is off."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _client_and_experiment(tracking_cfg):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(tracking_cfg.uri)
    if uri.startswith(("http://", "https://")):
        # MLflow's own HTTP retries wait minutes on a dead server; the Run buffers instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ and not tracking_cfg.uri:
        LOCAL_STORE.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # the first access (the client's constructor) creates a fresh store's tables
        client = MlflowClient(uri)
        return client, _retrying(lambda: _experiment_id(client, uri, tracking_cfg.experiment))


@contextmanager
def exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (waits for another process holding it)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def store_lock(uri: str):
    """Held while a job first touches a SQLite store: creating its tables is not atomic, so two jobs
    started together on a fresh store both tried (``alembic_version already exists``). Other stores
    need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with exclusive(Path(uri[len("sqlite:///"):] + ".lock")):
        yield


def _experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created if missing (a parallel job may create it first: then the
    retry finds it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))


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
    run = _retrying(lambda: client.create_run(experiment_id, run_name=run_name, tags=all_tags))
    return Run(client, run.info.run_id)


def resume_run(tracking_cfg, run_id: str):
    """Reopen an existing run (meta-training resumed with resume=true)."""
    if not tracking_cfg.enabled:
        return NullRun()
    client, _ = _client_and_experiment(tracking_cfg)
    client.update_run(run_id, status="RUNNING")
    return Run(client, run_id)
