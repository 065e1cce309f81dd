"""Training batches: a deterministic, resumable index sampler and a threaded reader.

What is read (datasets, preparation, preprocessing) is ``datasets``' business; this module only
decides the order, and reads this process's rows of every global batch:

* The records of the split (N of them) form an infinite stream of epochs; epoch e is the
  permutation ``np.random.default_rng([seed, e]).permutation(N)``.
* Global batch b (0-based from the start of training) is positions [b*B, (b+1)*B) of that
  stream (B = ``config.training.batch_size``); batches cross epoch boundaries seamlessly.
* A process reads the rows of each global batch that its devices own
  (``sharding.process_rows``: rows [p*B/P, (p+1)*B/P) for process p of P with the default mesh),
  so the global batch is the same for any number of processes and devices.
* Row r of batch b is flipped when ``default_rng([seed, FLIP_STREAM, b]).random(B)[r] < 0.5``:
  the same after a resume and for any process count.
* A class-conditional config (``config.model.num_classes`` > 0) also reads each record's label:
  batches are then ``(images, labels int32 [len(rows)])``, the labels of the same records (a
  flip does not change a label), so they resume exactly as the images do.
* The reader's whole state is one integer, ``position`` = global batches consumed, saved in every
  checkpoint; a reader created at a saved position yields exactly the batches an uninterrupted
  reader would have yielded.
* A background thread keeps ``config.data.prefetch`` batches ready; each batch is decoded and
  preprocessed by ``config.data.num_threads`` threads. Batches stay uint8 (a quarter of the bytes
  of float32 on the way to the devices).

Why not Grain: its ``IndexSampler`` shards the records per process (``ShardOptions``), so the
global batch changes with the number of processes (2 processes x 2 devices could not train like
1 process x 4 devices), and its ``DataLoader`` checkpoints a dict of per-worker indices rather than
one integer. The sampler here is about forty lines of numpy and gives both properties.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ddpm_jax import datasets

FLIP_STREAM = 0x666C6970  # "flip": separates the flip draws from the epoch permutations


# ----------------------------------------------------------------------------------------------
# The index sampler (pure functions of seed, position and rows)


@functools.lru_cache(maxsize=8)
def _cached_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(num_records)
    permutation.setflags(write=False)
    return permutation


def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The record order of one epoch: ``default_rng([seed, epoch]).permutation(num_records)``."""
    return _cached_permutation(int(seed), int(epoch), int(num_records))


def batch_record_indices(
    seed: int, num_records: int, global_batch: int, batch_index: int, rows: np.ndarray
) -> np.ndarray:
    """Record ids of ``rows`` of global batch ``batch_index`` in the infinite stream of epochs."""
    positions = batch_index * global_batch + np.asarray(rows, np.int64)
    epochs, offsets = np.divmod(positions, num_records)
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        ids[here] = epoch_permutation(seed, int(epoch), num_records)[offsets[here]]
    return ids


def batch_flips(seed: int, global_batch: int, batch_index: int, rows: np.ndarray) -> np.ndarray:
    """Whether each of ``rows`` of global batch ``batch_index`` is mirrored (probability 1/2)."""
    draws = np.random.default_rng([seed, FLIP_STREAM, batch_index]).random(global_batch)
    return draws[np.asarray(rows, np.int64)] < 0.5


# ----------------------------------------------------------------------------------------------
# The reader


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    """Everything that fixes the batches a reader yields (besides the data itself).

    Attributes:
      rows: the rows of each global batch this process reads (sorted global indices).
    """

    seed: int
    global_batch: int
    rows: tuple[int, ...]
    image_shape: tuple[int, int, int]
    random_flip: bool
    prefetch: int
    num_threads: int
    labels: bool = False


