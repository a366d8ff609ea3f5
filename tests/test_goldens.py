"""Golden values computed independently of the code under test (plain numpy, float64).

Each test re-derives its expected numbers from the published rule or from SPEC.md, never
by calling the package function it checks:
- FedAdam / FedYogi server updates against the Adam and Yogi rules (optax's conventions);
- the benchmark's per-split metrics against closed-form losses at the initial weights;
- the truncated-PES estimator over two truncations with resets against SPEC section 4;
- one imported reference-code LOpt-A file, two server rounds, against SPEC sections 3.1-3.3.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lagg_pipeline.aggregators import hand
from lagg_pipeline.aggregators.base import ServerUpdate
from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.benchmark import run_benchmark
from lagg_pipeline.checkpoint import load_params
from lagg_pipeline.data import Split, Splits
from lagg_pipeline.legacy import import_legacy
from lagg_pipeline.meta.pes import PES
from lagg_pipeline.meta.truncation import Episode
from lagg_pipeline.tasks import Task
from test_pes import DATA, linear_task

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "original_lopt_a_k8.pickle"


# --------------------------------------------------------------------------------------------
# 1. FedAdam / FedYogi
# --------------------------------------------------------------------------------------------

def _two_rounds(update, params, deltas_rounds):
    state = update.init(params)
    out = []
    for deltas in deltas_rounds:
        params, state = jax.jit(update.update)(deltas, state, params)
        out.append(np.asarray(params["w"], np.float64))
    return out


def _adam_reference(x, gs, lr, b1, b2, eps):
    """Kingma & Ba with bias correction; m, v start at 0; eps outside the square root."""
    m, v, out = np.zeros_like(x), np.zeros_like(x), []
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        out.append(x)
    return out


def _yogi_reference(x, gs, lr, b1, b2, eps, v_rule="yogi"):
    """Zaheer et al. 2018 as optax.yogi runs it: m and v start at 1e-6 (optax's
    initial_accumulator_value), v <- v - (1-b2) sign(v - g^2) g^2, both moments bias-corrected,
    eps outside the square root. ``v_rule="adam"`` swaps in Adam's v update (for contrast)."""
    m, v, out = np.full_like(x, 1e-6), np.full_like(x, 1e-6), []
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        if v_rule == "yogi":
            v = v - (1 - b2) * np.sign(v - g ** 2) * g ** 2
        else:
            v = b2 * v + (1 - b2) * g ** 2
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        out.append(x)
    return out


def test_fedadam_and_fedyogi_match_the_published_rules_over_two_rounds():
    lr, b1, b2, eps = 0.1, 0.8, 0.5, 1e-3
    x0 = np.array([0.3, -0.2])
    # Two clients per round; the mean delta is what matters: pseudo-gradient g = -mean_k delta_k.
    # Round 1 mean delta (-1.0, 0.8), round 2 (-0.1, -1.5): coordinate 0's g^2 falls below v in
    # round 2 (Yogi: v shrinks additively), coordinate 1's rises above it (Yogi: v grows by
    # (1-b2) g^2 without Adam's b2 v forgetting).
    round1 = np.array([[-1.5, 1.1], [-0.5, 0.5]])
    round2 = np.array([[0.2, -1.0], [-0.4, -2.0]])
    gs = [-round1.mean(axis=0), -round2.mean(axis=0)]
    np.testing.assert_allclose(gs, [[1.0, -0.8], [0.1, 1.5]])
    params = {"w": jnp.asarray(x0, jnp.float32)}
    deltas = [{"w": jnp.asarray(r, jnp.float32)} for r in (round1, round2)]

    adam = _two_rounds(hand.fedadam(lr, b1, b2, eps), params, deltas)
    yogi = _two_rounds(hand.fedyogi(lr, b1, b2, eps), params, deltas)
    adam_ref = _adam_reference(x0, gs, lr, b1, b2, eps)
    yogi_ref = _yogi_reference(x0, gs, lr, b1, b2, eps)
    yogi_with_adams_v = _yogi_reference(x0, gs, lr, b1, b2, eps, v_rule="adam")
    for got, want in zip(adam, adam_ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(yogi, yogi_ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    # The first Adam step is lr * sign(g) (up to eps): the update descends the pseudo-gradient.
    np.testing.assert_allclose(adam[0], x0 - lr * np.sign(gs[0]) / (1 + eps / np.abs(gs[0])), rtol=1e-5)
    # Round 2 is where Yogi's additive v update departs from Adam's multiplicative one: the
    # test tells the two rules apart (and the two server updates really differ).
    assert np.all(np.abs(yogi_ref[1] - yogi_with_adams_v[1]) > 1e-3)
    assert np.all(np.abs(yogi[1] - yogi_with_adams_v[1]) > 1e-3)
    assert np.all(np.abs(yogi[1] - adam[1]) > 1e-3)


# --------------------------------------------------------------------------------------------
# 2. Benchmark metrics read their own splits
# --------------------------------------------------------------------------------------------

W0 = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.6]])
B0 = np.array([0.1, -0.2, 0.05])


