"""The speed yardstick behind ``make bench``: every number comes from one run on this machine.

For every meta-training task (digits_mlp, mnist1d_mlp) and the unseen mnist5k_mlp at K=8, H=4,
B=128 it measures, after compilation and as the median over repeats: one fedavg, one lagg_a
and one lopt_a round, one PES outer step of LAgg-A (8 antithetic pairs x 50 rounds = 800
rounds) and the outer steps per hour that makes, the compile time and XLA's memory estimate of
each, and their analytic FLOPs. The steady probe (bench/steady.py: a 2048² matmul on every device
at once, read between the tasks, median) gives this machine's compute rate, so every time is
also a fraction of the compute-bound limit. Two ratios say where overhead
lives: lagg_a round / fedavg round, and PES outer step / 800 lagg_a rounds. For mnist5k_mlp it
also compiles the fedavg round with the train split captured as a jit constant (how the
pipeline used to do it) to show what passing data as arguments saves. Compile times are cold
(an empty persistent cache); the PES step is compiled a second time to show what a later job
pays with XLA's persistent cache (lagg_pipeline/xla_cache.py).

The per-op profile of the PES steps is bench/profile.py (``make bench-profile``); the scaling
sweep against K, H, B and model size is bench/scaling.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline import xla_cache, xla_flags
from lagg_pipeline.aggregators import hand
from lagg_pipeline.bench import steady
from lagg_pipeline.benchmark import init_round_states
from lagg_pipeline.simulator import make_round_step

LR, HIDDEN = 0.5, 32
TASKS = {"digits_mlp": ("digits", [32]), "mnist1d_mlp": ("mnist1d", [128, 128]),
         "mnist5k_mlp": ("mnist5k", [128, 128])}
MEASURES = ("fedavg_round", "lagg_a_round", "lopt_a_round", "pes_outer_step")
BENCH_BEGIN, BENCH_END = "<!-- bench:begin -->", "<!-- bench:end -->"


class Shape(NamedTuple):
    """What sets the cost of a round and of a PES outer step (meta-training's defaults)."""

    K: int = 8
    H: int = 4
    B: int = 128
    num_tasks: int = 8  # antithetic pairs
    trunc_length: int = 50

    @property
    def pes_rounds(self) -> int:
        """Rounds in one PES outer step: 2 members x pairs x truncation length."""
        return 2 * self.num_tasks * self.trunc_length


DEFAULT = Shape()


def matmul_gflops() -> float:
    """This machine's float32 matmul rate, every core (see :mod:`lagg_pipeline.bench.steady`)."""
    return steady.matmul_probe()


def layer_sizes(image_shape, hidden, classes: int = 10) -> list[tuple[int, int]]:
    sizes = [int(np.prod(image_shape)), *hidden, classes]
    return list(zip(sizes[:-1], sizes[1:]))


def num_task_params(image_shape, hidden) -> int:
    """Weights and biases of the task MLP."""
    return sum(i * o + o for i, o in layer_sizes(image_shape, hidden))


def round_flops(image_shape, hidden, shape: Shape = DEFAULT) -> float:
    """One local-SGD round: K*H*B examples, forward + backward = 3 x 2 x (in x out) per layer."""
    return shape.K * shape.H * shape.B * 6.0 * sum(i * o for i, o in layer_sizes(image_shape, hidden))


def learned_flops(image_shape, hidden, input_width: int) -> float:
    """A per-parameter MLP (input_width -> 32 -> 32 -> 2) over every task parameter, forward."""
    return num_task_params(image_shape, hidden) * 2.0 * (input_width * HIDDEN + HIDDEN * HIDDEN + HIDDEN * 2)


def lagg_a_flops(image_shape, hidden, shape: Shape = DEFAULT) -> float:
    """LAgg-A's network: input width K+38."""
    return learned_flops(image_shape, hidden, shape.K + 38)


def lopt_a_flops(image_shape, hidden) -> float:
    """LOpt-A's network: input width 39, whatever K."""
    return learned_flops(image_shape, hidden, 39)


def compile_timed(fn, *args):
    """(compiled fn, compile seconds, XLA's memory estimate in MiB or None)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    memory = None if stats is None else (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                                         + stats.output_size_in_bytes) / 2 ** 20
    return compiled, seconds, memory


def median_seconds(call, repeats: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs after one warm-up."""
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def learned_update(variant: str, K: int):
    """The server update of a freshly initialised learned aggregator."""
    from lagg_pipeline.aggregators.learned import LearnedAggregator

    aggregator = LearnedAggregator(variant, K, HIDDEN)
    return aggregator.server_update(aggregator.init_meta_params(jax.random.PRNGKey(0)))


def time_rounds(task, split, update, rounds: int, repeats: int, shape: Shape = DEFAULT,
                split_as_constant: bool = False):
    """(seconds per round, compile seconds, memory MiB) of ``rounds`` scanned rounds."""
    step = make_round_step(task, update, num_grads=shape.K, num_local_steps=shape.H, local_batch_size=shape.B,
                           local_learning_rate=LR)
    state = jax.tree.map(lambda x: x[0], init_round_states(task, update, 0, 1, split))

    def run(s, data):
        return jax.lax.scan(lambda c, _: step(c, data), s, None, length=rounds)

    if split_as_constant:
        _, compile_s, memory = compile_timed(lambda s: run(s, split), state)
        return None, compile_s, memory
    compiled, compile_s, memory = compile_timed(run, state, split)
    return median_seconds(lambda: compiled(state, split), repeats) / rounds, compile_s, memory


def shape_keywords(shape: Shape = DEFAULT) -> dict:
    """:func:`steady.pes_trainer`'s shape keywords for ``shape``."""
    return {"K": shape.K, "H": shape.H, "B": shape.B, "num_tasks": shape.num_tasks,
            "trunc_length": shape.trunc_length, "lr": LR, "aggregator_hidden": HIDDEN}


def pes_trainer(task, split, shape: Shape = DEFAULT):
    """A LAgg-A MetaTrainer at ``shape`` (meta-training's defaults otherwise)."""
    return steady.pes_trainer(task, split, **shape_keywords(shape))


def time_pes(task, split, repeats: int, shape: Shape = DEFAULT, cached: bool = True):
    """(seconds per PES outer step of LAgg-A, compile seconds, memory MiB, compile seconds
    again: from XLA's persistent cache, what every later job with these shapes pays, None
    unless ``cached``; seconds of the meta-training state's cold init)."""
    trainer = pes_trainer(task, split, shape)
    t0 = time.perf_counter()
    state = jax.block_until_ready(trainer.init())
    init_s = time.perf_counter() - t0
    compiled, compile_s, memory = compile_timed(trainer._step, state, trainer.data)
    cached_compile_s = compile_timed(trainer._step, state, trainer.data)[1] if cached else None
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], trainer.data)
        return metrics

    return median_seconds(one_step, repeats), compile_s, memory, cached_compile_s, init_s