class Reader:
    """This process's rows of consecutive global batches, uint8 ``[len(rows), H, W, C]`` (with
    ``spec.labels``: the tuple of those images and their int32 ``[len(rows)]`` labels).

    An infinite iterator whose whole state is ``position`` (global batches consumed); create a
    reader at a saved position to continue from it. Close it (or use it as a context manager) to
    stop its threads.
    """

    def __init__(self, source: Sequence[dict], spec: ReaderSpec,
                 preprocess: Callable[[np.ndarray], np.ndarray], position: int = 0):
        self.spec = spec
        self.num_records = len(source)
        self._source, self._preprocess = source, preprocess
        self._rows = np.asarray(spec.rows, np.int64)
        self._pool = None
        if spec.num_threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                spec.num_threads, thread_name_prefix="ddpm-decode")
        self._position = _check_position(position)
        self._closed, self._error = False, None
        self._stop, self._queue, self._worker = threading.Event(), None, None
        if spec.prefetch > 0:
            self._queue = queue.Queue(maxsize=spec.prefetch)
            self._worker = threading.Thread(
                target=_produce, args=(self.read_batch, self._position, self._stop, self._queue),
                name="ddpm-prefetch", daemon=True)
            self._worker.start()

    @property
    def position(self) -> int:
        """Global batches consumed so far (the next batch is global batch ``position``)."""
        return self._position

    def read_batch(self, batch_index: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """This process's rows of global batch ``batch_index``, computed now (no prefetch)."""
        spec = self.spec
        ids = batch_record_indices(
            spec.seed, self.num_records, spec.global_batch, batch_index, self._rows)
        images = self._load(ids)
        if spec.random_flip:
            flips = batch_flips(spec.seed, spec.global_batch, batch_index, self._rows)
            images[flips] = images[flips, :, ::-1]
        if spec.labels:
            return images, datasets.load_labels(self._source, ids)
        return images

    def _load(self, ids: np.ndarray) -> np.ndarray:
        load = functools.partial(datasets.load_images, self._source,
                                 preprocess=self._preprocess, shape=self.spec.image_shape)
        if self._pool is None or len(ids) < 2:
            return load(ids)
        chunks = np.array_split(ids, min(self.spec.num_threads, len(ids)))
        return np.concatenate(list(self._pool.map(load, chunks)))

    def __iter__(self) -> Reader:
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the reader is closed")
        if self._error is not None:
            raise self._error
        if self._worker is None:
            batch = self.read_batch(self._position)
        else:
            batch_index, batch = self._queue.get()
            if isinstance(batch, BaseException):
                self._error = batch
                raise batch
            assert batch_index == self._position, (batch_index, self._position)
        self._position += 1
        return batch

    def close(self) -> None:
        """Stops the prefetch and decode threads; the reader cannot be used afterwards."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._closed = True

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_position(position: Any) -> int:
    if isinstance(position, bool) or not isinstance(position, int | np.integer) or position < 0:
        raise datasets.DataError(
            f"a reader position is a non-negative integer, got {position!r}")
    return int(position)


def _produce(read_batch: Callable[[int], np.ndarray], start: int, stop: threading.Event,
             out: queue.Queue) -> None:
    """Prefetch thread: puts (index, batch or error) for start, start + 1, ... until ``stop``."""
    batch_index = start
    while not stop.is_set():
        try:
            item = (batch_index, read_batch(batch_index))
        except Exception as error:  # handed to the consumer, which raises it
            item = (batch_index, error)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item[1], BaseException):
            return
        batch_index += 1


def train_reader_spec(data: datasets.DataSpec, rows: np.ndarray, *, seed: int,
                      global_batch: int) -> ReaderSpec:
    """The ``ReaderSpec`` of training on ``data``: ``rows`` of each global batch of
    ``global_batch`` (``training.batch_size``), in the order and flips of ``seed``."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= global_batch:
        raise datasets.DataError(
            f"reader rows must lie in [0, {global_batch}), got {rows.tolist()}")
    if not isinstance(seed, int) or seed < 0:
        raise datasets.DataError(f"config.seed must be a non-negative integer, got {seed!r}")
    size = data.image_size
    return ReaderSpec(seed=seed, global_batch=global_batch, rows=tuple(int(r) for r in rows),
                      image_shape=(size, size, data.channels), random_flip=data.random_flip,
                      prefetch=data.prefetch, num_threads=data.num_threads,
                      labels=data.num_classes > 0)


def create_train_reader(data: datasets.DataSpec, rows: np.ndarray, *, seed: int,
                        global_batch: int, position: int = 0) -> Reader:
    """This process's reader of ``data.split`` for training.

    Args:
      data: the config's data section (``datasets.DataSpec.from_config``).
      rows: the rows of each global batch this process reads (``sharding.process_rows``).
      seed: the run's seed (``config.seed``): it fixes the epochs' order and the flips.
      global_batch: ``training.batch_size``, over all processes.
      position: global batches already consumed (restored from a checkpoint).

    Returns:
      A ``Reader`` yielding uint8 ``[len(rows), H, W, C]`` (and the int32 labels of those rows
      when ``data.num_classes`` > 0).

    Raises:
      DataError: unknown dataset or split, data not prepared, image size or channels that do not
        match the data, or rows outside the global batch.
    """
    spec = datasets.dataset_spec(data)  # checks the shape and classes against the dataset
    reader_spec = train_reader_spec(data, rows, seed=seed, global_batch=global_batch)
    source = datasets.open_source(data, data.split)
    if len(source) == 0:
        raise datasets.DataError(f"split {data.split!r} of {spec.tfds_name} has no records")
    return Reader(source, reader_spec, datasets.preprocessor(spec, data.image_size),
                  _check_position(position))
