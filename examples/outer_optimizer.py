"""Use a shipped learned aggregator as the outer optimizer of your own local-SGD loop.

The model, data and training loop below are defined here, not in lagg_pipeline: K workers
take H local SGD steps from the server weights, and the outer optimizer turns their
pseudo-gradients into the next server weights -- once with DiLoCo's outer Nesterov SGD, once
with the shipped LAgg-A. Run: python examples/outer_optimizer.py
"""
import haiku as hk
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import lagg_pipeline
from lagg_pipeline.outer import load

K, H, B, ROUNDS = 8, 4, 64, 150
_, info, _ = load("family_k8_h4_mix")  # LAgg-A, meta-trained for K=8 workers
assert info.num_grads == K
LOCAL_LR = info.local_learning_rate  # the local step size it was meta-trained with


def net(x):  # a small CNN the pipeline knows nothing about
    x = jax.nn.relu(hk.Conv2D(16, 3)(x))
    return hk.Linear(10)(hk.Flatten()(x))


model = hk.without_apply_rng(hk.transform(net))
digits = load_digits()
x_all = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
y_all = jnp.asarray(digits.target)


def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()


def worker(params, key):
    """H local SGD steps on this worker's own batches; returns its pseudo-gradient -delta."""
    def step(w, k):
        idx = jax.random.choice(k, len(y_all), (B,), replace=False)
        g = jax.grad(loss)(w, x_all[idx], y_all[idx])
        return jax.tree.map(lambda p, gp: p - LOCAL_LR * gp, w, g), None

    final, _ = jax.lax.scan(step, params, jax.random.split(key, H))
    return jax.tree.map(jnp.subtract, params, final)


def train(outer, per_worker: bool, seed: int = 0):
    params = model.init(jax.random.PRNGKey(seed), x_all[:1])
    state = outer.init(params)

    @jax.jit
    def round_(params, state, key):
        g_K = jax.vmap(worker, in_axes=(None, 0))(params, jax.random.split(key, K))
        g = g_K if per_worker else jax.tree.map(lambda a: a.mean(0), g_K)
        updates, state = outer.update(g, state, params)
        return optax.apply_updates(params, updates), state

    key = jax.random.PRNGKey(seed + 1)
    for _ in range(ROUNDS):
        key, k = jax.random.split(key)
        params, state = round_(params, state, k)
    return float(loss(params, x_all, y_all))


if __name__ == "__main__":
    diloco = train(optax.sgd(0.7, momentum=0.9, nesterov=True), per_worker=False)
    learned = train(lagg_pipeline.outer_optimizer("family_k8_h4_mix"), per_worker=True)
    print(f"after {ROUNDS} rounds, loss on all digits: DiLoCo outer step {diloco:.4f}, shipped LAgg-A {learned:.4f}")
