"""The report's page: per group, the test-split tables, time to target, the verdict and a plot.

Outer-valid numbers appear once, labelled as the split the baselines were tuned on (and the
``_ov`` aggregators meta-trained on), beside the test loss so the generalisation gap of a learned
aggregator can be compared with the baselines'.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from lagg_pipeline.comparison import Curves
from lagg_pipeline.data.partition import partition_slug
from lagg_pipeline.report import LOSS_FLOOR, TRAIN_TAIL, floored
from lagg_pipeline.verdict import Judgement, Stats, judge

SPLITS = ("Which split decides what (SPEC 5): *train* drives the inner optimisation; *outer-valid* tuned the "
          "baselines and is the meta-objective of the `_ov` aggregators; *inner-valid* is free for a meta-objective; "
          "*test* is read by this report and nothing else, so every verdict below reads the test split. Outer-valid "
          "numbers appear only as the split a method was tuned or meta-trained on.")
TABLE_ROUNDS = (100, 250)  # besides the last evaluation
PLOTTED_BASELINES = 3  # beside each learned aggregator: the best few, so the lines stay apart
ERROR_FLOOR = 1e-4


class Page(NamedTuple):
    key: tuple  # (task, K, H, rounds, partition)
    title: str
    curves: list[Curves]
    judgement: Judgement


def judge_all(groups: dict[tuple, list[Curves]]) -> list[Page]:
    """Every group judged (a group without a common evaluation is a one-line error)."""
    pages = []
    for key, curves in groups.items():
        task, k, h, rounds, partition = key
        seeds = sorted({c.train_loss.shape[0] for c in curves})
        clients = "" if partition == "iid" else f", clients: {partition}"
        title = f"{task}, K={k}, H={h}{clients}: {rounds} rounds, {'/'.join(map(str, seeds))} seeds"
        pages.append(Page(key, title, curves, judge(curves, title)))
    return pages


def _fmt(values: np.ndarray) -> str:
    if not len(values):
        return "diverged"
    mean = float(np.mean(values))
    return f"{mean:.4g} ± {float(np.std(values)):.2g}" if np.isfinite(mean) else "diverged"


def _seeds(s: Stats) -> str:
    if not s.diverged:
        return str(s.seeds)
    return f"{s.seeds}, {s.diverged} diverged" + (" (against it)" if s.curves.learned else " †")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def held_out_table(j: Judgement) -> list[str]:
    """Test accuracy and loss at rounds 100, 250 and the last; train loss; outer-valid beside test."""
    last = int(j.rounds[-1])
    marks = sorted({int(j.rounds[np.argmax(j.rounds >= m)]) for m in TABLE_ROUNDS if (j.rounds >= m).any()} - {last})
    marks.append(last)
    at = [int(np.searchsorted(j.rounds, m)) for m in marks]
    header = ["method", "settings", "seeds", *(f"test acc r{m}" for m in marks), *(f"test loss r{m}" for m in marks),
              f"train loss (last {TRAIN_TAIL} rounds)", f"outer-valid loss r{last} (tuned/meta-trained on)",
              f"gap r{last}: test − outer-valid"]
    rows = []
    for s in j.rows:
        name = f"**{s.name}**" if s.curves.learned else s.name
        rows.append([name, s.curves.settings, _seeds(s), *(_fmt(s.test_accuracy[:, i]) for i in at),
                     *(_fmt(s.test_loss[:, i]) for i in at), _fmt(s.train[:, -TRAIN_TAIL:].mean(axis=1)),
                     _fmt(s.outer_valid[:, -1]), _fmt(s.test_loss[:, -1] - s.outer_valid[:, -1])])
    return _table(header, rows)


def target_table(j: Judgement) -> list[str]:
    """Rounds to the best baseline's final test accuracy and train loss, and the ratio to the fastest baseline."""
    if not j.targets:
        return []
    baselines = [s.name for s in j.rows if not s.curves.learned and len(s.train)]
    header, columns = ["method"], []
    for kind, what in (("accuracy", "test accuracy"), ("train", "train loss")):
        value, owner, reached = j.targets[kind]
        fastest = min(reached[b] for b in baselines if reached[b])
        header += [f"rounds to {owner}'s final {what} {value:.4g}", "× fastest baseline"]
        columns.append((reached, fastest))
    horizon = j.rows[0].train.shape[1]
    rows = [[f"**{s.name}**" if s.curves.learned else s.name,
             *(cell for reached, fastest in columns for cell in
               ((str(reached[s.name]), f"{reached[s.name] / fastest:.2g}") if reached[s.name] else
                (f"> {horizon}", "—")))] for s in j.rows]
    return _table(header, rows)


