"""Judge: each learned method against the baselines of its group, as data (numpy only).

On seed means, at every evaluation from round 100 on (runs shorter than that: from their first
evaluation), against the best baseline *at that round, per metric*, on one split:

1. train loss (mean of the ``TRAIN_TAIL`` rounds up to the evaluation) lower than every baseline's;
2. accuracy at most ``ACCURACY_SLACK`` below the best baseline's;
3. loss at most ``LOSS_SLACK`` above the best baseline's;
4. time to target (as in AlgoPerf): rounds to the best baseline's final accuracy and final train
   loss, beside each baseline's.

SPEC 5: ``split="outer_valid"`` is the validation verdict, the one every choice reads
(``recommend``); ``split="test"`` reports on what was chosen and is read by nothing that chooses.

Where tuned FedAvg is one of several baselines, each learned method is judged a second time
against FedAvg alone (the goal on tasks outside the meta-training family); without a tuned FedAvg
row, against the untuned ones, marked so.

Evaluations: the reference is the evaluation rounds every baseline has; a baseline evaluated so
sparsely that it would shrink them is left out of the reference (noted). Each learned row is judged
at its own evaluations among the reference's, so a sparse row never shrinks another's.

Diverged seeds are data: a baseline counts with its finite seeds (noted), a learned method's
diverged seeds count against it (infinite loss, zero accuracy).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lagg_pipeline.report.curves import FEDAVG, Curves, GroupKey

TRAIN_TAIL = 10  # train loss is the trailing mean of this many rounds: one round is noisy
FROM_ROUND = 100
ACCURACY_SLACK = 0.005  # half a point
# Accuracies are seed means of example fractions, so a gap of exactly half a point is common, and
# float rounding (1e-16 in float64, ~6e-8 in the archive's float32) must not decide that tie: it
# meets "at most half a point below" as written, whichever file the curves were read from. So is
# an accuracy equal to the time-to-target's (the same seed-mean fraction summed in another order).
ACCURACY_TIE = 1e-6
LOSS_SLACK = 0.10  # 10%
SPLITS = {"test": ("test_loss", "test_accuracy"), "outer_valid": ("outer_valid", "outer_valid_accuracy")}


class Stats(NamedTuple):
    """One row's seeds as the verdict counts them, at its own evaluations after round 0."""

    curves: Curves
    diverged: int  # seeds with a non-finite value anywhere
    rounds: np.ndarray  # [E] its evaluation rounds
    train: np.ndarray  # [S, R] per round (learned: non-finite -> inf; baselines: finite seeds only)
    test_loss: np.ndarray  # [S, E]
    test_accuracy: np.ndarray  # [S, E]
    outer_valid: np.ndarray  # [S, E] loss
    outer_valid_accuracy: np.ndarray | None  # [S, E]; None: not measured by its runs

    @property
    def seeds(self) -> int:
        return self.curves.train_loss.shape[0]

    @property
    def name(self) -> str:
        return self.curves.method

    def mean(self, metric: str) -> np.ndarray:
        values = getattr(self, metric)
        return values.mean(axis=0) if len(values) else np.array([])

    def at(self, metric: str, rounds: np.ndarray) -> np.ndarray:
        """[len(rounds)] seed mean of ``metric`` at ``rounds`` (each one of this row's evaluations)."""
        return self.mean(metric)[np.searchsorted(self.rounds, rounds)]

    def smoothed_train(self) -> np.ndarray:
        """[R] trailing mean over TRAIN_TAIL rounds of the seed-mean train loss (inf where any is)."""
        return trailing_mean(self.mean("train"))


class Check(NamedTuple):
    """One criterion at the judged evaluations [J]."""

    ok: np.ndarray  # [J] bool
    mine: np.ndarray  # [J]
    best: np.ndarray  # [J] the best baseline's value
    owner: list[str]  # [J] whose it is
    excess: np.ndarray  # [J] how far past the bound (the worst miss is its largest)


class Target(NamedTuple):
    """Rounds to one baseline's final value."""

    value: float
    owner: str
    reached: dict  # {row name: first round at which it reaches value, or None}
    fastest: str | None  # the first baseline to reach it


class Verdict(NamedTuple):
    name: str
    against: list[str]  # the baselines' names
    fedavg_alone: str  # "" against every baseline, "tuned" / "untuned" against FedAvg alone
    judged: np.ndarray  # [J] the evaluations read
    checks: dict  # {"train" | "accuracy" | "loss": Check}
    targets: dict  # {"accuracy" | "train": Target}
    first_eval: int  # the reference's first evaluation (a target reached there has no finer ratio)
    gap: tuple | None  # (its, the baselines' min, max) final test − outer-valid loss; test split only

    @property
    def holds(self) -> bool:
        return all(c.ok.all() for c in self.checks.values())


