"""Tuned-value selection and the cross-run report's collection, on MLflow stores filled with known curves."""
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline import tracking, tuning, tuning_records, tuning_select
from lagg_pipeline.report import collect, headline, judge, page
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
    return BenchmarkResult(name, train_SxR, eval_rounds, ov + 0.01, acc, ov, acc, 1e-3, 0.5)


def log_run(experiment, name, result, *, optimizer=None, task="digits_mlp", H=4, seed=0, params=None,
            parent=None, partition=None):
    optimizer = optimizer or name
    cfg = tracking_cfg(experiment)
    tags = {"optimizer": optimizer, "task": task, "H": H, "K": 8, "seed": seed, "method": name,
            **({"partition": partition} if partition else {})}  # runs from before partitions have no tag
    run = tracking.start_run(cfg, name, tags, parent_run_id=parent)
    run.log_params({"num_rounds": result.train_loss.shape[1], "num_runs": result.train_loss.shape[0],
                    "local_batch_size": 128, **(params or {})})
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
    (path,) = tuning_select.select(client, "tuning", tmp_path / "tuned").written
    assert path == tmp_path / "tuned" / "digits_mlp" / "fedavg.yaml"
    entries = OmegaConf.to_container(OmegaConf.load(path))
    assert sorted(entries) == ["H4_K8", "H4_K8_dirichlet_alpha0.1_M64"]
    skewed = entries["H4_K8_dirichlet_alpha0.1_M64"]
    assert skewed["values"] == {"local_learning_rate": 3.0} and skewed["clients"] == "dirichlet(alpha=0.1, M=64)"
    assert skewed["extend"] == ["hparams_search=fedavg task=digits_mlp H=4 k=8 local_learning_rate=9.0 num_runs=2 num_rounds=30 "
                                "partition=dirichlet partition.alpha=0.1 partition.num_clients=64"]
    entry = entries["H4_K8"]
    assert entry["values"] == {"local_learning_rate": 0.5}
    assert entry["outer_valid_loss"] == pytest.approx(0.2)
    assert entry["grid_points"] == 4 and entry["diverged_points"] == 1
    assert entry["grid"]["local_learning_rate"] == [0.1, 0.5, 1.0, 2.0] and entry["on_grid_edge"] == []
    assert entry["sweep"] == ["python -m lagg_pipeline --multirun hparams_search=fedavg H=4"]
    assert entry["mlflow"]["parent_runs"] == [parent.run_id]
    grid = [r for r in client.search_runs([client.get_experiment_by_name("tuning").experiment_id])
            if r.data.tags.get("mlflow.parentRunId") and r.data.tags.get("partition") is None]
    assert len(grid) == 4 and entry["grid_minutes"] == tuning_select.grid_minutes(grid)


def test_a_grids_wall_time_sums_its_points_runs():
    from types import SimpleNamespace

    runs = [SimpleNamespace(info=SimpleNamespace(start_time=t0, end_time=t0 + ms)) for t0, ms in ((5, 90_000),
                                                                                                  (10**12, 30_000))]
    assert tuning_select.grid_minutes(runs) == 2.0


def test_a_choice_on_the_grid_edge_records_the_sweep_one_step_past_it(tmp_path):
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": "hparams_search=fedavgm H=8"})
    train = np.full((1, 30), 0.3)
    for lr, momentum, ov in ((0.5, 0.0, 0.3), (2.0, 0.0, 0.1), (2.0, 0.9, 0.2), (0.5, 0.9, 0.4)):
        log_run("tuning", "fedavgm", fake_result("fedavgm", train, np.full((1, 3), ov)), H=8, parent=parent.run_id,
                params={"local_learning_rate": lr, "optimizer.server_learning_rate": 1.0, "optimizer.momentum": momentum})
    client, _ = tracking.client(tracking_cfg("tuning"))
    (path,) = tuning_select.select(client, "tuning", tmp_path / "tuned").written
    entry = OmegaConf.to_container(OmegaConf.load(path))["H8_K8"]
    assert entry["values"] == {"local_learning_rate": 2.0, "optimizer.server_learning_rate": 1.0,
                               "optimizer.momentum": 0.0}
    assert entry["on_grid_edge"] == ["local_learning_rate"]  # momentum 0 ends the method's range; one server lr
    assert entry["extend"] == ["hparams_search=fedavgm task=digits_mlp H=8 k=8 local_learning_rate=6.0 "
                               "optimizer.server_learning_rate=1.0 optimizer.momentum=0.0 num_runs=1 num_rounds=30"]
    assert tuning_records.extension_sweeps(tmp_path / "tuned") == entry["extend"]
    assert [tuning_select.beyond_edge("optimizer.momentum", 0.9, [0.0, 0.9]), tuning_select.beyond_edge("beta", 0.5, [0.5, 0.9]),
            tuning_select.beyond_edge("local_learning_rate", 0.1, [0.1, 1.0]),
            tuning_select.beyond_edge("local_learning_rate", 0.5, [0.1, 0.5, 1.0])] == [0.99, 0.25, 0.0333, None]


