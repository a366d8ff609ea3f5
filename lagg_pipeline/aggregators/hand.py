"""Hand-designed server updates over stacked deltas (SPEC section 2).

Each acts on the pseudo-gradient g = -mean_k delta_k through an optax transformation,
so FedAvg is SGD with learning rate 1 on g, and the data-parallel references (sgd, adam)
are the same optimizers fed with minus the whole-batch gradient.
"""
from __future__ import annotations

import jax
import optax

from lagg_pipeline.aggregators.base import GRADIENT, LOCAL_SGD, ServerUpdate, mean_delta


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value} is not allowed; it must be > 0")


def _decay(**values: float) -> None:
    """Momentum and moment decays: a value of 1 or more never forgets, and the update grows without bound."""
    for name, value in values.items():
        if not 0 <= value < 1:
            raise ValueError(f"{name}={value} is not allowed; it must be in [0, 1)")


def pseudo_gradient_update(tx: optax.GradientTransformation, scale: float = 1.0,
                           client: str = LOCAL_SGD) -> ServerUpdate:
    """A server update applying ``tx`` to g = -scale * mean_k delta_k."""

    def update(deltas_K, state, params):
        g = jax.tree.map(lambda d: -scale * d, mean_delta(deltas_K))
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return ServerUpdate(tx.init, update, client)


def fedavg() -> ServerUpdate:
    """FedAvg / local SGD (McMahan et al. 2017): x <- x + mean_k delta_k."""
    return pseudo_gradient_update(optax.sgd(1.0))


def slowmo(beta: float, slowmo_learning_rate: float, local_learning_rate: float) -> ServerUpdate:
    """SlowMo as the reference code runs it (Wang et al. 2020 differ by a factor gamma).

    u <- beta u + (x - x_bar) / gamma; x <- x - alpha u, with x_bar = x + mean_k delta_k.
    beta = 0 and alpha = gamma reduce it to FedAvg.
    """
    _positive(slowmo_learning_rate=slowmo_learning_rate, local_learning_rate=local_learning_rate)
    if not 0 <= beta < 1:
        raise ValueError(f"beta={beta} is not allowed; it must be in [0, 1)")
    tx = optax.sgd(slowmo_learning_rate, momentum=beta or None)
    return pseudo_gradient_update(tx, scale=1.0 / local_learning_rate)


def sgd(learning_rate: float) -> ServerUpdate:
    """Data-parallel SGD: one step per round on the whole K*H*B batch."""
    _positive(learning_rate=learning_rate)
    return pseudo_gradient_update(optax.sgd(learning_rate), client=GRADIENT)


def adam(learning_rate: float) -> ServerUpdate:
    """Data-parallel Adam (Kingma & Ba 2015): one step per round on the whole batch."""
    _positive(learning_rate=learning_rate)
    return pseudo_gradient_update(optax.adam(learning_rate), client=GRADIENT)


def fedavgm(server_learning_rate: float, momentum: float) -> ServerUpdate:
    """FedAvgM (Hsu et al. 2019): heavy-ball server momentum on the pseudo-gradient."""
    _positive(server_learning_rate=server_learning_rate)
    _decay(momentum=momentum)
    return pseudo_gradient_update(optax.sgd(server_learning_rate, momentum=momentum))


def diloco(server_learning_rate: float, momentum: float) -> ServerUpdate:
    """DiLoCo's outer step (Douillard et al. 2023): Nesterov SGD on the pseudo-gradient."""
    _positive(server_learning_rate=server_learning_rate)
    _decay(momentum=momentum)
    return pseudo_gradient_update(optax.sgd(server_learning_rate, momentum=momentum, nesterov=True))


def fedadam(server_learning_rate: float, b1: float, b2: float, eps: float) -> ServerUpdate:
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient."""
    _positive(server_learning_rate=server_learning_rate, eps=eps)
    _decay(b1=b1, b2=b2)
    return pseudo_gradient_update(optax.adam(server_learning_rate, b1=b1, b2=b2, eps=eps))


def fedyogi(server_learning_rate: float, b1: float, b2: float, eps: float) -> ServerUpdate:
    """FedYogi (Reddi et al. 2021): Yogi on the pseudo-gradient."""
    _positive(server_learning_rate=server_learning_rate, eps=eps)
    _decay(b1=b1, b2=b2)
    return pseudo_gradient_update(optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=eps))
