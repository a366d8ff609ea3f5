"""Accumulators and per-element input features of the learned server updates (SPEC 3.1-3.2).

Joseph et al., "Meta-learning Optimizers for Communication-Efficient Learning", TMLR 2025.
The accumulators follow the adafactor-MLP learned optimizer they build on: momentum, RMS and
adafactor-style second moments of the mean delta, one slot per decay on a trailing axis.
Everything here is a small pure function over one parameter leaf or over a parameter pytree.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
# m (3), v (1), m*rsqrt(v) (3), rsqrt(v) (1), fac_g (3), then the 5 x 3 adafactor block.
NUM_ACCUMULATOR_FEATURES = 26


class Decays(NamedTuple):
    """The accumulators' decays, each a vector with one entry per slot."""

    momentum: jax.Array  # (3,)
    rms: jax.Array  # (1,)
    adafactor: jax.Array  # (3,)


class FactoredV(NamedTuple):
    """Adafactor second moments of a >=2-dim leaf: its mean over d0 (row) and d1 (col)."""

    v_row: jax.Array  # leaf shape without d0, + (3,)
    v_col: jax.Array  # leaf shape without d1, + (3,)


class UnfactoredV(NamedTuple):
    """Adafactor second moment of a <2-dim leaf, kept per element."""

    v: jax.Array  # leaf shape + (3,)


class LeafAccumulators(NamedTuple):
    """Everything one parameter leaf accumulates across rounds (SPEC 3.1)."""

    momentum: jax.Array  # leaf shape + (3,)
    rms: jax.Array  # leaf shape + (1,)
    adafactor: Union[FactoredV, UnfactoredV]


def offset_to_decay(initial: tuple[float, ...], offset: jax.Array) -> jax.Array:
    """decay = 1 - (1 - beta0) exp(10 theta): theta = 0 gives back beta0 (SPEC 3.1)."""
    return 1.0 - (1.0 - jnp.asarray(initial, jnp.float32)) * jnp.exp(10.0 * offset)


def decays_from_offsets(momentum: jax.Array, rms: jax.Array, adafactor: jax.Array) -> Decays:
    """The decays for meta-learned offsets; second-moment decays clipped to [0, 1].

    The parametrisation never exceeds 1, so the clip only guards against negative decays;
    the reference clips the RMS and the adafactor decays (not momentum), and so do we.
    """
    return Decays(
        momentum=offset_to_decay(MOMENTUM_DECAYS, momentum),
        rms=jnp.clip(offset_to_decay(RMS_DECAYS, rms), 0.0, 1.0),
        adafactor=jnp.clip(offset_to_decay(ADAFACTOR_DECAYS, adafactor), 0.0, 1.0),
    )


def factored_dims(shape: tuple[int, ...]) -> Optional[tuple[int, int]]:
    """(d0, d1): indices of the largest and second-largest dims, or None below 2 dims."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    return int(order[-1]), int(order[-2])


def safe_rsqrt(x: jax.Array) -> jax.Array:
    """rsqrt(max(x, 1e-9)): bounded where a second moment is (nearly) zero."""
    return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def init_leaf_accumulators(p: jax.Array) -> LeafAccumulators:
    """Zero accumulators for one parameter leaf."""
    n_mom, n_rms, n_fac = len(MOMENTUM_DECAYS), len(RMS_DECAYS), len(ADAFACTOR_DECAYS)
    dims = factored_dims(p.shape)
    if dims is None:
        adafactor = UnfactoredV(jnp.zeros(p.shape + (n_fac,), jnp.float32))
    else:
        d0, d1 = dims
        adafactor = FactoredV(
            v_row=jnp.zeros(np.delete(p.shape, d0).tolist() + [n_fac], jnp.float32),
            v_col=jnp.zeros(np.delete(p.shape, d1).tolist() + [n_fac], jnp.float32))
    return LeafAccumulators(momentum=jnp.zeros(p.shape + (n_mom,), jnp.float32),
                            rms=jnp.zeros(p.shape + (n_rms,), jnp.float32),
                            adafactor=adafactor)


def init_accumulators(params: Params) -> Params:
    """A params-shaped tree of zero ``LeafAccumulators``."""
    return jax.tree.map(init_leaf_accumulators, params)


def update_leaf_accumulators(acc: LeafAccumulators, g: jax.Array,
                             decays: Decays) -> LeafAccumulators:
    """One round of every accumulator of one leaf, fed the mean delta g (SPEC 3.1)."""
    g_ = g[..., None]  # broadcast against the trailing decay axis
    momentum = decays.momentum * acc.momentum + (1.0 - decays.momentum) * g_
    rms = decays.rms * acc.rms + (1.0 - decays.rms) * jnp.square(g_)
    beta = decays.adafactor
    g2 = jnp.square(g_) + 1e-30
    if isinstance(acc.adafactor, FactoredV):
        d0, d1 = factored_dims(g.shape)
        adafactor = FactoredV(
            v_row=beta * acc.adafactor.v_row + (1.0 - beta) * jnp.mean(g2, axis=d0),
            v_col=beta * acc.adafactor.v_col + (1.0 - beta) * jnp.mean(g2, axis=d1))
    else:
        adafactor = UnfactoredV(beta * acc.adafactor.v + (1.0 - beta) * g2)
    return LeafAccumulators(momentum, rms, adafactor)


def update_accumulators(accumulators: Params, mean_delta: Params, decays: Decays) -> Params:
    """One round of every leaf's accumulators; ``mean_delta`` is mean_k delta_k."""
    return jax.tree.map(lambda g, acc: update_leaf_accumulators(acc, g, decays),
                        mean_delta, accumulators)


