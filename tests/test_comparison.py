"""Tuned-value selection and the cross-run report, on MLflow stores filled with known curves."""
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline import comparison, tracking, tuning
from lagg_pipeline.benchmark import BenchmarkResult
from lagg_pipeline.jobs.benchmark import log_benchmark


def tracking_cfg(experiment):
    return OmegaConf.create({"enabled": True, "uri": None, "experiment": experiment, "parent_run_id": None,
                             "run_name": None})


def fake_result(name, train_SxR, ov_SxE=None, acc_SxE=None):
    S, R = train_SxR.shape
    eval_rounds = np.array([0, R // 2, R])
    ov = np.full((S, 3), 0.5) if ov_SxE is None else ov_SxE
    acc = np.full((S, 3), 0.9) if acc_SxE is None else acc_SxE
    return BenchmarkResult(name, train_SxR, eval_rounds, ov + 0.01, acc, ov, 1e-3, 0.5)


def log_run(experiment, name, result, *, optimizer=None, task="digits_mlp", H=4, seed=0, params=None,
            parent=None, partition=None):
    optimizer = optimizer or name
    cfg = tracking_cfg(experiment)
    tags = {"optimizer": optimizer, "task": task, "H": H, "K": 8, "seed": seed, "method": name,
            **({"partition": partition} if partition else {})}  # runs from before partitions have no tag
    run = tracking.start_run(cfg, name, tags, parent_run_id=parent)
    run.log_params({"num_rounds": result.train_loss.shape[1], "num_runs": result.train_loss.shape[0],
                    **(params or {})})
    out = Path(f"art_{run.run_id}")
    out.mkdir()
    log_benchmark(run, result, out)
    run.end()
    return run


def test_select_picks_lowest_outer_valid_loss_and_records_the_sweep(tmp_path):
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": "hparams_search=fedavg H=4"})
    train = np.full((2, 30), 0.3)
    for lr, ov in ((0.1, 0.9), (0.5, 0.2), (1.0, 0.4)):
        log_run("tuning", "fedavg", fake_result("fedavg", train, np.full((2, 3), ov)),
                params={"local_learning_rate": lr}, parent=parent.run_id)
    diverged = train.copy()
    diverged[:, 5:] = np.nan
    log_run("tuning", "fedavg", fake_result("fedavg", diverged, np.full((2, 3), np.nan)),
            params={"local_learning_rate": 2.0}, parent=parent.run_id)
    # grid points over non-i.i.d. clients are their own choice; a run outside any sweep (no parent) is none
    clients = {"partition.name": "dirichlet", "partition.alpha": 0.1, "partition.num_clients": 64}
    for lr, ov in ((1.0, 0.3), (3.0, 0.01)):
        log_run("tuning", "fedavg", fake_result("fedavg", train, np.full((2, 3), ov)), parent=parent.run_id,
                params={"local_learning_rate": lr, **clients}, partition="dirichlet(alpha=0.1, M=64)")
    log_run("tuning", "fedavg", fake_result("fedavg", train, np.full((2, 3), 0.01)), params={"local_learning_rate": 9.0})
    client, _ = tracking.client(tracking_cfg("tuning"))
    (path,) = tuning.select(client, "tuning", tmp_path / "tuned")
    assert path == tmp_path / "tuned" / "digits_mlp" / "fedavg.yaml"
    entries = OmegaConf.to_container(OmegaConf.load(path))
    assert sorted(entries) == ["H4_K8", "H4_K8_dirichlet_alpha0.1_M64"]
    skewed = entries["H4_K8_dirichlet_alpha0.1_M64"]
    assert skewed["values"] == {"local_learning_rate": 3.0} and skewed["clients"] == "dirichlet(alpha=0.1, M=64)"
    assert skewed["extend"] == ["hparams_search=fedavg task=digits_mlp H=4 k=8 local_learning_rate=9.0 num_rounds=30 "
                                "partition=dirichlet partition.alpha=0.1 partition.num_clients=64"]
    entry = entries["H4_K8"]
    assert entry["values"] == {"local_learning_rate": 0.5}
    assert entry["outer_valid_loss"] == pytest.approx(0.2)
    assert entry["grid_points"] == 4 and entry["diverged_points"] == 1
    assert entry["grid"]["local_learning_rate"] == [0.1, 0.5, 1.0, 2.0] and entry["on_grid_edge"] == []
    assert entry["sweep"] == ["python -m lagg_pipeline --multirun hparams_search=fedavg H=4"]
    assert entry["mlflow"]["parent_runs"] == [parent.run_id]


def test_a_choice_on_the_grid_edge_records_the_sweep_one_step_past_it(tmp_path):
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": "hparams_search=fedavgm H=8"})
    train = np.full((1, 30), 0.3)
    for lr, momentum, ov in ((0.5, 0.0, 0.3), (2.0, 0.0, 0.1), (2.0, 0.9, 0.2), (0.5, 0.9, 0.4)):
        log_run("tuning", "fedavgm", fake_result("fedavgm", train, np.full((1, 3), ov)), H=8, parent=parent.run_id,
                params={"local_learning_rate": lr, "optimizer.server_learning_rate": 1.0, "optimizer.momentum": momentum})
    client, _ = tracking.client(tracking_cfg("tuning"))
    (path,) = tuning.select(client, "tuning", tmp_path / "tuned")
    entry = OmegaConf.to_container(OmegaConf.load(path))["H8_K8"]
    assert entry["values"] == {"local_learning_rate": 2.0, "optimizer.server_learning_rate": 1.0,
                               "optimizer.momentum": 0.0}
    assert entry["on_grid_edge"] == ["local_learning_rate"]  # momentum 0 ends the method's range; one server lr
    assert entry["extend"] == ["hparams_search=fedavgm task=digits_mlp H=8 k=8 local_learning_rate=6.0 "
                               "optimizer.server_learning_rate=1.0 optimizer.momentum=0.0 num_runs=1 num_rounds=30"]
    assert tuning.extension_sweeps(tmp_path / "tuned") == entry["extend"]
    assert [tuning.beyond_edge("optimizer.momentum", 0.9, [0.0, 0.9]), tuning.beyond_edge("beta", 0.5, [0.5, 0.9]),
            tuning.beyond_edge("local_learning_rate", 0.1, [0.1, 1.0]),
            tuning.beyond_edge("local_learning_rate", 0.5, [0.1, 0.5, 1.0])] == [0.99, 0.25, 0.0333, None]


def test_tuned_values_apply_unless_the_command_line_sets_them(tmp_path, monkeypatch):
    root = tmp_path / "tuned"
    (root / "digits_mlp").mkdir(parents=True)
    (root / "digits_mlp" / "fedavgm.yaml").write_text(
        "H4_K8:\n  values: {local_learning_rate: 0.3, optimizer.momentum: 0.5}\n")
    monkeypatch.setattr(tuning, "tuned_root", lambda: root)  # the default root, as jobs read it
    cfg = OmegaConf.create({"task": {"name": "digits_mlp"}, "optimizer": {"name": "fedavgm", "momentum": 0.9},
                            "num_local_steps": 4, "num_grads": 8, "local_learning_rate": 0.5,
                            "partition": {"name": "iid"}})
    tuned, applied, tuned_over = tuning.apply(cfg, given=set())
    assert applied == {"local_learning_rate": 0.3, "optimizer.momentum": 0.5} and tuned_over == "iid"
    assert (tuned.local_learning_rate, tuned.optimizer.momentum) == (0.3, 0.5) and cfg.local_learning_rate == 0.5
    tuned, applied, _ = tuning.apply(cfg, given={"local_learning_rate"})
    assert applied == {"optimizer.momentum": 0.5} and tuned.local_learning_rate == 0.5
    cfg.num_local_steps = 8  # no entry for H=8: nothing changes
    assert tuning.apply(cfg, given=set()) == (cfg, {}, None)


def test_clients_use_values_tuned_over_them_else_the_iid_ones(tmp_path, monkeypatch):
    root = tmp_path / "tuned"
    (root / "mnist1d_mlp").mkdir(parents=True)
    (root / "mnist1d_mlp" / "fedavg.yaml").write_text(
        "H4_K8:\n  values: {local_learning_rate: 0.3}\n"
        "H4_K8_dirichlet_alpha0.1_M64:\n  values: {local_learning_rate: 1.0}\n")
    monkeypatch.setattr(tuning, "tuned_root", lambda: root)
    cfg = OmegaConf.create({"task": {"name": "mnist1d_mlp"}, "optimizer": {"name": "fedavg"}, "num_local_steps": 4,
                            "num_grads": 8, "local_learning_rate": 0.5,
                            "partition": {"name": "dirichlet", "alpha": 0.1, "num_clients": 64}})
    assert tuning.apply(cfg, given=set())[1:] == ({"local_learning_rate": 1.0}, "dirichlet(alpha=0.1, M=64)")
    cfg.partition.alpha = 1.0  # no grid over these clients: the i.i.d. choice, said so
    assert tuning.apply(cfg, given=set())[1:] == ({"local_learning_rate": 0.3}, "iid")
    cfg.partition = {"name": "iid"}
    assert tuning.apply(cfg, given=set())[1:] == ({"local_learning_rate": 0.3}, "iid")


def test_every_grid_recipe_names_the_keys_it_tunes():
    from lagg_pipeline.config import HAND_OPTIMIZERS

    for optimizer in HAND_OPTIMIZERS:
        assert tuning.grid_keys(optimizer), optimizer


def test_rounds_to_reach_uses_the_smoothed_seed_mean():
    rounds = np.arange(1, 101, dtype=float)
    curves = comparison.Curves("x", "fedavg", "", np.stack([1 / rounds, 1 / rounds]), np.array([0, 100]),
                               *(np.zeros((2, 2)),) * 3)
    # the 10-round trailing mean of 1/r first drops to <= 0.05 at round 25 (mean of 1/16..1/25)
    smoothed = [np.mean(1 / rounds[max(0, r - 10):r]) for r in range(1, 101)]
    expected = next(r for r in range(1, 101) if smoothed[r - 1] <= 0.05)
    assert comparison.rounds_to_reach(curves, 0.05) == expected
    assert comparison.rounds_to_reach(curves, 1e-9) is None


def test_report_pools_seeds_ranks_methods_and_states_the_verdict(tmp_path):
    R = 300
    r = np.arange(1, R + 1, dtype=float)
    fedavg = np.stack([1 / np.sqrt(r)] * 2)
    learned = np.stack([0.5 / np.sqrt(r)] * 2)
    # an older run of the same method and starting seed is replaced by the newer one
    log_run("results", "fedavg", fake_result("fedavg", 5 * fedavg), params={"local_learning_rate": 0.1})
    log_run("results", "fedavg", fake_result("fedavg", fedavg), params={"local_learning_rate": 0.5})
    log_run("results", "fedadam", fake_result("fedadam", 2 * fedavg),
            params={"local_learning_rate": 0.5, "optimizer.server_learning_rate": 0.01})
    # two runs of the learned method with different starting seeds are pooled: 4 seeds
    for seed in (0, 2):
        log_run("results", "lagg_a@digits_k8_h4", fake_result("lagg_a@digits_k8_h4", learned, np.full((2, 3), 0.6)),
                optimizer="lagg_a", seed=seed, params={"local_learning_rate": 0.5, "pretrained": "digits_k8_h4"})
    # the same method over non-i.i.d. clients is a group of its own
    log_run("results", "fedavg", fake_result("fedavg", 3 * fedavg), params={"local_learning_rate": 0.5},
            partition="dirichlet(alpha=0.1, M=64)")
    client, _ = tracking.client(tracking_cfg("results"))
    groups = comparison.collect(client, "results")
    skewed = ("digits_mlp", 8, 4, R, "dirichlet(alpha=0.1, M=64)")
    np.testing.assert_array_equal(groups.pop(skewed)[0].train_loss, 3 * fedavg)
    (key, curves), = groups.items()
    assert key == ("digits_mlp", 8, 4, R, "iid")
    assert [c.method for c in curves] == ["lagg_a@digits_k8_h4", "fedavg", "fedadam"]
    assert curves[0].train_loss.shape == (4, R) and curves[1].train_loss.shape == (2, R)
    np.testing.assert_array_equal(curves[1].train_loss, fedavg)
    header, table, numbers = comparison.rows(curves)
    assert header[2:6] == ["train r50", "train r100", "train r250", f"train r{R}"]
    assert table[1][1] == "local_learning_rate=0.5" and table[2][1].endswith("server_learning_rate=0.01")
    assert table[0][2] == f"{0.5 / np.sqrt(50):.4g} ± 0"
    assert table[1][-1] == "300" and table[2][-1] == "> 300"
    lines = comparison.verdict(numbers, R)
    assert lines[0].startswith("- **lagg_a@digits_k8_h4**: lowest train loss at every reported round from 100 on")
    assert "does not match it" in lines[0]  # its outer-valid loss 0.6 is above the baselines' 0.5
    text = comparison.markdown(groups, tmp_path)
    assert (tmp_path / f"digits_mlp_K8_H4_R{R}.png").stat().st_size > 10_000
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{comparison.BEGIN}\nold numbers\n{comparison.END}\ntail\n")
    comparison.splice_readme(readme, text)
    content = readme.read_text()
    assert "old numbers" not in content and content.startswith("intro\n") and content.endswith("tail\n")
    assert "| **lagg_a@digits_k8_h4** |" in content
    text = comparison.markdown({skewed: [comparison.collect(client, "results")[skewed][0]]}, tmp_path)
    assert "### digits_mlp, K=8, H=4, clients: dirichlet(alpha=0.1, M=64): 300 rounds, 2 seeds" in text
    assert (tmp_path / f"digits_mlp_K8_H4_R{R}_dirichlet_alpha0.1_M64.png").is_file()


def test_held_out_verdict_names_where_and_by_how_much():
    rounds = np.array([0, 50, 100])
    baseline = {"outer_valid": 0.04, "outer_valid_curve": np.array([2.3, 0.10, 0.04]),
                "test_accuracy_curve": np.array([0.1, 0.970, 0.980])}

    def learned(ov, acc):
        return {"outer_valid": ov[-1], "outer_valid_curve": np.array(ov), "test_accuracy_curve": np.array(acc),
                "eval_rounds": rounds}

    # within 5% on the loss and half a point on accuracy everywhere: a match
    text = comparison.held_out(learned([2.3, 0.104, 0.03], [0.1, 0.966, 0.990]), baseline, "fedyogi")
    assert text.startswith("matches or beats fedyogi (the best baseline on held-out data) at every evaluation")
    text = comparison.held_out(learned([2.3, 0.106, 0.03], [0.1, 0.964, 0.990]), baseline, "fedyogi")
    assert text == ("outer-valid loss 0.03 at the last round vs fedyogi's 0.04; does not match it at every evaluation: "
                    "outer-valid loss more than 5% above fedyogi's at 1 of 3 evaluations (first at round 50: 0.106 vs "
                    "0.1), and test accuracy more than 0.5 points below fedyogi's at 1 of 3 evaluations (first at "
                    "round 50: 0.964 vs 0.97)")
    nan = learned([2.3, np.nan, np.nan], [0.1, 0.1, 0.1])  # a diverged run never matches
    text = comparison.held_out(nan, baseline, "fedyogi")
    assert text.startswith("outer-valid loss diverged at the last round vs fedyogi's 0.04")
    assert "at 2 of 3 evaluations (first at round 50: diverged vs 0.1)" in text


def test_a_diverged_baseline_beats_nobody_and_is_nobodys_reference():
    curve = lambda ov: {"outer_valid_curve": np.array([2.3, ov]), "test_accuracy_curve": np.array([0.1, 0.9]),
                        "eval_rounds": np.array([0, 100]), "outer_valid": ov}
    numbers = {"lagg_a@x": {"optimizer": "lagg_a", "train_r100": 0.5, **curve(0.6)},
               "fedavg": {"optimizer": "fedavg", "train_r100": np.nan, **curve(np.nan)},
               "sgd": {"optimizer": "sgd", "train_r100": 0.7, **curve(0.8)}}
    (line,) = comparison.verdict(numbers, 100)
    assert line.startswith("- **lagg_a@x**: lowest train loss at every reported round from 100 on; matches or beats sgd")
    numbers["sgd"] = {"optimizer": "sgd", "train_r100": np.inf, **curve(np.inf)}
    assert comparison.verdict(numbers, 100) == []  # no baseline left to compare with


def test_experiments_open_on_the_runs_view_in_the_mlflow_ui():
    client, experiment_id = tracking.client(tracking_cfg("fresh"))
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND[0]] == "custom_model_development"
    other = client.create_experiment("made elsewhere")  # an existing experiment gets the tag on first use
    client, experiment_id = tracking.client(tracking_cfg("made elsewhere"))
    assert experiment_id == other
    assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND[0]] == "custom_model_development"


