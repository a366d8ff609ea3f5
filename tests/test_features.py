"""The vectorised accumulators and features (SPEC 3.1-3.2) against a naive reference.

The reference below loops over elements, rows and columns with Python floats and shares no
code with the implementation. The decays are checked against the naive formula on their own;
the accumulators then run on the implementation's float32 decays, because near 1 a single
float32 ulp of a decay moves 1 - decay by ~5e-5 relative, which would hide formula errors
behind a loose tolerance.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lagg_pipeline.aggregators import features

K = 3
ROUNDS = 3
OFFSETS = {"momentum": [0.05, -0.1, 0.02], "rms": [-0.03], "adafactor": [0.1, -0.05, 0.03]}
INITIAL = {"momentum": [0.9, 0.99, 0.999], "rms": [0.999], "adafactor": [0.9, 0.99, 0.999]}
TAUS = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
BIG = (784, 128)


def naive_decays(offsets, clip):
    out = {}
    for name, thetas in offsets.items():
        out[name] = []
        for beta0, theta in zip(INITIAL[name], thetas):
            decay = 1.0 - (1.0 - beta0) * math.exp(10.0 * theta)
            if clip[name]:
                decay = min(max(decay, 0.0), 1.0)
            out[name].append(decay)
    return out


def naive_factored_dims(shape):
    if len(shape) < 2:
        return None
    by_size = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    return by_size[-1], by_size[-2]


def drop(index, axis):
    return index[:axis] + index[axis + 1:]


def rsqrt(x):
    return 1.0 / math.sqrt(x)


class NaiveLeaf:
    """Per-element accumulators and features of one leaf, in Python floats."""

    def __init__(self, shape, decays, tracked):
        self.shape = tuple(shape) or (1,)
        self.decays = decays
        self.tracked = tracked
        self.m = {e: [0.0] * 3 for e in tracked}
        self.rms = {e: [0.0] for e in tracked}
        self.dims = naive_factored_dims(self.shape)
        if self.dims is None:
            self.v = {e: [0.0] * 3 for e in tracked}
        else:
            self.v_row, self.v_col = {}, {}

    def update(self, g):
        """g: {element index: float}, the mean delta over all elements."""
        for e in self.tracked:
            for j, b in enumerate(self.decays["momentum"]):
                self.m[e][j] = b * self.m[e][j] + (1 - b) * g[e]
            b = self.decays["rms"][0]
            self.rms[e][0] = b * self.rms[e][0] + (1 - b) * g[e] * g[e]
        betas = self.decays["adafactor"]
        if self.dims is None:
            for e in self.tracked:
                for j, b in enumerate(betas):
                    self.v[e][j] = b * self.v[e][j] + (1 - b) * (g[e] * g[e] + 1e-30)
            return
        d0, d1 = self.dims
        sum_row, sum_col = {}, {}
        for e, value in g.items():
            g2 = value * value + 1e-30
            sum_row[drop(e, d0)] = sum_row.get(drop(e, d0), 0.0) + g2
            sum_col[drop(e, d1)] = sum_col.get(drop(e, d1), 0.0) + g2
        for sums, stats, count in ((sum_row, self.v_row, self.shape[d0]),
                                   (sum_col, self.v_col, self.shape[d1])):
            for key, total in sums.items():
                old = stats.get(key, [0.0] * 3)
                stats[key] = [b * old[j] + (1 - b) * total / count for j, b in enumerate(betas)]

    def features(self, e, raw, p, g):
        """Un-normalised SPEC 3.2 items 1-4 at element e."""
        m, v = self.m[e], self.rms[e][0]
        out = list(raw) + [p] + m + [v] + [mj * rsqrt(v + 1e-6) for mj in m] + [rsqrt(v + 1e-6)]
        if self.dims is None:
            vv = self.v[e]
            out += [g * rsqrt(max(x + 1e-9, 1e-9)) for x in vv]
            out += vv + vv + [rsqrt(x + 1e-8) for x in vv] * 2
            out += [mj * (x + 1e-6) ** -0.5 for mj, x in zip(m, vv)]
            return out
        d0, d1 = self.dims
        row, col = self.v_row[drop(e, d0)], self.v_col[drop(e, d1)]
        factor = []
        for j in range(3):
            # Mean of v_row along d1, read element by element.
            along = [self.v_row[drop(e[:d1] + (i,) + e[d1 + 1:], d0)][j] for i in range(self.shape[d1])]
            row_mean = sum(along) / len(along)
            row_factor = rsqrt(max(row[j] / (row_mean + 1e-9), 1e-9))
            factor.append(row_factor * rsqrt(max(col[j], 1e-9)))
        out += [g * f for f in factor] + row + col
        out += [rsqrt(x + 1e-8) for x in row] + [rsqrt(x + 1e-8) for x in col]
        return out + [mj * f for mj, f in zip(m, factor)]


def naive_normalize(rows):
    """rows: one feature list per element (all elements); normalise column by column."""
    out = [list(r) for r in rows]
    for c in range(len(rows[0])):
        total = 0.0
        for r in rows:
            total += r[c] * r[c]
        scale = rsqrt(1e-5 + total / len(rows))
        for r in out:
            r[c] *= scale
    return out


def impl_decays():
    return features.decays_from_offsets(*(jnp.asarray(OFFSETS[n], jnp.float32)
                                          for n in ("momentum", "rms", "adafactor")))


def element_dict(x, shape):
    x = np.asarray(x, np.float64).reshape(tuple(shape) or (1,))
    return {e: float(x[e]) for e in np.ndindex(*x.shape)}


update = jax.jit(features.update_leaf_accumulators)


@jax.jit
def both_features(raw_R, p, t, acc):
    return features.per_element_features(raw_R, p, acc), features.leaf_features(raw_R, p, t, acc)


def run_rounds(shape, with_accumulators, per_worker, tracked_fn):
    """Runs both implementations; yields (round, naive, implementation outputs) per round."""
    rng = np.random.default_rng(sum(shape) + 7)
    p = rng.normal(size=shape).astype(np.float32)
    acc = features.init_leaf_accumulators(jnp.asarray(p))
    full_shape = tuple(shape) or (1,)
    all_elements = list(np.ndindex(*full_shape))
    tracked = tracked_fn(all_elements, rng)
    decays = {name: np.asarray(d, np.float64).tolist() for name, d in impl_decays()._asdict().items()}
    naive = NaiveLeaf(shape, decays, tracked)
    p_el = element_dict(p, shape)
    for t in range(ROUNDS):
        deltas = (0.01 * rng.normal(size=(K,) + tuple(shape))).astype(np.float32)
        if shape:  # a near-silent slice pushes adafactor stats below safe_rsqrt's 1e-9 floor
            deltas[:, 0] *= 1e-6
        per_k = [element_dict(d, shape) for d in deltas]
        g = {e: sum(d[e] for d in per_k) / K for e in all_elements}
        naive.update(g)
        acc = update(acc, jnp.mean(jnp.asarray(deltas), axis=0), impl_decays())
        raw_R = jnp.asarray(deltas) if per_worker else jnp.mean(jnp.asarray(deltas), 0, keepdims=True)
        naive_rows = {}
        for e in tracked:
            raw = [d[e] for d in per_k] if per_worker else [g[e]]
            row = naive.features(e, raw, p_el[e], g[e])
            naive_rows[e] = row if with_accumulators else row[:len(raw) + 1]
        leaf_acc = acc if with_accumulators else None
        raw_out, out = both_features(raw_R, jnp.asarray(p), jnp.asarray(t, jnp.int32), leaf_acc)
        yield t, naive, acc, naive_rows, np.asarray(raw_out), np.asarray(out)


def all_of(elements, rng):
    return elements


def subset_of(elements, rng):
    picks = rng.choice(len(elements), size=64, replace=False)
    return [elements[i] for i in picks]


SMALL = [(128,), (3, 3, 8, 16), (), (10, 6), (6, 10)]
VARIANTS = [(True, True), (True, False), (False, True), (False, False)]  # (accumulators, per worker)


def test_zero_offsets_give_initial_decays():
    decays = features.decays_from_offsets(jnp.zeros(3), jnp.zeros(1), jnp.zeros(3))
    np.testing.assert_allclose(decays.momentum, INITIAL["momentum"], rtol=1e-6)
    np.testing.assert_allclose(decays.rms, INITIAL["rms"], rtol=1e-6)
    np.testing.assert_allclose(decays.adafactor, INITIAL["adafactor"], rtol=1e-6)


def test_decays_with_offsets_and_clipping():
    clip = {"momentum": False, "rms": True, "adafactor": True}
    for name, want in naive_decays(OFFSETS, clip).items():
        np.testing.assert_allclose(getattr(impl_decays(), name), want, rtol=1e-6)
    # Offsets large enough to push 1 - (1 - beta0) e^(10 theta) below 0.
    big = features.decays_from_offsets(jnp.full(3, 0.5), jnp.full(1, 1.0), jnp.full(3, 0.5))
    assert float(big.momentum[0]) < 0
    assert float(big.rms[0]) == 0.0 and float(big.adafactor[0]) == 0.0


@pytest.mark.parametrize("shape", [(3, 3), (5, 2, 5), (7, 3, 7, 2), (2, 9)])
def test_factored_dims_is_argsort_of_shape(shape):
    assert features.factored_dims(shape) == naive_factored_dims(shape)
    order = np.argsort(shape)  # the reference's call, ties included
    assert features.factored_dims(shape) == (int(order[-1]), int(order[-2]))


def assert_rows_close(got, want):
    """rtol 1e-5, plus an atol of 1e-6 of each column's rms over the rows.

    The float32 mean of K deltas that nearly cancel has a relative error far above 1e-5 on
    its tiny values; the atol forgives that while staying 1e-6 of the column's scale.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.sqrt(np.mean(np.square(want), axis=0))
    assert got.shape == want.shape
    bad = np.abs(got - want) > 1e-6 * scale + 1e-5 * np.abs(want)
    assert not bad.any(), (f"{bad.sum()} mismatches, first at (row, column) {tuple(np.argwhere(bad)[0])}: "
                           f"got {got[bad][0]!r}, want {want[bad][0]!r}")


