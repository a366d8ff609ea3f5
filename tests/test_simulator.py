"""The vmapped, scanned client round against hand values and a plain Python loop."""
import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from lagg_pipeline.aggregators.base import GRADIENT
from lagg_pipeline.simulator import make_client_round, reshape_round_batch
from lagg_pipeline.tasks import make_task


def scalar_loss(params, x, y):
    return 0.5 * jnp.mean((params["w"] * x - y) ** 2)


def test_two_worker_round_golden():
    # gamma = 0.5, w = 1, B = 1, H = 2.
    # Worker 1 (x = 1, 2; y = 0): losses 0.5, 0.5; w: 1 -> 0.5 -> -0.5, delta -1.5.
    # Worker 2 (x = 1, 1; y = 1): loss 0, gradient 0, delta 0. Round loss = 0.25.
    x = jnp.array([[[1.0], [2.0]], [[1.0], [1.0]]])
    y = jnp.array([[[0.0], [0.0]], [[1.0], [1.0]]])
    deltas_K, loss = jax.jit(make_client_round(scalar_loss, 0.5))({"w": jnp.array(1.0)}, x, y)
    np.testing.assert_allclose(deltas_K["w"], [-1.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(loss, 0.25, atol=1e-7)


def test_gradient_client_sends_minus_block_gradient():
    # Worker 1 block (x = 1, 2; y = 0) at w = 1: grad = mean((w x - y) x) = 2.5, loss 1.25.
    x = jnp.array([[[1.0], [2.0]], [[1.0], [1.0]]])
    y = jnp.array([[[0.0], [0.0]], [[1.0], [1.0]]])
    deltas_K, loss = make_client_round(scalar_loss, 0.5, GRADIENT)({"w": jnp.array(1.0)}, x, y)
    np.testing.assert_allclose(deltas_K["w"], [-2.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(loss, 0.625, atol=1e-6)


def test_reshape_gives_worker_k_the_kth_contiguous_block():
    x_N = jnp.arange(2 * 3 * 4)
    x, y = reshape_round_batch(x_N[:, None], x_N, num_grads=2, num_local_steps=3)
    assert x.shape == (2, 3, 4, 1)
    np.testing.assert_array_equal(y[1, 0], [12, 13, 14, 15])
    np.testing.assert_array_equal(y[0, 2], [8, 9, 10, 11])


def test_vmapped_round_equals_python_loop_on_an_mlp():
    task_cfg = OmegaConf.create({"name": "t", "dataset": "digits", "model": "mlp", "hidden_sizes": [16]})
    task = make_task(task_cfg, (8, 8, 1), 10)
    params = task.init(jax.random.PRNGKey(0))
    K, H, B, lr = 3, 4, 5, 0.3
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(kx, (K, H, B, 8, 8, 1))
    y = jax.random.randint(ky, (K, H, B), 0, 10)
    deltas_K, loss = jax.jit(make_client_round(task.loss, lr))(params, x, y)

    losses = []
    for k in range(K):
        w = params
        for h in range(H):
            value, g = jax.value_and_grad(task.loss)(w, x[k, h], y[k, h])
            losses.append(value)
            w = jax.tree.map(lambda p, gp: p - lr * gp, w, g)
        naive = jax.tree.map(lambda a, b: a - b, w, params)
        jax.tree.map(lambda v, n: np.testing.assert_allclose(v[k], n, rtol=1e-5, atol=1e-6), deltas_K, naive)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6)
