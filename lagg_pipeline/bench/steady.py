"""The steady probe and one process's PES measures, runnable against any revision of the package.

The probe is the whole machine's float32 matmul rate: one 2048² matmul per device, all devices
at once (one CPU device per core, or one device whose matmul spreads over the cores), so it
reads the same limit however the devices are set up; a single matmul on device 0 swings by
1.4x between runs. :class:`Probe` keeps every reading, taken between the measures, and reports
their median beside them.

``make bench-compare`` runs :func:`measure_pes` in a fresh process per revision: this file is
executed by path with the other revision's package first on ``sys.path``, so it imports only
what every revision since a6de6c6 offers (``MetaTrainer``, ``PESData``, ``load_splits``,
``make_task``, ``LearnedAggregator``, ``Config``) and nothing else of ``lagg_pipeline.bench``.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import numpy as np

PROBE_SIZE = 2048
SHAPE_KEYS = ("K", "H", "B", "num_tasks", "trunc_length", "lr", "aggregator_hidden")


def matmul_probe(n: int = PROBE_SIZE, repeats: int = 5) -> float:
    """GFLOP/s of one n x n float32 matmul on every device at once, median over ``repeats``."""
    devices = jax.devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), jax.sharding.PartitionSpec("d"))
    a = jax.device_put(np.random.default_rng(0).standard_normal((len(devices), n, n), np.float32), sharding)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return len(devices) * 2 * n ** 3 / statistics.median(times) / 1e9


class Probe:
    """Probe readings taken between measures; ``gflops`` is their median."""

    def __init__(self):
        self.readings: list[float] = []

    def read(self) -> float:
        self.readings.append(matmul_probe())
        return self.readings[-1]

    @property
    def gflops(self) -> float:
        return statistics.median(self.readings)


def load_task(name: str, dataset: str, hidden):
    """(task, splits): an MLP with ``hidden`` layers on ``dataset``."""
    from omegaconf import OmegaConf

    from lagg_pipeline.data import load_splits
    from lagg_pipeline.tasks import make_task

    splits = load_splits(dataset)
    task = make_task(OmegaConf.create({"name": name, "dataset": dataset, "model": "mlp", "hidden_sizes": list(hidden)}),
                     tuple(splits.train.x.shape[1:]), splits.num_classes)
    return task, splits


def pes_trainer(task, split, *, K: int, H: int, B: int, num_tasks: int, trunc_length: int, lr: float,
                aggregator_hidden: int):
    """A LAgg-A MetaTrainer at this shape (meta-training's defaults otherwise)."""
    from omegaconf import OmegaConf

    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.config import Config
    from lagg_pipeline.meta.pes import PESData
    from lagg_pipeline.meta.train import MetaTrainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "optimizer": {"name": "lagg_a"}, "num_outer_steps": 1000, "num_tasks": num_tasks,
        "trunc_length": trunc_length, "num_grads": K, "num_local_steps": H, "local_batch_size": B,
        "local_learning_rate": lr, "hidden_size": aggregator_hidden})
    return MetaTrainer(cfg, task, PESData(split), LearnedAggregator("lagg_a", K, aggregator_hidden))


def measure_pes(spec: dict) -> dict:
    """A PES outer step's cold compile and median step time, the meta-training state's cold init
    (the other wait before the first step), probe readings before, between and after. ``spec``:
    name, dataset, hidden, outer_steps and :func:`pes_trainer`'s shape keywords."""
    jax.config.update("jax_enable_compilation_cache", False)  # cold compiles, whatever the environment says
    probe = Probe()
    task, splits = load_task(spec["name"], spec["dataset"], spec["hidden"])
    trainer = pes_trainer(task, splits.train, **{k: spec[k] for k in SHAPE_KEYS})
    t0 = time.perf_counter()
    state = jax.block_until_ready(trainer.init())  # cold too: what it compiles (op by op, or jitted)
    init_s = time.perf_counter() - t0
    probe.read()
    t0 = time.perf_counter()
    compiled = jax.jit(trainer._step).lower(state, trainer.data).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, trainer.data)  # the first run allocates
    jax.block_until_ready(metrics)
    steps = []
    for _ in range(spec["outer_steps"]):
        probe.read()
        t0 = time.perf_counter()
        state, metrics = compiled(state, trainer.data)
        jax.block_until_ready(metrics)
        steps.append(time.perf_counter() - t0)
    probe.read()
    return {"pes_outer_step_seconds": statistics.median(steps), "pes_outer_step_compile_seconds": compile_s,
            "pes_init_seconds": init_s,
            "probe_gflops": probe.gflops, "probe_readings": probe.readings, "devices": jax.device_count(),
            "package": sys.modules[type(trainer).__module__].__file__}  # which revision's code ran


if __name__ == "__main__":
    print("RESULT", json.dumps(measure_pes(json.loads(sys.argv[1]))))
