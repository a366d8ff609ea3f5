"""The speed harness behind ``make bench``: every number below comes from one run.

Measures, on the embedded digits task with K=8, H=4, B=128:
- seconds per round of the jitted, vmapped, scanned simulator (one seed, after compile),
- the same rounds driven the way the reference code drives them -- batches pulled from
  the host each round and a Python loop over workers and local steps -- and the ratio,
- seconds per PES outer step (num_tasks=8, trunc_length=50, lagg_a) after compile.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline.aggregators import hand
from lagg_pipeline.benchmark import init_round_states
from lagg_pipeline.data import load_splits
from lagg_pipeline.simulator import make_round_step
from lagg_pipeline.tasks import make_task

K, H, B, LR = 8, 4, 128, 0.5


def _digits():
    splits = load_splits("digits")
    task_cfg = OmegaConf.create({"name": "digits_mlp", "dataset": "digits", "model": "mlp", "hidden_sizes": [32]})
    return splits, make_task(task_cfg, tuple(splits.train.x.shape[1:]), splits.num_classes)


def scanned_seconds_per_round(splits, task, rounds: int) -> float:
    update = hand.fedavg()
    step = make_round_step(task, splits.train, update, num_grads=K, num_local_steps=H,
                           local_batch_size=B, local_learning_rate=LR)
    state = jax.tree.map(lambda x: x[0], init_round_states(task, update, 0, 1))
    run = jax.jit(lambda s: jax.lax.scan(lambda c, _: step(c), s, None, length=rounds)).lower(state).compile()
    jax.block_until_ready(run(state))
    t0 = time.perf_counter()
    jax.block_until_ready(run(state))
    return (time.perf_counter() - t0) / rounds


def host_loop_seconds_per_round(splits, task, rounds: int) -> float:
    """Reference-style: numpy batches from the host, Python loops over workers and steps."""
    x_host, y_host = np.asarray(splits.train.x), np.asarray(splits.train.y)
    grad_fn = jax.jit(jax.value_and_grad(task.loss))
    sgd_step = jax.jit(lambda w, g: jax.tree.map(lambda p, gp: p - LR * gp, w, g))
    params = task.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def one_round(params):
        idx = rng.choice(len(x_host), K * H * B)
        x, y = x_host[idx].reshape(K, H, B, *x_host.shape[1:]), y_host[idx].reshape(K, H, B)
        new = []
        for k in range(K):
            w = params
            for h in range(H):
                _, g = grad_fn(w, jnp.asarray(x[k, h]), jnp.asarray(y[k, h]))
                w = sgd_step(w, g)
            new.append(w)
        return jax.tree.map(lambda *ws: sum(ws) / K, *new)

    jax.block_until_ready(one_round(params))  # compile
    t0 = time.perf_counter()
    for _ in range(rounds):
        params = one_round(params)
    jax.block_until_ready(params)
    return (time.perf_counter() - t0) / rounds


def pes_seconds_per_outer_step(splits, task, outer_steps: int, variant: str = "lagg_a") -> tuple[float, float]:
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.config import Config
    from lagg_pipeline.meta.train import MetaTrainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"optimizer": {"name": variant}, "num_outer_steps": 1000})
    trainer = MetaTrainer(cfg, task, splits.train, LearnedAggregator(variant, K, cfg.hidden_size))
    state = trainer.init()
    t0 = time.perf_counter()
    step = jax.jit(trainer._step).lower(state).compile()
    compile_seconds = time.perf_counter() - t0
    state, _ = jax.block_until_ready(step(state))
    t0 = time.perf_counter()
    for _ in range(outer_steps):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / outer_steps, compile_seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds timed for the simulator")
    parser.add_argument("--host-rounds", type=int, default=20, help="rounds timed for the host loop")
    parser.add_argument("--outer-steps", type=int, default=3, help="PES outer steps timed (0 skips)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    splits, task = _digits()
    scanned = scanned_seconds_per_round(splits, task, args.rounds)
    host = host_loop_seconds_per_round(splits, task, args.host_rounds)
    numbers = {"device": str(jax.devices()[0]), "seconds_per_round_scanned": scanned,
               "seconds_per_round_host_loop": host, "speedup_scanned_vs_host_loop": host / scanned}
    if args.outer_steps:
        per_step, compile_seconds = pes_seconds_per_outer_step(splits, task, args.outer_steps)
        numbers.update(seconds_per_outer_step_lagg_a=per_step, pes_compile_seconds=compile_seconds,
                       rounds_per_second_in_pes=2 * 8 * 50 / per_step)
    width = max(map(len, numbers))
    print(f"digits_mlp, K={K}, H={H}, B={B}")
    for name, value in numbers.items():
        print(f"  {name:<{width}}  {value:.4g}" if isinstance(value, float) else f"  {name:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    return numbers


if __name__ == "__main__":
    main()