@pytest.mark.parametrize("shape", SMALL + [BIG])
def test_accumulators_match_naive(shape):
    tracked_fn = subset_of if shape == BIG else all_of
    for _, naive, acc, *_ in run_rounds(shape, True, False, tracked_fn):
        full = tuple(shape) or (1,)
        m, rms = (np.asarray(a).reshape(full + a.shape[len(shape):]) for a in acc[:2])
        assert_rows_close([m[e] for e in naive.tracked], [naive.m[e] for e in naive.tracked])
        assert_rows_close([rms[e] for e in naive.tracked], [naive.rms[e] for e in naive.tracked])
        if naive.dims is None:
            v = np.asarray(acc.adafactor.v).reshape(full + (3,))
            assert_rows_close([v[e] for e in naive.tracked], [naive.v[e] for e in naive.tracked])
        else:
            for got, want in ((acc.adafactor.v_row, naive.v_row), (acc.adafactor.v_col, naive.v_col)):
                got = np.asarray(got)
                assert got.size == 3 * len(want)
                assert_rows_close([got[key] for key in want], list(want.values()))


@pytest.mark.parametrize("with_accumulators,per_worker", VARIANTS)
@pytest.mark.parametrize("shape", SMALL)
def test_features_match_naive(shape, with_accumulators, per_worker):
    full = tuple(shape) or (1,)
    for t, _, _, naive_rows, raw_out, out in run_rounds(shape, with_accumulators, per_worker, all_of):
        width = features.feature_width(K if per_worker else 1, with_accumulators)
        assert out.shape == full + (width,)
        elements = list(naive_rows)
        steps = [math.tanh(t / tau - 1.0) for tau in TAUS]
        want = [row + steps for row in naive_normalize([naive_rows[e] for e in elements])]
        assert_rows_close([out[e] for e in elements], want)
        assert_rows_close([raw_out[e] for e in elements], [naive_rows[e] for e in elements])


