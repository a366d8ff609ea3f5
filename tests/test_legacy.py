"""Importing the reference code's pickled meta-parameters without running its pickles (SPEC 3.3, 8)."""
import builtins
import os
import pickle
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lagg_pipeline.aggregators.learned import LearnedAggregator
from lagg_pipeline.checkpoint import PARAMS_FORMAT, load_params
from lagg_pipeline.legacy import LegacyFormatError, import_legacy, input_width, load_legacy_meta_params

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "original_lopt_a_k8.pickle"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(),
                                   reason=f"the reference code's meta-parameter file is absent ({FIXTURE})")

FIXTURE_SHAPES = {"momentum_decays": (3,), "rms_decays": (1,), "adafactor_decays": (3,),
                  "nn": {"~": {"w0": (39, 32), "b0": (32,), "w1": (32, 32), "b1": (32,), "w2": (32, 2), "b2": (2,)}}}


def shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype == np.float32
        assert x.shape == y.shape and x.tobytes() == y.tobytes()


def legacy_dict(width, hidden, seed=0):
    """The reference's layout as plain float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return {"momentum_decays": f(3), "rms_decays": f(1), "adafactor_decays": f(3),
            "nn": {"~": {"w0": f(width, hidden), "b0": f(hidden), "w1": f(hidden, hidden), "b1": f(hidden),
                         "w2": f(hidden, 2), "b2": f(2)}}}


def write_pickle(path, obj, **kwargs):
    Path(path).write_bytes(pickle.dumps(obj, **kwargs))
    return Path(path)


@needs_fixture
def test_fixture_loads_with_documented_shapes():
    params = load_legacy_meta_params(FIXTURE)
    assert shapes(params) == FIXTURE_SHAPES
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
        assert np.all(np.isfinite(leaf))
    assert sum(x.size for x in jax.tree.leaves(params)) == 2409  # LOpt-A's meta-parameter count
    # Trained weights, not zeros: w0 ~ truncated normal with std 1/sqrt(39); decay offsets moved off 0.
    w0 = params["nn"]["~"]["w0"]
    assert 0.08 < float(w0.std()) < 0.25
    assert np.all(params["momentum_decays"] != 0) and 0 < np.abs(params["adafactor_decays"]).max() < 0.1


@needs_fixture
def test_plain_pickle_load_fails_in_this_jax():
    """Why the importer exists: today's JAX cannot rebuild the JAX 0.4 arrays the file holds."""
    with open(FIXTURE, "rb") as f, pytest.raises(TypeError, match="named_shape"):
        pickle.load(f)


@needs_fixture
def test_import_fixture_then_run_it(tmp_path):
    out = import_legacy(FIXTURE, tmp_path / "imported.npz", "lopt_a", 8, 32)
    assert out == tmp_path / "imported.npz" and out.is_file()
    params, metadata = load_params(out)
    assert_identical(params, load_legacy_meta_params(FIXTURE))
    assert metadata == {"format": PARAMS_FORMAT, "version": 1, "variant": "lopt_a", "num_grads": 8,
                        "hidden_size": 32, "source": "legacy:original_lopt_a_k8.pickle"}

    agg = LearnedAggregator("lopt_a", 8)
    update = agg.server_update(jax.tree.map(jnp.asarray, params))
    rng = np.random.default_rng(1)
    old = {"dense": {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)},
           "scale": jnp.asarray(0.5, jnp.float32)}
    deltas = jax.tree.map(lambda p: jnp.asarray(0.01 * rng.normal(size=(8,) + p.shape), jnp.float32), old)
    state = update.init(old)
    new, state = jax.jit(update.update)(deltas, state, old)
    assert jax.tree.structure(new) == jax.tree.structure(old)
    for p, q in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
        assert q.shape == p.shape and q.dtype == jnp.float32
        assert np.all(np.isfinite(q))
        assert not np.array_equal(np.asarray(p), np.asarray(q))
    # SPEC 3.3: step = d * exp(0.001 g) * 0.001, so one round moves each weight by far less than 1.
    moved = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
    assert 0 < moved < 0.1
    assert int(state.t) == 1 and np.isfinite(float(state.mean_abs_step)) and float(state.mean_abs_step) > 0


@needs_fixture
def test_fixture_width_and_hidden_size_mismatch(tmp_path):
    out = tmp_path / "x.npz"
    with pytest.raises(LegacyFormatError, match=re.escape(
            "legacy file has input width 39 = lopt_a; it does not match optimizer=lagg_a num_grads=8 (width 46)")):
        import_legacy(FIXTURE, out, "lagg_a", 8, 32)
    with pytest.raises(LegacyFormatError, match=re.escape(
            "legacy file has hidden size 32; it does not match hidden_size=64 (set hidden_size=32)")):
        import_legacy(FIXTURE, out, "lopt_a", 8, 64)
    with pytest.raises(LegacyFormatError, match="optimizer=lopt cannot be imported"):
        import_legacy(FIXTURE, out, "lopt", 8, 32)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_lagg_a_width_mismatch_guesses_k(tmp_path):
    legacy = write_pickle(tmp_path / "lagg_a_k4.pickle", legacy_dict(42, 3))
    with pytest.raises(LegacyFormatError, match=re.escape("input width 42 = lagg_a at num_grads=4; it does not "
                                                          "match optimizer=lagg_a num_grads=8 (width 46)")):
        import_legacy(legacy, tmp_path / "x.npz", "lagg_a", 8, 3)
    with pytest.raises(LegacyFormatError, match=re.escape("input width 42 = lagg_a at num_grads=4; it does not "
                                                          "match optimizer=lopt_a num_grads=4 (width 39)")):
        import_legacy(legacy, tmp_path / "x.npz", "lopt_a", 4, 3)
    odd = write_pickle(tmp_path / "odd.pickle", legacy_dict(13, 3))
    with pytest.raises(LegacyFormatError, match=re.escape("input width 13 = neither lagg_a nor lopt_a")):
        import_legacy(odd, tmp_path / "x.npz", "lopt_a", 4, 3)
    assert not (tmp_path / "x.npz").exists()
    params, metadata = load_params(import_legacy(legacy, tmp_path / "ok.npz", "lagg_a", 4, 3))
    assert metadata["variant"] == "lagg_a" and metadata["num_grads"] == 4
    assert_identical(params, legacy_dict(42, 3))