def _fixed_linear_task():
    """Softmax regression whose init ignores the key: the weights at round 0 are W0, B0."""

    def init(key):
        del key
        return {"w": jnp.asarray(W0, jnp.float32), "b": jnp.asarray(B0, jnp.float32)}

    def apply(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    return Task("fixed_linear", init, apply, 3)


def _np_logits(x):
    return x.reshape(x.shape[0], -1) @ W0 + B0


def _np_loss(x, y):
    z = _np_logits(x)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def _np_accuracy(x, y):
    return float(np.mean(np.argmax(_np_logits(x), axis=1) == y))


def _frozen_server():
    """A server update that never moves the weights: every evaluation is at the initial weights."""
    return ServerUpdate(lambda params: jnp.zeros((), jnp.float32), lambda deltas, state, params: (params, state))


def test_each_benchmark_metric_reads_its_own_split():
    rng = np.random.default_rng(0)
    make = lambda n, labels, scale=1.0: (scale * rng.normal(size=(n, 3)), np.asarray(labels, np.int64))  # noqa: E731
    train = make(8, [0, 1, 2, 0, 1, 2, 0, 1])
    inner_valid = make(7, [2] * 7)
    outer_valid = make(5, [1] * 5, scale=2.0)
    test = make(6, [0] * 6, scale=0.5)
    as_split = lambda xy: Split(jnp.asarray(xy[0], jnp.float32), jnp.asarray(xy[1], jnp.int32))  # noqa: E731
    splits = Splits(as_split(train), as_split(inner_valid), as_split(outer_valid), as_split(test), 3)

    want = {name: _np_loss(*xy) for name, xy in
            [("train", train), ("inner_valid", inner_valid), ("outer_valid", outer_valid), ("test", test)]}
    want_accuracy = _np_accuracy(*test)
    # Make sure the splits can be told apart by every metric the test checks.
    values = sorted(want.values())
    assert min(np.diff(values)) > 0.05, want
    assert 0 < want_accuracy < 1 and want_accuracy != _np_accuracy(*outer_valid)
    assert want_accuracy != _np_accuracy(*train) and want_accuracy != _np_accuracy(*inner_valid)

    # K*H*B = 2*1*4 = 8 = the train split's size: each round sees every training example once,
    # and with H = 1 every minibatch loss is taken at the server weights, so a round's train
    # loss is the whole train split's loss at the (never moving) weights.
    result = run_benchmark(_fixed_linear_task(), splits, _frozen_server(), name="frozen", num_grads=2,
                           num_local_steps=1, local_batch_size=4, local_learning_rate=0.1, num_runs=2,
                           num_rounds=2, eval_every=1, seed=0, progress=False)
    np.testing.assert_array_equal(result.eval_rounds, [0, 1, 2])
    np.testing.assert_allclose(result.test_loss, np.full((2, 3), want["test"]), rtol=1e-5)
    np.testing.assert_allclose(result.outer_valid_loss, np.full((2, 3), want["outer_valid"]), rtol=1e-5)
    np.testing.assert_allclose(result.test_accuracy, np.full((2, 3), want_accuracy), rtol=1e-6)
    np.testing.assert_allclose(result.train_loss, np.full((2, 2), want["train"]), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 3. PES over two truncations with resets
# --------------------------------------------------------------------------------------------

def _flat(tree, lead):
    """[lead, P] float64: every leaf of ``tree`` flattened after its ``lead`` leading axis."""
    return np.concatenate([np.asarray(x, np.float64).reshape(lead, -1) for x in jax.tree.leaves(tree)], axis=1)


def _pes_reference(xi, eps, loss, mask, fin, sigma, n, b_uses_xi=False):
    """SPEC section 4 for one truncation, particles on axis 0 of xi/eps: (grad [P], next xi).
    ``b_uses_xi`` weights the post-reset term by xi instead of eps (a wrong rule, for contrast)."""
    dl = loss[:, :n] - loss[:, n:]
    den = mask.sum(axis=0)
    a = (dl * (1 - fin) * mask).sum(axis=0) / den
    b = (dl * fin * mask).sum(axis=0) / den
    xi = xi + eps
    grad = np.mean(a[:, None] * xi + b[:, None] * (xi if b_uses_xi else eps), axis=0) / (2 * sigma ** 2)
    reset = fin.any(axis=0)
    return np.nan_to_num(grad), np.where(reset[:, None], eps, xi)


def test_pes_matches_the_spec_over_two_truncations_with_resets():
    n, T, sigma = 3, 4, 0.01
    aggregator = LearnedAggregator("lopt", num_grads=2, hidden_size=8)
    pes = PES(linear_task(), aggregator, num_tasks=n, trunc_length=T, pes_std=sigma, min_length=1000,
              max_length=1001, num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    # Rounds 0-3 are truncation 1, rounds 4-7 truncation 2. A reset happens on the round where
    # step >= length. Particle 0 resets on round 5 (second round of truncation 2); particle 1
    # never; particle 2 resets on round 1 (truncation 1) and then runs a fresh 1000-round episode.
    # Two rounds follow each reset in its window: the first round of a fresh episode scores the
    # fresh init (the same for both antithetic members), the second one depends on eps, so the
    # b-term is not trivially zero.
    state = state._replace(episode=Episode(jnp.array([0, 0, 0], jnp.int32), jnp.array([5, 1000, 1], jnp.int32)))
    # A non-zero accumulator, as if earlier truncations had run: a reset must discard it.
    xi0_tree = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.PRNGKey(9), x.shape, x.dtype),
                            state.accumulator)
    state = state._replace(accumulator=xi0_tree)
    expected_mask = [np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], np.float64),
                     np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]], np.float64)]
    expected_fin = [np.array([[0, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]], np.float64),
                    np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], np.float64)]

    captured = {}
    unroll = pes.unroll

    def capturing_unroll(meta_2N, st, data):
        st, out = unroll(meta_2N, st, data)
        captured["out"], captured["meta_2N"] = out, meta_2N
        return st, out

    pes.unroll = capturing_unroll  # this instance only; estimate calls self.unroll

    @jax.jit
    def estimate(theta, st, key):
        grad, st, metrics = pes.estimate(theta, st, key, DATA)
        return grad, st, captured["out"], captured["meta_2N"]

    def eps_of(key):
        """eps as estimate draws it: N(0, sigma^2) of shape [N, all parameters], cut in leaf order."""
        leaves, treedef = jax.tree.flatten(theta)
        flat = np.asarray(sigma * jax.random.normal(key, (n, sum(p.size for p in leaves))))
        bounds = np.cumsum([0] + [p.size for p in leaves])
        return treedef.unflatten([flat[:, a:b].reshape(n, *p.shape) for a, b, p in zip(bounds, bounds[1:], leaves)])

    xi = _flat(xi0_tree, n)
    theta_flat = _flat(jax.tree.map(lambda p: p[None], theta), 1)
    grads, refs = [], []
    for call, key in enumerate([jax.random.PRNGKey(11), jax.random.PRNGKey(12)]):
        grad, state, out, meta_2N = estimate(theta, state, key)
        eps = _flat(eps_of(key), n)
        # The recomputed eps is the one the particles really ran with: theta + eps, theta - eps.
        members = _flat(meta_2N, 2 * n)
        np.testing.assert_allclose(members[:n], theta_flat + eps, atol=1e-6)
        np.testing.assert_allclose(members[n:], theta_flat - eps, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out.mask), expected_mask[call])
        np.testing.assert_array_equal(np.asarray(out.finished), expected_fin[call])
        loss = np.asarray(out.loss, np.float64)
        assert np.all(np.isfinite(loss))
        # The masked (reset) rounds carry a real loss difference, so including them would show.
        dl = loss[:, :n] - loss[:, n:]
        reset_dl = dl[expected_mask[call] == 0]
        assert reset_dl.size == 1 and np.all(reset_dl != 0)
        resetting = 2 if call == 0 else 0
        assert dl[3, resetting] != 0  # a scored post-reset round: b != 0 for the resetting particle
        ref_grad, xi_next = _pes_reference(xi, eps, loss, expected_mask[call], expected_fin[call], sigma, n)
        got = _flat(jax.tree.map(lambda g: g[None], grad), 1)[0]
        scale = np.max(np.abs(ref_grad))
        np.testing.assert_allclose(got, ref_grad, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(_flat(state.accumulator, n), xi_next, rtol=1e-5, atol=1e-9)
        grads.append(got)
        refs.append((xi, eps, loss, scale))
        xi = xi_next

    # The accumulator after both calls, spelled out: particle 0 reset in truncation 2 -> eps2;
    # particle 1 never reset -> xi0 + eps1 + eps2; particle 2 reset in truncation 1 -> eps1 + eps2.
    xi0 = _flat(xi0_tree, n)
    eps1, eps2 = refs[0][1], refs[1][1]
    np.testing.assert_allclose(xi, np.stack([eps2[0], xi0[1] + eps1[1] + eps2[1], eps1[2] + eps2[2]]), atol=1e-12)

    # The reference is sensitive to each property the estimator must have (so the comparison
    # above would catch its loss): a-term with xi not eps, b-term with eps not xi, masked reset
    # steps, xi reset after a reset.
    xi1, eps2, loss2, scale = refs[1]
    far = lambda alt: np.max(np.abs(alt - grads[1])) > 1e-3 * scale  # noqa: E731
    m2, f2 = expected_mask[1], expected_fin[1]
    assert far(_pes_reference(np.zeros_like(xi1), eps2, loss2, m2, f2, sigma, n)[0])  # a-term uses eps only
    assert far(_pes_reference(xi1, eps2, loss2, np.ones_like(m2), f2, sigma, n)[0])  # reset step unmasked
    assert far(_pes_reference(xi1, eps2, loss2, m2, f2, sigma, n, b_uses_xi=True)[0])  # b-term with xi
    not_reset_xi1 = xi0 + refs[0][1]  # had particle 2's accumulator not been reset after truncation 1
    assert far(_pes_reference(not_reset_xi1, eps2, loss2, m2, f2, sigma, n)[0])


# --------------------------------------------------------------------------------------------
# 4. An imported reference-code LOpt-A file against SPEC 3.1-3.3
# --------------------------------------------------------------------------------------------

MOMENTUM, RMS, ADAFACTOR = (0.9, 0.99, 0.999), (0.999,), (0.9, 0.99, 0.999)
TIMESCALES = np.array([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000], np.float64)


def _decay(beta0, offset):
    return 1.0 - (1.0 - np.asarray(beta0)) * np.exp(10.0 * np.asarray(offset, np.float64))


def _rsqrt(x):
    return 1.0 / np.sqrt(x)


def _safe_rsqrt(x):
    return _rsqrt(np.maximum(x, 1e-9))


class _NumpyLOptA:
    """SPEC 3.1-3.3 for LOpt-A in plain numpy, leaf by leaf (scalars as shape (1,))."""

    def __init__(self, meta):
        self.nn = {k: np.asarray(v, np.float64) for k, v in meta["nn"]["~"].items()}
        self.bm = _decay(MOMENTUM, meta["momentum_decays"])
        self.bv = np.clip(_decay(RMS, meta["rms_decays"]), 0, 1)
        self.bf = np.clip(_decay(ADAFACTOR, meta["adafactor_decays"]), 0, 1)
        self.acc, self.t = {}, 0

    def _leaf(self, name, p, deltas):
        shape = p.shape or (1,)
        p = p.reshape(shape)
        g = deltas.mean(axis=0).reshape(shape)  # LOpt-A: the mean delta only
        g_ = g[..., None]
        g2 = g_ ** 2 + 1e-30
        if name not in self.acc:
            acc = {"m": np.zeros(shape + (3,)), "v": np.zeros(shape + (1,))}
            if len(shape) >= 2:
                order = np.argsort(shape)
                d0, d1 = int(order[-1]), int(order[-2])
                acc["row"] = np.zeros(tuple(np.delete(shape, d0)) + (3,))
                acc["col"] = np.zeros(tuple(np.delete(shape, d1)) + (3,))
            else:
                acc["f"] = np.zeros(shape + (3,))
            self.acc[name] = acc
        acc = self.acc[name]
        acc["m"] = self.bm * acc["m"] + (1 - self.bm) * g_
        acc["v"] = self.bv * acc["v"] + (1 - self.bv) * g_ ** 2
        m, v = acc["m"], acc["v"]
        if len(shape) >= 2:
            order = np.argsort(shape)
            d0, d1 = int(order[-1]), int(order[-2])
            acc["row"] = self.bf * acc["row"] + (1 - self.bf) * g2.mean(axis=d0)
            acc["col"] = self.bf * acc["col"] + (1 - self.bf) * g2.mean(axis=d1)
            d1p = d1 - 1 if d1 > d0 else d1
            row_factor = _safe_rsqrt(acc["row"] / (acc["row"].mean(axis=d1p, keepdims=True) + 1e-9))
            col_factor = _safe_rsqrt(acc["col"])
            factor = np.expand_dims(row_factor, d0) * np.expand_dims(col_factor, d1)
            full = shape + (3,)
            row = np.broadcast_to(np.expand_dims(acc["row"], d0), full)
            col = np.broadcast_to(np.expand_dims(acc["col"], d1), full)
            fac_g = g_ * factor
            block = [row, col, _rsqrt(row + 1e-8), _rsqrt(col + 1e-8), m * factor]
        else:
            acc["f"] = self.bf * acc["f"] + (1 - self.bf) * g2
            f = acc["f"]
            fac_g = g_ * _safe_rsqrt(f + 1e-9)
            block = [f, f, _rsqrt(f + 1e-8), _rsqrt(f + 1e-8), m * (f + 1e-6) ** -0.5]
        columns = [g_, p[..., None], m, v, m * _rsqrt(v + 1e-6), _rsqrt(v + 1e-6), fac_g] + block
        x = np.concatenate([np.broadcast_to(c, shape + c.shape[-1:]) for c in columns], axis=-1)
        assert x.shape[-1] == 28
        x = x * _rsqrt(1e-5 + np.mean(x ** 2, axis=tuple(range(x.ndim - 1)), keepdims=True))
        emb = np.broadcast_to(np.tanh(self.t / TIMESCALES - 1.0), shape + (11,))
        h = np.concatenate([x, emb], axis=-1)
        h = np.maximum(h @ self.nn["w0"] + self.nn["b0"], 0)
        h = np.maximum(h @ self.nn["w1"] + self.nn["b1"], 0)
        out = h @ self.nn["w2"] + self.nn["b2"]
        return out[..., 0] * np.exp(out[..., 1] * 0.001) * 0.001  # shape ``shape``

    def update(self, deltas, params):
        steps = {k: self._leaf(k, params[k], deltas[k]).reshape(params[k].shape) for k in params}
        self.t += 1
        return {k: params[k] - steps[k] for k in params}, steps


@pytest.mark.skipif(not FIXTURE.is_file(), reason=f"the reference code's meta-parameter file is absent ({FIXTURE})")
def test_imported_lopt_a_server_update_matches_the_spec_in_numpy(tmp_path):
    meta, _ = load_params(import_legacy(FIXTURE, tmp_path / "lopt_a.npz", "lopt_a", 8, 32))
    rng = np.random.default_rng(7)
    # d0 after d1 ("w", 3x2), d0 before d1 ("u", 2x3), a vector and a scalar.
    params = {"w": 0.2 * rng.normal(size=(3, 2)), "u": 0.2 * rng.normal(size=(2, 3)),
              "b": 0.1 * rng.normal(size=(2,)), "s": np.array(0.15)}
    params = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    rounds = [{k: (0.05 * rng.normal(size=(8,) + p.shape)).astype(np.float32).astype(np.float64)
               for k, p in params.items()} for _ in range(2)]

    update = LearnedAggregator("lopt_a", 8).server_update(jax.tree.map(jnp.asarray, meta))
    step_fn = jax.jit(update.update)
    got = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = update.init(got)
    reference = _NumpyLOptA(meta)
    want = params
    for r, deltas in enumerate(rounds):
        before = got
        got, state = step_fn(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), deltas), state, got)
        want, want_steps = reference.update(deltas, want)
        for k in params:
            got_step = np.asarray(before[k], np.float64) - np.asarray(got[k], np.float64)
            assert np.all(np.abs(want_steps[k]) > 1e-6), (r, k, want_steps[k])  # a real step to compare
            np.testing.assert_allclose(got_step, want_steps[k], rtol=2e-3, atol=2e-8, err_msg=f"round {r} {k}")
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-7, err_msg=f"round {r} {k}")
        mean_abs = sum(np.abs(s).sum() for s in want_steps.values()) / sum(s.size for s in want_steps.values())
        np.testing.assert_allclose(float(state.mean_abs_step), mean_abs, rtol=1e-3)
        assert int(state.t) == r + 1
