"""LAgg-A, LOpt-A, LAgg and LOpt: per-element MLP server updates (SPEC 3.3).

Joseph et al., "Meta-learning Optimizers for Communication-Efficient Learning", TMLR 2025.
Meta-parameters are laid out exactly as the reference code saves them, so importing its
files is a rename-free copy:
- ``lagg_a`` / ``lopt_a``: {"momentum_decays": (3,), "rms_decays": (1,),
  "adafactor_decays": (3,), "nn": {"~": {"w0": (W, h), "b0", "w1", "b1", "w2": (h, 2), "b2"}}}
- ``lagg`` / ``lopt``: the bare ``hk.nets.MLP`` params {"mlp/~/linear_i": {"w", "b"}}, no
  decays (these variants keep no accumulators, so decays would be dead meta-parameters).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from lagg_pipeline.aggregators import features
from lagg_pipeline.aggregators.base import ServerUpdate, mean_delta

MetaParams = Any
Params = Any

VARIANTS = ("lagg_a", "lopt_a", "lagg", "lopt")
_DISPLAY = {"lagg_a": "LAgg-A", "lopt_a": "LOpt-A", "lagg": "LAgg", "lopt": "LOpt"}
_K_FREE_TWIN = {"lagg_a": "lopt_a", "lagg": "lopt"}
EXP_MULT = 1e-3
STEP_MULT = 1e-3
NUM_OUTPUTS = 2  # direction d, magnitude g


class LearnedState(NamedTuple):
    """Server state of a learned update."""

    accumulators: Any  # params-shaped tree of features.LeafAccumulators; None for lagg / lopt
    t: jax.Array  # int32, rounds already applied
    mean_abs_step: jax.Array  # float32, mean |step| over all parameters in the last round


def _at(tree, path: tuple[str, ...]):
    """The node of nested dicts ``tree`` at ``path``."""
    return functools.reduce(lambda node, key: node[key], path, tree)


def _adafactor_mlp(x: jax.Array, hidden_size: int) -> jax.Array:
    """The reference's hand-rolled MLP: top-level w{i}/b{i}, i.e. Haiku module "~"."""
    for i, size in enumerate((hidden_size, hidden_size, NUM_OUTPUTS)):
        fan_in = x.shape[-1]
        w = hk.get_parameter(f"w{i}", (fan_in, size), jnp.float32,
                             init=hk.initializers.TruncatedNormal(1.0 / np.sqrt(fan_in)))
        b = hk.get_parameter(f"b{i}", (size,), jnp.float32, init=jnp.zeros)
        x = x @ w + b
        if i < 2:
            x = jax.nn.relu(x)
    return x


def _plain_mlp(x: jax.Array, hidden_size: int) -> jax.Array:
    """The reference's LAgg/LOpt network; hk.Linear's default init is the same truncated normal."""
    return hk.nets.MLP((hidden_size, hidden_size, NUM_OUTPUTS))(x)


