"""The tuning criterion: the judged part of the outer-valid curve, and no point where a seed diverged."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline import tracking, tuning, tuning_records, tuning_select
from lagg_pipeline.benchmark import BenchmarkResult

from test_comparison import log_run, tracking_cfg


def result(train_SxR, ov_SxE, eval_every=50):
    S, R = train_SxR.shape
    rounds = np.arange(0, R + 1, eval_every)
    acc = np.full(ov_SxE.shape, 0.9)
    return BenchmarkResult("fedavg", train_SxR, rounds, ov_SxE + 0.01, acc, ov_SxE, acc, 1e-3, 0.5)


def test_a_seed_diverged_when_any_loss_is_non_finite_or_blows_up_even_if_it_recovers():
    train = np.full((3, 200), 0.5)
    train[:, 0] = 2.3
    ov = np.full((3, 5), 0.6)
    assert tuning.diverged_seeds(result(train, ov)) == 0
    spiked = train.copy()
    spiked[1, 120] = 4.5e16  # finite, and the next round is fine again
    assert tuning.diverged_seeds(result(spiked, ov)) == 1
    nan_ov = ov.copy()
    nan_ov[2, 3] = np.nan
    assert tuning.diverged_seeds(result(spiked, nan_ov)) == 2
    assert tuning.diverged_seeds(result(train * np.array([[1.0], [1.0], [np.inf]]), ov)) == 1


def test_the_score_is_the_mean_outer_valid_loss_from_round_100_not_the_last_round():
    train = np.full((2, 300), 0.5)
    ov = np.array([[2.3, 0.1, 0.4, 0.5, 0.6, 0.7, 0.2]] * 2)  # rounds 0, 50, ..., 300
    rounds = np.arange(0, 301, 50)
    assert tuning.selection_score(rounds, ov.mean(0)) == pytest.approx(np.mean([0.4, 0.5, 0.6, 0.7, 0.2]))
    assert tuning.selection_score([0, 40], [2.3, 0.9]) == pytest.approx(0.9)  # under 100 rounds: from its first evaluation
    assert np.isnan(tuning.selection_score(rounds[:-1], ov.mean(0)))  # MLflow dropped a non-finite value


def test_select_reads_the_logged_curve_and_never_picks_a_point_where_one_seed_diverged(tmp_path):
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": "hparams_search=fedavg H=4"})
    train = np.full((3, 200), 0.5)
    train[:, 0] = 2.3
    spiked = train.copy()
    spiked[0, 150] = 1e16  # the lowest outer-valid loss, but one seed blew up on the way
    early = np.array([[2.3, 0.05, 0.5, 0.5, 0.5]] * 3)  # best at round 50 only: outside the judged window
    for lr, curve, ov in ((0.5, train, np.full((3, 5), 0.4)), (2.0, spiked, np.full((3, 5), 0.1)),
                          (0.1, train, np.full((3, 5), 0.9)), (1.0, train, early)):
        log_run("tuning", "fedavg", result(curve, ov), params={"local_learning_rate": lr}, parent=parent.run_id)
    client, _ = tracking.client(tracking_cfg("tuning"))
    (path,) = tuning_select.select(client, "tuning", tmp_path / "tuned").written
    entry = OmegaConf.to_container(OmegaConf.load(path))["H4_K8"]
    assert entry["values"] == {"local_learning_rate": 0.5} and entry["outer_valid_loss"] == pytest.approx(0.4)
    assert entry["diverged_points"] == 1 and entry["criterion"] == tuning.CRITERION


def _grid(lrs_and_losses, overrides):
    """Log one sweep of fedavg points (3 seeds x 200 rounds) with its parent run; a loss None diverged."""
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": overrides})
    train = np.full((3, 200), 0.5)
    train[:, 0] = 2.3
    for lr, ov in lrs_and_losses:
        curve = train if ov is not None else np.where(np.arange(200) > 20, np.inf, train)
        log_run("tuning", "fedavg", result(curve, np.full((3, 5), np.inf if ov is None else ov)),
                params={"local_learning_rate": lr}, parent=parent.run_id)


@pytest.mark.parametrize("beyond_loss, chosen, edges", [(0.2, 6.0, ["local_learning_rate"]), (0.6, 2.0, []),
                                                        (None, 2.0, [])])  # None: every seed past the edge diverged
def test_on_a_fresh_store_the_recorded_choice_competes_with_the_sweep_past_its_edge(tmp_path, monkeypatch,
                                                                                   beyond_loss, chosen, edges):
    _grid(((0.5, 0.7), (1.0, 0.5), (2.0, 0.4)), "hparams_search=fedavg H=4")
    client, _ = tracking.client(tracking_cfg("tuning"))
    root = tmp_path / "tuned"
    (path,) = tuning_select.select(client, "tuning", root).written
    first = OmegaConf.to_container(OmegaConf.load(path))["H4_K8"]
    assert first["values"] == {"local_learning_rate": 2.0} and first["on_grid_edge"] == ["local_learning_rate"]
    assert first["extend"] == ["hparams_search=fedavg task=digits_mlp H=4 k=8 local_learning_rate=6.0 num_rounds=200"]

    # A new machine: a fresh store runs only the sweep past the edge; the grid that chose 2.0 is not in it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'new_machine.db'}")
    _grid(((6.0, beyond_loss),), "hparams_search=fedavg H=4 k=8 local_learning_rate=6.0 hydra.sweep.dir=/tmp/x")
    client, _ = tracking.client(tracking_cfg("tuning"))
    tuning_select.select(client, "tuning", root)
    entry = OmegaConf.to_container(OmegaConf.load(path))["H4_K8"]
    assert entry["values"] == {"local_learning_rate": chosen}
    assert entry["outer_valid_loss"] == pytest.approx(min(0.4, beyond_loss or np.inf))
    assert entry["diverged_points"] == (beyond_loss is None)
    assert entry["grid"] == {"local_learning_rate": [0.5, 1.0, 2.0, 6.0]} and entry["grid_points"] == 4
    assert entry["on_grid_edge"] == edges  # 6.0 won: the next step is 18; 2.0 held: 6.0 closed the edge
    assert entry["sweep"] == ["python -m lagg_pipeline --multirun hparams_search=fedavg H=4",  # Hydra's own dropped
                              "python -m lagg_pipeline --multirun hparams_search=fedavg H=4 k=8 local_learning_rate=6.0"]
    assert len(entry["mlflow"]["parent_runs"]) == 2
    assert (entry["mlflow"]["best_run"] == first["mlflow"]["best_run"]) == (chosen == 2.0)
    assert len(client.search_runs([client.get_experiment_by_name("tuning").experiment_id])) == 2  # a parent, a point
    tuning_select.select(client, "tuning", root)  # selecting again counts nothing twice
    again = OmegaConf.to_container(OmegaConf.load(path))["H4_K8"]
    assert again == entry


def test_the_status_table_gives_each_choices_budget_and_edge_and_counts_those_at_the_judged_horizon(tmp_path):
    (tmp_path / "digits_mlp").mkdir()
    (tmp_path / "digits_mlp" / "fedavg.yaml").write_text(
        "H4_K8: {values: {local_learning_rate: 0.5}, rounds: 1000, seeds: 3, on_grid_edge: []}\n"
        "H8_K8: {values: {local_learning_rate: 0.5}, rounds: 300, seeds: 1, on_grid_edge: [local_learning_rate]}\n")
    (tmp_path / "digits_mlp" / "adam.yaml").write_text("H4_K8: {values: {local_learning_rate: 0.001}}\n")
    lines = tuning_records.status(tmp_path)
    assert lines[:4] == ["| task | setting | fedavg | adam |", "|---|---|---|---|",
                         "| digits_mlp | H4_K8 | 1000×3 | budget not recorded |",
                         "| digits_mlp | H8_K8 | 300×1, edge | — |"]
    assert lines[-1].startswith("1 of 3 choices made at the judged horizon (1000 rounds × at least 3 seeds)")


def test_a_grid_the_store_holds_in_part_is_listed_by_tune_status_and_not_chosen_from(tmp_path):
    parent = tracking.start_run(tracking_cfg("tuning"), "sweep", {"sweep": "parent"})
    parent.log_params({"sweep_overrides": "hparams_search=fedavg H=4"})
    train = np.full((3, 1000), 0.5)
    ov = np.full((3, 21), 0.4)
    for lr, rounds in ((0.3, 1000), (0.5, 1000), (1.0, 1000), (0.1, 200), (6.0, 1000)):  # another budget; off-grid
        log_run("tuning", "fedavg", result(train[:, :rounds], ov[:, :rounds // 50 + 1]),
                params={"local_learning_rate": lr}, parent=parent.run_id)
    client, _ = tracking.client(tracking_cfg("tuning"))
    assert tuning_records.grid_progress(client) == [
        "- fedavg on digits_mlp H=4 K=8: 3 of 5 points finished; missing local_learning_rate=0.1; "
        "local_learning_rate=2.0"]
    root = tmp_path / "tuned"
    assert tuning_select.select(client, "tuning", root) == tuning_select.Selection(
        [], ["fedavg on digits_mlp H=4 K=8: 3 of 5 grid points finished, not chosen until the rest are"])
    assert not root.exists()
    for lr, loss in ((0.1, 0.4), (2.0, 0.3)):
        log_run("tuning", "fedavg", result(train, np.full((3, 21), loss)), params={"local_learning_rate": lr},
                parent=parent.run_id)
    assert tuning_records.grid_progress(client) == []
    (path,), unfinished = tuning_select.select(client, "tuning", root)
    entry = OmegaConf.to_container(OmegaConf.load(path))["H4_K8"]
    assert unfinished == [] and entry["values"] == {"local_learning_rate": 2.0} and entry["grid_points"] == 6
