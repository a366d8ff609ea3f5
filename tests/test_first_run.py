"""What a new user sees first: --help lists the groups they choose; a first run prints our
lines only (third-party INFO lines go to the run's log file)."""
import subprocess
import sys
from pathlib import Path

import pytest



def test_help_lists_only_the_groups_a_user_chooses():
    # in a process of its own, as a user runs it: Hydra's help in-process leaves pytest's capture closed
    result = subprocess.run([sys.executable, "-m", "lagg_pipeline", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "optimizer: " in result.stdout and "experiment: " in result.stdout and "== Config ==" in result.stdout
    assert "tuned_hparams" not in result.stdout  # data the jobs read, not a choice


@pytest.mark.slow
def test_a_first_run_prints_no_third_party_info_lines():
    result = subprocess.run([sys.executable, "-m", "lagg_pipeline", "optimizer=fedavg", "num_runs=1", "num_rounds=10",
                             "eval_every=5", "progress=false"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    terminal = result.stdout + result.stderr
    assert "INFO" not in terminal and "fedavg" in result.stdout
    (log,) = Path("outputs/runs").rglob("lagg_pipeline.log")
    assert "Creating initial MLflow database tables" in log.read_text()  # kept where it belongs


def test_make_ui_prints_the_runs_table_url_and_serves_with_one_worker(monkeypatch, capsys):
    from lagg_pipeline import tracking, ui

    served = []
    monkeypatch.setattr(ui.os, "execvpe", lambda path, args, env: served.append((args, env)))
    ui.main(["--port", "5055"])
    (args, env), = served
    _, experiment_id = _client()
    assert f"http://127.0.0.1:5055/#/experiments/{experiment_id}/runs" in capsys.readouterr().out
    assert args[1] == "server" and args[args.index("--workers") + 1] == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no job consumers for a local store
    assert args[args.index("--backend-store-uri") + 1] == tracking.tracking_uri()


def _client():
    from omegaconf import OmegaConf

    from lagg_pipeline import tracking

    return tracking.client(OmegaConf.create({"enabled": True, "uri": None, "experiment": "lagg_pipeline"}))


def test_ui_with_an_unknown_experiment_lists_the_existing_ones_and_creates_nothing(monkeypatch):
    from omegaconf import OmegaConf

    from lagg_pipeline import tracking, ui

    client, _ = tracking.client(OmegaConf.create({"enabled": True, "uri": None, "experiment": "results"}))
    before = sorted(e.name for e in client.search_experiments())
    monkeypatch.setattr(ui.os, "execvpe", lambda *args: pytest.fail("served a typo"))
    with pytest.raises(SystemExit, match=r"^--experiment reslts: no such experiment in sqlite:.*; choose one of: "
                                         r"Default, results$"):
        ui.main(["--experiment", "reslts"])
    assert sorted(e.name for e in client.search_experiments()) == before
