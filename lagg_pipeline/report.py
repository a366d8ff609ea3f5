"""Readable results: the end-of-run summary table and loss-vs-rounds plots."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lagg_pipeline.benchmark import BenchmarkResult

TRAIN_TAIL = 10  # the summary's train loss averages the last rounds: one round is noisy


def summary(result: BenchmarkResult) -> dict[str, tuple[float, float]]:
    """Final metrics as (mean, std) over seeds."""
    tail = result.train_loss[:, -min(TRAIN_TAIL, result.train_loss.shape[1]):].mean(axis=1)
    return {
        f"train_loss_last{TRAIN_TAIL}": (tail.mean(), tail.std()),
        "test_loss": (result.test_loss[:, -1].mean(), result.test_loss[:, -1].std()),
        "test_accuracy": (result.test_accuracy[:, -1].mean(), result.test_accuracy[:, -1].std()),
        "outer_valid_loss": (result.outer_valid_loss[:, -1].mean(), result.outer_valid_loss[:, -1].std()),
    }


def format_summary(results: Sequence[BenchmarkResult]) -> str:
    """A table, one row per server update: final metrics mean ± std over seeds."""
    columns = list(summary(results[0]))
    header = ["optimizer", *columns, "s/round"]
    rows = [[r.name, *(f"{m:.4f} ± {s:.4f}" for m, s in summary(r).values()), f"{r.seconds_per_round:.2e}"]
            for r in results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
    seeds, rounds = results[0].train_loss.shape
    title = f"after {rounds} rounds, mean ± std over {seeds} seeds"
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot_curves(results: Sequence[BenchmarkResult], path: str | Path) -> Path:
    """Train loss vs rounds, test loss and test accuracy vs rounds (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        rounds = np.arange(1, r.train_loss.shape[1] + 1)
        for ax, x, y in ((axes[0], rounds, r.train_loss), (axes[1], r.eval_rounds, r.test_loss),
                         (axes[2], r.eval_rounds, r.test_accuracy)):
            mean, std = y.mean(axis=0), y.std(axis=0)
            ax.plot(x, mean, label=r.name)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    for ax, title in zip(axes, ("train loss", "test loss", "test accuracy")):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(first_step + 1, first_step + len(history) + 1), history)
    ax.set(xlabel="outer step", ylabel="meta-loss (mean train loss over the truncation)", title="meta-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
