"""One communication round of the client simulator (SPEC section 1).

K workers (``jax.vmap``) each start from the server weights and take H plain SGD steps
(``jax.lax.scan``); each sends its delta (new minus old). The server update then turns
the stacked deltas into the next server weights.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lagg_pipeline.aggregators.base import GRADIENT, LOCAL_SGD
from lagg_pipeline.data import episode_split, sample_batch
from lagg_pipeline.data.partition import ClientSplit, sample_clients
from lagg_pipeline.data.sampler import next_counter

LossFn = Callable  # (params, x, y) -> scalar


def reshape_round_batch(x_N, y_N, num_grads: int, num_local_steps: int):
    """[K*H*B, ...] -> [K, H, B, ...]: worker k gets the k-th contiguous block of H*B."""
    x = x_N.reshape(num_grads, num_local_steps, -1, *x_N.shape[1:])
    return x, y_N.reshape(num_grads, num_local_steps, -1)


def make_client_round(loss_fn: LossFn, local_learning_rate: float, client: str = LOCAL_SGD):
    """``round(params, x_KxHxB, y_KxHxB) -> (deltas_K, train_loss)``.

    ``train_loss`` is the mean over workers and local steps of each minibatch's loss
    evaluated before its SGD step. With ``client="gradient"`` (data-parallel sgd/adam)
    each worker sends minus its block's gradient at the server weights instead.
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def local_sgd(params, x_HxB, y_HxB):
        def step(w, batch):
            loss, g = grad_fn(w, *batch)
            return jax.tree.map(lambda p, gp: p - local_learning_rate * gp, w, g), loss

        w_final, losses_H = jax.lax.scan(step, params, (x_HxB, y_HxB))
        return jax.tree.map(jnp.subtract, w_final, params), jnp.mean(losses_H)

    def gradient(params, x_HxB, y_HxB):
        x = x_HxB.reshape(-1, *x_HxB.shape[2:])
        loss, g = grad_fn(params, x, y_HxB.reshape(-1))
        return jax.tree.map(jnp.negative, g), loss

    worker = {LOCAL_SGD: local_sgd, GRADIENT: gradient}[client]

    def client_round(params, x_KxHxB, y_KxHxB):
        deltas_K, losses_K = jax.vmap(worker, in_axes=(None, 0, 0))(params, x_KxHxB, y_KxHxB)
        return deltas_K, jnp.mean(losses_K)

    return client_round


class RoundState(NamedTuple):
    """Everything one training run carries from round to round."""

    params: Any
    server_state: Any
    data_key: jax.Array  # classic uint32 PRNG key of this run's data stream
    data_counter: Any  # int32 examples consumed so far, or ClientCounters over a ClientSplit


def draw_round(train, key: jax.Array, counter, num_grads: int, num_local_steps: int, local_batch_size: int):
    """One round's examples (x [K, H, B, ...], y [K, H, B]) and the stream's next position.

    From a :class:`Split`, the K workers share one i.i.d. stream; from a
    :class:`ClientSplit`, K of its clients are picked and each reads its own examples; from an
    :class:`~lagg_pipeline.data.episode_split.EpisodePool`, the stream covers the episode's
    training part only."""
    if isinstance(train, episode_split.EpisodePool):
        x_N, y_N, counter = episode_split.train_batch(
            train, key, counter, round_size(num_grads, num_local_steps, local_batch_size))
        x, y = reshape_round_batch(x_N, y_N, num_grads, num_local_steps)
        return x, y, counter
    if isinstance(train, ClientSplit):
        x, y, counter = sample_clients(train, key, counter, num_grads, num_local_steps * local_batch_size)
        return (x.reshape(num_grads, num_local_steps, local_batch_size, *x.shape[2:]),
                y.reshape(num_grads, num_local_steps, local_batch_size), counter)
    count = round_size(num_grads, num_local_steps, local_batch_size)
    x_N, y_N = sample_batch(train, key, counter, count)
    x, y = reshape_round_batch(x_N, y_N, num_grads, num_local_steps)
    return x, y, next_counter(counter, count, train.y.shape[0])


def make_round_step(task, server_update, *, num_grads: int, num_local_steps: int,
                    local_batch_size: int, local_learning_rate: float):
    """``step(state, train_split) -> (state, train_loss)``: sample one round's batches on the
    device, run the clients, apply the server update. Pure, so it can sit inside scan and
    vmap; the split is an argument so that jit never embeds a dataset as a constant."""
    client_round = make_client_round(task.loss, local_learning_rate, server_update.client)

    def step(state: RoundState, train_split):
        x, y, counter = draw_round(train_split, state.data_key, state.data_counter, num_grads, num_local_steps,
                                   local_batch_size)
        deltas_K, train_loss = client_round(state.params, x, y)
        params, server_state = server_update.update(deltas_K, state.server_state, state.params)
        return RoundState(params, server_state, state.data_key, counter), train_loss

    return step


def round_size(num_grads: int, num_local_steps: int, local_batch_size: int) -> int:
    """Examples one round consumes: K*H*B."""
    return num_grads * num_local_steps * local_batch_size
