"""Haiku task models with their loss and accuracy (SPEC section 6).

Images arrive as float32 [N, H, W, C] in [0, 1]; losses are mean softmax cross-entropy
and every model uses Haiku's default initialisers.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

Params = Any


class Task(NamedTuple):
    """A model on a dataset: ``init(key) -> params``, ``apply(params, x) -> logits``."""

    name: str
    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    num_classes: int

    def loss(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = self.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def accuracy(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(self.apply(params, x), axis=-1) == y)


def _mlp(hidden_sizes, num_classes):
    def forward(x):
        return hk.nets.MLP([*hidden_sizes, num_classes])(hk.Flatten()(x))

    return forward


def _conv(channels, num_classes):
    def forward(x):
        for i, c in enumerate(channels):
            x = jax.nn.relu(hk.Conv2D(c, kernel_shape=3, stride=2 if i == 0 else 1)(x))
        return hk.Linear(num_classes)(jnp.mean(x, axis=(1, 2)))

    return forward


def make_task(task_cfg, image_shape: tuple[int, int, int], num_classes: int) -> Task:
    """Build the task named by a ``conf/task`` entry for images of ``image_shape``."""
    body = {"mlp": _mlp, "conv": _conv}[task_cfg.model]
    model = hk.without_apply_rng(hk.transform(body(tuple(task_cfg.hidden_sizes), num_classes)))
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return Task(task_cfg.name, lambda key: model.init(key, dummy), model.apply, num_classes)


def num_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
