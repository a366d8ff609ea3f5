"""Readable results: the end-of-run summary table and loss-vs-rounds plots."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lagg_pipeline.benchmark import BenchmarkResult

TRAIN_TAIL = 10  # the last-rounds train loss averages this many rounds: one round is noisy
CHECKPOINT_ROUNDS = (50, 100, 250)  # the summary reads train loss along the curve, not just at its end
LOSS_FLOOR = 1e-6  # log-scale plots clip losses here: a loss of exactly 0 must not end a curve


def _per_seed(result: BenchmarkResult) -> dict[str, np.ndarray]:
    """Each summary metric per seed, [S]: train loss at fixed rounds, at the last round, its
    mean over all rounds and over the last rounds; held-out metrics at the last evaluation."""
    train = result.train_loss
    rounds = train.shape[1]
    values = {f"train_loss_r{r}": train[:, r - 1] for r in CHECKPOINT_ROUNDS if r < rounds}
    values[f"train_loss_r{rounds}"] = train[:, -1]
    values["train_loss_mean"] = train.mean(axis=1)
    values[f"train_loss_last{TRAIN_TAIL}"] = train[:, -min(TRAIN_TAIL, rounds):].mean(axis=1)
    values.update(test_loss=result.test_loss[:, -1], test_accuracy=result.test_accuracy[:, -1],
                  outer_valid_loss=result.outer_valid_loss[:, -1],
                  outer_valid_accuracy=result.outer_valid_accuracy[:, -1])
    return values


def summary(result: BenchmarkResult) -> dict[str, tuple[float, float]]:
    """Summary metrics as (mean, std) over seeds (see ``_per_seed``)."""
    return {name: (float(v.mean()), float(v.std())) for name, v in _per_seed(result).items()}


def format_summary(results: Sequence[BenchmarkResult]) -> str:
    """A table, one row per metric and one column per server update: mean ± std over seeds.
    Train loss is shown along the whole curve so that a method that wins only at the end
    (or only early) is visible as such."""
    names = [r.name for r in results]
    stats = [summary(r) for r in results]
    header = ["metric", *names]
    cell = lambda m, sd: f"{m:.4g} ± {sd:.2g}" if np.isfinite(m) else "diverged"
    rows = [[metric, *(cell(*s[metric]) for s in stats)] for metric in stats[0]]
    rows.append(["seconds/round", *(f"{r.seconds_per_round:.2e}" for r in results)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    seeds, rounds = results[0].train_loss.shape
    title = (f"after {rounds} rounds, mean ± std over {seeds} seeds (train_loss_rN: round N; _mean: over all "
             f"rounds; _last{TRAIN_TAIL}: the last {TRAIN_TAIL} rounds; held-out metrics at round {rounds})")
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def diverged_at(result: BenchmarkResult) -> int | None:
    """The first round whose train loss is not finite in some seed (None if every round is)."""
    bad = ~np.isfinite(result.train_loss).all(axis=0)
    return int(np.argmax(bad)) + 1 if bad.any() else None


def floored(values: np.ndarray) -> np.ndarray:
    """Losses for a log axis: non-negative values below LOSS_FLOOR are drawn at the floor."""
    return np.where(np.isfinite(values), np.maximum(values, LOSS_FLOOR), values)


def plot_curves(results: Sequence[BenchmarkResult], path: str | Path) -> Path:
    """Train loss vs rounds, test loss and test accuracy vs rounds (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
