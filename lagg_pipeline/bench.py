"""The speed yardstick behind ``make bench``: every number comes from one run on this machine.

For the digits_mlp and mnist5k_mlp shapes at K=8, H=4, B=128 it measures, after compilation
and as the median over repeats: one fedavg round, one lagg_a round, one PES outer step of
LAgg-A (8 antithetic pairs x 50 rounds = 800 rounds), the compile time and XLA's memory
estimate of each, and their analytic FLOPs. A jitted 2048x2048 matmul gives this machine's
compute rate, so every time is also a fraction of the compute-bound limit. Two ratios say
where overhead lives: lagg_a round / fedavg round, and PES outer step / 800 lagg_a rounds.
For mnist5k_mlp it also compiles the fedavg round with the train split captured as a jit
constant (how the pipeline used to do it) to show what passing data as arguments saves.
Compile times are cold (an empty persistent cache); the PES step is compiled a second time
to show what a later job pays with XLA's persistent cache (lagg_pipeline/xla_cache.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline import xla_cache
from lagg_pipeline.aggregators import hand
from lagg_pipeline.benchmark import init_round_states
from lagg_pipeline.data import load_splits
from lagg_pipeline.simulator import make_round_step
from lagg_pipeline.tasks import make_task

K, H, B, LR = 8, 4, 128, 0.5
NUM_TASKS, TRUNC_LENGTH, HIDDEN = 8, 50, 32
TASKS = {"digits_mlp": ("digits", [32]), "mnist5k_mlp": ("mnist5k", [128, 128])}
BENCH_BEGIN, BENCH_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matmul rate: the compute-bound yardstick."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def layer_sizes(image_shape, hidden, classes: int = 10) -> list[tuple[int, int]]:
    sizes = [int(np.prod(image_shape)), *hidden, classes]
    return list(zip(sizes[:-1], sizes[1:]))


def round_flops(image_shape, hidden) -> float:
    """One local-SGD round: K*H*B examples, forward + backward = 3 x 2 x (in x out) per layer."""
    return K * H * B * 6.0 * sum(i * o for i, o in layer_sizes(image_shape, hidden))


def lagg_a_flops(image_shape, hidden) -> float:
    """LAgg-A's per-parameter MLP (K+38 -> 32 -> 32 -> 2) over every task parameter, forward."""
    num_params = sum(i * o + o for i, o in layer_sizes(image_shape, hidden))
    return num_params * 2.0 * ((K + 38) * HIDDEN + HIDDEN * HIDDEN + HIDDEN * 2)


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    memory = None if stats is None else (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                                         + stats.output_size_in_bytes) / 2 ** 20
    return compiled, seconds, memory


def _median_seconds(call, repeats: int) -> float:
    jax.block_until_ready(call())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_rounds(task, split, update, rounds: int, repeats: int, split_as_constant: bool = False):
    """(seconds per round, compile seconds, memory MiB) of ``rounds`` scanned rounds."""
    step = make_round_step(task, update, num_grads=K, num_local_steps=H, local_batch_size=B, local_learning_rate=LR)
    state = jax.tree.map(lambda x: x[0], init_round_states(task, update, 0, 1, split))

    def run(s, data):
        return jax.lax.scan(lambda c, _: step(c, data), s, None, length=rounds)

    if split_as_constant:
        compiled, compile_s, memory = _compile(lambda s: run(s, split), state)
        return None, compile_s, memory
    compiled, compile_s, memory = _compile(run, state, split)
    return _median_seconds(lambda: compiled(state, split), repeats) / rounds, compile_s, memory


def time_pes(task, split, repeats: int):
    """(seconds per PES outer step of LAgg-A, compile seconds, memory MiB, compile seconds
    again: from XLA's persistent cache, what every later job with these shapes pays)."""
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.config import Config
    from lagg_pipeline.meta.pes import PESData
    from lagg_pipeline.meta.train import MetaTrainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "optimizer": {"name": "lagg_a"}, "num_outer_steps": 1000, "num_tasks": NUM_TASKS,
        "trunc_length": TRUNC_LENGTH, "num_grads": K, "num_local_steps": H, "local_batch_size": B,
        "local_learning_rate": LR, "hidden_size": HIDDEN})
    trainer = MetaTrainer(cfg, task, PESData(split), LearnedAggregator("lagg_a", K, HIDDEN))
    state = trainer.init()
    compiled, compile_s, memory = _compile(trainer._step, state, trainer.data)
    _, cached_compile_s, _ = _compile(trainer._step, state, trainer.data)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], trainer.data)
        return metrics

    return _median_seconds(one_step, repeats), compile_s, memory, cached_compile_s