def load_task(name: str, hidden=None):
    """(task, splits) of a bench task, optionally with other hidden sizes."""
    dataset, default_hidden = TASKS[name]
    return steady.load_task(name, dataset, default_hidden if hidden is None else hidden)


def measure(name: str, args) -> dict:
    """Every measure of one task at the default shape, as {measure key: value}."""
    hidden = TASKS[name][1]
    task, splits = load_task(name)
    image_shape = tuple(splits.train.x.shape[1:])
    fedavg_flops = round_flops(image_shape, hidden)
    flops = {"fedavg_round": fedavg_flops,
             "lagg_a_round": fedavg_flops + lagg_a_flops(image_shape, hidden),
             "lopt_a_round": fedavg_flops + lopt_a_flops(image_shape, hidden)}
    flops["pes_outer_step"] = DEFAULT.pes_rounds * flops["lagg_a_round"]
    updates = {"fedavg_round": hand.fedavg(), "lagg_a_round": learned_update("lagg_a", DEFAULT.K),
               "lopt_a_round": learned_update("lopt_a", DEFAULT.K)}
    timings = {m: time_rounds(task, splits.train, u, args.rounds, args.repeats) for m, u in updates.items()}
    out = {}
    if args.outer_steps:
        *timings["pes_outer_step"], out["pes_outer_step_compile_seconds_cached"], out["pes_init_seconds"] = time_pes(
            task, splits.train, args.outer_steps)
    for measure_name, (seconds, compile_s, memory) in timings.items():
        out.update({f"{measure_name}_seconds": seconds, f"{measure_name}_compile_seconds": compile_s,
                    f"{measure_name}_memory_mib": memory, f"{measure_name}_gflop": flops[measure_name] / 1e9})
    out["lagg_a_round_over_fedavg_round"] = out["lagg_a_round_seconds"] / out["fedavg_round_seconds"]
    if args.outer_steps:
        out["pes_outer_steps_per_hour"] = 3600.0 / out["pes_outer_step_seconds"]
        out["pes_step_over_800_lagg_a_rounds"] = out["pes_outer_step_seconds"] / (
            DEFAULT.pes_rounds * out["lagg_a_round_seconds"])
    if name == "mnist5k_mlp":  # what embedding the split as a constant used to cost
        out["fedavg_round_compile_seconds_split_as_constant"] = time_rounds(
            task, splits.train, hand.fedavg(), args.rounds, 0, split_as_constant=True)[1]
    return out


