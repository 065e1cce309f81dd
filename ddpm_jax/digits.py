"""The embedded `digits` dataset: a tfds builder for the 8x8 digits that scikit-learn ships.

scikit-learn carries, inside its own package, the 1,797 8x8 handwritten digits of the UCI
"Optical Recognition of Handwritten Digits" test set (`sklearn.datasets.load_digits`), with
pixel values 0..16. This builder turns them into a regular tfds dataset, so the default
experiment trains with no network at all:

* image: uint8 (8, 8, 1), value = round(v * 255 / 16) with halves rounded up (0 -> 0,
  16 -> 255; 8 -> 128 is the only half), so the full 0..255 range is used.
* label: ClassLabel(10), the digit.
* index: int64, the row of the image in `load_digits()`; records are stored in row order.

Splits (fixed, by sklearn row; the rows are not shuffled first):

* train: rows 0..1496 (1,497 images)
* test: rows 1497..1796 (300 images)

The input pipeline prepares it on first use as ArrayRecord files (random access, no
TensorFlow at read time); `python -m ddpm_jax.prepare_data --config=configs/digits.py` does
the same explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_TRAIN = 1497
NUM_TEST = 300
NUM_EXAMPLES = NUM_TRAIN + NUM_TEST
SPLIT_ROWS = {"train": (0, NUM_TRAIN), "test": (NUM_TRAIN, NUM_EXAMPLES)}

_CITATION = """\
@misc{alpaydin1998optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}
"""


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns the scikit-learn digits as uint8 images and int64 labels.

    Returns:
        (images, labels): images uint8 [1797, 8, 8, 1] in 0..255 (round(v * 255 / 16), halves
        up), labels int64 [1797] in 0..9, both in sklearn row order.
    """
    from sklearn.datasets import load_digits  # local: scikit-learn is slow to import

    bunch = load_digits()
    scaled = np.floor(bunch.images.astype(np.float64) * 255.0 / 16.0 + 0.5)
    images = np.clip(scaled, 0, 255).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """The 1,797 8x8 scikit-learn digits as uint8 images (train 1,497 / test 300)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: sklearn rows 0..1496 train, 1497..1796 test."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 derives this with `importlib_resources`, a package it declares only for
        # Python < 3.9; this file's path is what it would find.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records stay in sklearn row order
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the data is inside scikit-learn.
        images, labels = load_sklearn_digits()
        return {
            split: self._generate_examples(images, labels, start, stop)
            for split, (start, stop) in SPLIT_ROWS.items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, start: int, stop: int
    ) -> Iterator[tuple[int, dict]]:
        for row in range(start, stop):
            yield row, {"image": images[row], "label": int(labels[row]), "index": row}
