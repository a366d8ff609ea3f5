"""The meta-test protocol on the embedded digits task, and its report."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from lagg_pipeline.aggregators import hand
from lagg_pipeline.benchmark import run_benchmark
from lagg_pipeline.data import load_splits
from lagg_pipeline.report import format_summary, plot_curves, summary
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


def test_summary_table_and_plot(digits, tmp_path):
    results = [bench(digits, hand.fedavg(), "fedavg", num_rounds=10), bench(digits, hand.sgd(0.5), "sgd", num_rounds=10)]
    table = format_summary(results)
    lines = table.splitlines()
    assert lines[0] == "after 10 rounds, mean ± std over 2 seeds"
    assert lines[3].startswith("fedavg") and lines[4].startswith("sgd") and "±" in lines[3]
    path = plot_curves(results, tmp_path / "curves.png")
    assert path.stat().st_size > 10_000
