"""Episode bookkeeping for truncated unrolls: lengths, random offsets, resets, masks.

Each particle runs inner episodes of log-uniform length; an episode that ends is replaced
by a fresh one (new model init, new aggregator state, new length) and the step spent on
the reset carries no meta-loss (SPEC section 4).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Episode(NamedTuple):
    """Per-particle counters, shape [N]."""

    step: jax.Array  # int32: rounds taken in the current episode
    length: jax.Array  # int32: rounds this episode lasts


def sample_lengths(key, shape, min_length: int, max_length: int) -> jax.Array:
    """L = int(exp(U(log min_length, log max_length))), as the reference draws them."""
    u = jax.random.uniform(key, shape, minval=jnp.log(min_length), maxval=jnp.log(max_length))
    return jnp.exp(u).astype(jnp.int32)


def initial_episodes(key, num_particles: int, min_length: int, max_length: int) -> Episode:
    """Fresh lengths with steps offset uniformly in [0, max_length) so resets are staggered."""
    k_len, k_off = jax.random.split(key)
    return Episode(jax.random.randint(k_off, (num_particles,), 0, max_length, dtype=jnp.int32),
                   sample_lengths(k_len, (num_particles,), min_length, max_length))


def advance(episode: Episode, key, min_length: int, max_length: int) -> tuple[Episode, jax.Array]:
    """One inner step: (next episode counters, is_reset [N]).

    A particle whose episode is over spends this step being reset (step 0, a new length);
    the others take one training round.
    """
    is_reset = episode.step >= episode.length
    new_length = sample_lengths(key, episode.length.shape, min_length, max_length)
    return Episode(jnp.where(is_reset, 0, episode.step + 1),
                   jnp.where(is_reset, new_length, episode.length)), is_reset


def normalize_meta_loss(loss: jax.Array, num_classes: int) -> jax.Array:
    """Clip to [0, 1.5 ln C]; NaN and inf become the maximum."""
    top = 1.5 * jnp.log(num_classes)
    return jnp.where(jnp.isfinite(loss), jnp.clip(loss, 0.0, top), top)
