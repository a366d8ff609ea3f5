"""mode=report: one comparison across the MLflow runs of an experiment.

Benchmark runs (tagged ``method``) are grouped by task, K, H and number of rounds; per
method the per-seed curves of its runs are pooled (the newest run per starting seed), and
the report gives, mean ± std over seeds: train loss at rounds 50, 100, 250 and the last, its
mean over all rounds, test loss and accuracy and outer-valid loss at the last round, and the
rounds a method needs to reach FedAvg's final train loss; plus one plot per group. It is
printed, written as ``report.md`` with its plots, and logged to MLflow; with ``readme=`` its
tables replace the part of that file between the Results markers, so no number there is
typed by hand.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lagg_pipeline.config import HAND_OPTIMIZERS, partition_slug
from lagg_pipeline.report import CHECKPOINT_ROUNDS, LOSS_FLOOR, TRAIN_TAIL, floored

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
REFERENCE = "fedavg"  # "rounds to reach" FedAvg's final train loss
_ORDER = ("fedavg", "slowmo", "fedavgm", "diloco", "fedadam", "fedyogi", "sgd", "adam")


class Curves(NamedTuple):
    """Pooled per-seed curves of one method in one group."""

    method: str
    optimizer: str
    settings: str
    train_loss: np.ndarray  # [S, R]
    eval_rounds: np.ndarray  # [E]
    test_loss: np.ndarray  # [S, E]
    test_accuracy: np.ndarray  # [S, E]
    outer_valid_loss: np.ndarray  # [S, E]


def _settings(run) -> str:
    """The hyper-parameters that distinguish this run's method: its tuned keys, or where a learned
    aggregator came from."""
    from lagg_pipeline import tuning

    params, optimizer = run.data.params, run.data.tags.get("optimizer", "")
    if optimizer in HAND_OPTIMIZERS:
        keys = tuning.grid_keys(optimizer)
        return ", ".join(f"{k.split('.')[-1]}={params.get(k)}" for k in keys)
    source = params.get("pretrained") if params.get("pretrained") not in (None, "None") else "this run"
    return f"local_learning_rate={params.get('local_learning_rate')}, meta-trained: {source}"


def _load_curves(client, run, method: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, f"curves/{method}_curves.npz", tmp)
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}


def collect(client, experiment_name: str) -> dict[tuple, list[Curves]]:
    """{(task, K, H, rounds, partition): [Curves per method]} from the experiment's finished benchmark runs."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {experiment_name!r}")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50000)
    newest: dict[tuple, object] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "method" not in tags or "num_rounds" not in params:
            continue
        group = (tags["task"], int(tags["K"]), int(tags["H"]), int(params["num_rounds"]), tags.get("partition", "iid"))
        newest.setdefault((group, tags["method"], int(tags["seed"])), run)  # newest first
    pooled: dict[tuple, dict[str, list]] = {}
    for (group, method, _), run in newest.items():
        pooled.setdefault(group, {}).setdefault(method, []).append(run)
    groups = {}
    for group, methods in sorted(pooled.items()):
        entries = []
        for method, method_runs in methods.items():
            arrays = [_load_curves(client, r, method) for r in sorted(method_runs, key=lambda r: int(r.data.tags["seed"]))]
            cat = lambda key: np.concatenate([a[key] for a in arrays], axis=0)
            entries.append(Curves(method, method_runs[0].data.tags["optimizer"], _settings(method_runs[0]),
                                  cat("train_loss"), arrays[0]["eval_rounds"], cat("test_loss"),
                                  cat("test_accuracy"), cat("outer_valid_loss")))
        groups[group] = sorted(entries, key=_method_order)
    return groups


def _method_order(c: Curves):
    return (c.optimizer in HAND_OPTIMIZERS, _ORDER.index(c.optimizer) if c.optimizer in _ORDER else -1, c.method)


def _smoothed(curve_R: np.ndarray) -> np.ndarray:
    """Trailing mean over TRAIN_TAIL rounds: one round's loss is too noisy to compare."""
    cumsum = np.concatenate([[0.0], np.cumsum(curve_R)])
    r = np.arange(1, len(curve_R) + 1)
    lo = np.maximum(r - TRAIN_TAIL, 0)
    return (cumsum[r] - cumsum[lo]) / (r - lo)


def rounds_to_reach(curves: Curves, target: float) -> int | None:
    """First round at which the (seed-mean, smoothed) train loss is <= target."""
    below = _smoothed(curves.train_loss.mean(axis=0)) <= target
    return int(np.argmax(below)) + 1 if below.any() else None