def _colours(names: Sequence[str]) -> dict[str, tuple]:
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: palette(i % palette.N) for i, n in enumerate(names)}


def plot_page(page: Page, path: Path) -> Path:
    """One row of panels per learned aggregator, beside the best few baselines (by final test loss):
    train loss, test loss and test error rate (1 − accuracy), each on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = page.judgement.rows
    baselines = sorted((s for s in rows if not s.curves.learned and len(s.train)),
                       key=lambda s: s.mean("test_loss")[-1])
    learned = [s for s in rows if s.curves.learned]
    panels = [[s, *baselines[:PLOTTED_BASELINES]] for s in learned] or [baselines[:PLOTTED_BASELINES + 2]]
    colour = _colours([s.name for s in rows])
    fig, axes = plt.subplots(len(panels), 3, figsize=(16, 3.6 * len(panels)), squeeze=False)
    rounds = page.judgement.rounds
    for axes_row, members in zip(axes, panels):
        for s in members:
            style = dict(color=colour[s.name], lw=1.8 if s.curves.learned else 1.2,
                         ls="-" if s.curves.learned else "--")
            axes_row[0].plot(np.arange(1, s.train.shape[1] + 1), floored(s.smoothed_train()), label=s.name, **style)
            axes_row[1].plot(rounds, floored(s.mean("test_loss")), **style)
            axes_row[2].plot(rounds, np.maximum(1 - s.mean("test_accuracy"), ERROR_FLOOR), **style)
        axes_row[0].legend(fontsize=8)
        for ax, title in zip(axes_row, (f"train loss ({TRAIN_TAIL}-round mean, clipped at {LOSS_FLOOR:g})",
                                        "test loss", "test error rate (1 − accuracy)")):
            ax.set(yscale="log", title=title, xlabel="communication rounds")
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{page.title} — test split; " + (f"each learned aggregator beside the {PLOTTED_BASELINES} "
                 "baselines with the lowest final test loss" if learned else "the baselines with the lowest final "
                 "test loss"))
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(pages: list[Page], out: Path, image_prefix: str = "", notes: Sequence[str] = ()) -> str:
    """The report's markdown, with one plot per group written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [SPLITS, "", *(f"> {note}" for note in notes), *([""] if notes else [])]
    for page in pages:
        task, k, h, rounds, partition = page.key
        image = plot_page(page, out / f"{task}_K{k}_H{h}_R{rounds}{partition_slug(partition)}.png")
        targets = target_table(page.judgement)
        parts += [f"### {page.title}", "", *held_out_table(page.judgement), "",
                  *(["Time to target (rounds; the best tuned baseline's final value):", "", *targets, ""]
                    if targets else []),
                  *page.judgement.lines, "", f"![{page.title}]({image_prefix}{image.name})", ""]
    return "\n".join(parts)


_VERDICT = re.compile(r"^- \*\*(.+?)\*\*(, against tuned FedAvg alone,)? (holds|does not hold) on the test split\.(.*)$",
                      re.M)
_CRITERIA = ("(1) train loss below every baseline's", "(2) test accuracy within", "(3) test loss within")
_TIME = re.compile(r"\(4\) time to target: (?:> )?\d+ rounds to .*?'s final test accuracy \S+ "
                   r"\((?:([\d.e+]+)× the fastest baseline|never reached)")
_HEADER = ("| comparison | holds on the test split | (1) train loss below every baseline's | (2) test accuracy within "
           "0.5 points of the best | (3) test loss within 10% of the best | (4) rounds to the best's final test "
           "accuracy, × the fastest baseline's |\n|---|---|---|---|---|---|")
_SHOWN = 2  # names per cell; the rest are counted


