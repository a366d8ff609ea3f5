"""Speed claims that reproduce: this tree against another git revision, ``make bench-compare REF=<rev>``.

The other revision is checked out as a git worktree in a temporary folder and runs with its
own code (its folder first on ``PYTHONPATH``; ``lagg_pipeline.conf``, which the editable
install maps to this repository's conf/, is pointed at its own conf/). Each pass measures
every task once per revision, each measure in a fresh process (:mod:`lagg_pipeline.bench.steady`,
the same measuring code and XLA_FLAGS for both), the revisions' order alternating between
passes so that a machine's drift hits both alike. The table gives per-measure medians over
passes, the ratio (other revision / this tree: above 1 is this tree faster) pass by pass
with each pass's probe readings, and the PES step's share of the probe's matmul limit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lagg_pipeline import xla_flags
from lagg_pipeline.bench import steady, yardstick
from lagg_pipeline.data.splits import DATASETS
from lagg_pipeline.errors import UserError

BEGIN, END = "<!-- bench-compare:begin -->", "<!-- bench-compare:end -->"
MEASURES = ("pes_outer_step_seconds", "pes_outer_step_compile_seconds", "pes_init_seconds")
REPO = Path(__file__).resolve().parents[2]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def worktree(revision: str):
    """The repository at ``revision`` in a temporary folder, its conf/ reachable as lagg_pipeline.conf."""
    try:
        _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError:
        raise UserError(f"REF={revision} is not a git revision of {REPO}") from None
    path = Path(tempfile.mkdtemp(prefix="lagg_compare_")) / "tree"
    _git("worktree", "add", "--detach", str(path), revision)
    try:
        (path / "lagg_pipeline" / "conf").symlink_to("../conf")
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))


def measure(root: Path, spec: dict, flags: str) -> dict:
    """steady.measure_pes(spec) in a fresh process that imports the package found at ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=str(root), XLA_FLAGS=flags, **{xla_flags.OFF_ENV: "0"})
    code = f"import runpy, sys; sys.argv[1:] = [{json.dumps(spec)!r}]; runpy.run_path({str(steady.__file__)!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"measuring {spec['name']} under {root} failed:\n{result.stderr[-3000:]}")
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    if not Path(out["package"]).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"the process meant for {root} imported the package from {out['package']}")
    return out


def spec_of(task: str, outer_steps: int, shape: yardstick.Shape) -> dict:
    dataset, hidden = yardstick.TASKS[task]
    return {"name": task, "dataset": dataset, "hidden": hidden, "outer_steps": outer_steps,
            **yardstick.shape_keywords(shape)}


def compare(roots: dict[str, Path], tasks: list[str], passes: int, outer_steps: int, flags: str,
            shape: yardstick.Shape = yardstick.DEFAULT) -> dict:
    """{task: {side: [one dict per pass]}}; the sides' order alternates from pass to pass."""
    runs = {t: {side: [] for side in roots} for t in tasks}
    for number in range(passes):
        order = list(roots) if number % 2 == 0 else list(roots)[::-1]
        for task in tasks:
            for side in order:
                runs[task][side].append(measure(roots[side], spec_of(task, outer_steps, shape), flags))
                print(f"pass {number + 1} {task} {side}: " + ", ".join(
                    f"{m} {runs[task][side][-1][m]:.4g}" for m in (*MEASURES, "probe_gflops")), flush=True)
    return runs