def _num(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else "diverged"


def _fmt(values: np.ndarray, digits: int = 4) -> str:
    mean, std = float(np.mean(values)), float(np.std(values))
    return f"{mean:.{digits}g} ± {std:.2g}" if np.isfinite(mean) else "diverged"


def rows(curves: list[Curves]) -> tuple[list[str], list[list[str]], dict]:
    """Header, table rows and the numbers the verdict reads."""
    rounds = curves[0].train_loss.shape[1]
    marks = [r for r in CHECKPOINT_ROUNDS if r < rounds] + [rounds]
    reference = next((c for c in curves if c.method == REFERENCE), None)
    target = float(_smoothed(reference.train_loss.mean(axis=0))[-1]) if reference is not None else None
    header = ["method", "settings", *(f"train r{r}" for r in marks), "train mean", f"test loss r{rounds}",
              f"test acc r{rounds}", f"outer-valid r{rounds}", "rounds to FedAvg's final train loss"]
    table, numbers = [], {}
    for c in curves:
        reach = rounds_to_reach(c, target) if target is not None else None
        table.append([f"**{c.method}**" if c.optimizer not in HAND_OPTIMIZERS else c.method, c.settings,
                      *(_fmt(c.train_loss[:, r - 1]) for r in marks), _fmt(c.train_loss.mean(axis=1)),
                      _fmt(c.test_loss[:, -1]), _fmt(c.test_accuracy[:, -1]), _fmt(c.outer_valid_loss[:, -1]),
                      "—" if target is None else (str(reach) if reach else f"> {rounds}")])
        numbers[c.method] = {"optimizer": c.optimizer, **{f"train_r{r}": float(c.train_loss[:, r - 1].mean()) for r in marks},
                             "outer_valid": float(c.outer_valid_loss[:, -1].mean()),
                             "outer_valid_curve": c.outer_valid_loss.mean(axis=0),
                             "test_accuracy_curve": c.test_accuracy.mean(axis=0), "eval_rounds": c.eval_rounds}
    return header, table, numbers


OUTER_VALID_SLACK = 0.05  # "matches": outer-valid loss at most 5% above the baseline's,
ACCURACY_SLACK = 0.005  # and test accuracy at most half a point below it


def verdict(numbers: dict, rounds: int) -> list[str]:
    """Per learned method, stated from the numbers: does it beat every baseline on train loss
    from round 100 on, and does it match the best baseline's held-out loss and accuracy?"""
    baselines = {m: n for m, n in numbers.items() if n["optimizer"] in HAND_OPTIMIZERS}
    # a diverged baseline beats nobody and is nobody's reference
    finite = {m: n for m, n in baselines.items() if np.isfinite(n["outer_valid"])}
    if not finite:
        return []
    lines = []
    marks = [r for r in CHECKPOINT_ROUNDS if 100 <= r < rounds] + [rounds]
    best_ov = min(finite, key=lambda m: finite[m]["outer_valid"])
    for method, n in numbers.items():
        if n["optimizer"] in HAND_OPTIMIZERS:
            continue
        lost = [f"round {r}: {m} {_num(b[f'train_r{r}'])} ≤ {_num(n[f'train_r{r}'])}" for r in marks
                for m, b in baselines.items()
                if np.isfinite(b[f"train_r{r}"]) and not n[f"train_r{r}"] < b[f"train_r{r}"]]
        train = ("lowest train loss at every reported round from 100 on" if not lost else
                 "not the lowest train loss everywhere from round 100 (" + "; ".join(lost[:3]) +
                 (f"; {len(lost) - 3} more" if len(lost) > 3 else "") + ")")
        lines.append(f"- **{method}**: {train}; {held_out(n, finite[best_ov], best_ov)}.")
    return lines


def held_out(n: dict, b: dict, baseline: str) -> str:
    """Does a learned method match ``baseline`` (the lowest final outer-valid loss) on held-out
    data at every evaluation: outer-valid loss at most 5% above it, test accuracy at most half a
    point below? Says where and by how much it does not."""
    rounds = n["eval_rounds"]
    ov, ov_b = n["outer_valid_curve"], b["outer_valid_curve"]
    acc, acc_b = n["test_accuracy_curve"], b["test_accuracy_curve"]
    ov_worse = np.flatnonzero(~(ov <= ov_b * (1 + OUTER_VALID_SLACK) + 1e-12))
    acc_worse = np.flatnonzero(~(acc >= acc_b - ACCURACY_SLACK))
    if not len(ov_worse) and not len(acc_worse):
        return (f"matches or beats {baseline} (the best baseline on held-out data) at every evaluation: "
                f"outer-valid loss {n['outer_valid']:.4g} vs {b['outer_valid']:.4g} at the last round")
    parts = []
    for name, worse, mine, theirs, how in (("outer-valid loss", ov_worse, ov, ov_b, "more than 5% above"),
                                           ("test accuracy", acc_worse, acc, acc_b, "more than 0.5 points below")):
        if len(worse):
            i = worse[0]
            parts.append(f"{name} {how} {baseline}'s at {len(worse)} of {len(rounds)} evaluations "
                         f"(first at round {rounds[i]}: {_num(mine[i])} vs {_num(theirs[i])})")
    return (f"outer-valid loss {_num(n['outer_valid'])} at the last round vs {baseline}'s {_num(b['outer_valid'])}; "
            "does not match it at every evaluation: " + ", and ".join(parts))


def plot_group(curves: list[Curves], title: str, path: Path) -> Path:
    """Train loss (log, floored), test accuracy and outer-valid loss against rounds: mean ± std
    bands per method; learned aggregators solid, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for c in curves:
        style = "-" if c.optimizer not in HAND_OPTIMIZERS else "--"
        rounds = np.arange(1, c.train_loss.shape[1] + 1)
        color = None
        for ax, x, y, log in ((axes[0], rounds, c.train_loss, True), (axes[1], c.eval_rounds, c.test_accuracy, False),
                              (axes[2], c.eval_rounds, c.outer_valid_loss, True)):
            mean, std = y.mean(0), y.std(0)
            low, high = (floored(mean - std), floored(mean + std)) if log else (mean - std, mean + std)
            line, = ax.plot(x, floored(mean) if log else mean, style, color=color, lw=1.4,
                            label=c.method if ax is axes[0] else None)
            color = line.get_color()
            ax.fill_between(x, low, high, alpha=0.15, color=color)
    axes[0].set(yscale="log", title=f"train loss (clipped at {LOSS_FLOOR:g})")
    axes[1].set(title="test accuracy")
    axes[2].set(yscale="log", title="outer-valid (held-out) loss")
    for ax in axes:
        ax.set_xlabel("communication rounds")
        ax.grid(alpha=0.3)
    fig.legend(loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(groups: dict[tuple, list[Curves]], out: Path, image_prefix: str = "") -> str:
    """The report's markdown, with one plot per group written into ``out``."""
    parts = []
    for (task, k, h, rounds, partition), curves in groups.items():
        seeds = sorted({c.train_loss.shape[0] for c in curves})
        clients = "" if partition == "iid" else f", clients: {partition}"
        title = f"{task}, K={k}, H={h}{clients}: {rounds} rounds, {'/'.join(map(str, seeds))} seeds"
        header, table, numbers = rows(curves)
        image = plot_group(curves, title, out / f"{task}_K{k}_H{h}_R{rounds}{partition_slug(partition)}.png")
        parts += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                  *("| " + " | ".join(row) + " |" for row in table), "", *verdict(numbers, rounds), "",
                  f"![{title}]({image_prefix}{image.name})", ""]
    return "\n".join(parts)


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
                     f"{m.get('local_learning_rate')} | {m.get('partition', 'iid')} | {m.get('meta_loss_split', 'train')} | "
                     f"{m.get('meta_init', 'random')} | {m.get('outer_steps')} | "
                     f"{minutes} | `{m.get('command', '?')}` |")
    return "\n".join(lines)