def format_table(numbers: dict) -> str:
    lines = [f"device {numbers['device']}, jax {numbers['jax_version']}, matmul probe "
             f"{numbers['matmul_gflops']:.0f} GFLOP/s; K={DEFAULT.K}, H={DEFAULT.H}, B={DEFAULT.B}; "
             f"PES {DEFAULT.num_tasks} pairs x {DEFAULT.trunc_length} rounds over {numbers['device_count']} "
             f"device(s)", f"XLA_FLAGS={numbers['xla_flags'] or '(none)'}", ""]
    header = f"{'task':<12} {'measure':<15} {'seconds':>10} {'compile s':>10} {'MiB':>8} {'GFLOP':>9} {'% of limit':>10}"
    lines += [header, "-" * len(header)]
    for task in TASKS:
        for measure_name in MEASURES:
            key = f"{task}.{measure_name}"
            if f"{key}_seconds" not in numbers:
                continue
            memory = numbers[f"{key}_memory_mib"]
            lines.append(f"{task:<12} {measure_name:<15} {numbers[f'{key}_seconds']:>10.4g} "
                         f"{numbers[f'{key}_compile_seconds']:>10.3g} "
                         f"{'-' if memory is None else f'{memory:.0f}':>8} {numbers[f'{key}_gflop']:>9.3g} "
                         f"{100 * numbers[f'{key}_fraction_of_matmul_limit']:>9.1f}%")
    lines.append("")
    for key, value in numbers.items():
        if key.endswith(("_over_fedavg_round", "_over_800_lagg_a_rounds", "_split_as_constant", "_cached",
                         "_per_hour")):
            lines.append(f"{key:<58} {value:.3g}")
    return "\n".join(lines)


def log_to_mlflow(numbers: dict, run_name: str, experiment: str = "bench", artifacts=()) -> None:
    """Log every float of ``numbers`` (and the ``artifacts`` files) to one MLflow run."""
    from lagg_pipeline import tracking

    cfg = OmegaConf.create({"enabled": True, "uri": None, "experiment": experiment})
    run = tracking.start_run(cfg, run_name, {"device": numbers["device"]})
    run.log_metrics({k: ([0], [v]) for k, v in numbers.items() if isinstance(v, float)})
    for path in artifacts:
        run.log_artifact(path)
    run.end()


def main(argv=None) -> dict:
    xla_flags.apply()  # a command-line entry point: set before JAX starts its backend
    parser = argparse.ArgumentParser(prog="python -m lagg_pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--rounds", type=int, default=100, help="rounds per timed scan")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each round scan (median)")
    parser.add_argument("--outer-steps", type=int, default=3, help="timed PES outer steps (median; 0 skips PES)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--mlflow", action="store_true", help="also log them to the MLflow experiment 'bench'")
    parser.add_argument("--readme", help="replace the table between this file's bench markers")
    args = parser.parse_args(argv)

    # Compile times are cold: a fresh persistent cache, which time_pes then reads back.
    xla_cache.enable(tempfile.mkdtemp(prefix="lagg_bench_xla_"), env_wins=False)
    probe = steady.Probe()  # read between the tasks' measures; the limit is the median reading
    numbers = {"device": str(jax.devices()[0]), "jax_version": jax.__version__,
               "device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name in args.tasks.split(","):
        probe.read()
        numbers.update({f"{name}.{k}": v for k, v in measure(name, args).items()})
    probe.read()
    numbers["matmul_gflops"] = probe.gflops
    for key in [k for k in numbers if k.endswith("_gflop")]:
        measure_key = key.removesuffix("_gflop")
        numbers[f"{measure_key}_fraction_of_matmul_limit"] = (numbers[key] / numbers["matmul_gflops"]
                                                              / numbers[f"{measure_key}_seconds"])
    table = format_table(numbers)
    print(table)
    from lagg_pipeline.bench.outputs import write_outputs

    write_outputs(table, numbers, "make bench", args.readme, args.json, BENCH_BEGIN, BENCH_END)
    if args.mlflow:
        log_to_mlflow(numbers, "make bench")
    return numbers

