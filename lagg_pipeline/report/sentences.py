"""Render, in words: the verdict of a :class:`~lagg_pipeline.report.judge.Judgement` as the
sentences below each scorecard, for whoever wants every number."""
from __future__ import annotations

import numpy as np

from lagg_pipeline.report.judge import (ACCURACY_SLACK, FROM_ROUND, LOSS_SLACK, TRAIN_TAIL, Check, Judgement, Note,
                                        Target, Verdict)

SPLIT_NAMES = {"test": "the test split", "outer_valid": "the outer-valid split"}
METRIC_NAMES = {"test": "test", "outer_valid": "outer-valid"}
AGAINST = {"": "", "tuned": ", against tuned FedAvg alone,", "untuned": ", against FedAvg alone (untuned),"}


def num(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else "diverged"


def _ratio(mine: float, best: float) -> str:
    return "counted as infinite" if not np.isfinite(mine) else f"{mine / best:.3g}× it" if best > 0 else "above it"


def check_text(label: str, check: Check, judged: np.ndarray, by) -> str:
    """'<label> at a of N evaluations', and where, by how much and against whom it missed."""
    text = f"{label} at {int(check.ok.sum())} of {len(check.ok)} evaluations"
    missed = np.flatnonzero(~check.ok)
    if not len(missed):
        return text
    where = lambda i: (f"round {judged[i]}: {num(check.mine[i])} vs {check.owner[i]}'s {num(check.best[i])}, "
                       f"{by(check.mine[i], check.best[i])}")
    worst = missed[np.argmax(np.nan_to_num(check.excess[missed], nan=np.inf))]
    return (f"{text}; misses {len(missed)}, first at {where(missed[0])}"
            + (f"; largest at {where(worst)}" if worst != missed[0] else ""))


def criteria(split: str) -> dict[str, str]:
    metric = METRIC_NAMES[split]
    return {"train": "(1) train loss below every baseline's",
            "accuracy": f"(2) {metric} accuracy within {ACCURACY_SLACK * 100:g} points of the best baseline's",
            "loss": f"(3) {metric} loss within {LOSS_SLACK:.0%} of the best baseline's"}


def target_text(what: str, target: Target, name: str, horizon: int, first: int = 1) -> str:
    """'<rounds> rounds to <owner>'s final <what> (<ratio> the fastest baseline, ...)'; ``first``: the
    earliest round it can be read at (a fastest baseline there leaves no finer ratio to measure)."""
    mine, fastest = target.reached[name], target.fastest
    if fastest is None:
        return f"{mine or '> ' + str(horizon)} rounds to {target.owner}'s final {what} {target.value:.4g}"
    at = target.reached[fastest]
    ratio = f"{mine / at:.2g}× the fastest baseline" if mine else "never reached"
    grid = ", the first evaluation" if at == first else ""
    return (f"{mine or '> ' + str(horizon)} rounds to {target.owner}'s final {what} {target.value:.4g} ({ratio}, "
            f"{fastest} at {at}{grid})")


def verdict_line(v: Verdict, split: str, diverged: int, seeds: int, horizon: int) -> str:
    labels, metric = criteria(split), METRIC_NAMES[split]
    by = {"train": _ratio, "accuracy": lambda m, b: f"{(b - m) * 100:.3g} points below", "loss": _ratio}
    checks = [check_text(labels[k], v.checks[k], v.judged, by[k]) for k in ("train", "accuracy", "loss")]
    gap = ""
    if v.gap is not None:
        mine, low, high = v.gap
        gap = (f"; generalisation gap at round {horizon} (test − outer-valid loss, the split it was tuned/"
               f"meta-trained on): {num(mine)}, the baselines' {low:.3g} to {high:.3g}")
    lost = (f" {diverged} of {seeds} seeds diverged, counted against it (infinite loss, zero accuracy)."
            if diverged else "")
    return (f"- **{v.name}**{AGAINST[v.fedavg_alone]} {'holds' if v.holds else 'does not hold'} on "
            f"{SPLIT_NAMES[split]}.{lost} " + "; ".join(checks)
            + "; (4) time to target: "
            + target_text(f"{metric} accuracy", v.targets["accuracy"], v.name, horizon, first=v.first_eval) + ", "
            + target_text("train loss", v.targets["train"], v.name, horizon) + gap + ".")


def note_line(note: Note, split: str) -> str:
    if note.kind == "diverged":
        diverged, seeds, finite = note.numbers
        return f"- {note.name}: {diverged} of {seeds} seeds diverged; " + (
            f"counted with its {finite} finite seeds (marked †)." if finite else
            "no finite seed, so it is nobody's reference.")
    if note.kind == "sparse":
        mine, others = note.numbers
        return (f"- {note.name}: evaluated at {mine} rounds, where the other baselines share {others}: left out of "
                f"the reference so that it shrinks nobody's evaluations.")
    if note.kind == "unjudged":
        mine, theirs = (", ".join(map(str, r[:6])) + (", …" if len(r) > 6 else "") for r in note.numbers)
        return (f"- {note.name}: none of its evaluations (rounds {mine}) is among the baselines' (rounds {theirs}): "
                f"not judged; rerun it with their eval_every.")
    return f"- {note.name}: its runs did not measure outer-valid accuracy (logged before it was): no {split} verdict."


def lines(j: Judgement) -> list[str]:
    """The preamble saying what was compared, the notes, then one line per verdict."""
    notes = [note_line(n, j.split) for n in j.notes if n.kind != "unmeasured" or j.split == "outer_valid"]
    learned = [s for s in j.rows if s.curves.learned]
    if not learned:
        return notes + ["No learned method ran in this group: nothing to judge."]
    if not j.reference:
        return notes + ["- no baseline with a finite seed: nothing to judge against."]
    start = (f"from round {FROM_ROUND}" if j.rounds[-1] >= FROM_ROUND else
             f"from the first evaluation, round {j.rounds[0]} (the runs are shorter than {FROM_ROUND} rounds)")
    judged = j.rounds[j.rounds >= FROM_ROUND] if j.rounds[-1] >= FROM_ROUND else j.rounds
    head = (f"Verdict on {SPLIT_NAMES[j.split]}, at the {len(judged)} evaluations {start} to round {judged[-1]} "
            f"the {len(j.reference)} baselines share (a row evaluated more sparsely: at its own among them); seed "
            f"means; against the best baseline at each round, per metric; train loss as the mean of the {TRAIN_TAIL} "
            f"rounds up to each evaluation.")
    horizon = j.rows[0].train.shape[1]
    by_name = {s.name: s for s in j.rows}
    said = lambda v: verdict_line(v, j.split, by_name[v.name].diverged, by_name[v.name].seeds, horizon)
    return [head, *notes, *map(said, j.verdicts), *map(said, j.alone)]
