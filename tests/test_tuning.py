"""The tuning criterion: the judged part of the outer-valid curve, and no point where a seed diverged."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline import tracking, tuning
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
    (path,) = tuning.select(client, "tuning", tmp_path / "tuned")
    entry = OmegaConf.to_container(OmegaConf.load(path))["H4_K8"]
    assert entry["values"] == {"local_learning_rate": 0.5} and entry["outer_valid_loss"] == pytest.approx(0.4)
    assert entry["diverged_points"] == 1 and entry["criterion"] == tuning.CRITERION
