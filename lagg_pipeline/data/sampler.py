"""Batches drawn inside jit from an endless stream of per-epoch permutations.

Example number i of the stream is position i mod N of epoch i // N, whose order is
``permutation(fold_in(key, epoch), N)``: sampling is without replacement within an epoch,
a batch may cross epoch boundaries, and the stream is a pure function of (key, counter),
so a run that is resumed from its counter draws exactly the batches it would have drawn.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lagg_pipeline.data.splits import Split


def sample_batch(split: Split, key: jax.Array, counter: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Examples counter .. counter + count - 1 of the stream: (x [count, H, W, C], y [count]).

    ``count`` is static; ``key`` (uint32 PRNGKey) and ``counter`` (int32 scalar) may be traced,
    so this runs under jit and vmap over (key, counter).
    """
    n = split.y.shape[0]
    first_epoch = counter // n
    # One batch touches at most count // n + 2 epochs; build just those permutations.
    num_epochs = count // n + 2
    epochs = first_epoch + jnp.arange(num_epochs)
    orders_ExN = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), n))(epochs)
    i = counter + jnp.arange(count)
    idx = orders_ExN[i // n - first_epoch, i % n]
    return split.x[idx], split.y[idx]
