"""A fresh train/validation division of the non-test data for every meta-training episode.

With a fixed validation split the meta-learner can fit that split (144 examples on digits):
it learns an aggregator whose training happens to suit those examples, not the task. Here
the pool of the fitting splits (train and inner-valid; never outer-valid, which chooses among
aggregators, nor test, which reports: SPEC 5) is divided anew by each episode's data key: a
keyed permutation of the pool puts ``num_valid`` examples first (this episode's validation
set) and the rest after (its training set). Over episodes every pool example is validated on
and trained on, never both in one episode, so no fixed set of examples can be memorised.

The training stream of an episode is the usual without-replacement stream
(:mod:`lagg_pipeline.data.sampler`) over positions ``num_valid .. n-1`` of that permutation;
both are pure functions of (key, counter), so a resumed run draws the same batches.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lagg_pipeline.data.sampler import epoch_round_keys, next_counter, permute, stream_indices
from lagg_pipeline.data.splits import Split, Splits

# The layout key is fold_in(data_key, _LAYOUT_SALT): distinct from the stream key itself and
# from any client stream fold_in(data_key, m) (resplit runs have no clients; the salt is above
# any client index anyway). It equals the fixed outer-valid split's batch key in meta/pes.py,
# which a resplit run never draws (the two meta-losses exclude each other); the shipped
# family aggregators were meta-trained with it, so it stays.
_LAYOUT_SALT = 0x7FFFFFFF
VALID_FRACTION_DENOMINATOR = 9  # 1/9 of train + inner-valid: the training part is the train split's size


class EpisodePool(NamedTuple):
    """The fitting splits' examples, to be divided per episode (a distinct type from :class:`Split`
    so the round sampler knows to draw from the episode's training part only)."""

    x: jax.Array
    y: jax.Array


def pool_of(splits: Splits) -> EpisodePool:
    """train + inner-valid, in that order (outer-valid and test are never fitted on)."""
    parts = (splits.train, splits.inner_valid)
    return EpisodePool(jnp.concatenate([p.x for p in parts]), jnp.concatenate([p.y for p in parts]))


def sizes(pool_size: int) -> tuple[int, int]:
    """(training examples, validation examples) of one episode; static, from the pool's shape."""
    num_valid = pool_size // VALID_FRACTION_DENOMINATOR
    return pool_size - num_valid, num_valid


def _layout(n: int, data_key: jax.Array, positions: jax.Array) -> jax.Array:
    """Pool indices at ``positions`` of this episode's permutation of the n-example pool."""
    round_keys = epoch_round_keys(jax.random.fold_in(data_key, _LAYOUT_SALT), jnp.uint32(0))
    return permute(positions.astype(jnp.uint32), round_keys, n).astype(jnp.int32)


def train_indices(pool_size: int, data_key: jax.Array, counter: jax.Array, count: int) -> jax.Array:
    """Pool indices of examples counter .. counter + count - 1 of the episode's training stream."""
    num_train, num_valid = sizes(pool_size)
    positions = stream_indices(data_key, counter, count, num_train) + num_valid
    return _layout(pool_size, data_key, positions)


def valid_indices(pool_size: int, data_key: jax.Array) -> jax.Array:
    """Pool indices of the episode's whole validation set: fixed for the episode (its data key)."""
    return _layout(pool_size, data_key, jnp.arange(sizes(pool_size)[1]))


def train_batch(pool: EpisodePool, data_key: jax.Array, counter: jax.Array, count: int):
    """Examples counter .. counter + count - 1 of the episode's training stream:
    (x [count, ...], y [count], next counter)."""
    idx = train_indices(pool.y.shape[0], data_key, counter, count)
    return pool.x[idx], pool.y[idx], next_counter(counter, count, sizes(pool.y.shape[0])[0])


def valid_split(pool: EpisodePool, data_key: jax.Array) -> Split:
    """The episode's whole validation set."""
    idx = valid_indices(pool.y.shape[0], data_key)
    return Split(pool.x[idx], pool.y[idx])
