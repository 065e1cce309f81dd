"""Throughput of the training reader, in images/s, after a warm-up.

  python -m ddpm_jax.benchmarks.input_pipeline [--config=cifar10 --batch_size=128 --num_batches=50]

One line per source, each read by ``input_pipeline.Reader`` with the reader settings of
``--config`` (threads, prefetch, flips) and this process's rows (``sharding.process_rows``):

* ``<config> (mock)``: ``tfds.testing.mock_data``'s random records of the config's dataset
  through ``input_pipeline.create_train_reader``. No files and no PNG decoding: it measures
  the reader itself (index sampling, threads, flips) plus the mock's random generation.
* ``<shape> ArrayRecord``: random images of the config's shape written as a real tfds
  ArrayRecord dataset (PNG-encoded, like cifar10) in a temporary folder, reading and decoding
  included.
* ``digits``: the real embedded dataset through ``create_train_reader`` (prepared in a
  temporary folder unless --data_dir is given).

The consumer does nothing with the batches, so the figures are the reader's ceiling. One JSON
line per source goes to stdout, a table to stderr.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags

from ddpm_jax import datasets, sharding
from ddpm_jax import input_pipeline as ip
from ddpm_jax.benchmarks import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when this module is the program)."""
    flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
    flags.DEFINE_integer("batch_size", 128, "Global batch size.")
    flags.DEFINE_integer("num_batches", 50, "Batches timed after the warm-up.")
    flags.DEFINE_integer("warmup", 5, "Batches read before timing.")
    flags.DEFINE_integer("num_examples", 4096, "Records of the mock and ArrayRecord sets.")
    flags.DEFINE_string("data_dir", None, "tfds data_dir for digits (default: a temp dir).")


def shaped_builder(shape: tuple[int, int, int], num_examples: int):
    """A tfds builder of ``num_examples`` random uint8 images of ``shape`` (PNG-encoded)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 - only this benchmark writes a dataset
    from etils import epath  # noqa: PLC0415

    class ShapedBenchmark(tfds.core.GeneratorBasedBuilder):
        """Random images stored like cifar10 (benchmark only)."""

        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            return epath.Path(__file__)  # see ddpm_jax/digits.py: avoids importlib_resources

        def _info(self) -> tfds.core.DatasetInfo:
            features = {"image": tfds.features.Image(shape=shape),
                        "label": tfds.features.ClassLabel(num_classes=10)}
            return tfds.core.DatasetInfo(builder=self,
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager) -> dict:
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[int, dict]]:
            rng = np.random.default_rng(0)
            for key in range(num_examples):
                yield key, {"image": rng.integers(0, 256, shape, np.uint8), "label": key % 10}

    return ShapedBenchmark


def images_per_second(reader: ip.Reader, warmup: int, num_batches: int) -> float:
    """Reads ``warmup`` batches, then times ``num_batches`` more; returns images per second."""
    for _ in range(warmup):
        next(reader)
    start = time.perf_counter()
    images = sum(len(next(reader)) for _ in range(num_batches))
    return images / (time.perf_counter() - start)


def measure(name: str, reader: ip.Reader, config) -> dict:
    """Times ``reader`` (closed afterwards); prints a table row and returns the record."""
    with reader:
        rate = images_per_second(reader, FLAGS.warmup, FLAGS.num_batches)
    d = config.data
    print(f"{name:<28} {rate:>10,.0f} images/s  (batch {config.training.batch_size}, "
          f"{d.num_threads} threads, prefetch {d.prefetch}, {reader.num_records:,} records)",
          file=sys.stderr)
    return dict(benchmark="input_pipeline", source=name, images_per_s=rate,
                batch=config.training.batch_size, image_shape=list(reader.spec.image_shape),
                num_threads=d.num_threads, prefetch=d.prefetch, records=reader.num_records,
                num_batches=FLAGS.num_batches)


def with_batch(config, batch: int):
    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    return config


def train_reader(config, rows) -> ip.Reader:
    """The training reader of ``config`` (``input_pipeline.create_train_reader``)."""
    return ip.create_train_reader(datasets.DataSpec.from_config(config), rows, seed=config.seed,
                                  global_batch=config.training.batch_size)


def main(argv: Sequence[str]) -> None:
    """Prints the reader's images/s for each source."""
    del argv
    import tensorflow_datasets as tfds  # noqa: PLC0415

    for flag in ("batch_size", "num_batches", "num_examples"):
        common.positive(flag, getattr(FLAGS, flag))
    config = with_batch(common.load_config(FLAGS.config), FLAGS.batch_size)
    rows = sharding.process_rows(sharding.create_mesh(), FLAGS.batch_size)
    d = config.data
    with tfds.testing.mock_data(num_examples=FLAGS.num_examples):
        common.emit(measure(f"{d.dataset} (mock)", train_reader(config, rows),
                            config))
    shape = (d.image_size, d.image_size, d.channels)
    with tempfile.TemporaryDirectory() as tmp:
        builder = shaped_builder(shape, FLAGS.num_examples)(data_dir=tmp,
                                                            file_format="array_record")
        datasets.hide_tensorflow_from_accelerators()
        builder.download_and_prepare(file_format="array_record")
        source = builder.as_data_source("train")
        spec = datasets.DatasetSpec("shaped", d.channels, d.image_size, "exact", "")
        reader_spec = ip.train_reader_spec(datasets.DataSpec.from_config(config), rows,
                                           seed=config.seed,
                                           global_batch=config.training.batch_size)
        reader = ip.Reader(source, reader_spec,
                           datasets.preprocessor(spec, d.image_size))
        common.emit(measure("{}x{}x{} ArrayRecord".format(*shape), reader, config))
    with tempfile.TemporaryDirectory() as tmp:
        digits = with_batch(common.load_config("digits"), FLAGS.batch_size)
        digits.data.data_dir = FLAGS.data_dir or tmp
        common.emit(measure("digits", train_reader(digits, rows), digits))


if __name__ == "__main__":
    define_flags()
    app.run(main)
