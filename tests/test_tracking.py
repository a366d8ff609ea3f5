"""Tracking faults: a store that stops answering costs neither the run nor a metric."""
import json

import pytest

from lagg_pipeline import tracking


class FlakyStore:
    """An MLflow client stand-in whose store can be switched off."""

    def __init__(self):
        self.down, self.calls, self.metrics, self.status = False, 0, [], None

    def _answer(self):
        self.calls += 1
        if self.down:
            raise ConnectionError("Connection refused")

    def log_batch(self, run_id, metrics=(), params=()):
        self._answer()
        self.metrics.extend(metrics)

    def get_metric_history(self, run_id, name):
        self._answer()
        return [m for m in self.metrics if m.key == name]

    def set_terminated(self, run_id, status):
        self._answer()
        self.status = status


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)


def test_metrics_wait_in_a_local_file_while_the_store_is_down_and_arrive_in_order(capsys):
    store = FlakyStore()
    run = tracking.Run(store, "r1")
    run.log_metrics({"meta_loss": ([1], [0.5])})
    store.down = True
    run.log_metrics({"meta_loss": ([2], [0.4])})
    assert store.calls == 1 + 4  # the first failure is retried (a store may be restarting)...
    run.log_metrics({"meta_loss": ([3], [0.3])})
    assert store.calls == 1 + 4 + 1  # ...then one attempt per call while it stays down: no stall
    kept = [json.loads(line) for line in run.pending_file.read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in kept] == [("meta_loss", 2, 0.4), ("meta_loss", 3, 0.3)]
    assert "metrics are kept in" in capsys.readouterr().out
    assert run.metric_total("meta_loss") is None  # unknown while the store is down
    store.down = False
    run.log_metrics({"meta_loss": ([4], [0.2])})
    assert [m.step for m in store.metrics] == [1, 2, 3, 4]
    assert not run.pending_file.exists()
    assert "buffered metrics of run r1 sent" in capsys.readouterr().out
    assert run.metric_total("meta_loss") == pytest.approx(1.4)


def test_a_run_ending_while_the_store_is_down_says_so_instead_of_failing(capsys):
    store = FlakyStore()
    run = tracking.Run(store, "r2")
    store.down = True
    run.log_metrics({"train_loss": ([1], [2.0])})
    run.end()  # no exception: the job's results are already on disk
    out = capsys.readouterr().out
    assert f"metrics still in {run.pending_file}" in out and "still shows it as running" in out
    assert store.status is None and run.pending_file.exists()


def test_a_fresh_sqlite_store_is_created_under_a_lock(tmp_path, monkeypatch):
    """Two jobs started together on a fresh store raced on its tables (alembic_version already exists):
    whoever touches it first holds a lock beside it that every other job waits for."""
    import fcntl

    from omegaconf import OmegaConf

    from lagg_pipeline import tracking

    import mlflow.tracking

    db = tmp_path / "mlflow.db"
    held = []

    def locked():
        with open(f"{db}.lock", "w") as other:  # another job's attempt at the same moment
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True

    def creating(client, uri, name):
        held.append(("experiment", locked()))
        return "0"

    class Client:  # MLflow's constructor opens the store, which creates a fresh one's tables
        def __init__(self, uri):
            held.append(("client", locked()))

    monkeypatch.setattr(tracking, "_experiment_id", creating)
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    tracking.client(OmegaConf.create({"enabled": True, "uri": f"sqlite:///{db}", "experiment": "x"}))
    assert held == [("client", True), ("experiment", True)]
