"""The learned server updates (SPEC 3.3): layout, step formula, state, jit/vmap, K checks."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lagg_pipeline.aggregators import features
from lagg_pipeline.aggregators.learned import VARIANTS, LearnedAggregator, LearnedState

PARAMS = {"dense": {"w": jnp.linspace(-1.0, 1.0, 24).reshape(6, 4), "b": jnp.arange(4.0) / 10},
          "conv": jnp.cos(jnp.arange(2 * 3 * 5.0)).reshape(2, 3, 5), "scale": jnp.asarray(0.7)}


SMALL_PARAMS = {"w": PARAMS["dense"]["w"], "scale": PARAMS["scale"]}  # fewer leaves, faster compiles


def deltas(k, seed=0, params=PARAMS):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (0.01 * rng.normal(size=(k,) + p.shape)).astype(np.float32), params)


def lively_meta_params(agg, seed=0):
    """Random weights and biases, and offsets != 0, so d and g are far from trivial."""
    rng = np.random.default_rng(seed)
    mp = agg.init_meta_params(jax.random.PRNGKey(seed))
    mp = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.normal(size=x.shape).astype(np.float32), mp)
    last = mp["nn"]["~"] if agg.uses_accumulators else mp["mlp/~/linear_2"]
    last["b2" if agg.uses_accumulators else "b"] = np.asarray([0.5, 400.0], np.float32)  # exp(0.001 g) != 1
    return mp


def get_path(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def numpy_mlp(agg, mp, x):
    """The per-element MLP in numpy, from the saved layout: returns (d, g)."""
    if agg.uses_accumulators:
        layers = [(mp["nn"]["~"][f"w{i}"], mp["nn"]["~"][f"b{i}"]) for i in range(3)]
    else:
        layers = [(mp[f"mlp/~/linear_{i}"]["w"], mp[f"mlp/~/linear_{i}"]["b"]) for i in range(3)]
    x = np.asarray(x, np.float64)
    for i, (w, b) in enumerate(layers):
        x = x @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
        if i < 2:
            x = np.maximum(x, 0.0)
    return x[..., 0], x[..., 1]


@pytest.mark.parametrize("variant,k,count", [("lagg_a", 8, 2633), ("lopt_a", 8, 2409),
                                             ("lopt_a", 16, 2409), ("lagg", 8, 1794), ("lopt", 8, 1570)])
def test_meta_param_counts(variant, k, count):
    mp = LearnedAggregator(variant, k).init_meta_params(jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(mp)) == count


def test_adafactor_layout_matches_the_reference_files():
    agg = LearnedAggregator("lagg_a", 8)
    mp = agg.init_meta_params(jax.random.PRNGKey(0))
    shapes = jax.tree.map(jnp.shape, mp)
    assert shapes == {"momentum_decays": (3,), "rms_decays": (1,), "adafactor_decays": (3,),
                      "nn": {"~": {"w0": (46, 32), "b0": (32,), "w1": (32, 32), "b1": (32,),
                                   "w2": (32, 2), "b2": (2,)}}}
    assert agg.input_width == 46 and LearnedAggregator("lopt_a", 8).input_width == 39
    for name in ("momentum_decays", "rms_decays", "adafactor_decays", ("nn", "~", "b0")):
        value = mp["nn"]["~"]["b0"] if isinstance(name, tuple) else mp[name]
        assert not np.any(np.asarray(value))
    # Truncated normal with std 1/sqrt(fan_in): within 2 std and about the right spread.
    w0 = np.asarray(mp["nn"]["~"]["w0"])
    assert np.abs(w0).max() <= 2 / np.sqrt(46) / 0.87962566 + 1e-6
    assert 0.8 < w0.std() * np.sqrt(46) < 1.2


def test_plain_layout_is_the_reference_hk_mlp():
    mp = LearnedAggregator("lopt", 8).init_meta_params(jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, mp) == {
        "mlp/~/linear_0": {"w": (13, 32), "b": (32,)}, "mlp/~/linear_1": {"w": (32, 32), "b": (32,)},
        "mlp/~/linear_2": {"w": (32, 2), "b": (2,)}}
    assert LearnedAggregator("lagg", 5).input_width == 17


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_is_direction_times_exp_magnitude(variant):
    k = 4
    agg = LearnedAggregator(variant, k)
    mp = lively_meta_params(agg)
    su = agg.server_update(mp)
    state = su.init(PARAMS)
    assert isinstance(state, LearnedState) and state.t.dtype == jnp.int32 and int(state.t) == 0

    @jax.jit
    def expected_inputs(d_K, acc, params, t):
        """Accumulators updated with the mean delta first, then every leaf's features."""
        mean_d = jax.tree.map(lambda d: d.mean(0), d_K)
        raw = d_K if agg.per_worker_inputs else jax.tree.map(lambda d: d[None], mean_d)
        if not agg.uses_accumulators:
            return None, jax.tree.map(lambda r, p: features.leaf_features(r, p, t), raw, params)
        decays = features.decays_from_offsets(mp["momentum_decays"], mp["rms_decays"],
                                              mp["adafactor_decays"])
        acc = features.update_accumulators(acc, mean_d, decays)
        return acc, jax.tree.map(lambda r, p, a: features.leaf_features(r, p, t, a), raw, params, acc)

    params = PARAMS
    acc = features.init_accumulators(PARAMS) if agg.uses_accumulators else None
    update = jax.jit(su.update)
    for t in range(2):
        d_K = deltas(k, seed=t)
        new_params, state = update(d_K, state, params)
        assert int(state.t) == t + 1
        acc, inputs = expected_inputs(d_K, acc, params, jnp.asarray(t))
        abs_steps = []
        for path, p in jax.tree.flatten_with_path(params)[0]:
            x = get_path(inputs, path)
            assert x.shape == (p.shape or (1,)) + (agg.input_width,)
            d, g = numpy_mlp(agg, mp, x)
            step = (d * np.exp(0.001 * g) * 0.001).reshape(p.shape)
            np.testing.assert_allclose(get_path(new_params, path), np.asarray(p) - step,
                                       rtol=1e-5, atol=1e-7)
            abs_steps.append(np.abs(step).ravel())
        assert np.concatenate(abs_steps).max() > 1e-4  # steps are not negligible next to p
        np.testing.assert_allclose(state.mean_abs_step, np.concatenate(abs_steps).mean(), rtol=1e-4)
        params = new_params
    assert new_params["scale"].shape == ()


