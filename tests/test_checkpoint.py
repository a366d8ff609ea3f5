"""Pickle-free atomic checkpoints (SPEC 8): round trips, mismatches, crashes, pruning, exports."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lagg_pipeline import checkpoint
from lagg_pipeline.checkpoint import (PARAMS_FORMAT, CheckpointError, CheckpointManager, load_arrays,
                                      load_params, load_pytree, save_arrays, save_params, save_pytree)


def small_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"linear": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)},
            "linear_1": {"w": rng.normal(size=(4, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}}


def train_state(seed=0):
    """Params, a used adamw state (NamedTuples, int32 count), a uint32 PRNG key, an int32 step."""
    params = jax.tree.map(jnp.asarray, small_params(seed))
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    for i in range(seed + 1):  # nonzero mu / nu / count that depend on the seed
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "key": jax.random.PRNGKey(seed + 11),
            "step": jnp.asarray(seed + 5, jnp.int32), "history": [jnp.float32(seed), jnp.arange(3) + seed]}


def assert_bit_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_pytree_round_trip_is_bit_exact():
    saved = train_state(seed=2)
    template = train_state(seed=0)
    # The template really holds other values, so the values can only come from the file.
    assert not np.array_equal(template["key"], saved["key"])
    assert int(template["opt_state"][0].count) != int(saved["opt_state"][0].count)
    path = save_pytree("state.npz", saved, {"note": "hi", "n": 3})
    assert path.name == "state.npz" and path.is_file()
    restored, metadata = load_pytree("state.npz", template)
    assert metadata == {"note": "hi", "n": 3}
    assert_bit_equal(restored, saved)
    # NamedTuple types come back as themselves, and the typed leaves keep their dtypes.
    assert type(restored["opt_state"][0]) is type(saved["opt_state"][0])
    assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
    assert restored["key"].dtype == np.uint32 and restored["key"].shape == (2,)
    assert restored["step"].dtype == np.int32 and int(restored["step"]) == 7
    assert restored["opt_state"][0].count.dtype == np.int32 and int(restored["opt_state"][0].count) == 3


def test_leaves_are_named_by_key_path():
    names = set(checkpoint.flatten(train_state()))
    assert {"params/linear/w", "opt_state/0/count", "opt_state/0/mu/linear/w", "key", "step",
            "history/1"} <= names
    arrays, metadata = load_arrays(save_pytree("s.npz", train_state()))
    assert set(arrays) == names and metadata == {}


@pytest.mark.parametrize("change,message", [
    (lambda t: t["params"]["linear"].__setitem__("w", jnp.zeros((3, 5), jnp.float32)),
     r"'params/linear/w' is float32\[3, 4\], expected float32\[3, 5\]"),
    (lambda t: t.__setitem__("step", np.asarray(7, np.float32)), r"'step' is int32\[\], expected float32\[\]"),
    (lambda t: t.__setitem__("key", np.zeros(2, np.int32)), r"'key' is uint32\[2\], expected int32\[2\]"),
    (lambda t: t["params"].__setitem__("extra", jnp.zeros(2)), r"missing 'params/extra' \(1 missing, 0 unexpected"),
    (lambda t: t["params"].pop("linear_1"), r"unexpected 'params/linear_1/b' \(0 missing, 2 unexpected"),
])
def test_mismatch_names_the_path(change, message):
    save_pytree("state.npz", train_state())
    template = train_state()
    change(template)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pytree("state.npz", template)
    assert "state.npz" in str(err.value) and "\n" not in str(err.value)


def test_reserved_metadata_name_is_refused():
    with pytest.raises(CheckpointError, match="reserved"):
        save_arrays("a.npz", {checkpoint.META_KEY: np.zeros(1)})


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "ckpts", keep=5)
    manager.save(1, train_state(1), {"run": "a"})
    real_replace = os.replace
    calls = []

    def crash_once(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError("disk vanished")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_once)
    with pytest.raises(OSError, match="disk vanished"):
        manager.save(2, train_state(2))
    assert str(calls[0]).endswith("ckpt_00000002.npz")
    assert not manager.path(2).exists()
    assert sorted(p.name for p in manager.directory.iterdir()) == ["ckpt_00000001.npz", "latest"]
    assert (manager.directory / "latest").read_text() == "ckpt_00000001.npz"
    assert manager.latest_step() == 1
    restored, metadata = manager.restore(train_state(0))
    assert_bit_equal(restored, train_state(1))
    assert metadata == {"run": "a", "step": 1}

    # A crash that skipped the cleanup (SIGKILL) leaves temporary files: ignored, then cleaned.
    stray = [manager.directory / ".ckpt_00000009.npz.abc123.tmp", manager.directory / ".latest.xyz.tmp"]
    for path in stray:
        path.write_bytes(b"half a file")
    assert manager.latest_step() == 1
    (manager.directory / "latest").unlink()
    assert manager.latest_step() == 1  # the fallback scan ignores them too
    manager.save(2, train_state(2))  # os.replace works again (crash_once raised once)
    assert not any(p.exists() for p in stray)
    assert sorted(p.name for p in manager.directory.iterdir()) == ["ckpt_00000001.npz", "ckpt_00000002.npz",
                                                                   "latest"]
    assert manager.latest_step() == 2
    assert_bit_equal(manager.restore(train_state(0))[0], train_state(2))


def test_crash_writing_latest_pointer_keeps_old_pointer(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=5)
    manager.save(1, {"x": jnp.arange(3)})
    real_replace = os.replace

    def fail_on_pointer(src, dst):
        if os.path.basename(dst) == "latest":
            raise OSError("crash")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fail_on_pointer)
    with pytest.raises(OSError):
        manager.save(2, {"x": jnp.arange(3) + 10})
    assert (tmp_path / "latest").read_text() == "ckpt_00000001.npz"
    assert not list(tmp_path.glob(".*.tmp"))
    assert manager.latest_step() == 1
    np.testing.assert_array_equal(manager.restore({"x": jnp.zeros(3, jnp.int32)})[0]["x"], [0, 1, 2])


def test_manager_keeps_newest_n_and_points_to_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep=3)
    assert manager.latest_step() is None and manager.latest_path() is None
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        manager.restore({"x": jnp.zeros(2)})
    template = {"x": jnp.zeros(2, jnp.float32), "t": jnp.zeros((), jnp.int32)}
    for step in (10, 20, 30, 40, 50):
        path = manager.save(step, {"x": jnp.full(2, step / 10, jnp.float32), "t": jnp.int32(step)}, {"k": step})
        assert path == manager.path(step) and path.is_file()
    assert sorted(p.name for p in manager.directory.iterdir()) == [
        "ckpt_00000030.npz", "ckpt_00000040.npz", "ckpt_00000050.npz", "latest"]
    assert (manager.directory / "latest").read_text() == "ckpt_00000050.npz"
    assert manager.latest_step() == 50 and manager.latest_path() == manager.directory / "ckpt_00000050.npz"
    restored, metadata = manager.restore(template)
    np.testing.assert_array_equal(restored["x"], [5.0, 5.0])
    assert int(restored["t"]) == 50 and metadata == {"k": 50, "step": 50}
    restored, metadata = manager.restore(template, step=40)
    assert int(restored["t"]) == 40 and metadata["step"] == 40

    pointer = manager.directory / "latest"
    pointer.write_text("ckpt_00000040.npz\n")  # the pointer wins over the newest file
    assert manager.latest_step() == 40
    pointer.unlink()  # missing pointer: newest file
    assert manager.latest_step() == 50
    pointer.write_text("ckpt_00000060.npz")  # pointer to a missing file: newest file
    assert manager.latest_step() == 50
    pointer.write_text("garbage")
    assert manager.latest_step() == 50
    manager.path(50).unlink()
    assert manager.latest_step() == 40
    assert int(manager.restore(template)[0]["t"]) == 40
    # Files that only look like checkpoints are not picked up.
    (manager.directory / "ckpt_00000099.npz.bak").write_bytes(b"x")
    (manager.directory / "ckpt_99.npz").write_bytes(b"x")
    assert manager.latest_step() == 40


def test_params_export_round_trip():
    rng = np.random.default_rng(0)
    params = {"nn": {"~": {"w0": rng.normal(size=(39, 4)).astype(np.float32),
                           "b0": rng.normal(size=4).astype(np.float32)}},
              "momentum_decays": np.asarray([0.1, -0.2, 0.3], np.float32),
              "rms_decays": np.asarray([0.5], np.float32)}
    path = save_params("meta.npz", jax.tree.map(jnp.asarray, params), {"variant": "lopt_a", "num_grads": 8})
    loaded, metadata = load_params(path)
    assert metadata == {"format": PARAMS_FORMAT, "version": 1, "variant": "lopt_a", "num_grads": 8}
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert_bit_equal(loaded, params)


def test_params_export_keeps_haiku_module_names():
    """hk.nets.MLP names hold "/" (LAgg / LOpt meta-parameters); the export keeps them as keys."""
    from lagg_pipeline.aggregators.learned import LearnedAggregator

    agg = LearnedAggregator("lopt", 8, hidden_size=4)
    mp = jax.jit(agg.init_meta_params)(jax.random.PRNGKey(0))
    assert "mlp/~/linear_0" in mp
    loaded, metadata = load_params(save_params("lopt.npz", mp, {"variant": "lopt"}))
    assert sorted(loaded) == ["mlp/~/linear_0", "mlp/~/linear_1", "mlp/~/linear_2"]
    assert metadata == {"format": PARAMS_FORMAT, "version": 1, "variant": "lopt"}
    assert_bit_equal(loaded, jax.tree.map(np.asarray, mp))
    agg.check_compatible(jax.tree.map(jnp.asarray, loaded))


def test_load_params_refuses_a_plain_pytree_file():
    save_pytree("state.npz", {"nn": {"w": jnp.ones(2)}}, {"step": 3})
    with pytest.raises(CheckpointError, match=re.escape(
            f"state.npz is not an exported meta-parameter file (format None, expected {PARAMS_FORMAT!r})")):
        load_params("state.npz")
    save_arrays("fake.npz", {"w": np.ones(2)}, {"format": "something.else"})
    with pytest.raises(CheckpointError, match="format 'something.else'"):
        load_params("fake.npz")


class _Payload:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "payload_ran"
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = _Payload(str(marker)), {"x": 1}
    np.savez("evil.npz", w=np.ones(3, np.float32), evil=objects)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.npz: refusing to load: .*[Oo]bject arrays"):
        load_arrays("evil.npz")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pytree("evil.npz", {"w": np.zeros(3, np.float32), "evil": objects})
    assert not marker.exists()


def test_object_arrays_and_odd_dtypes_are_refused_at_save(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot save 'a/evil': dtype object"):
        save_pytree("x.npz", {"a": {"evil": np.array([{"x": 1}], dtype=object)}})
    with pytest.raises(CheckpointError, match=r"cannot save 'w': dtype bfloat16"):
        save_pytree("x.npz", {"w": jnp.zeros(2, jnp.bfloat16)})
    with pytest.raises(CheckpointError, match=r"cannot save 'key': .*key_data"):
        save_pytree("x.npz", {"key": jax.random.key(0)})
    with pytest.raises(CheckpointError, match="metadata must be JSON"):
        save_pytree("x.npz", {"w": np.zeros(2)}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_any_leaf_name_round_trips():
    """Names np.savez would take as its own keyword arguments, and names that collide."""
    tree = {"file": np.arange(3), "allow_pickle": np.ones(2, np.float32), "args": {"kwds": np.int8(4)}}
    restored, _ = load_pytree(save_pytree("names.npz", tree), jax.tree.map(np.zeros_like, tree))
    assert_bit_equal(restored, tree)
    with pytest.raises(CheckpointError, match="two leaves share the checkpoint name 'a/b'"):
        save_pytree("clash.npz", {"a": {"b": np.zeros(1)}, "a/b": np.zeros(1)})


def test_non_checkpoint_files_are_refused():
    np.save("single.npy", np.arange(3))
    with pytest.raises(CheckpointError, match="single.npy holds a single array"):
        load_arrays("single.npy")
    with open("torn.npz", "wb") as f:
        f.write(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError, match="torn.npz: refusing to load"):
        load_arrays("torn.npz")


def test_manager_edge_cases(tmp_path):
    with pytest.raises(CheckpointError, match="keep=0 is not allowed"):
        CheckpointManager(tmp_path, keep=0)
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save(step, {"t": np.int32(step)})
    # A rerun from an earlier step: the file just written is kept and pointed to.
    manager.save(5, {"t": np.int32(5)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000005.npz", "ckpt_00000030.npz", "latest"]
    assert manager.latest_step() == 5
    with pytest.raises(CheckpointError, match="no checkpoint for step 10 in"):
        manager.restore({"t": np.int32(0)}, step=10)


def test_params_export_checks_its_input_and_version():
    with pytest.raises(CheckpointError, match=r"nested dicts of arrays; \['nn'\]\[0\]"):
        save_params("p.npz", {"nn": [np.zeros(2)]})
    # The format tag cannot be overridden by the caller's metadata.
    _, metadata = load_params(save_params("p.npz", {"w": np.zeros(2)}, {"format": "x", "version": 7}))
    assert metadata == {"format": PARAMS_FORMAT, "version": 1}
    save_arrays("future.npz", {"w": np.zeros(2)}, {"format": PARAMS_FORMAT, "version": 2})
    with pytest.raises(CheckpointError, match="version 2; this code reads version 1"):
        load_params("future.npz")