class Note(NamedTuple):
    """Something the reader must know about a row: ``kind`` in "diverged" (a baseline's seeds),
    "sparse" (a baseline left out of the reference), "unjudged" (a learned row with no evaluation
    among the reference's), "unmeasured" (no outer-valid accuracy in its runs)."""

    kind: str
    name: str
    numbers: tuple = ()


class Judgement(NamedTuple):
    """A group's rows, the evaluations they were compared at, and the verdicts."""

    split: str  # "test" | "outer_valid"
    rows: list[Stats]
    reference: list[Stats]  # the baselines judged against
    rounds: np.ndarray  # the reference's evaluations
    targets: dict  # {"accuracy" | "train": Target} against every reference baseline, for every row
    verdicts: list[Verdict]  # against every reference baseline, one per judged learned row
    alone: list[Verdict]  # against FedAvg alone
    notes: list[Note]


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


def stats(c: Curves) -> Stats:
    """The seeds the verdict counts, at the row's evaluations after round 0."""
    keep = c.eval_rounds > 0
    evals = [c.test_loss[:, keep], c.test_accuracy[:, keep], c.outer_valid_loss[:, keep],
             None if c.outer_valid_accuracy is None else c.outer_valid_accuracy[:, keep]]
    finite = np.isfinite(c.train_loss).all(1) & np.all([np.isfinite(v).all(1) for v in evals if v is not None], axis=0)
    if c.learned:  # its diverged seeds count against it
        loss = lambda v: np.where(np.isfinite(v), v, np.inf)
        accuracy = lambda v: None if v is None else np.where(np.isfinite(v), v, 0.0)
        return Stats(c, int((~finite).sum()), c.eval_rounds[keep], loss(c.train_loss), loss(evals[0]),
                     accuracy(evals[1]), loss(evals[2]), accuracy(evals[3]))
    return Stats(c, int((~finite).sum()), c.eval_rounds[keep], c.train_loss[finite],
                 *(None if v is None else v[finite] for v in evals))


def finite_baselines(rows: list[Stats]) -> list[Stats]:
    """The baselines that can be a reference: those with at least one finite seed."""
    return [s for s in rows if not s.curves.learned and len(s.train)]


def _intersect(rows: list[Stats]) -> np.ndarray:
    common = set(rows[0].rounds.tolist())
    for s in rows[1:]:
        common &= set(s.rounds.tolist())
    return np.array(sorted(common), dtype=int)


def reference_rounds(baselines: list[Stats]) -> tuple[list[Stats], np.ndarray, list[Stats]]:
    """(kept baselines, their common evaluations, the sparse ones left out): the sparsest baseline is
    left out while keeping it would shrink the evaluations the others share."""
    kept, sparse = sorted(baselines, key=lambda s: -len(s.rounds)), []
    while len(kept) > 1 and len(_intersect(kept[:-1])) > len(_intersect(kept)):
        sparse.append(kept.pop())
    return [s for s in baselines if s in kept], _intersect(kept), sparse


def rounds_to(values: np.ndarray, rounds: np.ndarray, reached) -> int | None:
    """The first of ``rounds`` at which ``reached(values)`` holds."""
    hit = reached(values)
    return int(rounds[np.argmax(hit)]) if hit.any() else None


def time_to_target(rows: list[Stats], baselines: list[Stats], accuracy: str) -> dict:
    """Rounds each row needs to reach the best baseline's final ``accuracy`` and final train loss."""
    every_round = np.arange(1, rows[0].train.shape[1] + 1)
    final_acc = {s.name: s.mean(accuracy)[-1] for s in baselines}
    final_train = {s.name: s.smoothed_train()[-1] for s in baselines}
    best_acc, best_train = max(final_acc, key=final_acc.get), min(final_train, key=final_train.get)
    acc_reached = {s.name: rounds_to(s.mean(accuracy), s.rounds, lambda v: v >= final_acc[best_acc] - ACCURACY_TIE)
                   for s in rows}
    train_reached = {s.name: rounds_to(s.smoothed_train(), every_round, lambda v: v <= final_train[best_train])
                     for s in rows}
    fastest = lambda reached: min((b.name for b in baselines if reached[b.name]), key=reached.get, default=None)
    return {"accuracy": Target(final_acc[best_acc], best_acc, acc_reached, fastest(acc_reached)),
            "train": Target(final_train[best_train], best_train, train_reached, fastest(train_reached))}


