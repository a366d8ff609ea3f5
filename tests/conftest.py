"""Shared test set-up: scratch working directories, a private TFDS data dir and XLA cache."""
import pytest

from lagg_pipeline import xla_flags

xla_flags.apply()  # the tests run JAX as the command line does (one CPU device per core)


@pytest.fixture(scope="session", autouse=True)
def _tfds_data_dir(tmp_path_factory):
    """Embedded datasets are prepared once per session into a private data dir; XLA caches likewise."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
    # The command lines the tests run share one XLA cache, and never the user's.
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path, monkeypatch):
    """outputs/ (Hydra runs, the MLflow store) lands in a per-test folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
