"""Batches drawn inside jit from an endless stream of per-epoch permutations, in O(batch).

Example number i of the stream is position ``perm_e(i mod N)`` of the split, where
``e = i // N`` and ``perm_e`` is a keyed bijection of [0, N): a 4-round balanced Feistel
network on the smallest even-bit domain 2^(2b) >= N, cycle-walked back into [0, N). So
sampling is without replacement within an epoch, a batch may cross epoch boundaries, and
the stream is a pure function of (key, counter): a run resumed from its counter draws
exactly the batches it would have drawn. A batch of ``count`` examples costs O(count)
integer hashes, independent of N (a full permutation per epoch would cost N log N).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lagg_pipeline.data.splits import Split

FEISTEL_ROUNDS = 4


def _hash32(x: jax.Array) -> jax.Array:
    """A bijective avalanche mix of uint32 values (the "lowbias32" integer hash)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def half_bits(n: int) -> int:
    """The least b >= 1 with 4^b >= n: the Feistel domain [0, 2^(2b)) holds [0, n) with at most 4x slack."""
    b = 1
    while 4 ** b < n:
        b += 1
    return b


def epoch_round_keys(key: jax.Array, epoch: jax.Array) -> jax.Array:
    """[..., FEISTEL_ROUNDS] uint32 round keys of each epoch's permutation under ``key``."""
    base_R = jax.random.bits(key, (FEISTEL_ROUNDS,), jnp.uint32)
    salt = _hash32(epoch.astype(jnp.uint32)[..., None] * jnp.uint32(FEISTEL_ROUNDS)
                   + jnp.arange(FEISTEL_ROUNDS, dtype=jnp.uint32))
    return _hash32(base_R ^ salt)


def permute(position: jax.Array, round_keys: jax.Array, n, b=None) -> jax.Array:
    """perm(position) for positions in [0, n) (uint32), under per-element ``round_keys`` [..., R].

    ``n`` and the half width ``b`` (default ``half_bits(n)``) may be traced, as for a client
    whose size is data; ``b`` must then be given."""
    b = jnp.asarray(half_bits(n) if b is None else b, jnp.uint32)
    mask = (jnp.uint32(1) << b) - jnp.uint32(1)

    def feistel(x):
        left, right = x >> b, x & mask
        for r in range(FEISTEL_ROUNDS):
            left, right = right, left ^ (_hash32(right ^ round_keys[..., r]) & mask)
        return (left << b) | right

    # Cycle-walking: re-encrypt until the value lands in [0, n). Feistel is a bijection of the
    # 2^(2b) domain, so the walk from a point of [0, n) returns to [0, n) and the result is a
    # bijection of [0, n); at most 3/4 of the domain is outside, so walks are short.
    y = feistel(position)
    return jax.lax.while_loop(lambda y: jnp.any(y >= n), lambda y: jnp.where(y >= n, feistel(y), y), y)


def stream_indices(key: jax.Array, counter: jax.Array, count: int, n, b=None) -> jax.Array:
    """Split indices of stream examples counter .. counter + count - 1 (int32 [count]).

    ``n`` (and ``b``, see :func:`permute`) may be traced; ``count`` is static."""
    b = half_bits(n) if b is None else b
    n = jnp.asarray(n).astype(jnp.uint32)
    i = jnp.asarray(counter).astype(jnp.uint32) + jnp.arange(count, dtype=jnp.uint32)
    epoch, position = i // n, i % n
    return permute(position, epoch_round_keys(key, epoch), n, b).astype(jnp.int32)


def next_counter(counter: jax.Array, count: int, n: int) -> jax.Array:
    """The stream position after ``count`` more examples, kept in int32 range: positions wrap at
    a whole number of epochs (the largest multiple of n below 2^31), so the stream stays a
    sequence of complete permutations however long a run is (epoch keys repeat after ~2^31/n
    epochs, instead of the counter overflowing)."""
    n = jnp.asarray(n).astype(jnp.uint32)
    period = jnp.uint32(2 ** 31 - 1) // n * n
    return ((jnp.asarray(counter).astype(jnp.uint32) + jnp.uint32(count)) % period).astype(jnp.int32)


def sample_batch(split: Split, key: jax.Array, counter: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Examples counter .. counter + count - 1 of the stream: (x [count, ...], y [count]).

    ``count`` is static; ``key`` (uint32 PRNGKey) and ``counter`` (int32 scalar) may be traced,
    so this runs under jit and vmap over (key, counter).
    """
    idx = stream_indices(key, counter, count, split.y.shape[0])
    return split.x[idx], split.y[idx]