class FlakyClient:
    """Refuses log_batch while ``down`` (like a stopped server or a locked SQLite file)."""

    def __init__(self):
        self.down, self.metrics, self.status = False, [], None

    def log_batch(self, run_id, metrics=(), params=()):
        if self.down:
            raise ConnectionError("connection refused")
        self.metrics.extend(metrics)

    def set_terminated(self, run_id, status):
        self.status = status

    def log_artifact(self, run_id, path, artifact_path=None):
        raise ConnectionError("connection refused")


def test_metrics_survive_a_tracking_outage(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_retrying", lambda call, **_: call())  # no waiting in the test
    client = FlakyClient()
    run = tracking.Run(client, "r1")
    run.log_metrics({"meta_loss": ([1, 2], [0.5, 0.4])})
    client.down = True
    run.log_metrics({"meta_loss": ([3, 4], [0.3, 0.2])})
    run.log_metrics({"meta_loss": ([5], [0.1])})
    assert run.pending_file.is_file() and len(run.pending_file.read_text().splitlines()) == 3
    out = capsys.readouterr().out
    assert out.count("metrics are kept in") == 1 and str(run.pending_file) in out
    run.log_artifact(__file__, "x")  # an upload that fails is reported, not raised
    assert "artifact not uploaded" in capsys.readouterr().out
    client.down = False
    run.log_metrics({"meta_loss": ([6], [0.05])})
    assert [m.step for m in client.metrics] == [1, 2, 3, 4, 5, 6]  # every step arrives, in order
    assert not run.pending_file.exists() and "sent" in capsys.readouterr().out
    run.end()
    assert client.status == "FINISHED"


def test_retrying_rides_out_a_locked_database(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking._retrying(locked_twice) == "ok" and len(calls) == 3
    with pytest.raises(RuntimeError):
        tracking._retrying(lambda: (_ for _ in ()).throw(RuntimeError("still locked")), attempts=2)


def test_shipped_table_lists_every_shipped_aggregator_with_its_settings():
    from lagg_pipeline import pretrained

    rows = comparison.shipped_table().splitlines()[2:]
    assert len(rows) == len(pretrained.available())
    assert all(row.count("|") == 13 for row in rows)
    (row,) = [r for r in rows if "`digits_k8_h4_ov`" in r]
    assert "| digits_mlp | 8 | 4 | 0.5 | iid | outer_valid | random | 400 |" in row
    assert "`python -m lagg_pipeline experiment=pretrain_digits_k8_h4_ov optimizer=lagg_a" in row


def test_the_shipped_counterpart_matches_how_a_job_meta_trains():
    from lagg_pipeline import pretrained

    assert pretrained.matching("lagg_a", "digits_mlp", 8, 4, "train") == "digits_k8_h4"
    assert pretrained.matching("lagg_a", "digits_mlp", 8, 8, "train") == "digits_k8_h8"
    assert pretrained.matching("lagg_a", "mnist1d_mlp", 8, 4, "train", "iid", "averaging") == "mnist1d_k8_h4"
    assert pretrained.matching("lagg_a", "mnist1d_mlp", 8, 4, "train", "dirichlet(alpha=0.1, M=64)",
                               "averaging") == "mnist1d_k8_h4_dirichlet"
    assert pretrained.matching("lagg_a", "mnist1d_mlp", 8, 4, "train") is None  # no random-start one shipped
    assert pretrained.matching("lagg_a", "digits_mlp", 16, 4, "train") is None
