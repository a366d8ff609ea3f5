"""The meta-test protocol (SPEC section 5): seeds x rounds, whole-split evaluation.

All seeds run together (``jax.vmap``); rounds run in jitted ``lax.scan`` chunks of
``eval_every`` rounds, each followed by a full pass over the test and outer-valid splits.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from lagg_pipeline.data.partition import init_counter
from lagg_pipeline.simulator import RoundState, make_round_step


class BenchmarkResult(NamedTuple):
    """Per-seed curves: train loss every round, evaluations every ``eval_every`` rounds."""

    name: str
    train_loss: np.ndarray  # [S, R]: loss of round r (1-based r at column r-1)
    eval_rounds: np.ndarray  # [E]: rounds applied before each evaluation (0 = init)
    test_loss: np.ndarray  # [S, E]
    test_accuracy: np.ndarray  # [S, E]
    outer_valid_loss: np.ndarray  # [S, E]
    outer_valid_accuracy: np.ndarray  # [S, E]: the split baselines are tuned and aggregators chosen on
    seconds_per_round: float  # wall time of one round of all seeds, after compilation
    compile_seconds: float


def _evaluate(task, params, test, outer_valid):
    test_loss = task.loss(params, test.x, test.y)
    test_accuracy = task.accuracy(params, test.x, test.y)
    outer_valid_loss = task.loss(params, outer_valid.x, outer_valid.y)
    outer_valid_accuracy = task.accuracy(params, outer_valid.x, outer_valid.y)
    return test_loss, test_accuracy, outer_valid_loss, outer_valid_accuracy


def init_round_states(task, server_update, seed: int, num_runs: int, train) -> RoundState:
    """One RoundState per seed over the ``train`` split, stacked; run i uses keys derived from (seed, i)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num_runs)

    def init(key):
        init_key, data_key = jax.random.split(key)
        params = task.init(init_key)
        return RoundState(params, server_update.init(params), data_key, init_counter(train))

    return jax.jit(jax.vmap(init))(keys)  # one compile, not one per op (bitwise equal)


def run_benchmark(task, splits, server_update, *, name: str, num_grads: int, num_local_steps: int,
                  local_batch_size: int, local_learning_rate: float, num_runs: int,
                  num_rounds: int, eval_every: int, seed: int, progress: bool = True) -> BenchmarkResult:
    """Train ``num_runs`` seeds for ``num_rounds`` rounds with ``server_update``."""
    step = make_round_step(task, server_update, num_grads=num_grads,
                           num_local_steps=num_local_steps, local_batch_size=local_batch_size,
                           local_learning_rate=local_learning_rate)

    def chunk(states, train_split, length):
        def one_seed(state):
            return jax.lax.scan(lambda s, _: step(s, train_split), state, None, length=length)

        return jax.vmap(one_seed)(states)

    evaluate = jax.jit(jax.vmap(lambda p, test, outer_valid: _evaluate(task, p, test, outer_valid),
                                in_axes=(0, None, None)))
    states = init_round_states(task, server_update, seed, num_runs, splits.train)

    lengths = [eval_every] * (num_rounds // eval_every)
    if num_rounds % eval_every:
        lengths.append(num_rounds % eval_every)
    t0 = time.perf_counter()
    compiled = {n: jax.jit(chunk, static_argnums=2).lower(states, splits.train, n).compile() for n in set(lengths)}
    compile_seconds = time.perf_counter() - t0

    evals = [evaluate(states.params, splits.test, splits.outer_valid)]
    losses, run_seconds = [], 0.0
    with tqdm(total=num_rounds, desc=name, unit="round", disable=not progress, leave=False) as bar:
        for n in lengths:
            t0 = time.perf_counter()
            states, loss_SxN = compiled[n](states, splits.train)
            loss_SxN.block_until_ready()
            run_seconds += time.perf_counter() - t0
            losses.append(np.asarray(loss_SxN))
            evals.append(evaluate(states.params, splits.test, splits.outer_valid))
            # postfix first: update() redraws, so the bar shows this chunk's loss, not the previous one
            bar.set_postfix(train_loss=f"{losses[-1][:, -1].mean():.4f}", refresh=False)
            bar.update(n)

    test_loss, test_accuracy, outer_valid_loss, outer_valid_accuracy = (
        np.stack([np.asarray(e[i]) for e in evals], axis=1) for i in range(4))
    return BenchmarkResult(
        name=name,
        train_loss=np.concatenate(losses, axis=1),
        eval_rounds=np.cumsum([0] + lengths),
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        outer_valid_loss=outer_valid_loss,
        outer_valid_accuracy=outer_valid_accuracy,
        seconds_per_round=run_seconds / num_rounds,
        compile_seconds=compile_seconds,
    )
