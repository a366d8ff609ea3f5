"""make bench-compare: another revision in its own worktree, alternating processes, ratios with the probe."""
import json
import subprocess

import pytest

from lagg_pipeline.bench import compare, steady


def _run(step, compile_s, probe, init_s=1.0):
    return {"pes_outer_step_seconds": step, "pes_outer_step_compile_seconds": compile_s, "pes_init_seconds": init_s,
            "probe_gflops": probe}


def test_table_gives_medians_and_the_ratio_pass_by_pass_with_each_pass_probe():
    runs = {"digits_mlp": {"this": [_run(1.0, 4.0, 100, 2.0), _run(2.0, 5.0, 120), _run(1.5, 6.0, 110)],
                           "other": [_run(3.0, 8.0, 90), _run(3.0, 9.0, 130), _run(6.0, 9.0, 105)]}}
    text = compare.table(runs, {"this": "abc1234", "other": "a6de6c6"}, "--xla_x=1", "machine loaded")
    step = next(line for line in text.splitlines() if line.split()[1:2] == ["pes_outer_step"])
    # medians 1.5 and 3.0, ratio 2.00x; per pass 3/1, 3/2, 6/1.5; probes this/other per pass
    assert step.split()[2:10] == ["1.5", "3", "2.00x", "3.00", "1.50", "4.00", "100/90", "120/130"]
    assert step.split()[10] == "110/105"
    init = next(line for line in text.splitlines() if line.split()[1:2] == ["pes_init"])
    assert init.split()[2:8] == ["1", "1", "1.00x", "0.50", "1.00", "1.00"]  # the state's cold init, the other wait
    assert "machine loaded" in text and "XLA_FLAGS=--xla_x=1" in text
    share = next(line for line in text.splitlines() if "share_of_limit" in line)
    gflop = 800 * (compare.yardstick.round_flops((8, 8, 1), [32]) + compare.yardstick.lagg_a_flops((8, 8, 1), [32])) / 1e9
    assert share.split()[2] == f"{100 * gflop / 1.5 / 110:.1f}%"


def test_the_other_revision_is_a_worktree_with_its_own_conf_and_is_removed_after():
    with compare.worktree("HEAD") as root:
        assert (root / "lagg_pipeline" / "__init__.py").is_file()
        assert (root / "lagg_pipeline" / "conf" / "config.yaml").is_file()  # lagg_pipeline.conf in that tree
        assert str(root) in subprocess.run(["git", "worktree", "list"], cwd=compare.REPO, capture_output=True,
                                           text=True).stdout
    assert not root.exists()
    assert str(root) not in subprocess.run(["git", "worktree", "list"], cwd=compare.REPO, capture_output=True,
                                           text=True).stdout


def test_an_unknown_revision_is_one_line():
    with pytest.raises(compare.UserError, match="REF=no-such-rev is not a git revision"):
        with compare.worktree("no-such-rev"):
            pass


def test_the_probe_reads_every_device_and_keeps_its_readings():
    probe = steady.Probe()
    assert probe.read() > 1 and probe.read() > 1
    assert len(probe.readings) == 2 and min(probe.readings) <= probe.gflops <= max(probe.readings)


@pytest.mark.slow
def test_compare_runs_each_revision_with_its_own_code_alternating(tmp_path):
    out = tmp_path / "compare.json"
    runs = compare.main(["HEAD", "--quick", "--passes", "2", "--outer-steps", "1", "--tasks", "digits_mlp",
                         "--json", str(out)])
    sides = runs["digits_mlp"]
    assert [len(sides["this"]), len(sides["other"])] == [2, 2]
    assert all(r["package"].startswith(str(compare.REPO / "lagg_pipeline")) for r in sides["this"])
    assert all(not r["package"].startswith(str(compare.REPO)) for r in sides["other"])  # the worktree's own
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(runs))