def test_select_compares_one_budget_counts_each_point_once_and_judges_edges_by_neighbours(tmp_path):
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": "hparams_search=fedavgm H=8"})

    def point(rounds, lr, server_lr, momentum, ov):
        log_run("tuning", "fedavgm", fake_result("fedavgm", np.full((1, rounds), 0.3), np.full((1, 3), ov)), H=8,
                parent=parent.run_id, params={"local_learning_rate": lr, "optimizer.server_learning_rate": server_lr,
                                              "optimizer.momentum": momentum, "local_batch_size": 128})

    point(30, 2.0, 1.0, 0.9, 0.01)  # an older grid at a smaller budget: best by far, but not comparable
    for lr, server_lr, ov in ((0.5, 1.0, 0.3), (2.0, 1.0, 0.1), (6.0, 3.0, 0.5), (2.0, 3.0, 0.4)):
        point(60, lr, server_lr, 0.0, ov)
    point(60, 2.0, 1.0, 0.0, 0.12)  # the best point re-run: one point, its newest run
    client, _ = tracking.client(tracking_cfg("tuning"))
    (path,) = tuning_select.select(client, "tuning", tmp_path / "tuned").written
    entry = OmegaConf.to_container(OmegaConf.load(path))["H8_K8"]
    assert entry["values"] == {"local_learning_rate": 2.0, "optimizer.server_learning_rate": 1.0,
                               "optimizer.momentum": 0.0}
    assert entry["outer_valid_loss"] == pytest.approx(0.12) and entry["grid_points"] == 4
    assert (entry["rounds"], entry["seeds"], entry["batch"]) == (60, 1, 128)
    assert entry["other_budgets_ignored"] == ["30 rounds x 1 seeds, batch 128"]
    # 6.0 was tried only at server lr 3.0: along its own line (server lr 1.0) the best lr 2.0 is the edge
    assert entry["on_grid_edge"] == ["local_learning_rate", "optimizer.server_learning_rate"]
    assert entry["extend"][0] == ("hparams_search=fedavgm task=digits_mlp H=8 k=8 local_learning_rate=6.0 "
                                  "optimizer.server_learning_rate=1.0 optimizer.momentum=0.0 num_runs=1 num_rounds=60")
    assert "optimizer.server_learning_rate=0.333" in entry["extend"][1]


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


def test_trailing_mean_smooths_the_train_loss_and_keeps_divergence_visible():
    rounds = np.arange(1, 101, dtype=float)
    expected = [np.mean(1 / rounds[max(0, r - 10):r]) for r in range(1, 101)]
    np.testing.assert_allclose(judge.trailing_mean(1 / rounds), expected)
    curve = 1 / rounds
    curve[40] = np.inf  # a diverged seed in the mean: infinite while it is in the window, not NaN
    smoothed = judge.trailing_mean(curve)
    assert np.isinf(smoothed[40:50]).all() and np.isfinite(smoothed[:40]).all()
    np.testing.assert_allclose(smoothed[50:], expected[50:])


def test_trailing_mean_recovers_after_a_huge_finite_spike():
    # a baseline seed whose loss blew up to 4.5e16 and fell back to ln(10): later windows read
    # ln(10), not the 0 that differences of a running sum leave behind
    curve = np.full(100, np.log(10.0), dtype=np.float32)
    curve[30] = 4.5e16
    smoothed = judge.trailing_mean(curve)
    assert (smoothed[30:40] > 1e15).all()
    np.testing.assert_allclose(smoothed[40:], np.log(10.0), rtol=1e-6)