@pytest.mark.parametrize("variant", ["lagg_a", "lopt"])
def test_jit_and_vmap_over_stacked_meta_params(variant):
    k = 3
    agg = LearnedAggregator(variant, k)
    mps = [lively_meta_params(agg, seed) for seed in (1, 2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *mps)
    d_K = deltas(k, params=SMALL_PARAMS)

    def two_rounds(mp):  # meta-params closed over inside the traced function, as in PES
        su = agg.server_update(mp)
        params, state = su.update(d_K, su.init(SMALL_PARAMS), SMALL_PARAMS)
        return su.update(d_K, state, params)

    batched = jax.jit(jax.vmap(two_rounds))(stacked)
    for i, mp in enumerate(mps):
        single = jax.jit(two_rounds)(mp)
        jax.tree.map(lambda b, s: np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-8),
                     batched, single)
    assert batched[1].t.shape == (2,) and batched[1].mean_abs_step.shape == (2,)


def test_k_mismatch_is_a_clear_error():
    mp = LearnedAggregator("lagg_a", 8).init_meta_params(jax.random.PRNGKey(0))
    message = ("LAgg-A meta-parameters were trained for K=8 (input width 46) and cannot run with "
               "num_grads=16; LAgg-A's input width is K+38. Re-meta-train at K=16, or use lopt_a "
               "which is independent of K.")
    with pytest.raises(ValueError, match=re.escape(message)):
        LearnedAggregator("lagg_a", 16).server_update(mp)
    plain = LearnedAggregator("lagg", 8).init_meta_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=re.escape("trained for K=8 (input width 20)")):
        LearnedAggregator("lagg", 4).check_compatible(plain)


