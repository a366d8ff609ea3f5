"""What a new user sees first: --help lists the groups they choose; a first run prints our
lines only (third-party INFO lines go to the run's log file)."""
import subprocess
import sys
from pathlib import Path

import pytest

from lagg_pipeline import cli


def test_help_lists_only_the_groups_a_user_chooses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "optimizer: " in out and "experiment: " in out and "== Config ==" in out
    assert "tuned_hparams" not in out  # data the jobs read, not a choice


@pytest.mark.slow
def test_a_first_run_prints_no_third_party_info_lines():
    result = subprocess.run([sys.executable, "-m", "lagg_pipeline", "optimizer=fedavg", "num_runs=1", "num_rounds=10",
                             "eval_every=5", "progress=false"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    terminal = result.stdout + result.stderr
    assert "INFO" not in terminal and "fedavg" in result.stdout
    (log,) = Path("outputs/runs").rglob("lagg_pipeline.log")
    assert "Creating initial MLflow database tables" in log.read_text()  # kept where it belongs
