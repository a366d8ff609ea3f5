"""The optax outer optimizer computes exactly the pipeline's own server update."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lagg_pipeline
from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.checkpoint import save_params
from lagg_pipeline.outer import load, outer_optimizer


def _toy(key, K):
    kp, kd = jax.random.split(key)
    params = {"w": jax.random.normal(kp, (5, 3)), "b": jnp.zeros(3)}
    deltas_K = jax.tree.map(lambda p: 0.01 * jax.random.normal(kd, (K, *p.shape)), params)
    return params, deltas_K


def _same_updates(outer, server, params, deltas_K, pseudo):
    o_state, s_state = outer.init(params), server.init(params)
    for r in range(3):  # a few rounds: the accumulators and the step counter must agree too
        deltas_r = jax.tree.map(lambda d: d * (r + 1), deltas_K)
        updates, o_state = outer.update(pseudo(deltas_r), o_state, params)
        new_params, s_state = server.update(deltas_r, s_state, params)
        for u, n, p in zip(jax.tree.leaves(updates), jax.tree.leaves(new_params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(n - p))
        np.testing.assert_allclose(np.asarray(optax.apply_updates(params, updates)["w"]),
                                   np.asarray(new_params["w"]), rtol=1e-6)
        params = new_params


def test_shipped_lagg_a_reads_per_worker_pseudo_gradients():
    meta_params, info, hidden = load("family_k8_h4_mix")
    assert info.variant == "lagg_a" and info.num_grads == 8
    server = LearnedAggregator("lagg_a", 8, hidden).server_update(meta_params)
    params, deltas_K = _toy(jax.random.PRNGKey(0), 8)
    _same_updates(lagg_pipeline.outer_optimizer("family_k8_h4_mix"), server, params, deltas_K,
                  lambda d: jax.tree.map(jnp.negative, d))


def test_lopt_a_reads_the_averaged_pseudo_gradient(tmp_path):
    aggregator = LearnedAggregator("lopt_a", 4, 32)
    meta_params = aggregator.init_meta_params(jax.random.PRNGKey(3))
    meta_params["nn"]["~"]["w2"] = meta_params["nn"]["~"]["w2"] * 50  # steps big enough to matter
    save_params(tmp_path / "lopt.npz", meta_params, {"variant": "lopt_a", "num_grads": 4, "hidden_size": 32})
    outer = outer_optimizer(path=tmp_path / "lopt.npz")
    params, deltas_K = _toy(jax.random.PRNGKey(1), 4)
    _same_updates(outer, aggregator.server_update(meta_params), params, deltas_K,
                  lambda d: jax.tree.map(lambda x: -x.mean(0), d))
    assert float(jnp.abs(outer.update(jax.tree.map(lambda x: -x.mean(0), deltas_K), outer.init(params),
                                      params)[0]["w"]).max()) > 1e-6


def test_outer_optimizer_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="pretrained=nope is not shipped for lagg_a"):
        outer_optimizer("nope")
    with pytest.raises(ValueError, match="exactly one"):
        outer_optimizer()
    outer = outer_optimizer("family_k8_h4_mix")
    params, deltas_K = _toy(jax.random.PRNGKey(2), 8)
    with pytest.raises(ValueError, match="needs params"):
        outer.update(deltas_K, outer.init(params))
    with pytest.raises(ValueError, match="num_grads=8"):
        outer.update(jax.tree.map(lambda d: d[:4], deltas_K), outer.init(params), params)