def _accumulator_features(g: jax.Array, acc: LeafAccumulators) -> list[jax.Array]:
    """SPEC 3.2 items 3-4 for a >=1-dim leaf: 26 columns, each (shape + (n,))."""
    rsqrt_rms = jax.lax.rsqrt(acc.rms + 1e-6)
    columns = [acc.momentum, acc.rms, acc.momentum * rsqrt_rms, rsqrt_rms]
    if isinstance(acc.adafactor, UnfactoredV):
        v = acc.adafactor.v
        rsqrt_v = jax.lax.rsqrt(v + 1e-8)
        return columns + [g[..., None] * safe_rsqrt(v + 1e-9), v, v, rsqrt_v, rsqrt_v,
                          acc.momentum * jax.lax.rsqrt(v + 1e-6)]
    d0, d1 = factored_dims(g.shape)
    v_row, v_col = acc.adafactor
    full_shape = g.shape + v_row.shape[-1:]
    row = jnp.broadcast_to(jnp.expand_dims(v_row, d0), full_shape)
    col = jnp.broadcast_to(jnp.expand_dims(v_col, d1), full_shape)
    # v_row lacks d0, so d1 moves down one place when it came after d0.
    d1_in_row = d1 - 1 if d1 > d0 else d1
    row_factor = safe_rsqrt(v_row / (jnp.mean(v_row, axis=d1_in_row, keepdims=True) + 1e-9))
    factor = jnp.expand_dims(row_factor, d0) * jnp.expand_dims(safe_rsqrt(v_col), d1)
    return columns + [g[..., None] * factor, row, col, jax.lax.rsqrt(row + 1e-8),
                      jax.lax.rsqrt(col + 1e-8), acc.momentum * factor]


def per_element_features(raw_R: jax.Array, p: jax.Array,
                         acc: Optional[LeafAccumulators] = None) -> jax.Array:
    """SPEC 3.2 items 1-4, un-normalised: (shape + (R + 1 [+ 26],)), scalars as (1,).

    ``raw_R`` stacks the raw-delta inputs on a leading axis: all K deltas (LAgg variants) or
    just their mean (LOpt variants, R = 1); either way its mean is the mean delta.
    ``acc`` are the leaf's accumulators, already updated this round, or None for the
    variants without them.
    """
    shape = p.shape or (1,)
    raw_R = raw_R.reshape(raw_R.shape[:1] + shape)
    columns = [jnp.moveaxis(raw_R, 0, -1), p.reshape(shape)[..., None]]
    if acc is not None:
        if not p.shape:  # a scalar's accumulators are all unfactored: (n,) -> (1, n)
            acc = jax.tree.map(lambda a: a[None], acc)
        columns += _accumulator_features(jnp.mean(raw_R, axis=0), acc)
    return jnp.concatenate(columns, axis=-1)


def second_moment_scale(x: jax.Array) -> jax.Array:
    """rsqrt(1e-5 + mean(x^2)) of each trailing column over all the tensor's elements: (F,)."""
    return jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=tuple(range(x.ndim - 1))))


def second_moment_normalize(x: jax.Array) -> jax.Array:
    """x * rsqrt(1e-5 + mean(x^2)), each trailing column over all the tensor's elements."""
    return x * second_moment_scale(x)


def step_embedding(t: jax.Array) -> jax.Array:
    """tanh(t / tau - 1) for the 11 timescales tau; t = rounds already applied."""
    return jnp.tanh(t / jnp.asarray(STEP_TIMESCALES, jnp.float32) - 1.0)


def leaf_features(raw_R: jax.Array, p: jax.Array, t: jax.Array,
                  acc: Optional[LeafAccumulators] = None) -> jax.Array:
    """The network's input for one leaf: normalised features, then the step embedding.

    The SPEC's form; LearnedAggregator folds the normalisation and the step embedding into
    its first layer instead of building this array."""
    x = second_moment_normalize(per_element_features(raw_R, p, acc))
    steps = jnp.broadcast_to(step_embedding(t), x.shape[:-1] + (len(STEP_TIMESCALES),))
    return jnp.concatenate([x, steps], axis=-1)


def feature_width(num_raw: int, with_accumulators: bool) -> int:
    """Input width: K+38 (LAgg-A), 39 (LOpt-A), K+12 (LAgg), 13 (LOpt)."""
    width = num_raw + 1 + len(STEP_TIMESCALES)
    return width + NUM_ACCUMULATOR_FEATURES if with_accumulators else width