def test_lagg_update_rejects_deltas_from_another_k():
    su = LearnedAggregator("lagg_a", 4).server_update(
        LearnedAggregator("lagg_a", 4).init_meta_params(jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"built for num_grads=4 but got deltas with leading axis \(6,\)"):
        su.update(deltas(6, params=SMALL_PARAMS), su.init(SMALL_PARAMS), SMALL_PARAMS)


def test_lopt_a_runs_at_another_k():
    mp = LearnedAggregator("lopt_a", 8).init_meta_params(jax.random.PRNGKey(0))
    su = LearnedAggregator("lopt_a", 16).server_update(mp)
    params, state = jax.jit(su.update)(deltas(16, params=SMALL_PARAMS), su.init(SMALL_PARAMS), SMALL_PARAMS)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert int(state.t) == 1


def test_other_incompatibilities_are_one_line_errors():
    lopt_a = LearnedAggregator("lopt_a", 8)
    with pytest.raises(ValueError, match="input width 46, but LOpt-A with num_grads=8 needs 39"):
        lopt_a.check_compatible(LearnedAggregator("lagg_a", 8).init_meta_params(jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=re.escape("hidden size 16 (w0 is (39, 16)), but this LOpt-A "
                                                   "was built with hidden_size=32")):
        lopt_a.check_compatible(LearnedAggregator("lopt_a", 8, hidden_size=16).init_meta_params(
            jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="have no nn/~/w0, so they are not LOpt-A"):
        lopt_a.check_compatible(LearnedAggregator("lopt", 8).init_meta_params(jax.random.PRNGKey(0)))
    mp = lopt_a.init_meta_params(jax.random.PRNGKey(0))
    del mp["rms_decays"]
    with pytest.raises(ValueError, match="laid out as"):
        lopt_a.check_compatible(mp)


def test_construction_is_validated():
    with pytest.raises(ValueError, match="allowed: lagg_a, lopt_a, lagg, lopt"):
        LearnedAggregator("lagg-adafac", 8)
    with pytest.raises(ValueError, match="num_grads=0"):
        LearnedAggregator("lopt_a", 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_averaging_init_starts_as_normalised_worker_averaging(variant):
    """meta_init=averaging: with the random part switched off, the first step is exactly
    p + STEP_MULT * scale * mean_k normalise(delta_k) (LOpt: normalise(mean_k delta_k))."""
    k, scale = 3, 7.0
    agg = LearnedAggregator(variant, num_grads=k, hidden_size=8)
    fresh = agg.init_meta_params(jax.random.PRNGKey(0))
    meta = agg.averaging_meta_params(fresh, scale, rest_scale=0.0)
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (5, 4)), "b": jnp.arange(4.0)}
    deltas_K = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), (k, *p.shape)), params)
    update = agg.server_update(meta)
    new_params, state = update.update(deltas_K, update.init(params), params)

    def normalise(x):
        return x * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x)))

    per_worker = variant.startswith("lagg")
    for name in params:
        d = deltas_K[name]
        direction = jnp.mean(jax.vmap(normalise)(d), 0) if per_worker else normalise(jnp.mean(d, 0))
        np.testing.assert_allclose(new_params[name], params[name] + 1e-3 * scale * direction, rtol=1e-5, atol=1e-7)
    # the random part is kept, scaled; the fresh meta-parameters are left as they were
    kept = agg.averaging_meta_params(fresh, scale, rest_scale=0.5)
    w2_path = agg._layer_paths()[2][0]
    get = lambda tree: np.asarray(functools.reduce(lambda node, key: node[key], w2_path, tree))
    np.testing.assert_allclose(get(kept)[2:], 0.5 * get(fresh)[2:])
    assert get(fresh)[0, 0] != -scale  # not modified in place


def test_averaging_init_needs_two_hidden_units():
    with pytest.raises(ValueError, match="hidden_size >= 2"):
        agg = LearnedAggregator("lagg_a", num_grads=2, hidden_size=1)
        agg.averaging_meta_params(agg.init_meta_params(jax.random.PRNGKey(0)), 10.0)