def verdict(row: Stats, baselines: list[Stats], judged: np.ndarray, split: str, targets: dict, first_eval: int,
            fedavg_alone: str = "") -> Verdict:
    """What holds for one learned method, criterion by criterion, at ``judged``."""
    loss_key, acc_key = SPLITS[split]
    names = [s.name for s in baselines]
    train_b = np.stack([s.smoothed_train()[judged - 1] for s in baselines])  # [B, J]
    loss_b = np.stack([s.at(loss_key, judged) for s in baselines])
    acc_b = np.stack([s.at(acc_key, judged) for s in baselines])
    train, loss, acc = row.smoothed_train()[judged - 1], row.at(loss_key, judged), row.at(acc_key, judged)
    lo_train, lo_loss, hi_acc = train_b.argmin(0), loss_b.argmin(0), acc_b.argmax(0)
    cols = np.arange(len(judged))
    best_train, best_loss, best_acc = train_b[lo_train, cols], loss_b[lo_loss, cols], acc_b[hi_acc, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        checks = {"train": Check(train < best_train, train, best_train, [names[i] for i in lo_train], train / best_train),
                  "accuracy": Check(best_acc - acc <= ACCURACY_SLACK + ACCURACY_TIE, acc, best_acc, [names[i] for i in hi_acc],
                                    best_acc - acc),
                  "loss": Check(loss <= best_loss * (1 + LOSS_SLACK), loss, best_loss, [names[i] for i in lo_loss],
                                loss / best_loss)}
    gap = None
    if split == "test":
        final_gap = lambda s: s.mean("test_loss")[-1] - s.mean("outer_valid")[-1]
        gaps = [final_gap(s) for s in baselines]
        gap = (final_gap(row), min(gaps), max(gaps))
    return Verdict(row.name, names, fedavg_alone, judged, checks, targets, first_eval, gap)


def judged_rounds(row: Stats, reference: np.ndarray) -> np.ndarray:
    """The row's evaluations among the reference's, from FROM_ROUND on (shorter runs: all of them)."""
    mine = np.intersect1d(row.rounds, reference)
    return mine[mine >= FROM_ROUND] if (mine >= FROM_ROUND).any() else mine


def judge(curves: list[Curves], split: str = "test") -> Judgement:
    """The group's judgement on ``split`` ("test" or "outer_valid")."""
    rows = [stats(c) for c in curves]
    loss_key, acc_key = SPLITS[split]
    notes = [Note("diverged", s.name, (s.diverged, s.seeds, len(s.train)))
             for s in rows if not s.curves.learned and s.diverged]
    measured = [s for s in rows if getattr(s, acc_key) is not None]
    notes += [Note("unmeasured", s.name) for s in rows if getattr(s, acc_key) is None]
    candidates = finite_baselines(measured)
    if not candidates:
        return Judgement(split, rows, [], np.array([], dtype=int), {}, [], [], notes)
    reference, rounds, sparse = reference_rounds(candidates)
    notes += [Note("sparse", s.name, (len(s.rounds), len(_intersect(reference)))) for s in sparse]
    learned = [s for s in measured if s.curves.learned]
    targets = time_to_target(measured, reference, acc_key)
    judged = {s.name: judged_rounds(s, rounds) for s in learned}
    notes += [Note("unjudged", s.name, (tuple(s.rounds.tolist()), tuple(rounds.tolist())))
              for s in learned if not len(judged[s.name])]
    learned = [s for s in learned if len(judged[s.name])]
    first = int(rounds[0])
    verdicts = [verdict(s, reference, judged[s.name], split, targets, first) for s in learned]
    fedavg = [s for s in reference if s.curves.optimizer == FEDAVG]
    tuned = [s for s in fedavg if s.curves.tuned]
    alone = []
    if fedavg and len(fedavg) < len(reference):  # the goal on unseen tasks reads FedAvg alone
        versus, kind = (tuned, "tuned") if tuned else (fedavg, "untuned")
        versus_targets = time_to_target(learned + versus, versus, acc_key) if learned else {}
        alone = [verdict(s, versus, judged[s.name], split, versus_targets, first, kind) for s in learned]
    return Judgement(split, rows, reference, rounds, targets, verdicts, alone, notes)


class Judged(NamedTuple):
    """A group judged twice: on outer-valid (what choices read) and on test (what is reported)."""

    key: GroupKey
    seeds: list[int]  # the rows' seed counts
    test: Judgement
    valid: Judgement


def judge_groups(groups: dict[GroupKey, list[Curves]]) -> list[Judged]:
    """Every group judged on both splits."""
    return [Judged(key, sorted({c.train_loss.shape[0] for c in curves}), judge(curves, "test"),
                   judge(curves, "outer_valid")) for key, curves in groups.items()]