def table(runs: dict, labels: dict[str, str], flags: str, note: str = "",
          shape: yardstick.Shape = yardstick.DEFAULT) -> str:
    """Medians per side, the ratio other / this pass by pass and of the medians, probe per pass."""
    this, other = labels
    passes = len(next(iter(runs.values()))[this])
    lines = [f"this tree ({labels[this]}) against {labels[other]}: {passes} passes, each measure in a fresh process, "
             f"the order alternating", f"XLA_FLAGS={flags or '(none)'}" + (f"; {note}" if note else ""),
             f"ratio = {labels[other]} / this tree (above 1: this tree is faster); probe: whole-machine float32 "
             f"matmul GFLOP/s, median of the readings between that process's measures", ""]
    header = (f"{'task':<12} {'measure':<24} {'this':>9} {labels[other]:>9} {'ratio':>6}  {'ratio per pass':<22} "
              f"probe this/{labels[other]} per pass")
    lines += [header, "-" * len(header)]
    for task, sides in runs.items():
        probes = " ".join(f"{a['probe_gflops']:.0f}/{b['probe_gflops']:.0f}" for a, b in zip(sides[this], sides[other]))
        for m in MEASURES:
            mine, theirs = (statistics.median(r[m] for r in sides[s]) for s in (this, other))
            per_pass = " ".join(f"{b[m] / a[m]:.2f}" for a, b in zip(sides[this], sides[other]))
            lines.append(f"{task:<12} {m.removesuffix('_seconds'):<24} {mine:>9.4g} {theirs:>9.4g} "
                         f"{theirs / mine:>5.2f}x  {per_pass:<22} {probes}")
        dataset, hidden = yardstick.TASKS[task]
        image_shape = DATASETS[dataset].image_shape
        gflop = shape.pes_rounds * (yardstick.round_flops(image_shape, hidden, shape)
                                    + yardstick.lagg_a_flops(image_shape, hidden, shape)) / 1e9
        shares = [(gflop / statistics.median(r["pes_outer_step_seconds"] for r in sides[s])
                   / statistics.median(r["probe_gflops"] for r in sides[s])) for s in (this, other)]
        lines.append(f"{task:<12} {'pes_step_share_of_limit':<24} {100 * shares[0]:>8.1f}% {100 * shares[1]:>8.1f}%"
                     f"  ({gflop:.3g} GFLOP per PES step at the median probe)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lagg_pipeline.bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the git revision to compare this tree against (e.g. a6de6c6)")
    parser.add_argument("--tasks", default="digits_mlp,mnist1d_mlp", help="comma-separated subset of "
                                                                         + ", ".join(yardstick.TASKS))
    parser.add_argument("--passes", type=int, default=3, help="passes; each measures every task once per revision")
    parser.add_argument("--outer-steps", type=int, default=3, help="timed PES outer steps per process (median)")
    parser.add_argument("--quick", action="store_true", help="1 pair x 2 rounds per PES step, for tests")
    parser.add_argument("--note", default="", help="a remark for the table's header (e.g. that the machine was loaded)")
    parser.add_argument("--readme", help="replace the table between this file's bench-compare markers")
    parser.add_argument("--json", help="also write every process's numbers to this file")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in yardstick.TASKS:
            raise UserError(f"--tasks: {task} is not a bench task; choose from {', '.join(yardstick.TASKS)}")
    if args.passes < 1 or args.outer_steps < 1:
        raise UserError(f"--passes={args.passes} --outer-steps={args.outer_steps}: both must be >= 1")
    shape = yardstick.Shape(num_tasks=1, trunc_length=2) if args.quick else yardstick.DEFAULT
    environ = dict(os.environ)
    xla_flags.apply(environ)  # the package's defaults, passed to both revisions alike
    flags = environ.get("XLA_FLAGS", "")
    dirty = "+changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    labels = {"this": _git("rev-parse", "--short", "HEAD") + dirty, "other": args.ref}
    with worktree(args.ref) as other_root:
        runs = compare({"this": REPO, "other": other_root}, tasks, args.passes, args.outer_steps, flags, shape)
    text = table(runs, labels, flags, args.note, shape)
    print(text)
    from lagg_pipeline.bench.outputs import write_outputs

    write_outputs(text, {"labels": labels, "xla_flags": flags, "runs": runs},
                  f"make bench-compare REF={args.ref}", args.readme, args.json, BEGIN, END)
    return runs


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the worktree is removed
    try:
        main()
    except UserError as err:
        sys.exit(f"lagg_pipeline: error: {err}")
