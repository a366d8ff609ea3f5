"""The verdict on untouched data: each learned method against the tuned baselines, on the test split.

SPEC 5: the test split is read by the report and by nothing that is fitted or selected, so it is
the only split a claim about held-out quality reads (outer-valid tuned the baselines and, with
``meta_loss_split=outer_valid``, meta-trained the aggregator). Per learned method, at every
evaluation common to the group's rows from round 100 on (runs shorter than that: from their
first evaluation), on seed means, against the best tuned baseline *at that round, per metric*:

1. train loss (mean of the ``TRAIN_TAIL`` rounds up to the evaluation) lower than every baseline's;
2. test accuracy at most ``ACCURACY_SLACK`` below the best baseline's;
3. test loss at most ``TEST_LOSS_SLACK`` above the best baseline's;
4. time to target (as in AlgoPerf): rounds to the best baseline's final test accuracy and final
   train loss, beside each baseline's, and the ratio to the fastest baseline.

Where tuned FedAvg is one of several baselines, each learned method is judged a second time
against FedAvg alone: the goal on tasks outside the meta-training family is FedAvg's.

Diverged seeds are data: a baseline counts with its finite seeds (marked), a learned method's
diverged seeds count against it (infinite loss, zero accuracy).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lagg_pipeline.comparison import Curves
from lagg_pipeline.errors import UserError
from lagg_pipeline.report import TRAIN_TAIL

FROM_ROUND = 100
FEDAVG = "fedavg"  # on tasks outside the meta-training family the goal is tuned FedAvg's (also judged alone)
ACCURACY_SLACK = 0.005  # half a point
TEST_LOSS_SLACK = 0.10  # 10%


class Stats(NamedTuple):
    """One row's seeds as the verdict counts them, at the group's common evaluations."""

    curves: Curves
    diverged: int  # seeds with a non-finite value anywhere
    train: np.ndarray  # [S, R] per round (learned: non-finite -> inf; baselines: finite seeds only)
    test_loss: np.ndarray  # [S, E]
    test_accuracy: np.ndarray  # [S, E]
    outer_valid: np.ndarray  # [S, E]

    @property
    def seeds(self) -> int:
        return self.curves.train_loss.shape[0]

    @property
    def name(self) -> str:
        return self.curves.method

    def mean(self, metric: str) -> np.ndarray:
        return getattr(self, metric).mean(axis=0) if len(getattr(self, metric)) else np.array([])

    def smoothed_train(self) -> np.ndarray:
        """[R] trailing mean over TRAIN_TAIL rounds of the seed-mean train loss (inf where any is)."""
        return trailing_mean(self.mean("train"))


class Judgement(NamedTuple):
    """A group's rows, the rounds they were compared at, and what the verdict says."""

    rows: list[Stats]
    rounds: np.ndarray  # evaluations common to every row, round 0 excluded
    judged: np.ndarray  # the evaluations the verdict reads
    targets: dict  # {"accuracy"|"train": (value, baseline, {row name: rounds or None})}
    lines: list[str]


