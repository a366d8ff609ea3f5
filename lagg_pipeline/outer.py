"""A learned aggregator as an optax outer optimizer, for anyone's own local-SGD loop.

``outer_optimizer("family_k8_h4_mix")`` returns an ``optax.GradientTransformation`` that does
exactly what the pipeline's server update does (Joseph et al., TMLR 2025, SPEC 3), so a
DiLoCo-style loop can swap ``optax.sgd(0.7, momentum=0.9, nesterov=True)`` for it:

- LOpt-A reads the averaged pseudo-gradient ``g = -mean_k delta_k`` (optax's "gradient"),
- LAgg-A reads each worker's pseudo-gradient: pass ``g_K`` with a leading axis of size K on
  every leaf (``-delta_k`` stacked), as many workers as it was meta-trained for.

``update(g, state, params)`` needs ``params`` and returns ``updates = new_params - params``.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lagg_pipeline import pretrained as shipped
from lagg_pipeline.aggregators.learned import LearnedAggregator


class OuterInfo(NamedTuple):
    """What the loaded aggregator was meta-trained with (from its file)."""

    variant: str
    num_grads: int
    num_local_steps: int | None
    local_learning_rate: float | None
    task: str | None


def load(pretrained: str | None = None, *, path: str | Path | None = None, variant: str = "lagg_a"):
    """(meta_params, OuterInfo, hidden_size) of a shipped aggregator (``pretrained`` name, with
    ``variant``) or of a ``meta_params.npz`` file (``path``)."""
    from lagg_pipeline.checkpoint import load_params

    if (pretrained is None) == (path is None):
        raise ValueError("give exactly one of pretrained=<name> or path=<meta_params.npz>")
    if pretrained is not None:
        if pretrained not in shipped.names(variant):
            raise ValueError(f"pretrained={pretrained} is not shipped for {variant}; choose one of: "
                             f"{', '.join(shipped.names(variant)) or '(none)'}")
        path = shipped.path(variant, pretrained)
    meta_params, metadata = load_params(path)
    info = OuterInfo(metadata.get("variant", variant), int(metadata.get("num_grads", 1)),
                     metadata.get("num_local_steps"), metadata.get("local_learning_rate"), metadata.get("task"))
    return jax.tree.map(jnp.asarray, meta_params), info, int(metadata.get("hidden_size", 32))


def outer_optimizer(pretrained: str | None = None, *, path: str | Path | None = None,
                    variant: str = "lagg_a") -> optax.GradientTransformation:
    """The learned server update named by ``pretrained`` (or stored at ``path``) as an optax
    transformation of pseudo-gradients (``load`` tells what it was meta-trained with)."""
    meta_params, info, hidden_size = load(pretrained, path=path, variant=variant)
    aggregator = LearnedAggregator(info.variant, info.num_grads, hidden_size)
    server = aggregator.server_update(meta_params)

    def update(pseudo_gradients, state, params=None):
        if params is None:
            raise ValueError(f"the {aggregator.name} outer optimizer needs params: update(g, state, params)")
        if aggregator.per_worker_inputs:
            deltas_K = jax.tree.map(jnp.negative, pseudo_gradients)
        else:  # the averaged pseudo-gradient is one "worker"
            deltas_K = jax.tree.map(lambda g: -g[None], pseudo_gradients)
        new_params, state = server.update(deltas_K, state, params)
        return jax.tree.map(jnp.subtract, new_params, params), state

    return optax.GradientTransformation(server.init, update)
