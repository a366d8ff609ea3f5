"""Dataset splits resident on the device (SPEC section 6).

The TFDS train split of n examples is divided in stored order: the first ``n * 8 // 10`` are
``train``, the next ``n // 10`` ``inner_valid`` and the rest ``outer_valid``; ``test`` is the
TFDS test split. uint8 images become float32 in [0, 1], resized once if the task asks;
float inputs (mnist1d's signals) are kept as they are.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import NamedTuple

import jax
import numpy as np


class DatasetInfo(NamedTuple):
    tfds_name: str
    num_train: int  # size of the TFDS train split, before the 80/10/10 split
    num_test: int
    image_shape: tuple[int, ...]  # one example's input shape
    num_classes: int
    embedded: bool


DATASETS = {
    "digits": DatasetInfo("digits", 1438, 359, (8, 8, 1), 10, True),
    "mnist5k": DatasetInfo("mnist5k", 4000, 1000, (28, 28, 1), 10, True),
    "mnist1d": DatasetInfo("mnist1d", 8000, 2000, (40,), 10, True),
    "mnist1d_large": DatasetInfo("mnist1d_large", 56000, 14000, (40,), 10, True),
    "fashion_mnist": DatasetInfo("fashion_mnist", 60000, 10000, (28, 28, 1), 10, False),
    "mnist": DatasetInfo("mnist", 60000, 10000, (28, 28, 1), 10, False),
    "cifar10": DatasetInfo("cifar10", 50000, 10000, (32, 32, 3), 10, False),
}


class DataUnavailableError(RuntimeError):
    """A public dataset that is not prepared and cannot be prepared here."""


class Split(NamedTuple):
    x: jax.Array  # float32 [N, H, W, C] in [0, 1] (images) or [N, L] (mnist1d)
    y: jax.Array  # int32 [N]


class Splits(NamedTuple):
    train: Split
    inner_valid: Split
    outer_valid: Split
    test: Split
    num_classes: int  # static: pass the Split members, not Splits, into jit (an int leaf would be traced)


def default_data_dir() -> str:
    """TFDS's default: $TFDS_DATA_DIR read at call time (not import time), else ~/tensorflow_datasets."""
    import tensorflow_datasets as tfds

    return tfds.core.constants.get_default_data_dir()


def _train_cuts(n: int) -> tuple[int, int]:
    n_train, n_inner = n * 8 // 10, n // 10  # integer floors: no float rounding at exact multiples
    return n_train, n_train + n_inner


def split_sizes(dataset: str) -> dict[str, int]:
    """Sizes of the four splits from the static registry, without loading any data."""
    info = DATASETS[dataset]
    a, b = _train_cuts(info.num_train)
    return {"train": a, "inner_valid": b - a, "outer_valid": info.num_train - b, "test": info.num_test}


def _read_array_record(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels [N]) of a split prepared as array_record, in stored order."""
    source = builder.as_data_source(split=split)
    records = source.__getitems__(range(len(source)))
    return np.stack([r["image"] for r in records]), np.array([r["label"] for r in records])


def _prepared_formats(builder) -> set[str]:
    if not builder.is_prepared():
        return set()
    formats = [getattr(builder.info, "file_format", None), *getattr(builder.info, "alternative_file_formats", [])]
    return {str(getattr(fmt, "value", fmt)) for fmt in formats if fmt}  # FileFormat's str() is not its value


def _unavailable(name: str, data_dir: str, state: str = "not prepared") -> DataUnavailableError:
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    return DataUnavailableError(
        f"dataset {name} is {state} in {data_dir}; prepare it once as array_record, which needs TensorFlow "
        f"(pip install tensorflow-cpu) and either network access or its source files in {manual_dir}: "
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}', "
        f"file_format='array_record').download_and_prepare()\"; or set TFDS_DATA_DIR to a folder where it "
        f"is prepared")


def _readable_public(name: str, data_dir: str):
    """(builder, whether it is prepared as array_record) of a public dataset this install can read;
    DataUnavailableError otherwise. Reads no examples."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    formats = _prepared_formats(builder)
    if any("array_record" in f for f in formats):
        return builder, True
    if formats:  # prepared as tfrecord: only TensorFlow reads it
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise _unavailable(name, data_dir, "prepared as tfrecord (readable only with TensorFlow)") from None
        return builder, False
    raise _unavailable(name, data_dir)


