"""How a PES outer step's cost grows with K, H, B and the task's parameter count (``make bench-scaling``).

Around the bench's default point (digits MLP 64 -> 32 -> 10, K=8, H=4, B=128, LAgg-A, 8 pairs x
50 rounds) one axis moves at a time: K in (8, 16, 32), H in (4, 8, 16), B in (64, 128, 256)
and the hidden width in (32, 128, 512), i.e. 2,410 / 9,610 / 38,410 parameters. At every point
it times a lagg_a round and a PES outer step, fits time ~ x^e per axis (least squares in
log-log) and gives the exponent between neighbouring points, so a step away from 1 says
where the cost stops being linear. Outputs: a markdown block (table, exponents) a docs page
can include, a log-log plot, the numbers as JSON, optionally all of it logged to MLflow.
``--quick`` is a tiny grid for tests; ``--axes`` picks some of the axes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from lagg_pipeline import xla_flags
from lagg_pipeline.bench import yardstick as bench

TASK = "digits_mlp"
BASE = {"K": 8, "H": 4, "B": 128, "hidden": 32}
GRID = {"K": (8, 16, 32), "H": (4, 8, 16), "B": (64, 128, 256), "hidden": (32, 128, 512)}
QUICK_BASE = {"K": 2, "H": 1, "B": 8, "hidden": 4}
QUICK_GRID = {"K": (2, 4), "H": (1, 2), "B": (8, 16), "hidden": (4, 8)}
QUICK_PES = {"num_tasks": 1, "trunc_length": 2}
AXIS_LABEL = {"K": "workers K", "H": "local steps H", "B": "batch B", "hidden": "parameters"}
MEASURES = ("round_seconds", "pes_outer_step_seconds")


def fit_exponent(x, seconds) -> float:
    """e of the least-squares fit log(seconds) = c + e log(x)."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(seconds, float)), 1)[0])


