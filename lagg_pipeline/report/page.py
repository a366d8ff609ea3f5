"""Render, in tables: per group a scorecard on the test split, the outer-valid scorecard (the split
choices are made on), the held-out table, the time to target, the verdict sentences and a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lagg_pipeline.report import sentences
from lagg_pipeline.report.curves import GroupKey
from lagg_pipeline.report.judge import TRAIN_TAIL, Check, Judged, Judgement, Stats, Verdict, finite_baselines
from lagg_pipeline.report.plots import plot_group
from lagg_pipeline.report.recommend import choose, time_ratio

SPLITS = ("Which split decides what (SPEC 5): *train* drives the inner optimisation; *outer-valid* tuned the "
          "baselines and is the split every choice among learned aggregators reads (the validation verdict, "
          "`make recommend`); *inner-valid* is free for a meta-objective; *test* is read by this report and nothing "
          "else, so every claim below reads the test split. Outer-valid numbers appear as the split a method was "
          "chosen (or tuned) on.")
TABLE_ROUNDS = (100, 250)  # besides the last evaluation


def title(j: Judged) -> str:
    return f"{j.key.title}: {j.key.rounds} rounds, {'/'.join(map(str, j.seeds))} seeds"


PAPER_TRAIN = 48_000  # the paper's Fashion-MNIST training images: 1000 rounds at K=8, H=4, B=128 are ~85 epochs


def epochs(j: Judged) -> tuple[float, int] | None:
    """(epochs per round, the train split's size) of the group (a round draws K·H·B examples);
    None for a task whose config the package no longer holds."""
    from importlib import resources

    from omegaconf import OmegaConf

    from lagg_pipeline.config import CONFIG_PACKAGE
    from lagg_pipeline.data import split_sizes

    entry = resources.files(CONFIG_PACKAGE).joinpath("task", f"{j.key.task}.yaml")
    if not entry.is_file():
        return None
    train = split_sizes(OmegaConf.create(entry.read_text()).dataset)["train"]
    return j.key.K * j.key.H * j.key.B / train, train


def regime(j: Judged) -> str:
    """The training length in epochs, beside the paper's at the same K, H, B and rounds, and the data
    regime: the paper's when the train split is within 1.5x of its size, else small-data."""
    found = epochs(j)
    if found is None:
        return "epochs unknown"
    per_round, train = found
    paper = j.key.K * j.key.H * j.key.B * j.key.rounds / PAPER_TRAIN
    kind = "the paper's data regime" if train * 1.5 >= PAPER_TRAIN else "small-data regime"
    return f"{per_round * j.key.rounds:,.0f} epochs ({per_round:.2g} a round; the paper's: {paper:,.0f}): {kind}"


def _minutes(seconds: list[float | None]) -> str:
    known = [s for s in seconds if s is not None]
    if not known:
        return "not recorded"
    missing = len(seconds) - len(known)
    return f"{sum(known) / 60:,.0f} min" + (f" ({missing} of {len(seconds)} not recorded)" if missing else "")


def tuning_minutes(key: GroupKey) -> list[float | None]:
    """Each baseline's grid wall time at the group's task, H, K and clients (its tuned file's
    ``grid_minutes``); over clients, only the grids run over them (not the i.i.d. fallback)."""
    from lagg_pipeline.report.collect import BASELINE_ORDER
    from lagg_pipeline.tuning import lookup

    entries = [lookup(key.task, name, key.H, key.K, None, key.partition) for name in BASELINE_ORDER]
    return [e["grid_minutes"] * 60 if "grid_minutes" in e else None
            for e in entries if e is not None and e["partition"] == key.partition]


def cost_table(judged: list[Judged]) -> list[str]:
    """What regenerating each group took on the machine that measured it: the baselines' grids
    (summed ``grid_minutes`` of the tuned files) and the group's benchmark runs (summed run times)."""
    rows, all_grids, all_runs = [], [], []
    for j in judged:
        tuned, runs = tuning_minutes(j.key), [s.curves.run_seconds for s in j.test.rows]
        all_grids += tuned
        all_runs += runs
        rows.append([j.key.title, f"{len(tuned)} tuned" if tuned else "none tuned",
                     _minutes(tuned) if tuned else "—", _minutes(runs)])
    if len(rows) > 1:  # what `make tune results` costs on one such machine, one job at a time
        rows.append(["**all groups**", "", _minutes(all_grids) if all_grids else "—", _minutes(all_runs)])
    return table(["group", "baselines", "their grids (`make tune`)", "its runs (`make results`)"], rows)


def image_name(j: Judged) -> str:
    from lagg_pipeline.data.partition import partition_slug

    k = j.key
    return f"{k.task}_K{k.K}_H{k.H}_B{k.B}_R{k.rounds}{partition_slug(k.partition)}.png"


def fmt(values: np.ndarray) -> str:
    if not len(values):
        return "diverged"
    mean = float(np.mean(values))
    return f"{mean:.4g} ± {float(np.std(values)):.2g}" if np.isfinite(mean) else "diverged"


def seeds_cell(s: Stats) -> str:
    if not s.diverged:
        return str(s.seeds)
    return f"{s.seeds}, {s.diverged} diverged" + (" (against it)" if s.curves.learned else " †")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _shorter(s: Stats, rounds: int) -> bool:
    """A tuned baseline whose values were chosen at a shorter horizon than ``rounds`` (or one its file does not say)."""
    return s.curves.tuned and (s.curves.tuned_rounds or 0) < rounds


def _horizon(s: Stats) -> str:
    return f"{s.curves.tuned_rounds} rounds" if s.curves.tuned_rounds else "an unrecorded horizon"


def against(j: Judgement) -> str:
    """How many baselines a verdict is judged against, how many are tuned, and how many of those
    were tuned at a shorter horizon than the one judged."""
    tuned = [s for s in j.reference if s.curves.tuned]
    short = [s for s in tuned if _shorter(s, int(j.rounds[-1]))]
    at = " or ".join(sorted({_horizon(s) for s in short}))
    if len(j.reference) == 1:
        optimizer = j.reference[0].curves.optimizer
        return f"{optimizer} only, tuned at {at}" if short else f"{'tuned' if tuned else 'untuned'} {optimizer} only"
    if len(short) == len(j.reference):
        return f"{len(j.reference)} baselines tuned at {at}"
    if len(tuned) == len(j.reference):
        return f"{len(j.reference)} tuned baselines" + (f" ({len(short)} of them at {at})" if short else "")
    return f"{len(j.reference)} baselines ({len(tuned)} tuned" + (f", {len(short)} of them at {at})" if short else ")")


def count_cell(check: Check, judged: np.ndarray, key: str) -> str:
    """'k/N' (bold when N/N), with the first and the worst miss."""
    k, n = int(check.ok.sum()), len(check.ok)
    if k == n:
        return f"**{k}/{n}**"
    missed = np.flatnonzero(~check.ok)
    worst = missed[np.argmax(np.nan_to_num(check.excess[missed], nan=np.inf))]
    return (f"{k}/{n}: first r{judged[missed[0]]} ({_miss(check, missed[0], key)}), "
            f"worst r{judged[worst]} ({_miss(check, worst, key)})")


def _miss(check: Check, i: int, key: str) -> str:
    """By how much evaluation ``i`` missed: points below for accuracy, × the best for losses."""
    if not np.isfinite(check.mine[i]):
        return "diverged"
    return f"{(check.best[i] - check.mine[i]) * 100:.2g} pt below" if key == "accuracy" else f"{check.excess[i]:.3g}×"


def time_cell(v: Verdict) -> str:
    ratio = time_ratio(v)
    target = v.targets["accuracy"]
    rounds = target.reached.get(v.name)
    return f"{rounds} ({ratio:.2g}×)" if rounds and np.isfinite(ratio) else str(rounds or "never")


def scorecard(j: Judgement, chosen: str | None = None) -> list[str]:
    """One row per judged method: k/N per criterion with first and worst miss, time to target, diverged
    seeds, and what it is judged against; ``chosen`` is marked."""
    if not j.verdicts:
        return []
    metric = sentences.METRIC_NAMES[j.split]
    header = ["method", "holds", "(1) train loss below every baseline's", f"(2) {metric} accuracy within 0.5 pt",
              f"(3) {metric} loss within 10%", f"(4) rounds to {j.targets['accuracy'].owner}'s final {metric} "
              f"accuracy (× fastest baseline)", "diverged seeds", "judged against"]
    by_name = {s.name: s for s in j.rows}
    rows = []
    for v in [*j.verdicts, *j.alone]:
        s = by_name[v.name]
        name = f"**{v.name}**" + (" (chosen)" if v.name == chosen and not v.fedavg_alone else "")
        versus = sentences.AGAINST[v.fedavg_alone].strip(", ") or against(j)
        rows.append([name, "yes" if v.holds else "no",
                     *(count_cell(v.checks[k], v.judged, k) for k in ("train", "accuracy", "loss")),
                     time_cell(v), f"{s.diverged}/{s.seeds}", versus])
    return table(header, rows)


def held_out_table(j: Judgement) -> list[str]:
    """Test accuracy and loss at rounds 100, 250 and the last; train loss; outer-valid beside test."""
    # the evaluations the baselines share; with no baseline, every row's
    rounds = j.rounds if len(j.rounds) else np.unique(np.concatenate([s.rounds for s in j.rows]))
    last = int(rounds[-1])
    marks = sorted({int(rounds[np.argmax(rounds >= m)]) for m in TABLE_ROUNDS if (rounds >= m).any()} - {last})
    marks.append(last)
    header = ["method", "settings", "seeds", *(f"test acc r{m}" for m in marks), *(f"test loss r{m}" for m in marks),
              f"train loss (last {TRAIN_TAIL} rounds)", f"outer-valid loss r{last} (the split it was chosen on)",
              f"gap r{last}: test − outer-valid"]
    at = lambda s, metric, m: fmt(getattr(s, metric)[:, int(np.searchsorted(s.rounds, m))]) if m in s.rounds else "—"
    rows = []
    for s in j.rows:
        tuned = ("" if s.curves.learned else f" (tuned at {_horizon(s)})" if _shorter(s, last)
                 else "" if s.curves.tuned else " (untuned)")
        rows.append([f"**{s.name}**" if s.curves.learned else s.name + tuned, s.curves.settings, seeds_cell(s),
                     *(at(s, "test_accuracy", m) for m in marks), *(at(s, "test_loss", m) for m in marks),
                     fmt(s.train[:, -TRAIN_TAIL:].mean(axis=1)), fmt(s.outer_valid[:, -1]),
                     fmt(s.test_loss[:, -1] - s.outer_valid[:, -1])])
    return table(header, rows)


def target_table(j: Judgement) -> list[str]:
    """Rounds to the best baseline's final accuracy and train loss, and the ratio to the fastest baseline."""
    if not j.targets:
        return []
    header, columns = ["method"], []
    metric = sentences.METRIC_NAMES[j.split]
    for kind, what in (("accuracy", f"{metric} accuracy"), ("train", "train loss")):
        target = j.targets[kind]
        header += [f"rounds to {target.owner}'s final {what} {target.value:.4g}", "× fastest baseline"]
        columns.append((target.reached, target.reached[target.fastest] if target.fastest else None))
    horizon = j.rows[0].train.shape[1]
    cells = lambda reached, fastest, name: ((str(reached[name]), f"{reached[name] / fastest:.2g}" if fastest else "—")
                                            if reached.get(name) else (f"> {horizon}", "—"))
    rows = [[f"**{s.name}**" if s.curves.learned else s.name,
             *(cell for reached, fastest in columns for cell in cells(reached, fastest, s.name))]
            for s in j.rows if s.name in columns[0][0]]
    return table(header, rows)


def section(j: Judged, image_prefix: str) -> list[str]:
    """One group's part of the page (its plot: ``image_prefix`` + :func:`image_name`)."""
    chosen = choose(j.valid)
    picked = f"; **{chosen.name}** ranks first among the shipped aggregators (what `make recommend` reads)" \
        if chosen else ""
    valid_card = scorecard(j.valid, chosen.name if chosen else None)
    targets = target_table(j.test)
    return [f"### {title(j)}", "", f"Training length: {regime(j)}. Wall time of its runs: "
            f"{_minutes([s.curves.run_seconds for s in j.test.rows])}.", "",
            f"Scorecard on the test split, judged against {against(j.test)}:"
            if j.test.reference else "No baseline with a finite seed.", "",
            *scorecard(j.test, chosen.name if chosen else None), "",
            f"![{title(j)}]({image_prefix}{image_name(j)})", "",
            *([f"On the outer-valid split, the split the choice was made on{picked}:", "", *valid_card, ""]
              if valid_card else []),
            *held_out_table(j.test), "",
            *(["Time to target (rounds; the best baseline's final value):", "", *targets, ""] if targets else []),
            *sentences.lines(j.test), ""]


def plot(judged: list[Judged], out: Path) -> list[Path]:
    """One plot per group, into ``out``."""
    return [plot_group(j.test, title(j), out / image_name(j)) for j in judged]


def markdown(judged: list[Judged], image_prefix: str = "", notes: Sequence[str] = ()) -> str:
    """The report's markdown; the plots lie under ``image_prefix``."""
    parts = [SPLITS, "", "Wall time on the machine that measured each group (2 cores, up to two jobs side by side; "
             "summed MLflow run times; tuned files and groups written before it was recorded say so):", "",
             *cost_table(judged), "", *(f"> {note}" for note in notes), *([""] if notes else [])]
    for j in judged:
        parts += section(j, image_prefix)
    return "\n".join(parts)