def trailing_mean(curve: np.ndarray) -> np.ndarray:
    """Trailing mean over TRAIN_TAIL rounds: one round's loss is too noisy to compare.

    Summed per window, not as differences of a running sum: a finite spike (a loss of 1e16 that
    recovers) would cancel every later window to 0 there."""
    if not len(curve):
        return np.asarray(curve, dtype=float)
    pad = TRAIN_TAIL - 1
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.zeros(pad), curve]), TRAIN_TAIL)
    counts = np.minimum(np.arange(1, len(curve) + 1), TRAIN_TAIL)
    finite = np.isfinite(windows).all(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf and NaN windows are replaced just below
        return np.where(finite, windows.sum(axis=1) / counts, np.inf)


def stats(c: Curves, rounds: np.ndarray) -> Stats:
    """The seeds the verdict counts, at ``rounds``."""
    at = np.searchsorted(c.eval_rounds, rounds)
    evals = {"test_loss": c.test_loss[:, at], "test_accuracy": c.test_accuracy[:, at],
             "outer_valid": c.outer_valid_loss[:, at]}
    finite = np.isfinite(c.train_loss).all(1) & np.all([np.isfinite(getattr(c, k)).all(1) for k in
                                                        ("test_loss", "test_accuracy", "outer_valid_loss")], axis=0)
    if c.learned:  # its diverged seeds count against it
        loss = lambda v: np.where(np.isfinite(v), v, np.inf)
        return Stats(c, int((~finite).sum()), loss(c.train_loss), loss(evals["test_loss"]),
                     np.where(np.isfinite(evals["test_accuracy"]), evals["test_accuracy"], 0.0),
                     loss(evals["outer_valid"]))
    return Stats(c, int((~finite).sum()), c.train_loss[finite], *(v[finite] for v in evals.values()))


def common_rounds(curves: list[Curves], title: str) -> np.ndarray:
    """The evaluation rounds (after round 0) every row has; a one-line error when there is none."""
    common = set(curves[0].eval_rounds.tolist())
    for c in curves[1:]:
        common &= set(c.eval_rounds.tolist())
    common.discard(0)
    if not common:
        every = "; ".join(f"{c.method}: every {int(c.eval_rounds[1] - c.eval_rounds[0])}" for c in curves
                          if len(c.eval_rounds) > 1)
        raise UserError(f"{title}: no evaluation round common to all methods ({every}): rerun with one eval_every")
    return np.array(sorted(common))


def _num(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else "diverged"


def rounds_to(values: np.ndarray, rounds: np.ndarray, reached) -> int | None:
    """The first of ``rounds`` at which ``reached(values)`` holds."""
    hit = reached(values)
    return int(rounds[np.argmax(hit)]) if hit.any() else None


def time_to_target(rows: list[Stats], rounds: np.ndarray) -> dict:
    """Rounds each row needs to reach the best baseline's final test accuracy and final train loss."""
    baselines = [s for s in rows if not s.curves.learned and len(s.train)]
    every_round = np.arange(1, rows[0].train.shape[1] + 1)
    acc = {s.name: s.mean("test_accuracy")[-1] for s in baselines}
    train = {s.name: s.smoothed_train()[-1] for s in baselines}
    best_acc, best_train = max(acc, key=acc.get), min(train, key=train.get)
    return {"accuracy": (acc[best_acc], best_acc, {s.name: rounds_to(s.mean("test_accuracy"), rounds,
                                                                     lambda v: v >= acc[best_acc]) for s in rows}),
            "train": (train[best_train], best_train, {s.name: rounds_to(s.smoothed_train(), every_round,
                                                                        lambda v: v <= train[best_train]) for s in rows})}


def _target_text(what: str, target: tuple, row: Stats, baselines: list[Stats], first: int = 1) -> str:
    """'<rounds> rounds to <owner>'s final <what> (<ratio> the fastest baseline, ...)'; ``first``: the
    earliest round it can be read at (a fastest baseline there leaves no finer ratio to measure)."""
    value, owner, reached = target
    fastest = min((s.name for s in baselines if reached[s.name]), key=lambda n: reached[n])
    mine = reached[row.name]
    ratio = f"{mine / reached[fastest]:.2g}× the fastest baseline" if mine else "never reached"
    grid = ", the first evaluation" if reached[fastest] == first else ""
    return (f"{mine or '> ' + str(row.train.shape[1])} rounds to {owner}'s final {what} {value:.4g} ({ratio}, "
            f"{fastest} at {reached[fastest]}{grid})")


def _check(label: str, ok: np.ndarray, mine: np.ndarray, best: np.ndarray, owner: list[str], rounds: np.ndarray,
           excess: np.ndarray, by) -> str:
    """'<label> at a of N evaluations', and where, by how much and against whom it missed."""
    text = f"{label} at {int(ok.sum())} of {len(ok)} evaluations"
    missed = np.flatnonzero(~ok)
    if not len(missed):
        return text
    where = lambda i: f"round {rounds[i]}: {_num(mine[i])} vs {owner[i]}'s {_num(best[i])}, {by(mine[i], best[i])}"
    worst = missed[np.argmax(np.nan_to_num(excess[missed], nan=np.inf))]
    return (f"{text}; misses {len(missed)}, first at {where(missed[0])}"
            + (f"; largest at {where(worst)}" if worst != missed[0] else ""))


def _ratio(mine: float, best: float) -> str:
    return "counted as infinite" if not np.isfinite(mine) else f"{mine / best:.3g}× it" if best > 0 else "above it"


def verdict_line(row: Stats, baselines: list[Stats], rounds: np.ndarray, judged: np.ndarray, targets: dict,
                 against: str = "") -> str:
    """What holds for one learned method, criterion by criterion (``against``: which baselines, when not all)."""
    at = np.searchsorted(rounds, judged)
    names = [s.name for s in baselines]
    per_round = lambda metric: np.stack([s.mean(metric)[at] for s in baselines])  # [B, J]
    train_b = np.stack([s.smoothed_train()[judged - 1] for s in baselines])
    loss_b, acc_b = per_round("test_loss"), per_round("test_accuracy")
    train, loss, acc = row.smoothed_train()[judged - 1], row.mean("test_loss")[at], row.mean("test_accuracy")[at]
    lo_train, lo_loss, hi_acc = train_b.argmin(0), loss_b.argmin(0), acc_b.argmax(0)
    cols = np.arange(len(judged))
    best_train, best_loss, best_acc = train_b[lo_train, cols], loss_b[lo_loss, cols], acc_b[hi_acc, cols]
    ok = {"train": train < best_train, "acc": acc >= best_acc - ACCURACY_SLACK,
          "loss": loss <= best_loss * (1 + TEST_LOSS_SLACK)}
    checks = [
        _check("(1) train loss below every baseline's", ok["train"], train, best_train, [names[i] for i in lo_train],
               judged, train / best_train, _ratio),
        _check(f"(2) test accuracy within {ACCURACY_SLACK * 100:g} points of the best baseline's", ok["acc"], acc,
               best_acc, [names[i] for i in hi_acc], judged, best_acc - acc,
               lambda m, b: f"{(b - m) * 100:.3g} points below"),
        _check(f"(3) test loss within {TEST_LOSS_SLACK:.0%} of the best baseline's", ok["loss"], loss, best_loss,
               [names[i] for i in lo_loss], judged, loss / best_loss, _ratio)]
    gap = lambda s: s.mean("test_loss")[-1] - s.mean("outer_valid")[-1]
    gaps = [gap(s) for s in baselines]
    gap_text = (f"generalisation gap at round {rounds[-1]} (test − outer-valid loss, the split it was tuned/"
                f"meta-trained on): {_num(gap(row))}, the baselines' {min(gaps):.3g} to {max(gaps):.3g}")
    holds = all(v.all() for v in ok.values())
    diverged = (f" {row.diverged} of {row.seeds} seeds diverged, counted against it (infinite loss, zero "
                "accuracy)." if row.diverged else "")
    return (f"- **{row.name}**{against} {'holds' if holds else 'does not hold'} on the test split.{diverged} "
            + "; ".join(checks) + "; (4) time to target: "
            + _target_text("test accuracy", targets["accuracy"], row, baselines, first=int(rounds[0])) + ", "
            + _target_text("train loss", targets["train"], row, baselines) + "; " + gap_text + ".")


def judge(curves: list[Curves], title: str) -> Judgement:
    """The group's verdict: a preamble saying what was compared, then one line per learned method."""
    rounds = common_rounds(curves, title)
    rows = [stats(c, rounds) for c in curves]
    baselines = [s for s in rows if not s.curves.learned and len(s.train)]
    judged = rounds[rounds >= FROM_ROUND] if (rounds >= FROM_ROUND).any() else rounds
    start = (f"from round {FROM_ROUND}" if judged[0] >= FROM_ROUND else
             f"from the first evaluation, round {judged[0]} (the runs are shorter than {FROM_ROUND} rounds)")
    lines = [f"Verdict on the test split, at the {len(judged)} evaluations {start} to round {judged[-1]} common to "
             f"every row; seed means; against the best tuned baseline at each round, per metric; train loss as the "
             f"mean of the {TRAIN_TAIL} rounds up to each evaluation."]
    for s in rows:
        if not s.curves.learned and s.diverged:
            lines.append(f"- {s.name}: {s.diverged} of {s.seeds} seeds diverged; " +
                         (f"counted with its {len(s.train)} finite seeds (marked †)." if len(s.train) else
                          "no finite seed, so it is nobody's reference."))
    if not any(s.curves.learned for s in rows):
        return Judgement(rows, rounds, judged, time_to_target(rows, rounds) if baselines else {},
                         lines[1:] + ["No learned method ran in this group: nothing to judge."])
    if not baselines:
        return Judgement(rows, rounds, judged, {}, lines + ["- no baseline with a finite seed: nothing to judge against."])
    targets = time_to_target(rows, rounds)
    learned = [s for s in rows if s.curves.learned]
    lines += [verdict_line(s, baselines, rounds, judged, targets) for s in learned]
    fedavg = [s for s in baselines if s.name == FEDAVG]
    if fedavg and len(baselines) > 1:  # the goal on unseen tasks reads tuned FedAvg alone
        versus = time_to_target(learned + fedavg, rounds)
        lines += [verdict_line(s, fedavg, rounds, judged, versus, against=", against tuned FedAvg alone,")
                  for s in learned]
    return Judgement(rows, rounds, judged, targets, lines)
