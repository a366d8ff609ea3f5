"""XLA's CPU options measured, not guessed: ``make bench-xla``.

Each option set of ``VARIANTS`` runs in its own process (XLA reads its flags once per
process), in alternating passes so that a machine's drift hits every variant alike: a
fedavg round, a lagg_a round and a PES outer step of LAgg-A at the bench's default shape,
with the PES step's cold compile. The table gives medians over passes and each variant's
ratio to XLA's own defaults; lagg_pipeline/xla_flags.py applies the winning set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from lagg_pipeline import xla_flags

OPT1 = "--xla_backend_optimization_level=1"
BEGIN, END = "<!-- bench-xla:begin -->", "<!-- bench-xla:end -->"


def variants(cores: int) -> dict[str, str]:
    """{name: XLA_FLAGS}; "xla" is XLA's own defaults, "package" what xla_flags applies."""
    devices = f"--xla_force_host_platform_device_count={cores}"
    return {"xla": "", "opt_level_1": OPT1, f"{cores}_devices": devices,
            "package": xla_flags.merged("", xla_flags.cpu_defaults(cores))}


def _measure_here(task_name: str, outer_steps: int, rounds: int, repeats: int) -> dict:
    """This process's numbers (run inside the child)."""
    import jax

    from lagg_pipeline.bench import yardstick as bench
    from lagg_pipeline.aggregators import hand

    task, splits = bench.load_task(task_name)
    fedavg = bench.time_rounds(task, splits.train, hand.fedavg(), rounds, repeats)[0]
    lagg_a = bench.time_rounds(task, splits.train, bench.learned_update("lagg_a", bench.DEFAULT.K), rounds, repeats)[0]
    pes, compile_s, *_ = bench.time_pes(task, splits.train, outer_steps, cached=False)
    return {"devices": jax.device_count(), "fedavg_round_seconds": fedavg, "lagg_a_round_seconds": lagg_a,
            "pes_outer_step_seconds": pes, "pes_outer_step_compile_seconds": compile_s}


def measure(task_name: str, flags: str, outer_steps: int, rounds: int, repeats: int) -> dict:
    """One variant's numbers from a fresh process with ``XLA_FLAGS=flags`` and no package defaults."""
    env = {**os.environ, "XLA_FLAGS": flags, xla_flags.OFF_ENV: "0"}
    code = (f"import json; from lagg_pipeline.bench.xla import _measure_here; "
            f"print('RESULT', json.dumps(_measure_here({task_name!r}, {outer_steps}, {rounds}, {repeats})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])


def compare(task_names: list[str], passes: int, outer_steps: int, rounds: int, repeats: int, cores: int) -> dict:
    """{task: {variant: {measure: median over passes}}}, variants alternating within each pass."""
    runs: dict = {t: {v: [] for v in variants(cores)} for t in task_names}
    for _ in range(passes):
        for task_name in task_names:
            for name, flags in variants(cores).items():
                runs[task_name][name].append(measure(task_name, flags, outer_steps, rounds, repeats))
    return {t: {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in by_variant.items()}
            for t, by_variant in runs.items()}


def table(result: dict, cores: int) -> str:
    measures = ("fedavg_round_seconds", "lagg_a_round_seconds", "pes_outer_step_seconds",
                "pes_outer_step_compile_seconds")
    header = f"{'task':<12} {'variant':<12}" + "".join(f" {m.replace('_seconds', ''):>24}" for m in measures)
    lines = [f"XLA CPU options, {cores} cores; seconds (ratio to XLA's defaults), medians over passes",
             "", header, "-" * len(header)]
    for task_name, by_variant in result.items():
        base = by_variant["xla"]
        for name, numbers in by_variant.items():
            cells = "".join(f" {numbers[m]:>14.4g} ({numbers[m] / base[m]:4.2f}x)" for m in measures)
            lines.append(f"{task_name:<12} {name:<12}{cells}")
    lines += ["", "variants: " + "; ".join(f"{n}: {f or '(none)'}" for n, f in variants(cores).items())]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits_mlp,mnist1d_mlp", help="comma-separated bench tasks")
    parser.add_argument("--passes", type=int, default=2, help="alternating passes over the variants")
    parser.add_argument("--outer-steps", type=int, default=3, help="timed PES outer steps per process (median)")
    parser.add_argument("--rounds", type=int, default=100, help="rounds per timed scan")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each round scan")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--readme", help="replace the table between this file's bench-xla markers")
    args = parser.parse_args(argv)
    if args.readme:  # a bad file fails now, not after the measurements
        from pathlib import Path

        from lagg_pipeline.markers import check_markers

        check_markers(Path(args.readme), BEGIN, END)
    cores = xla_flags.host_cores()
    result = compare(args.tasks.split(","), args.passes, args.outer_steps, args.rounds, args.repeats, cores)
    text = table(result, cores)
    print(text)
    from lagg_pipeline.bench.outputs import write_outputs

    write_outputs(text, result, "make bench-xla", args.readme, args.json, BEGIN, END)
    return result


if __name__ == "__main__":
    main()
