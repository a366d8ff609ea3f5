"""Render, for the README: one row per comparison, built from the judgements (never from the
page's sentences). Each row names what it is judged against, the aggregator the outer-valid verdict
chose and that one's test scorecard (k/N per criterion), and the best of any learned row on test;
under it, for the paper's data regime, from which round each criterion holds and the last
evaluation's values; a second table holds the verdicts against FedAvg alone."""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from lagg_pipeline.report.judge import Check, Judged, Judgement, Verdict
from lagg_pipeline.report.page import against, regime, time_cell, title
from lagg_pipeline.report.recommend import choose, rank

HEADER = ("| comparison | epochs | judged against | chosen on outer-valid | holds on test | (1) train loss below every "
          "baseline's | (2) test accuracy within 0.5 pt of the best | (3) test loss within 10% of the best | (4) "
          "rounds to the best's final test accuracy (× fastest baseline) | best of any on test |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def shipped_label(name: str) -> str:
    """A shipped aggregator's label (variant@name) whose file the package no longer holds is marked, so
    the README never points at something a user cannot run."""
    from lagg_pipeline import pretrained

    shipped = {f"{variant}@{file}" for variant, file in pretrained.available()}
    return f"{name} (not shipped)" if re.fullmatch(r"\w+@\w+", name) and name not in shipped else name


def _counts(v: Verdict) -> list[str]:
    return [f"**{int(c.ok.sum())}/{len(c.ok)}**" if c.ok.all() else f"{int(c.ok.sum())}/{len(c.ok)}"
            for c in (v.checks[k] for k in ("train", "accuracy", "loss"))]


def _row(link: str, versus: str, chosen: Choice, test: list[Verdict]) -> str:
    """One comparison (``link`` holds its first two cells): the chosen row's test scorecard and the best
    test verdict of any row."""
    mine, chosen = next((v for v in test if v.name == chosen.name), None), chosen.shown
    best = max(test, key=rank)
    if mine is None:
        return f"| {link} | {versus} | {chosen} | not judged on test | — | — | — | — | — |"
    best_counts = ", ".join(f"{int(c.ok.sum())}/{len(c.ok)}" for c in best.checks.values())
    return (f"| {link} | {versus} | {chosen} | {'yes' if mine.holds else 'no'} | "
            + " | ".join(_counts(mine)) + f" | {time_cell(mine)} | {shipped_label(best.name)} ({best_counts}) |")


def since(check: Check, judged) -> str:
    """Over which evaluations a criterion holds: at every one, from a round on, or not at the last."""
    missed = np.flatnonzero(~check.ok)
    if not len(missed):
        return "at every evaluation"
    if missed[-1] == len(check.ok) - 1:
        return f"at {int(check.ok.sum())} of {len(check.ok)}, not at the last"
    return f"from round {judged[missed[-1] + 1]} on"


def standing(j: Judged, chosen: Choice) -> str | None:
    """One line on the chosen aggregator's test verdict: from which round each criterion holds, and
    its last evaluation's values beside the best baseline's (None: not judged on test)."""
    v, chosen = next((v for v in j.test.verdicts if v.name == chosen.name), None), chosen.shown
    if v is None:
        return None
    c = v.checks
    last = lambda check, f: f"{f(check.mine[-1])} vs {f(check.best[-1])} ({check.owner[-1]})"
    return (f"- **{j.key.title}**, {chosen}: (1) train loss {since(c['train'], v.judged)}, (2) test accuracy "
            f"{since(c['accuracy'], v.judged)}, (3) test loss {since(c['loss'], v.judged)}; at round "
            f"{v.judged[-1]}: test accuracy {last(c['accuracy'], '{:.3f}'.format)}, test loss "
            f"{last(c['loss'], '{:.3g}'.format)}, train loss {last(c['train'], '{:.3g}'.format)}.")


class Choice(NamedTuple):
    """The row the outer-valid verdict ranks first: its label (the verdicts' name) and how it is shown."""

    name: str
    shown: str


def _choice(valid: Judgement) -> Choice | None:
    """The row the outer-valid verdict ranks first: a shipped one, else any learned one (said)."""
    if shipped := choose(valid):
        return Choice(shipped.name, shipped_label(shipped.name))
    best = choose(valid, shipped_only=False)
    return Choice(best.name, f"{best.name} (none shipped ran)") if best else None


def headline(judged: list[Judged], link: str) -> str:
    """The README's tables; ``link``: the Results page relative to the README."""
    every, stands = [HEADER], []
    alone = ["Against FedAvg alone (the goal on tasks outside the meta-training family):", "",
                              HEADER]
    for j in sorted(judged, key=lambda j: "the paper's data regime" not in regime(j)):  # the main comparison first
        chosen = _choice(j.valid)
        if chosen is None or not j.test.verdicts:
            continue
        cell = f"[{j.key.title}]({link}#{anchor(title(j))}) | {regime(j)}"
        every.append(_row(cell, against(j.test), chosen, j.test.verdicts))
        if "the paper's data regime" in regime(j) and (line := standing(j, chosen)):
            stands.append(line)
        if j.test.alone:
            versus = f"{j.test.alone[0].fedavg_alone} FedAvg ({len(j.test.alone[0].against)} row" + \
                     ("s)" if len(j.test.alone[0].against) > 1 else ")")
            alone.append(_row(cell, versus, chosen, j.test.alone))
    stands = ["", "In the paper's data regime, where each chosen aggregator meets each criterion (test split) and "
              "its last evaluation beside the best baseline's:", "", *stands] if stands else []
    return "\n".join(every + stands + ([""] + alone if len(alone) > 3 else []))


def shipped_table() -> str:
    """The shipped aggregators, from their own metadata: settings, length and cost of meta-training."""
    from lagg_pipeline import pretrained

    lines = ["| optimizer | pretrained= | task | K | H | γ | clients | meta-loss | start | outer steps | meta-training "
             "| re-create |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, name), file in pretrained.available().items():
        m = pretrained.metadata(file)
        seconds = m.get("meta_train_seconds")
        minutes = f"{seconds / 60:.0f} min" if seconds else "?"
        minutes += " on one H200 GPU" if "H200" in str(m.get("meta_train_device", "")) else ""
        start = m.get("meta_init", "random")
        if m.get("started_from"):  # meta_init=saved: its steps and time come after those of the file it continues
            start, minutes = f"`{m['started_from']}`", f"{minutes} after `{m['started_from']}`'s"
        lines.append(f"| {variant} | `{name}` | {m.get('task')} | {m.get('num_grads')} | {m.get('num_local_steps')} | "
                     f"{m.get('local_learning_rate')} | {m.get('partition', 'iid')} | {pretrained.meta_loss_label(m)} | "
                     f"{start} | {m.get('outer_steps')} | "
                     f"{minutes} | `{m.get('command', '?')}` |")
    return "\n".join(lines)
