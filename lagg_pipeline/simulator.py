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
from lagg_pipeline.data.sampler import next_counter, stream_indices
from lagg_pipeline.data.splits import Split

LossFn = Callable  # (params, x, y) -> scalar


def reshape_round_batch(x_N, y_N, num_grads: int, num_local_steps: int):
    """[K*H*B, ...] -> [K, H, B, ...]: worker k gets the k-th contiguous block of H*B."""
    x = x_N.reshape(num_grads, num_local_steps, -1, *x_N.shape[1:])
    return x, y_N.reshape(num_grads, num_local_steps, -1)


def make_local_sgd(loss_fn: LossFn, local_learning_rate: float):
    """``run(params, inputs_H, read) -> (deltas_K, train_loss)``: every worker's H plain SGD
    steps from ``params``; local step h trains on ``read(inputs_H[h]) -> (x [K, B, ...], y [K, B])``.

    A scan over steps of a vmap over workers, so that each step can gather just the examples
    it uses (``inputs_H`` the round's example indices): gathering the whole round and handing
    it to a scan inside the vmap costs a gather, a transpose for the scan and a slice per step,
    three passes over the round's data instead of one."""
    grad_fn = jax.vmap(jax.value_and_grad(loss_fn))

    def run(params, inputs_H, read):
        num_grads = jax.tree.leaves(inputs_H)[0].shape[1]

        def step(w_K, inputs):
            losses_K, g_K = grad_fn(w_K, *read(inputs))
            return jax.tree.map(lambda p, gp: p - local_learning_rate * gp, w_K, g_K), losses_K

        start_K = jax.tree.map(lambda p: jnp.broadcast_to(p, (num_grads, *p.shape)), params)
        w_final_K, losses_HxK = jax.lax.scan(step, start_K, inputs_H)
        deltas_K = jax.tree.map(jnp.subtract, w_final_K, start_K)
        return deltas_K, jnp.mean(jnp.mean(losses_HxK, axis=0))

    return run


def make_client_round(loss_fn: LossFn, local_learning_rate: float, client: str = LOCAL_SGD):
    """``round(params, x_KxHxB, y_KxHxB) -> (deltas_K, train_loss)``.

    ``train_loss`` is the mean over workers and local steps of each minibatch's loss
    evaluated before its SGD step. With ``client="gradient"`` (data-parallel sgd/adam)
    each worker sends minus its block's gradient at the server weights instead.
    """
    grad_fn = jax.value_and_grad(loss_fn)
    local_sgd = make_local_sgd(loss_fn, local_learning_rate)

    def gradient(params, x_HxB, y_HxB):
        x = x_HxB.reshape(-1, *x_HxB.shape[2:])
        loss, g = grad_fn(params, x, y_HxB.reshape(-1))
        return jax.tree.map(jnp.negative, g), loss

    def client_round(params, x_KxHxB, y_KxHxB):
        if client == LOCAL_SGD:
            return local_sgd(params, (jnp.swapaxes(x_KxHxB, 0, 1), jnp.swapaxes(y_KxHxB, 0, 1)), lambda xy: xy)
        deltas_K, losses_K = jax.vmap(gradient, in_axes=(None, 0, 0))(params, x_KxHxB, y_KxHxB)
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


def stream_size(train: Split | episode_split.EpisodePool) -> int:
    """Examples the training stream cycles over: the split's, or an episode's training part of a pool."""
    if isinstance(train, episode_split.EpisodePool):
        return episode_split.sizes(train.y.shape[0])[0]
    return train.y.shape[0]


def round_indices(train: Split | episode_split.EpisodePool, key: jax.Array, counter: jax.Array, count: int):
    """Indices into ``train`` of the stream's examples counter .. counter + count - 1 (draw_round's)."""
    if isinstance(train, episode_split.EpisodePool):
        return episode_split.train_indices(train.y.shape[0], key, counter, count)
    return stream_indices(key, counter, count, train.y.shape[0])


def make_round_step(task, server_update, *, num_grads: int, num_local_steps: int,
                    local_batch_size: int, local_learning_rate: float):
    """``step(state, train_split, idx=None) -> (state, train_loss)``: sample one round's batches
    on the device, run the clients, apply the server update. Pure, so it can sit inside scan and
    vmap; the split is an argument so that jit never embeds a dataset as a constant. ``idx``:
    the round's :func:`round_indices` when the caller drew them already (PES draws them once
    per antithetic pair, whose members share a data stream)."""
    client_round = make_client_round(task.loss, local_learning_rate, server_update.client)
    local_sgd = make_local_sgd(task.loss, local_learning_rate)
    count = round_size(num_grads, num_local_steps, local_batch_size)

    def step(state: RoundState, train_split, idx=None):
        if server_update.client == LOCAL_SGD and not isinstance(train_split, ClientSplit):
            # draw_round's examples, each local step gathering its own (see make_local_sgd)
            if idx is None:
                idx = round_indices(train_split, state.data_key, state.data_counter, count)
            idx_HxKxB = jnp.swapaxes(idx.reshape(num_grads, num_local_steps, local_batch_size), 0, 1)
            deltas_K, train_loss = local_sgd(state.params, idx_HxKxB, lambda i: (train_split.x[i], train_split.y[i]))
            counter = next_counter(state.data_counter, count, stream_size(train_split))
        else:
            x, y, counter = draw_round(train_split, state.data_key, state.data_counter, num_grads,
                                       num_local_steps, local_batch_size)
            deltas_K, train_loss = client_round(state.params, x, y)
        params, server_state = server_update.update(deltas_K, state.server_state, state.params)
        return RoundState(params, server_state, state.data_key, counter), train_loss

    return step


def round_size(num_grads: int, num_local_steps: int, local_batch_size: int) -> int:
    """Examples one round consumes: K*H*B."""
    return num_grads * num_local_steps * local_batch_size
