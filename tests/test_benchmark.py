"""The meta-test protocol on the embedded digits task, and its report."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline.aggregators import hand
from lagg_pipeline.benchmark import BenchmarkResult, run_benchmark
from lagg_pipeline.data import load_splits
from lagg_pipeline.report.plots import LOSS_FLOOR, floored, plot_curves
from lagg_pipeline.report.run_summary import diverged_at, format_summary, summary
from lagg_pipeline.tasks import make_task


@pytest.fixture(scope="module")
def digits():
    splits = load_splits("digits")
    cfg = OmegaConf.create({"name": "digits_mlp", "dataset": "digits", "model": "mlp", "hidden_sizes": [32]})
    return splits, make_task(cfg, (8, 8, 1), 10)


def bench(digits, update, name, **kw):
    splits, task = digits
    args = dict(num_grads=8, num_local_steps=4, local_batch_size=128, local_learning_rate=0.5, num_runs=2,
                num_rounds=30, eval_every=10, seed=0, progress=False)
    args.update(kw)
    return run_benchmark(task, splits, update, name=name, **args)


def test_shapes_and_eval_rounds_with_a_remainder_chunk(digits):
    result = bench(digits, hand.fedavg(), "fedavg", num_rounds=25, eval_every=10)
    assert result.train_loss.shape == (2, 25)
    np.testing.assert_array_equal(result.eval_rounds, [0, 10, 20, 25])
    assert result.test_accuracy.shape == (2, 4) and result.outer_valid_loss.shape == (2, 4)
    assert result.outer_valid_accuracy.shape == (2, 4) and np.all(result.outer_valid_accuracy[:, -1] > 0.8)
    # At init, predictions are near uniform; training then improves both splits.
    assert np.all(np.abs(result.test_loss[:, 0] - np.log(10)) < 0.3)
    assert np.all(result.test_loss[:, -1] < result.test_loss[:, 0] - 1.0)
    assert np.all(result.test_accuracy[:, -1] > 0.8)
    assert result.seconds_per_round > 0 and result.compile_seconds > 0


def test_seeds_differ_and_repeat(digits):
    a = bench(digits, hand.fedavg(), "fedavg", num_rounds=10)
    b = bench(digits, hand.fedavg(), "fedavg", num_rounds=10)
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    assert not np.allclose(a.train_loss[0], a.train_loss[1])


def test_local_sgd_beats_one_data_parallel_step_per_round(digits):
    # The premise of local SGD: H=4 local steps per round make more progress per round
    # than one SGD step on the same K*H*B examples at the same learning rate.
    fedavg = bench(digits, hand.fedavg(), "fedavg")
    sgd = bench(digits, hand.sgd(0.5), "sgd")
    assert summary(fedavg)["train_loss_last10"][0] < 0.5 * summary(sgd)["train_loss_last10"][0]
    assert summary(fedavg)["train_loss_mean"][0] < summary(sgd)["train_loss_mean"][0]


def test_summary_table_and_plot(digits, tmp_path):
    results = [bench(digits, hand.fedavg(), "fedavg", num_rounds=10), bench(digits, hand.sgd(0.5), "sgd", num_rounds=10)]
    table = format_summary(results)
    lines = table.splitlines()
    assert lines[0].startswith("after 10 rounds, mean ± std over 2 seeds")
    assert lines[1].split() == ["metric", "fedavg", "sgd"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == ["train_loss_r10", "train_loss_mean", "train_loss_last10", "test_loss", "test_accuracy",
                          "outer_valid_loss", "outer_valid_accuracy", "seconds/round"]
    assert rows["train_loss_mean"].count("±") == 2
    path = plot_curves(results, tmp_path / "curves.png")
    assert path.stat().st_size > 10_000


def _result(train_loss_SxR, name="x"):
    S = train_loss_SxR.shape[0]
    evals = np.arange(2 * S, dtype=float).reshape(S, 2)
    return BenchmarkResult(name, train_loss_SxR, np.array([0, train_loss_SxR.shape[1]]), evals, evals / 10,
                           evals + 1, evals / 20, 1e-3, 1.0)


def test_summary_reads_the_whole_curve():
    """A method that wins only at the end must not look better along the whole curve."""
    rounds = np.arange(1, 301, dtype=float)
    late = _result(np.stack([1.0 / np.sqrt(rounds), 1.2 / np.sqrt(rounds)]))
    s = summary(late)
    assert list(s)[:4] == ["train_loss_r50", "train_loss_r100", "train_loss_r250", "train_loss_r300"]
    for r in (50, 100, 250, 300):
        np.testing.assert_allclose(s[f"train_loss_r{r}"][0], 1.1 / np.sqrt(r))
        np.testing.assert_allclose(s[f"train_loss_r{r}"][1], 0.1 / np.sqrt(r))
    np.testing.assert_allclose(s["train_loss_mean"][0], np.mean(1.1 / np.sqrt(rounds)))
    np.testing.assert_allclose(s["train_loss_last10"][0], np.mean(1.1 / np.sqrt(rounds[-10:])))
    assert s["test_loss"] == (2.0, 1.0) and s["outer_valid_loss"] == (3.0, 1.0)  # last evaluation, per seed
    np.testing.assert_allclose(s["outer_valid_accuracy"], (0.1, 0.05))


def test_diverged_runs_are_named_not_dropped(tmp_path):
    train = np.full((2, 30), 0.5)
    train[1, 12:] = np.nan
    result = _result(train, "bad")
    assert diverged_at(result) == 13 and diverged_at(_result(np.ones((2, 30)))) is None
    assert "diverged" in format_summary([result]).splitlines()[4]  # train_loss_mean row
    assert plot_curves([result], tmp_path / "p.png").stat().st_size > 10_000


def test_log_scale_plot_keeps_a_loss_of_zero():
    np.testing.assert_array_equal(floored(np.array([0.0, 1e-9, 0.5, np.nan])), [LOSS_FLOOR, LOSS_FLOOR, 0.5, np.nan])