def splice_readme(readme: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``readme`` with ``text``."""
    content = readme.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{readme} has no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def report_job(cfg, out: Path) -> str:
    """mode=report: build, print, save and log the comparison of ``tracking.experiment``."""
    import os

    from lagg_pipeline import tracking
    from lagg_pipeline.errors import UserError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per curve file otherwise
    client, _ = tracking.client(cfg.tracking)
    try:
        groups = collect(client, cfg.tracking.experiment)
    except LookupError as err:
        raise UserError(str(err)) from None
    if not groups:
        raise UserError(f"experiment {cfg.tracking.experiment} has no finished benchmark runs to report")
    targets = [out] + ([Path(cfg.report_dir)] if cfg.report_dir else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        text = markdown(groups, target)
        (target / "report.md").write_text(f"# Comparison: MLflow experiment {cfg.tracking.experiment}\n\n{text}")
    print(text)
    if cfg.readme:
        prefix = os.path.relpath(targets[-1], Path(cfg.readme).resolve().parent) + "/"
        shipped = ("Shipped aggregators (meta-training time on this project's 2-core machine, from each "
                   "file's metadata):\n\n" + shipped_table() + "\n\n")
        splice_readme(Path(cfg.readme), shipped + markdown(groups, targets[-1], image_prefix=prefix))
        print(f"updated the Results section of {cfg.readme}")
    run = tracking.start_run(cfg.tracking, f"report {cfg.tracking.experiment}", {"kind": "report"})
    run.log_artifact(out, "report")
    run.end()
    print(f"report: {out / 'report.md'}")
    return text
