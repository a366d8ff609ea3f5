"""The server-update interface shared by every aggregator, hand-designed or learned.

A server update is an optax-style pair of pure functions over pytrees. ``update``
consumes the workers' stacked deltas -- every parameter leaf gains a leading axis of
size K (``deltas_K``) -- and returns the next server weights and state (SPEC section 1).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
State = Any

# What the clients send. "local_sgd": each worker's H-step SGD delta (new minus old).
# "gradient": data-parallel references (sgd/adam), each worker sends minus the gradient
# of its H*B block at the server weights, so mean_k delta_k = -(whole-batch gradient).
LOCAL_SGD = "local_sgd"
GRADIENT = "gradient"


class ServerUpdate(NamedTuple):
    """``init(params) -> state``; ``update(deltas_K, state, params) -> (params, state)``."""

    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]
    client: str = LOCAL_SGD


def mean_delta(deltas_K: Params) -> Params:
    """The workers' average delta, mean over the leading K axis of every leaf."""
    return jax.tree.map(lambda d: jnp.mean(d, axis=0), deltas_K)