def _load_public(name: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import tensorflow_datasets as tfds

    builder, array_record = _readable_public(name, data_dir)
    if array_record:
        return {s: _read_array_record(builder, s) for s in ("train", "test")}
    return {s: tuple(tfds.as_numpy(builder.as_dataset(split=s, batch_size=-1, as_supervised=True)))
            for s in ("train", "test")}


def require_available(dataset: str, data_dir: str | None = None) -> None:
    """Raise ``DataUnavailableError`` unless :func:`load_splits` can read ``dataset`` here (an
    embedded one always can: it is prepared on first use). Cheap: no example is read."""
    info = DATASETS[dataset]
    if not info.embedded:
        _readable_public(info.tfds_name, data_dir or default_data_dir())


def _load_embedded(name: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from lagg_pipeline.data.builders import EMBEDDED_BUILDERS

    import logging

    import tensorflow_datasets as tfds

    # While the folder is being created TFDS warns that the variant folder has no
    # dataset_info.json: expected on first use, so keep absl's warnings off the terminal.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        builder = EMBEDDED_BUILDERS[name](data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            print(f"preparing the embedded dataset {name} in {data_dir} (once; nothing is downloaded)")
            tfds.display_progress_bar(False)  # TFDS's nested per-shard bars would swamp the terminal
            try:
                # TFDS prints "Downloading and preparing dataset ..." for any builder; a newcomer reads a download
                with contextlib.redirect_stdout(io.StringIO()):
                    builder.download_and_prepare()
            finally:
                tfds.display_progress_bar(True)
            print(f"prepared {name} in {builder.data_dir}")
    finally:
        absl_logger.setLevel(level)
    return {s: _read_array_record(builder, s) for s in ("train", "test")}


def _to_device(images_NHWC: np.ndarray, labels_N: np.ndarray, image_size: int | None) -> Split:
    """uint8 images to float32 [0, 1] on the default device, resized there once if asked;
    float inputs unchanged."""
    scale = np.float32(255) if images_NHWC.dtype == np.uint8 else np.float32(1)
    x_NHWC = jax.device_put(np.asarray(images_NHWC, np.float32) / scale)
    if image_size is not None and x_NHWC.shape[1:3] != (image_size, image_size):
        # Antialiased bilinear: when shrinking (28 -> 8) each output pixel averages its area.
        n, _, _, c = x_NHWC.shape
        x_NHWC = jax.image.resize(x_NHWC, (n, image_size, image_size, c), "linear", antialias=True)
    return Split(x_NHWC, jax.device_put(np.asarray(labels_N, np.int32)))


def load_splits(dataset: str, image_size: int | None = None, data_dir: str | None = None) -> Splits:
    """The four splits of ``dataset`` on the default device; an embedded one is prepared on first use.

    ``data_dir`` defaults to TFDS's (``$TFDS_DATA_DIR``, else ~/tensorflow_datasets). A public
    dataset is only read, never downloaded: ``DataUnavailableError`` says how to provide it.
    """
    info = DATASETS[dataset]
    data_dir = data_dir or default_data_dir()
    arrays = (_load_embedded if info.embedded else _load_public)(info.tfds_name, data_dir)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    a, b = _train_cuts(len(y_train))
    part = lambda lo, hi: _to_device(x_train[lo:hi], y_train[lo:hi], image_size)
    return Splits(part(0, a), part(a, b), part(b, None), _to_device(x_test, y_test, image_size), info.num_classes)