def local_exponents(x, seconds) -> list[float]:
    """The exponent between each pair of neighbouring points."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(seconds, float))
    return [float(e) for e in np.diff(ly) / np.diff(lx)]


def measure_point(point: dict, pes: dict, rounds: int, repeats: int, outer_steps: int) -> dict:
    """Seconds of one lagg_a round and one PES outer step at ``point`` (K, H, B, hidden)."""
    task, splits = bench.load_task(TASK, [point["hidden"]])
    shape = bench.Shape(K=point["K"], H=point["H"], B=point["B"], **pes)
    update = bench.learned_update("lagg_a", shape.K)
    round_s = bench.time_rounds(task, splits.train, update, rounds, repeats, shape)[0]
    pes_s = bench.time_pes(task, splits.train, outer_steps, shape, cached=False)[0]
    params = bench.num_task_params(tuple(splits.train.x.shape[1:]), [point["hidden"]])
    return {**point, "params": params, "round_seconds": round_s, "pes_outer_step_seconds": pes_s,
            "pes_over_rounds": pes_s / (shape.pes_rounds * round_s)}


def sweep(base: dict, grid: dict, pes: dict, rounds: int, repeats: int, outer_steps: int) -> dict:
    """Every axis of ``grid`` around ``base``: {"rows": [...], "exponents": {...}}; the base
    point is measured once and shared by every axis."""
    measured, rows = {}, []
    for axis, values in grid.items():
        for value in values:
            point = {**base, axis: value}
            key = tuple(sorted(point.items()))
            if key not in measured:
                measured[key] = measure_point(point, pes, rounds, repeats, outer_steps)
                print(measured[key], flush=True)
            rows.append({"axis": axis, **measured[key]})
    exponents = {}
    for axis in grid:
        axis_rows = [r for r in rows if r["axis"] == axis]
        x = [r["params" if axis == "hidden" else axis] for r in axis_rows]
        for m in MEASURES:
            seconds = [r[m] for r in axis_rows]
            exponents[f"{axis}.{m}"] = fit_exponent(x, seconds)
            exponents[f"{axis}.{m}.local"] = local_exponents(x, seconds)
    return {"rows": rows, "exponents": exponents}


def markdown(result: dict, header: str) -> str:
    """The table and the fitted exponents as a markdown block."""
    lines = [header, "", "| axis | K | H | B | parameters | lagg_a round (s) | PES outer step (s) | PES / rounds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['axis']} | {r['K']} | {r['H']} | {r['B']} | {r['params']:,} | {r['round_seconds']:.4g} | "
              f"{r['pes_outer_step_seconds']:.4g} | {r['pes_over_rounds']:.2f} |" for r in result["rows"]]
    lines += ["", "| axis | exponent: round | exponent: PES step | between neighbours: round | between neighbours: PES |",
              "|---|---|---|---|---|"]
    e = result["exponents"]
    for axis in dict.fromkeys(r["axis"] for r in result["rows"]):
        local = {m: ", ".join(f"{v:.2f}" for v in e[f"{axis}.{m}.local"]) for m in MEASURES}
        lines.append(f"| {AXIS_LABEL[axis]} | {e[f'{axis}.round_seconds']:.2f} | "
                     f"{e[f'{axis}.pes_outer_step_seconds']:.2f} | {local['round_seconds']} | "
                     f"{local['pes_outer_step_seconds']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Log-log time against each axis, one panel per axis, with the fitted exponents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(r["axis"] for r in result["rows"]))
    fig, panels = plt.subplots(1, len(axes_names), figsize=(4 * len(axes_names), 3.4))
    for panel, axis in zip(np.atleast_1d(panels), axes_names):
        rows = [r for r in result["rows"] if r["axis"] == axis]
        x = np.array([r["params" if axis == "hidden" else axis] for r in rows], float)
        for m, label in zip(MEASURES, ("lagg_a round", "PES outer step")):
            y = np.array([r[m] for r in rows])
            e = result["exponents"][f"{axis}.{m}"]
            line, = panel.loglog(x, y, "o-", label=f"{label}: x^{e:.2f}")
            fit = np.exp(np.polyval(np.polyfit(np.log(x), np.log(y), 1), np.log(x)))
            panel.loglog(x, fit, ":", color=line.get_color())
        panel.set_xlabel(AXIS_LABEL[axis])
        panel.set_ylabel("seconds")
        panel.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    xla_flags.apply()  # a command-line entry point: set before JAX starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench_scaling", help="folder for scaling.md, .png, .json")
    parser.add_argument("--quick", action="store_true", help="a tiny grid and PES (1 pair x 2 rounds), for tests")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per timed scan")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--outer-steps", type=int, default=2, help="timed PES outer steps (median)")
    parser.add_argument("--axes", default=",".join(GRID), help="comma-separated subset of " + ", ".join(GRID))
    parser.add_argument("--mlflow", action="store_true", help="also log to the MLflow experiment 'bench'")
    args = parser.parse_args(argv)

    base, grid, pes = (QUICK_BASE, QUICK_GRID, QUICK_PES) if args.quick else (BASE, GRID, {})
    grid = {axis: grid[axis] for axis in args.axes.split(",")}
    gflops = bench.matmul_gflops()
    result = sweep(base, grid, pes, args.rounds, args.repeats, args.outer_steps)
    shape = bench.Shape(**pes)
    header = (f"`make bench-scaling`: {TASK} around K={base['K']}, H={base['H']}, B={base['B']}, hidden "
              f"{base['hidden']}; LAgg-A, PES {shape.num_tasks} pairs x {shape.trunc_length} rounds; "
              f"device {jax.devices()[0]}, jax {jax.__version__}, matmul probe {gflops:.0f} GFLOP/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result, header)
    (out / "scaling.md").write_text(text + "\n")
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "scaling.png")
    print(text)
    if args.mlflow:
        numbers = {"device": str(jax.devices()[0]), "matmul_gflops": gflops}
        numbers.update({f"scaling.{k}": v for k, v in result["exponents"].items() if isinstance(v, float)})
        for r in result["rows"]:
            value = r["params"] if r["axis"] == "hidden" else r[r["axis"]]
            numbers.update({f"scaling.{r['axis']}_{value}.{m}": r[m] for m in MEASURES})
        bench.log_to_mlflow(numbers, "make bench-scaling", artifacts=[out / n for n in ("scaling.md", "scaling.png",
                                                                                      "scaling.json")])
    return result


if __name__ == "__main__":
    main()