def test_input_width_table():
    assert [input_width(v, 8) for v in ("lagg_a", "lopt_a", "lagg", "lopt")] == [46, 39, 20, 13]
    with pytest.raises(ValueError, match="unknown learned aggregator 'adam'"):
        input_width("adam", 8)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w')",))


@pytest.mark.parametrize("payload,refused", [(_System, f"{os.system.__module__}.system"),
                                             (_Eval, "builtins.eval")])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, payload, refused):
    marker = tmp_path / "payload_ran"
    legacy = legacy_dict(39, 4)
    legacy["nn"]["~"]["w1"] = payload(str(marker))
    path = write_pickle(tmp_path / "evil.pickle", legacy)
    assert refused.encode().split(b".")[-1] in path.read_bytes()  # the payload really is in the file
    with pytest.raises(LegacyFormatError, match=re.escape(f"refusing to load '{refused}'")):
        import_legacy(path, tmp_path / "out.npz", "lopt_a", 8, 4)
    with pytest.raises(LegacyFormatError, match=re.escape(f"'{refused}'")):
        load_legacy_meta_params(path)
    assert not marker.exists()
    assert not (tmp_path / "out.npz").exists()


class _JaxArrayThroughEval:
    """A JAX 0.4 array pickle whose inner reconstruction function is not numpy's."""

    def __reduce__(self):
        from jax._src.array import _reconstruct_array

        return (_reconstruct_array, (np.dtype, ("f4",), None, None))


def test_jax_array_reconstruction_only_through_numpy(tmp_path):
    path = write_pickle(tmp_path / "bad_jax.pickle", {"momentum_decays": _JaxArrayThroughEval()})
    with pytest.raises(LegacyFormatError, match="refusing JAX array reconstruction"):
        load_legacy_meta_params(path)


def test_own_numpy_pickle_round_trips(tmp_path):
    legacy = legacy_dict(39, 5, seed=3)
    path = write_pickle(tmp_path / "mine.pickle", legacy)
    params, metadata = load_params(import_legacy(path, tmp_path / "mine.npz", "lopt_a", 16, 5))
    assert shapes(params) == shapes(legacy)
    assert_identical(params, legacy)
    assert metadata["variant"] == "lopt_a" and metadata["hidden_size"] == 5 and metadata["num_grads"] == 16
    assert metadata["source"] == "legacy:mine.pickle"
    # float64 arrays (e.g. a file saved from numpy defaults) come in as float32.
    legacy64 = jax.tree.map(lambda x: x.astype(np.float64), legacy)
    loaded = load_legacy_meta_params(write_pickle(tmp_path / "f64.pickle", legacy64))
    assert_identical(loaded, legacy)


@pytest.mark.parametrize("remove,named", [(lambda d: d.pop("rms_decays"), "'rms_decays'"),
                                          (lambda d: d["nn"]["~"].pop("b1"), "'b1'"),
                                          (lambda d: d.pop("nn"), "'nn'")])
def test_missing_key_is_named(tmp_path, remove, named):
    legacy = legacy_dict(39, 4)
    remove(legacy)
    path = write_pickle(tmp_path / "partial.pickle", legacy)
    with pytest.raises(LegacyFormatError, match=f"lacks the expected entry {re.escape(named)}"):
        import_legacy(path, tmp_path / "out.npz", "lopt_a", 8, 4)
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: d["nn"]["~"].__setitem__("w1", np.zeros((4, 5), np.float32)),
     r"nn/~/w1 has shape \(4, 5\), expected \(4, 4\)"),
    (lambda d: d.__setitem__("momentum_decays", np.zeros(2, np.float32)),
     r"momentum_decays has shape \(2,\), expected \(3,\)"),
    (lambda d: d["nn"]["~"].__setitem__("w0", np.zeros(39, np.float32)), r"nn/~/w0 has shape \(39,\)"),
    (lambda d: d.__setitem__("rms_decays", "abc"), "non-numeric entry"),
])
def test_malformed_layout_is_a_legacy_format_error(tmp_path, corrupt, message):
    legacy = legacy_dict(39, 4)
    corrupt(legacy)
    path = write_pickle(tmp_path / "bad.pickle", legacy)
    with pytest.raises(LegacyFormatError, match=message):
        load_legacy_meta_params(path)


@pytest.mark.parametrize("content,message", [
    (b"", "junk.pickle is not a readable legacy pickle"),
    (b"not a pickle at all", "junk.pickle is not a readable legacy pickle"),
    (pickle.dumps([1, 2, 3]), "junk.pickle holds a list, not the reference's dict of meta-parameters"),
    (pickle.dumps({"nn": [1], "momentum_decays": 0}), "junk.pickle lacks the expected entry"),
])
def test_unreadable_or_wrong_container(tmp_path, content, message):
    path = tmp_path / "junk.pickle"
    path.write_bytes(content)
    with pytest.raises(LegacyFormatError, match=re.escape(message)):
        load_legacy_meta_params(path)