@pytest.mark.parametrize("with_accumulators,per_worker", [(True, True), (True, False)])
def test_big_matrix_features_match_naive_on_a_subset(with_accumulators, per_worker):
    # Row/col stats are naive over all elements; per-element features on 64 of them.
    for *_, naive_rows, raw_out, out in run_rounds(BIG, with_accumulators, per_worker, subset_of):
        assert_rows_close([raw_out[e] for e in naive_rows], list(naive_rows.values()))
    # The normaliser itself, checked naively column by column over the whole tensor.
    for c in range(raw_out.shape[-1]):
        total = 0.0
        for x in raw_out[..., c].ravel().tolist():
            total += x * x
        scale = rsqrt(1e-5 + total / raw_out[..., c].size)
        np.testing.assert_allclose(out[..., c], raw_out[..., c] * scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_worker,with_accumulators,width",
                         [(True, True, 8 + 38), (False, True, 39), (True, False, 8 + 12), (False, False, 13)])
def test_input_widths(per_worker, with_accumulators, width):
    assert features.feature_width(8 if per_worker else 1, with_accumulators) == width
    p = jnp.ones((4, 5))
    raw_R = jnp.ones((8 if per_worker else 1, 4, 5))
    acc = features.init_leaf_accumulators(p) if with_accumulators else None
    assert features.leaf_features(raw_R, p, jnp.asarray(0), acc).shape == (4, 5, width)


def test_accumulator_state_shapes():
    acc = features.init_accumulators({"w": jnp.ones((3, 3, 8, 16)), "b": jnp.ones(16), "s": jnp.ones(())})
    assert acc["w"].momentum.shape == (3, 3, 8, 16, 3) and acc["w"].rms.shape == (3, 3, 8, 16, 1)
    assert acc["w"].adafactor.v_row.shape == (3, 3, 8, 3)  # d0 = 3 (size 16) removed
    assert acc["w"].adafactor.v_col.shape == (3, 3, 16, 3)  # d1 = 2 (size 8) removed
    assert acc["b"].adafactor.v.shape == (16, 3) and acc["s"].adafactor.v.shape == (3,)
    assert acc["s"].momentum.shape == (3,) and acc["s"].rms.shape == (1,)
