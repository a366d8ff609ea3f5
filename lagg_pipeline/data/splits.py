"""Dataset splits resident on the device (SPEC section 6).

The TFDS train split is divided in order: the first 80% (``int(0.8 n)``) is ``train``,
the next 10% (``int(0.1 n)``) ``inner_valid`` and the rest ``outer_valid``; ``test`` is the
TFDS test split. Images become float32 in [0, 1], resized once if the task asks.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DatasetInfo(NamedTuple):
    tfds_name: str
    num_train: int  # size of the TFDS train split, before the 80/10/10 split
    num_test: int
    image_shape: tuple[int, int, int]
    num_classes: int
    embedded: bool


DATASETS = {
    "digits": DatasetInfo("digits", 1438, 359, (8, 8, 1), 10, True),
    "mnist5k": DatasetInfo("mnist5k", 4000, 1000, (28, 28, 1), 10, True),
    "fashion_mnist": DatasetInfo("fashion_mnist", 60000, 10000, (28, 28, 1), 10, False),
    "mnist": DatasetInfo("mnist", 60000, 10000, (28, 28, 1), 10, False),
    "cifar10": DatasetInfo("cifar10", 50000, 10000, (32, 32, 3), 10, False),
}


class DataUnavailableError(RuntimeError):
    """A public dataset that is not prepared and cannot be prepared here."""


class Split(NamedTuple):
    x: jax.Array  # float32 [N, H, W, C] in [0, 1]
    y: jax.Array  # int32 [N]


class Splits(NamedTuple):
    train: Split
    inner_valid: Split
    outer_valid: Split
    test: Split
    num_classes: int


def default_data_dir() -> str:
    """TFDS_DATA_DIR, read at call time, else TFDS's default ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _train_cuts(n: int) -> tuple[int, int]:
    n_train, n_inner = int(0.8 * n), int(0.1 * n)
    return n_train, n_train + n_inner


def split_sizes(dataset: str) -> dict[str, int]:
    """Sizes of the four splits from the static registry, without loading any data."""
    info = DATASETS[dataset]
    a, b = _train_cuts(info.num_train)
    return {"train": a, "inner_valid": b - a, "outer_valid": info.num_train - b, "test": info.num_test}


def _read_array_record(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    records = source.__getitems__(range(len(source)))
    return (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))


def _prepared_formats(builder) -> set[str]:
    if not builder.is_prepared():
        return set()
    formats = [getattr(builder.info, "file_format", None), *getattr(builder.info, "alternative_file_formats", [])]
    return {str(getattr(fmt, "value", fmt)) for fmt in formats if fmt}  # FileFormat's str() is not its value


def _unavailable(name: str, data_dir: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"dataset {name} is not prepared in {data_dir}: prepare it with network access and TensorFlow "
        f"(pip install 'lagg_pipeline[tfds-prepare]'; python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', file_format='array_record').download_and_prepare()\"), or put its source "
        f"files in {os.path.join(data_dir, 'downloads', 'manual')}, or set TFDS_DATA_DIR to where it is prepared")


def _load_public(name: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:
        raise _unavailable(name, data_dir) from None
    formats = _prepared_formats(builder)
    if any("array_record" in f for f in formats):
        return {s: _read_array_record(name, s, data_dir) for s in ("train", "test")}
    if formats:  # prepared as tfrecord: only TensorFlow reads it
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise _unavailable(name, data_dir) from None
        return {s: tuple(tfds.as_numpy(builder.as_dataset(split=s, batch_size=-1, as_supervised=True)))
                for s in ("train", "test")}
    raise _unavailable(name, data_dir)


def _load_embedded(name: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import tensorflow_datasets as tfds

    from lagg_pipeline.data.builders import EMBEDDED_BUILDERS

    builder = EMBEDDED_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        print(f"preparing the embedded dataset {name} in {data_dir} (once)")
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return {s: _read_array_record(name, s, data_dir) for s in ("train", "test")}


def _to_device(images: np.ndarray, labels: np.ndarray, image_size: int | None) -> Split:
    x = jnp.asarray(images, jnp.float32) / 255.0
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "linear", antialias=True)
    return Split(jax.device_put(x), jax.device_put(jnp.asarray(labels, jnp.int32)))


def load_splits(dataset: str, image_size: int | None = None, data_dir: str | None = None) -> Splits:
    """Load ``dataset`` (preparing an embedded one on first use) onto the device."""
    info = DATASETS[dataset]
    data_dir = data_dir or default_data_dir()
    arrays = (_load_embedded if info.embedded else _load_public)(info.tfds_name, data_dir)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    a, b = _train_cuts(len(y_train))
    part = lambda lo, hi: _to_device(x_train[lo:hi], y_train[lo:hi], image_size)
    return Splits(part(0, a), part(a, b), part(b, None), _to_device(x_test, y_test, image_size), info.num_classes)