def test_report_pools_seeds_of_one_method_and_keeps_the_newest_rerun(tmp_path):
    R = 300
    r = np.arange(1, R + 1, dtype=float)
    fedavg = np.stack([1 / np.sqrt(r)] * 2)
    learned = np.stack([0.5 / np.sqrt(r)] * 2)
    # an older run of the same method, settings and starting seed is replaced by the newer one
    log_run("results", "fedavg", fake_result("fedavg", 5 * fedavg), params={"local_learning_rate": 0.5})
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
    groups = collect.collect(client, "results")
    skewed = ("digits_mlp", 8, 4, R, 128, "dirichlet(alpha=0.1, M=64)")
    np.testing.assert_array_equal(groups[skewed][0].train_loss, 3 * fedavg)
    curves = groups[("digits_mlp", 8, 4, R, 128, "iid")]
    assert [c.method for c in curves] == ["lagg_a@digits_k8_h4", "fedavg", "fedadam"]
    assert curves[0].train_loss.shape == (4, R) and curves[1].train_loss.shape == (2, R)
    np.testing.assert_array_equal(curves[1].train_loss, fedavg)
    seconds = lambda method: sum((r.info.end_time - r.info.start_time) / 1000 for r in client.search_runs(
        [client.get_experiment_by_name("results").experiment_id], f"tags.method = '{method}'"))
    assert curves[0].run_seconds == pytest.approx(seconds("lagg_a@digits_k8_h4"))  # both seeds' runs
    assert curves[1].settings == "local_learning_rate=0.5" and curves[2].settings.endswith("server_learning_rate=0.01")
    assert curves[0].settings == "local_learning_rate=0.5, meta-params: shipped digits_k8_h4"
    judged = judge.judge_groups(groups)
    text = page.markdown(judged)
    assert "### digits_mlp, K=8, H=4, B=128, clients: dirichlet(alpha=0.1, M=64): 300 rounds, 2 seeds" in text
    assert text.count("No learned method ran in this group: nothing to judge.") == 1
    assert "### digits_mlp, K=8, H=4, B=128: 300 rounds, 2/4 seeds" in text
    assert "Wall time of its runs: 0 min." in text  # milliseconds here
    # the shipped tuned files' grids beside this store's runs; over clients only the grids run over them (none here)
    assert re.search(r"\n\| digits_mlp, K=8, H=4, B=128 \| 8 tuned \| [^|]+ \| 0 min \|\n", text)
    assert re.search(r"\n\| digits_mlp, K=8, H=4, B=128, clients: dirichlet\(alpha=0.1, M=64\) \| none tuned \| — \| 0 min \|\n", text)
    page.plot(judged, tmp_path)
    assert (tmp_path / f"digits_mlp_K8_H4_B128_R{R}.png").stat().st_size > 10_000
    assert (tmp_path / f"digits_mlp_K8_H4_B128_R{R}_dirichlet_alpha0.1_M64.png").is_file()


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

    rows = headline.shipped_table().splitlines()[2:]
    assert len(rows) == len(pretrained.available())
    assert all(row.count("|") == 13 for row in rows)
    (row,) = [r for r in rows if "| lagg_a | `family_k8_h4_mix`" in r]
    assert "| digits_mlp | 8 | 4 | 0.5 | iid | resplit + 0.5·train | averaging | 1200 |" in row
    assert "`python -m lagg_pipeline experiment=pretrain_family_k8_h4_mix optimizer=lagg_a" in row
    (row,) = [r for r in rows if "| lagg_a | `mnist1d_large_k8_h4_mix_cont`" in r]  # continues a shipped file
    assert "| 1.0 | iid | resplit + 0.5·train | `mnist1d_large_k8_h4_mix` | 300 | 33 min after " \
           "`mnist1d_large_k8_h4_mix`'s |" in row


def test_the_shipped_counterpart_is_the_recommended_one_else_one_trained_alike():
    from lagg_pipeline import pretrained

    assert pretrained.matching("lagg_a", "digits_mlp", 8, 4, "resplit", "iid", "averaging") in \
        {"family_k8_h4", "family_k8_h4_mix", "family4_k8_h4_mix75"}
    assert pretrained.matching("lopt_a", "digits_mlp", 8, 4, "resplit", "iid", "averaging") in \
        {"family_k8_h4_mix", "family4_k8_h4_mix"}
    assert pretrained.matching("lagg_a", "digits_mlp", 8, 4, "outer_valid", "iid", "averaging") is None  # retired
    assert pretrained.matching("lagg_a", "digits_mlp", 8, 4, "train") is None  # none shipped
    assert pretrained.matching("lagg_a", "digits_mlp", 16, 4, "outer_valid", "iid", "averaging") is None
    for entry in pretrained.recommendations():  # every recommendation names a shipped file
        assert (entry["variant"], entry["name"]) in pretrained.available()
        for task in entry["tasks"]:
            for h in entry["H"]:
                assert pretrained.recommended(entry["variant"], task, entry["num_grads"], h) is not None
    assert pretrained.recommended("lagg_a", "digits_mlp", 16, 4) is None


def test_a_group_with_no_baseline_is_reported_without_a_verdict():
    """A learned method benchmarked alone (with_fedavg=false, no baseline run yet): its held-out
    table at its own evaluations, and no verdict."""
    R = 300
    learned = np.stack([0.5 / np.sqrt(np.arange(1, R + 1, dtype=float))] * 2)
    log_run("results", "lagg_a@digits_k8_h4", fake_result("lagg_a@digits_k8_h4", learned, np.full((2, 3), 0.6)),
            optimizer="lagg_a", params={"local_learning_rate": 0.5, "pretrained": "digits_k8_h4"})
    client, _ = tracking.client(tracking_cfg("results"))
    text = page.markdown(judge.judge_groups(collect.collect(client, "results")))
    assert "No baseline with a finite seed." in text and "nothing to judge against" in text
    assert re.search(r"\n\| \*\*lagg_a@digits_k8_h4\*\* \| local_learning_rate=0.5, meta-params: shipped digits_k8_h4 \| 2 \| ", text)
