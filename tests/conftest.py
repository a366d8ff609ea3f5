"""Shared test set-up: scratch working directories and a private TFDS data dir."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def _tfds_data_dir(tmp_path_factory):
    """Embedded datasets are prepared once per session into a private data dir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path, monkeypatch):
    """outputs/ (Hydra runs, the MLflow store) lands in a per-test folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
