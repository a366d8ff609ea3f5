"""``make ui``: the MLflow UI of the local store, opened on the runs table of an experiment.

MLflow 3 opens on its GenAI pages ("Welcome to MLflow", an experiment's Traces overview);
the runs table has its own URL, which this prints before serving. One worker and no job
consumers: a local store needs no more, and the machine has other work to do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from omegaconf import OmegaConf

from lagg_pipeline import tracking
from lagg_pipeline.errors import UserError


DEFAULT_EXPERIMENT = "lagg_pipeline"  # where jobs write unless told otherwise


def runs_url(host: str, port: int, experiment_id: str) -> str:
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs"


def experiment_id(name: str) -> str:
    """The experiment's id. Only the default one is created when missing (so its URL works before the
    first run); another name must exist: a typo is one line listing the experiments there are."""
    from lagg_pipeline.report.collect import open_experiment

    cfg = OmegaConf.create({"enabled": True, "uri": None, "experiment": name})
    if name == DEFAULT_EXPERIMENT:
        return tracking.client(cfg)[1]
    try:
        return open_experiment(cfg)[1].experiment_id
    except UserError as err:
        raise SystemExit(str(err).replace(f"tracking.experiment={name}", f"--experiment {name}")) from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="the experiment whose runs open first")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # no INFO lines on creating the store
    found = experiment_id(args.experiment)
    uri = tracking.tracking_uri()
    artifacts = tracking.LOCAL_STORE.resolve() / "mlartifacts"
    print(f"MLflow UI of {uri}: the runs of experiment {args.experiment} at\n\n    "
          f"{runs_url(args.host, args.port, found)}\n\n"
          f"(to see train_loss, test_accuracy and test_loss in the table: Columns, then tick them under Metrics)\n",
          flush=True)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    os.execvpe(mlflow, [mlflow, "server", "--backend-store-uri", uri, "--default-artifact-root", str(artifacts),
                       "--host", args.host, "--port", str(args.port), "--workers", "1"], env)


if __name__ == "__main__":
    main()