def measure(name: str, dataset: str, hidden, args, gflops: float) -> dict:
    from lagg_pipeline.aggregators.learned import LearnedAggregator

    splits = load_splits(dataset)
    image_shape = tuple(splits.train.x.shape[1:])
    task = make_task(OmegaConf.create({"name": name, "dataset": dataset, "model": "mlp", "hidden_sizes": hidden}),
                     image_shape, splits.num_classes)
    aggregator = LearnedAggregator("lagg_a", K, HIDDEN)
    lagg_a = aggregator.server_update(aggregator.init_meta_params(jax.random.PRNGKey(0)))
    flops = {"fedavg_round": round_flops(image_shape, hidden),
             "lagg_a_round": round_flops(image_shape, hidden) + lagg_a_flops(image_shape, hidden)}
    flops["pes_outer_step"] = 2 * NUM_TASKS * TRUNC_LENGTH * flops["lagg_a_round"]
    timings = {"fedavg_round": time_rounds(task, splits.train, hand.fedavg(), args.rounds, args.repeats),
               "lagg_a_round": time_rounds(task, splits.train, lagg_a, args.rounds, args.repeats)}
    out = {}
    if args.outer_steps:
        *timings["pes_outer_step"], out["pes_outer_step_compile_seconds_cached"] = time_pes(
            task, splits.train, args.outer_steps)
    for measure_name, (seconds, compile_s, memory) in timings.items():
        out.update({f"{measure_name}_seconds": seconds, f"{measure_name}_compile_seconds": compile_s,
                    f"{measure_name}_memory_mib": memory, f"{measure_name}_gflop": flops[measure_name] / 1e9,
                    f"{measure_name}_fraction_of_matmul_limit": flops[measure_name] / 1e9 / gflops / seconds})
    out["lagg_a_round_over_fedavg_round"] = out["lagg_a_round_seconds"] / out["fedavg_round_seconds"]
    if args.outer_steps:
        out["pes_step_over_800_lagg_a_rounds"] = out["pes_outer_step_seconds"] / (
            2 * NUM_TASKS * TRUNC_LENGTH * out["lagg_a_round_seconds"])
    if dataset == "mnist5k":  # what embedding the split as a constant used to cost
        _, constant_compile, constant_memory = time_rounds(task, splits.train, hand.fedavg(), args.rounds, 0,
                                                           split_as_constant=True)
        out["fedavg_round_compile_seconds_split_as_constant"] = constant_compile
    return out


def format_table(numbers: dict) -> str:
    lines = [f"device {numbers['device']}, jax {numbers['jax_version']}, matmul probe "
             f"{numbers['matmul_gflops']:.0f} GFLOP/s; K={K}, H={H}, B={B}; PES {NUM_TASKS} pairs x "
             f"{TRUNC_LENGTH} rounds", ""]
    header = f"{'task':<12} {'measure':<15} {'seconds':>10} {'compile s':>10} {'MiB':>8} {'GFLOP':>9} {'% of limit':>10}"
    lines += [header, "-" * len(header)]
    for task in TASKS:
        for measure_name in ("fedavg_round", "lagg_a_round", "pes_outer_step"):
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
        if key.endswith(("_over_fedavg_round", "_over_800_lagg_a_rounds", "_split_as_constant", "_cached")):
            lines.append(f"{key:<58} {value:.3g}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    gflops = matmul_gflops()
    numbers = {"device": str(jax.devices()[0]), "jax_version": jax.__version__, "matmul_gflops": gflops}
    for name in args.tasks.split(","):
        dataset, hidden = TASKS[name]
        numbers.update({f"{name}.{k}": v for k, v in measure(name, dataset, hidden, args, gflops).items()})
    table = format_table(numbers)
    print(table)
    if args.readme:
        from pathlib import Path

        from lagg_pipeline.comparison import splice_readme

        splice_readme(Path(args.readme), f"```\n$ make bench\n{table}\n```", BENCH_BEGIN, BENCH_END)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    if args.mlflow:
        from lagg_pipeline import tracking

        cfg = OmegaConf.create({"enabled": True, "uri": None, "experiment": "bench"})
        run = tracking.start_run(cfg, "make bench", {"device": numbers["device"]})
        run.log_metrics({k: ([0], [v]) for k, v in numbers.items() if isinstance(v, float)})
        run.end()
    return numbers


if __name__ == "__main__":
    main()