class LearnedAggregator:
    """A learned server update (LAgg-A / LOpt-A / LAgg / LOpt) for K workers (SPEC 3.3)."""

    def __init__(self, variant: str, num_grads: int, hidden_size: int = 32):
        if variant not in VARIANTS:
            raise ValueError(f"unknown learned aggregator {variant!r}; "
                             f"allowed: {', '.join(VARIANTS)}")
        if num_grads < 1:
            raise ValueError(f"num_grads={num_grads} is not allowed; it must be >= 1")
        if hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size} is not allowed; it must be >= 1")
        self.variant = variant
        self.num_grads = num_grads
        self.hidden_size = hidden_size
        self.per_worker_inputs = variant.startswith("lagg")
        self.uses_accumulators = variant.endswith("_a")
        net = _adafactor_mlp if self.uses_accumulators else _plain_mlp
        net = functools.partial(net, hidden_size=hidden_size)
        self._net = hk.without_apply_rng(hk.transform(net))

    @property
    def name(self) -> str:
        return _DISPLAY[self.variant]

    @property
    def input_width(self) -> int:
        """K+38 (lagg_a), 39 (lopt_a), K+12 (lagg), 13 (lopt)."""
        num_raw = self.num_grads if self.per_worker_inputs else 1
        return features.feature_width(num_raw, self.uses_accumulators)

    def init_meta_params(self, key: jax.Array) -> MetaParams:
        """Fresh meta-parameters: Haiku-initialised network, decay offsets 0."""
        nn = self._net.init(key, jnp.zeros((1, self.input_width), jnp.float32))
        if not self.uses_accumulators:
            return nn
        return {"momentum_decays": jnp.zeros(len(features.MOMENTUM_DECAYS), jnp.float32),
                "rms_decays": jnp.zeros(len(features.RMS_DECAYS), jnp.float32),
                "adafactor_decays": jnp.zeros(len(features.ADAFACTOR_DECAYS), jnp.float32),
                "nn": nn}

    def _layer_paths(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(weights path, bias path) of the three layers, input layer first."""
        if self.uses_accumulators:
            return [(("nn", "~", f"w{i}"), ("nn", "~", f"b{i}")) for i in range(3)]
        return [((f"mlp/~/linear_{i}", "w"), (f"mlp/~/linear_{i}", "b")) for i in range(3)]

    def averaging_meta_params(self, meta_params: MetaParams, step_scale: float,
                              rest_scale: float = 0.1) -> MetaParams:
        """``meta_params`` rewired so that the update starts as normalised worker averaging.

        Two hidden units per layer carry +a and -a through the ReLUs, where a is the mean of the
        raw-delta input columns (normalised per tensor, SPEC 3.2), and relu(a) - relu(-a) = a
        reaches the direction output as d = -step_scale * a. With the magnitude output near 0 the
        first server step is p + STEP_MULT * step_scale * mean_k normalise(delta_k): FedAvg with
        each tensor's step normalised. The other units keep their random weights, their output
        weights scaled by ``rest_scale``, so that meta-training can use them. This is
        ``meta_init=averaging``: a start that already trains, instead of a random update that
        (on MNIST-1D) makes the loss grow and traps meta-training at "no step".
        """
        if self.hidden_size < 2:
            raise ValueError(f"meta_init=averaging needs hidden_size >= 2 (got {self.hidden_size})")
        num_raw = self.num_grads if self.per_worker_inputs else 1
        paths = [path for layer in self._layer_paths() for path in layer]
        w0, b0, w1, b1, w2, b2 = (np.array(_at(meta_params, path)) for path in paths)
        w0[:, :2], b0[:2] = 0.0, 0.0
        w0[:num_raw, 0], w0[:num_raw, 1] = 1.0 / num_raw, -1.0 / num_raw
        w1[:2, :], w1[:, :2], b1[:2] = 0.0, 0.0, 0.0
        w1[0, 0] = w1[1, 1] = 1.0
        w2 *= rest_scale
        w2[:2, :], b2[:] = 0.0, 0.0
        w2[0, 0], w2[1, 0] = -step_scale, step_scale
        rewired = jax.tree.map(lambda x: x, meta_params)  # new containers, same leaves
        for path, value in zip(paths, (w0, b0, w1, b1, w2, b2)):
            _at(rewired, path[:-1])[path[-1]] = jnp.asarray(value)
        return rewired

    def _first_layer(self, meta_params: MetaParams) -> jax.Array:
        try:
            if self.uses_accumulators:
                return meta_params["nn"]["~"]["w0"]
            return meta_params["mlp/~/linear_0"]["w"]
        except (KeyError, TypeError):
            where = "nn/~/w0" if self.uses_accumulators else "mlp/~/linear_0/w"
            raise ValueError(f"these meta-parameters have no {where}, so they are not {self.name} "
                             f"meta-parameters (top-level keys: {sorted(meta_params)})") from None

    def check_compatible(self, meta_params: MetaParams) -> None:
        """Raise a one-line ValueError unless ``meta_params`` fit this variant, K and width."""
        w0 = self._first_layer(meta_params)
        width = w0.shape[0]
        if width != self.input_width:
            offset = self.input_width - self.num_grads
            if self.per_worker_inputs and width > offset:
                raise ValueError(
                    f"{self.name} meta-parameters were trained for K={width - offset} (input width "
                    f"{width}) and cannot run with num_grads={self.num_grads}; {self.name}'s input "
                    f"width is K+{offset}. Re-meta-train at K={self.num_grads}, or use "
                    f"{_K_FREE_TWIN[self.variant]} which is independent of K.")
            raise ValueError(f"these meta-parameters have input width {width}, but {self.name} "
                             f"with num_grads={self.num_grads} needs {self.input_width}; they "
                             f"were meta-trained for another variant")
        if w0.shape[1:] != (self.hidden_size,):
            raise ValueError(f"these meta-parameters have hidden size {w0.shape[1]} (w0 is "
                             f"{w0.shape}), but this {self.name} was built with "
                             f"hidden_size={self.hidden_size}")
        expected = jax.eval_shape(self.init_meta_params, jax.random.PRNGKey(0))
        got_paths, got_tree = jax.tree.flatten_with_path(meta_params)
        want_paths, want_tree = jax.tree.flatten_with_path(expected)
        if got_tree != want_tree:
            raise ValueError(f"these meta-parameters are laid out as {got_tree}, but {self.name} "
                             f"expects {want_tree}")
        for (path, got), (_, want) in zip(got_paths, want_paths):
            if jnp.shape(got) != want.shape:
                raise ValueError(
                    f"meta-parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(got)}, but "
                    f"{self.name} with hidden_size={self.hidden_size} expects {want.shape}")

    def _check_deltas(self, deltas_K: Params) -> None:
        # Only the per-worker variants are tied to K; LOpt variants average any number.
        if not self.per_worker_inputs:
            return
        for d in jax.tree.leaves(deltas_K):
            if d.shape[:1] != (self.num_grads,):
                raise ValueError(f"{self.name} was built for num_grads={self.num_grads} but got "
                                 f"deltas with leading axis {d.shape[:1]} (shape {d.shape})")

    def server_update(self, meta_params: MetaParams) -> ServerUpdate:
        """The server update with these meta-parameters; jittable and vmappable over them."""
        self.check_compatible(meta_params)
        decays = (features.decays_from_offsets(meta_params["momentum_decays"],
                                               meta_params["rms_decays"],
                                               meta_params["adafactor_decays"])
                  if self.uses_accumulators else None)

        def init(params: Params) -> LearnedState:
            accumulators = features.init_accumulators(params) if self.uses_accumulators else None
            return LearnedState(accumulators, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

        (w0, b0), (w1, b1), (w2, b2) = [(_at(meta_params, w), _at(meta_params, b)) for w, b in self._layer_paths()]

        def leaf_step(t, raw_R, p, acc=None):
            # The network on features.leaf_features without building it: each column's
            # normalisation scale goes into w0's rows, and the step embedding, the same for
            # every element, into the first bias. Saves two passes over the [P, F] features.
            x = features.per_element_features(raw_R, p, acc)
            width = x.shape[-1]
            first_w = features.second_moment_scale(x)[:, None] * w0[:width]
            first_b = features.step_embedding(t) @ w0[width:] + b0
            hidden = jax.nn.relu(jax.nn.relu(x @ first_w + first_b) @ w1 + b1)
            out = hidden @ w2 + b2
            direction, magnitude = out[..., 0], out[..., 1]
            return (direction * jnp.exp(magnitude * EXP_MULT) * STEP_MULT).reshape(p.shape)

        def update(deltas_K: Params, state: LearnedState, params: Params):
            self._check_deltas(deltas_K)
            step_fn = functools.partial(leaf_step, state.t)
            if self.per_worker_inputs:
                raw = deltas_K
            else:
                raw = jax.tree.map(lambda d: jnp.mean(d, axis=0, keepdims=True), deltas_K)
            if self.uses_accumulators:
                accumulators = features.update_accumulators(state.accumulators,
                                                            mean_delta(deltas_K), decays)
                steps = jax.tree.map(step_fn, raw, params, accumulators)
            else:
                accumulators = None
                steps = jax.tree.map(step_fn, raw, params)
            new_params = jax.tree.map(lambda p, s: p - s, params, steps)
            leaves = jax.tree.leaves(steps)
            mean_abs_step = (sum(jnp.sum(jnp.abs(s)) for s in leaves)
                             / sum(s.size for s in leaves)).astype(jnp.float32)
            return new_params, LearnedState(accumulators, state.t + 1, mean_abs_step)

        return ServerUpdate(init, update)
