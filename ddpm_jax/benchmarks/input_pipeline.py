"""Throughput of the training reader, in images/s, after a warm-up.

  python -m ddpm_jax.benchmarks.input_pipeline [--batch_size=128 --num_batches=50]

One line per dataset:

* cifar10 (mock): tfds.testing.mock_data's random 32x32x3 records. No files and no PNG decoding:
  it measures the reader itself (index sampling, threads, flips, scaling) plus the mock's
  random generation.
* cifar10-shaped ArrayRecord: random 32x32x3 images written as a real tfds ArrayRecord dataset
  (PNG-encoded, like cifar10) in a temporary folder: reading and decoding included.
* digits: the real embedded dataset (prepared in a temporary folder unless --data_dir is given).

The consumer does nothing with the batches, so the figures are the reader's ceiling.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from etils import epath

from configs import default
from ddpm_jax import input_pipeline as ip

_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Batches timed after the warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Batches read before timing.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 4096, "Records of the cifar10-shaped sets.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir for digits (default: a temp dir).")


class CifarShapedBenchmark(tfds.core.GeneratorBasedBuilder):
    """Random 32x32x3 PNG images stored like cifar10 (benchmark only)."""

    VERSION = tfds.core.Version("1.0.0")
    NUM_EXAMPLES = 4096

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)  # see ddpm_jax/digits.py: avoids tfds' importlib_resources

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager
        return {"train": self._generate_examples(self.NUM_EXAMPLES)}

    def _generate_examples(self, count: int) -> Iterator[tuple[int, dict]]:
        rng = np.random.default_rng(0)
        for key in range(count):
            yield key, {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": key % 10}


def images_per_second(reader: ip.Reader, warmup: int, num_batches: int) -> float:
    """Reads `warmup` batches, then times `num_batches` more; returns images per second."""
    for _ in range(warmup):
        next(reader)
    start = time.perf_counter()
    images = sum(len(next(reader)) for _ in range(num_batches))
    return images / (time.perf_counter() - start)


def _config(dataset: str, image_size: int, channels: int, random_flip: bool):
    config = default.get_config()
    config.data.dataset, config.data.image_size = dataset, image_size
    config.data.channels, config.data.random_flip = channels, random_flip
    config.training.batch_size = _BATCH.value
    return config


def _reader_spec(config) -> ip.ReaderSpec:
    size, data = config.data.image_size, config.data
    return ip.ReaderSpec(
        seed=config.seed,
        global_batch=config.training.batch_size,
        process_index=0,
        process_count=1,
        image_shape=(size, size, data.channels),
        random_flip=data.random_flip,
        prefetch=data.prefetch,
        num_threads=data.num_threads,
    )


def _report(name: str, reader: ip.Reader, config) -> None:
    with reader:
        rate = images_per_second(reader, _WARMUP.value, _NUM_BATCHES.value)
    print(
        f"{name:<28} {rate:>10,.0f} images/s  (batch {config.training.batch_size}, "
        f"{config.data.num_threads} threads, prefetch {config.data.prefetch}, "
        f"{reader.num_records:,} records)"
    )


def main(argv: Sequence[str]) -> None:
    """Prints the reader's images/s for each benchmark dataset."""
    del argv
    config = _config("cifar10", 32, 3, True)
    with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES.value):
        _report(
            "cifar10 (mock)",
            ip.create_train_reader(config, process_index=0, process_count=1),
            config,
        )
    with tempfile.TemporaryDirectory() as tmp:
        CifarShapedBenchmark.NUM_EXAMPLES = _NUM_EXAMPLES.value
        builder = CifarShapedBenchmark(data_dir=tmp, file_format="array_record")
        ip.hide_tensorflow_from_accelerators()
        builder.download_and_prepare(file_format="array_record")
        source = builder.as_data_source("train")
        _report(
            "cifar10-shaped ArrayRecord",
            ip.Reader(source, _reader_spec(config), lambda x: x),
            config,
        )
    with tempfile.TemporaryDirectory() as tmp:
        config = _config("digits", 8, 1, False)
        config.data.data_dir = _DATA_DIR.value or tmp
        _report("digits", ip.create_train_reader(config, process_index=0, process_count=1), config)


if __name__ == "__main__":
    app.run(main)
