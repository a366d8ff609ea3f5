"""One job's own summary: the table printed at the end of a benchmark, mean ± std over seeds."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from lagg_pipeline.report.judge import TRAIN_TAIL

if TYPE_CHECKING:  # a type only: the numbers are numpy arrays
    from lagg_pipeline.benchmark import BenchmarkResult

CHECKPOINT_ROUNDS = (50, 100, 250)  # the summary reads train loss along the curve, not just at its end


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
