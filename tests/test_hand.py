"""Golden values computed by hand for every hand-designed server update (2 workers)."""
import jax.numpy as jnp
import numpy as np
import pytest

from lagg_pipeline.aggregators import hand
from lagg_pipeline.aggregators.base import GRADIENT, LOCAL_SGD

PARAMS = {"w": jnp.array([0.5, -1.0])}
DELTAS_K = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}  # mean delta = [2, 3]


def apply_rounds(server_update, rounds):
    params, state = PARAMS, server_update.init(PARAMS)
    out = []
    for _ in range(rounds):
        params, state = server_update.update(DELTAS_K, state, params)
        out.append(np.asarray(params["w"]))
    return out


def test_fedavg_adds_the_mean_delta():
    (x1,) = apply_rounds(hand.fedavg(), 1)
    np.testing.assert_allclose(x1, [2.5, 2.0], rtol=0, atol=1e-7)


def test_slowmo_reference_form_two_rounds():
    # gamma=0.5, alpha=0.2, beta=0.5: u1 = -[2,3]/0.5 = [-4,-6], x1 = x - 0.2 u1 = [1.3, 0.2];
    # u2 = 0.5 u1 + [-4,-6] = [-6,-9], x2 = x1 - 0.2 u2 = [2.5, 2.0].
    x1, x2 = apply_rounds(hand.slowmo(beta=0.5, slowmo_learning_rate=0.2, local_learning_rate=0.5), 2)
    np.testing.assert_allclose(x1, [1.3, 0.2], atol=1e-6)
    np.testing.assert_allclose(x2, [2.5, 2.0], atol=1e-6)


def test_slowmo_without_momentum_and_alpha_gamma_is_fedavg():
    slow = apply_rounds(hand.slowmo(beta=0.0, slowmo_learning_rate=0.3, local_learning_rate=0.3), 3)
    avg = apply_rounds(hand.fedavg(), 3)
    np.testing.assert_allclose(slow, avg, atol=1e-6)


def test_sgd_steps_on_minus_mean_delta():
    # Data-parallel: deltas are minus gradients, so g = [-2, -3] and x <- x - 0.1 g.
    update = hand.sgd(0.1)
    assert update.client == GRADIENT
    (x1,) = apply_rounds(update, 1)
    np.testing.assert_allclose(x1, [0.7, -0.7], atol=1e-7)


def test_adam_first_step_is_lr_times_sign():
    update = hand.adam(0.1)
    assert update.client == GRADIENT
    (x1,) = apply_rounds(update, 1)
    np.testing.assert_allclose(x1, [0.6, -0.9], atol=1e-6)


def test_fedavgm_momentum_accumulates():
    # g = -[2,3]; t1 = g, x1 = x - t1; t2 = 0.5 t1 + g = 1.5 g, x2 = x1 - 1.5 g.
    x1, x2 = apply_rounds(hand.fedavgm(server_learning_rate=1.0, momentum=0.5), 2)
    np.testing.assert_allclose(x1, [2.5, 2.0], atol=1e-6)
    np.testing.assert_allclose(x2, [5.5, 6.5], atol=1e-6)


def test_diloco_nesterov_first_step():
    # Nesterov: t1 = g, update = -lr (g + mu t1) = -0.7 * 1.9 g = 1.33 * [2, 3].
    (x1,) = apply_rounds(hand.diloco(server_learning_rate=0.7, momentum=0.9), 1)
    np.testing.assert_allclose(x1, [0.5 + 2.66, -1.0 + 3.99], atol=1e-5)


@pytest.mark.parametrize("make", [hand.fedadam, hand.fedyogi])
def test_adaptive_server_first_step_moves_towards_mean_delta(make):
    (x1,) = apply_rounds(make(server_learning_rate=0.01, b1=0.9, b2=0.99, eps=1e-3), 1)
    step = x1 - np.asarray(PARAMS["w"])
    assert np.all(step > 0) and np.all(step <= 0.01 + 1e-6)


def test_hand_updates_send_local_sgd_deltas():
    for update in (hand.fedavg(), hand.slowmo(0.9, 0.1, 0.1), hand.fedavgm(1.0, 0.9)):
        assert update.client == LOCAL_SGD


@pytest.mark.parametrize("make, kwargs, key", [
    (hand.sgd, {"learning_rate": 0.0}, "learning_rate"),
    (hand.slowmo, {"beta": 1.0, "slowmo_learning_rate": 0.1, "local_learning_rate": 0.1}, "beta"),
    (hand.fedadam, {"server_learning_rate": -1.0, "b1": 0.9, "b2": 0.99, "eps": 1e-3}, "server_learning_rate"),
])
def test_bad_arguments_are_refused_at_construction(make, kwargs, key):
    with pytest.raises(ValueError, match=key):
        make(**kwargs)
