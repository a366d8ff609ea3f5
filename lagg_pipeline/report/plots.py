"""Render, in pictures: a group's curves for the Results page, and one job's own plots."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lagg_pipeline.report.judge import TRAIN_TAIL, Judgement, finite_baselines

if TYPE_CHECKING:  # a type only
    from lagg_pipeline.benchmark import BenchmarkResult

LOSS_FLOOR = 1e-6  # log-scale plots clip losses here: a loss of exactly 0 must not end a curve
ERROR_FLOOR = 1e-4
PLOTTED_BASELINES = 3  # beside each learned aggregator: the best few, so the lines stay apart


def floored(values: np.ndarray) -> np.ndarray:
    """Losses for a log axis: non-negative values below LOSS_FLOOR are drawn at the floor."""
    return np.where(np.isfinite(values), np.maximum(values, LOSS_FLOOR), values)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(names: Sequence[str]) -> dict[str, tuple]:
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: palette(i % palette.N) for i, n in enumerate(names)}


def plot_group(j: Judgement, title: str, path: Path) -> Path:
    """One row of panels per learned aggregator, beside the best few baselines (by final test loss):
    train loss, test loss and test error rate (1 − accuracy), each on a log scale."""
    plt = _pyplot()
    baselines = sorted(finite_baselines(j.rows), key=lambda s: s.mean("test_loss")[-1])
    learned = [s for s in j.rows if s.curves.learned]
    panels = [[s, *baselines[:PLOTTED_BASELINES]] for s in learned] or [baselines[:PLOTTED_BASELINES + 2]]
    colour = _colours([s.name for s in j.rows])
    fig, axes = plt.subplots(len(panels), 3, figsize=(16, 3.6 * len(panels)), squeeze=False)
    for axes_row, members in zip(axes, panels):
        for s in members:
            style = dict(color=colour[s.name], lw=1.8 if s.curves.learned else 1.2,
                         ls="-" if s.curves.learned else "--")
            axes_row[0].plot(np.arange(1, s.train.shape[1] + 1), floored(s.smoothed_train()), label=s.name, **style)
            axes_row[1].plot(s.rounds, floored(s.mean("test_loss")), **style)
            axes_row[2].plot(s.rounds, np.maximum(1 - s.mean("test_accuracy"), ERROR_FLOOR), **style)
        axes_row[0].legend(fontsize=8)
        for ax, name in zip(axes_row, (f"train loss ({TRAIN_TAIL}-round mean, clipped at {LOSS_FLOOR:g})",
                                       "test loss", "test error rate (1 − accuracy)")):
            ax.set(yscale="log", title=name, xlabel="communication rounds")
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{title} — test split; " + (f"each learned aggregator beside the {PLOTTED_BASELINES} "
                 "baselines with the lowest final test loss" if learned else "the baselines with the lowest final "
                 "test loss"))
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_curves(results: Sequence[BenchmarkResult], path: str | Path) -> Path:
    """One job's benchmark results: train loss, test loss and test accuracy vs rounds (mean ± std over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        rounds = np.arange(1, r.train_loss.shape[1] + 1)
        for ax, x, y, log in ((axes[0], rounds, r.train_loss, True), (axes[1], r.eval_rounds, r.test_loss, False),
                              (axes[2], r.eval_rounds, r.test_accuracy, False)):
            mean, std = y.mean(axis=0), y.std(axis=0)
            low, high = mean - std, mean + std
            if log:
                mean, low, high = floored(mean), floored(low), floored(high)
            ax.plot(x, mean, label=r.name)
            ax.fill_between(x, low, high, alpha=0.2)
    for ax, title in zip(axes, (f"train loss (log; clipped at {LOSS_FLOOR:g})", "test loss", "test accuracy")):
        ax.set_xlabel("communication rounds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_meta_loss(history: Sequence[float], first_step: int, path: str | Path) -> Path:
    """Meta-loss against outer steps (steps first_step + 1 ...)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(first_step + 1, first_step + len(history) + 1), history)
    ax.set(xlabel="outer step", ylabel="meta-loss (mean train loss over the truncation)", title="meta-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