def _names(names: list[str]) -> str:
    """Up to _SHOWN names, shipped ones first; a shipped aggregator's label (variant@name) whose file
    is no longer in the package is marked, so that the README never points at something a user cannot run."""
    from lagg_pipeline import pretrained

    shipped = {f"{variant}@{name}" for variant, name in pretrained.available()}
    retired = lambda n: bool(re.fullmatch(r"\w+@\w+", n)) and n not in shipped
    names = sorted(names, key=retired)  # shipped ones first
    more = f" +{len(names) - _SHOWN}" if len(names) > _SHOWN else ""
    return ", ".join(f"{n} (not shipped)" if retired(n) else n for n in names[:_SHOWN]) + more


def _best_count(criterion: str, verdicts: list[tuple]) -> str:
    """The most evaluations any method meets ``criterion`` at, as 'k/N' and who (bold where k = N)."""
    counts = {}
    for name, _, _, text in verdicts:
        m = re.search(re.escape(criterion) + r"[^;]*? at (\d+) of (\d+) evaluations", text)
        if m:
            counts[name] = (int(m[1]), int(m[2]))
    if not counts:
        return "—"
    k, n = max(counts.values())
    best = _names([name for name, c in counts.items() if c == (k, n)])
    return f"**{k}/{n}** {best}" if k == n else f"{k}/{n} {best}"


def _best_time(verdicts: list[tuple]) -> str:
    """The smallest time-to-target ratio (rounds to the best baseline's final test accuracy over the
    fastest baseline's) of any method, and whose; 'never' when none reaches it."""
    ratios = {}
    for name, _, _, text in verdicts:
        m = _TIME.search(text)
        if m and m[1]:
            ratios[name] = float(m[1])
    if not ratios:
        return "never"
    best = min(ratios.values())
    return f"{best:g}× {_names([name for name, r in ratios.items() if r == best])}"


def headline(results: str, link: str) -> str:
    """The README's summary of a generated Results page (``markdown``'s text), read from its verdict lines:
    per comparison, who holds on the test split, the most evaluations any learned method meets each
    criterion at (k/N, and who), and the shortest time to target; then the same against tuned FedAvg
    alone (the goal on tasks outside the meta-training family), where FedAvg is one of several baselines."""
    tables = {"": [_HEADER], ", against tuned FedAvg alone,": ["Against tuned FedAvg alone:", "", _HEADER]}
    for section in re.split(r"^### ", results, flags=re.M)[1:]:
        title = section.splitlines()[0]
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        label = title.split(":")[0] if "clients:" not in title else ":".join(title.split(":")[:2])
        found = _VERDICT.findall(section)
        for against, rows in tables.items():
            verdicts = [v for v in found if v[1] == against]
            if verdicts:
                holds = _names([name for name, _, verdict, _ in verdicts if verdict == "holds"]) or "none"
                cells = [holds, *(_best_count(c, verdicts) for c in _CRITERIA), _best_time(verdicts)]
                rows.append(f"| [{label}]({link}#{anchor}) | " + " | ".join(cells) + " |")
    against_all, alone = tables.values()
    has_rows = len(alone) > 3  # beyond its title, blank line and header
    return "\n".join(against_all + ([""] + alone if has_rows else []))


def shipped_table() -> str:
    """The shipped aggregators, from their own metadata: settings, length and cost of meta-training."""
    from lagg_pipeline import pretrained

    lines = ["| optimizer | pretrained= | task | K | H | γ | clients | meta-loss | start | outer steps | meta-training "
             "| re-create |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, name), file in pretrained.available().items():
        m = pretrained.metadata(file)
        seconds = m.get("meta_train_seconds")
        minutes = f"{seconds / 60:.0f} min" if seconds else "?"
        lines.append(f"| {variant} | `{name}` | {m.get('task')} | {m.get('num_grads')} | {m.get('num_local_steps')} | "
                     f"{m.get('local_learning_rate')} | {m.get('partition', 'iid')} | {pretrained.meta_loss_label(m)} | "
                     f"{m.get('meta_init', 'random')} | {m.get('outer_steps')} | "
                     f"{minutes} | `{m.get('command', '?')}` |")
    return "\n".join(lines)

