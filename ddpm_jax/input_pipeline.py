"""Input pipeline: tfds datasets -> deterministic, resumable, per-process batches -> sharded arrays.

Datasets (`config.data.dataset`), all read from tfds ArrayRecord files in `config.data.data_dir`
(None: tfds' default, `$TFDS_DATA_DIR` or ~/tensorflow_datasets):

* `digits`: the project's embedded builder (ddpm_jax/digits.py), 8x8x1; prepares itself on
  first use, offline.
* `cifar10`: 32x32x3, used as stored.
* `mnist`: 28x28x1; zero-padded by 2 pixels on each side when `config.data.image_size` is 32
  (the usual way to fit it to a 32px model), otherwise resized to the configured size (see below).
* `celeb_a_hq/256`: 256x256x3, used as stored. tfds cannot download it: put `data256x256.tar`
  (CelebA-HQ at 256px, built with github.com/tkarras/progressive_growing_of_gans) in
  `<data_dir>/downloads/manual/` (or pass `--manual_dir` to prepare_data).
* `lsun/church_outdoor`, `lsun/bedroom`, `lsun/cat`: JPEGs of varying size, center-cropped to a
  square of their short side ((h - s) // 2 rows and (w - s) // 2 columns cut before), then
  resized to `config.data.image_size` with PIL's antialiased Lanczos filter: the crop and
  filter of progressive GAN's `dataset_tool.py create_lsun` (PIL.Image.ANTIALIAS is LANCZOS).
  Images already at the size are left untouched.

Every dataset except `digits` is prepared once, explicitly, with
`python -m ddpm_jax.prepare_data --config=configs/<exp>.py [--config.data.data_dir=DIR]`
(downloads, then writes ArrayRecord files); readers never download (hundreds of GB for LSUN,
and many processes must not race to write one data_dir). Preparation imports TensorFlow, which
is kept off accelerators first. Multi-host runs with a shared data_dir should prepare digits
that way too, before training.

Preprocessing: uint8 -> float32 x / 127.5 - 1 in [-1, 1]; a random horizontal flip when
`config.data.random_flip`.

Reading is TF-free random access (`builder.as_data_source`) with our own index sampler:

* The records of the split (N of them) form an infinite stream of epochs; epoch e is the
  permutation `np.random.default_rng([seed, e]).permutation(N)`.
* Global batch b (0-based from the start of training) is positions [b*B, (b+1)*B) of that
  stream (B = `config.training.batch_size`); batches cross epoch boundaries seamlessly.
* Process p of P reads rows [p*B/P, (p+1)*B/P) of each global batch.
* Row r of batch b is flipped when `default_rng([seed, FLIP_STREAM, b]).random(B)[r] < 0.5`:
  the same after a resume and for any process count.
* The reader's whole state is one integer, `position` = global batches consumed; restoring it
  reproduces the batches an uninterrupted reader would have produced.
* A background thread keeps `config.data.prefetch` batches ready; each batch is decoded and
  preprocessed by `config.data.num_threads` threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import math
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from ddpm_jax import digits

FLIP_STREAM = 0x666C6970  # "flip": separates the flip draws from the epoch permutations


class DataError(ValueError):
    """A dataset, split or batch setting that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline knows about one dataset.

    Attributes:
        tfds_name: the tfds builder name (with config).
        channels: channels of the stored images.
        stored_size: height = width of the stored images; None when it varies.
        layout: "exact" (used as stored), "pad_or_resize" (mnist) or "crop_resize" (lsun).
        config_hint: the --config argument of prepare_data commands in messages.
        manual_file: the file a manual download must provide, if any.
    """

    tfds_name: str
    channels: int
    stored_size: int | None
    layout: str
    config_hint: str
    manual_file: str | None = None


_SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 1, 8, "exact", "configs/digits.py"),
    "cifar10": DatasetSpec("cifar10", 3, 32, "exact", "configs/cifar10.py"),
    "mnist": DatasetSpec(
        "mnist",
        1,
        28,
        "pad_or_resize",
        "configs/default.py --config.data.dataset=mnist --config.data.channels=1",
    ),
    "celeb_a_hq/256": DatasetSpec(
        "celeb_a_hq/256", 3, 256, "exact", "configs/celebahq.py", "data256x256.tar"
    ),
    "lsun/church_outdoor": DatasetSpec(
        "lsun/church_outdoor", 3, None, "crop_resize", "configs/lsun_church.py"
    ),
    "lsun/bedroom": DatasetSpec("lsun/bedroom", 3, None, "crop_resize", "configs/lsun_bedroom.py"),
    "lsun/cat": DatasetSpec("lsun/cat", 3, None, "crop_resize", "configs/lsun_cat.py"),
}

DATASETS: tuple[str, ...] = tuple(_SPECS)


# ----------------------------------------------------------------------------------------------
# Validation and messages


def dataset_spec(config: Any) -> DatasetSpec:
    """Returns the spec of `config.data.dataset` after checking its size and channels.

    Args:
        config: the experiment config.

    Returns:
        The dataset's `DatasetSpec`.

    Raises:
        DataError: unknown dataset, or an image size / channel count the data cannot give.
    """
    name = config.data.dataset
    if name not in _SPECS:
        raise DataError(
            f"unknown dataset config.data.dataset={name!r}; known datasets: {', '.join(DATASETS)}"
        )
    spec = _SPECS[name]
    size, channels = config.data.image_size, config.data.channels
    if channels != spec.channels:
        raise DataError(
            f"config.data.channels={channels} does not match {name}, which has {spec.channels} "
            f"channel(s); set --config.data.channels={spec.channels}"
        )
    if not isinstance(size, int) or size < 1:
        raise DataError(f"config.data.image_size must be a positive integer, got {size!r}")
    if spec.layout == "exact" and size != spec.stored_size:
        stored = spec.stored_size
        raise DataError(
            f"config.data.image_size={size} does not match {name}, whose images are "
            f"{stored}x{stored}; set --config.data.image_size={stored}"
        )
    return spec


def check_batch_divisible(global_batch: int, num_devices: int, num_processes: int) -> None:
    """Checks that the global batch splits evenly over devices and processes.

    Args:
        global_batch: `config.training.batch_size`, summed over all devices and processes.
        num_devices: devices over which the batch is sharded (all processes together).
        num_processes: JAX processes, each reading global_batch / num_processes rows.

    Raises:
        DataError: the batch is not positive or not divisible; the message names a fix.
    """
    if global_batch < 1:
        raise DataError(f"training.batch_size must be positive, got {global_batch}")
    step = math.lcm(num_devices, num_processes)
    for count, what in ((num_devices, "devices"), (num_processes, "processes")):
        if global_batch % count:
            fix = max(step, global_batch // step * step)
            raise DataError(
                f"training.batch_size={global_batch} is not divisible by the {count} {what}; "
                f"use a multiple of {step}, e.g. --config.training.batch_size={fix}"
            )


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prepare_command(config: Any, spec: DatasetSpec, data_dir: str | None = None) -> str:
    command = f"python -m ddpm_jax.prepare_data --config={spec.config_hint}"
    data_dir = data_dir or config.data.data_dir
    return command + (f" --config.data.data_dir={data_dir}" if data_dir else "")


def _manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None) -> str:
    return str(manual_dir or builder.data_dir_root / "downloads" / "manual")


def _not_prepared_message(config: Any, spec: DatasetSpec, builder: Any) -> str:
    message = f"dataset {spec.tfds_name} is not prepared in {builder.data_dir_root}; "
    if spec.manual_file:
        message += (
            f"put {spec.manual_file} (CelebA-HQ from github.com/tkarras/"
            f"progressive_growing_of_gans) in {_manual_dir(builder)}, then "
        )
    return message + f"prepare it once with: {_prepare_command(config, spec)}"


def _split_names(split: str) -> list[str]:
    return [part.split("[")[0].strip() for part in split.split("+")]


def _no_random_access_message(config: Any, spec: DatasetSpec, builder: Any, formats) -> str:
    return (
        f"{spec.tfds_name} in {builder.data_dir_root} is stored as {', '.join(sorted(formats))}, "
        "which has no random access; prepare it as array_record into another data_dir: "
        f"{_prepare_command(config, spec, data_dir='OTHER_DIR')}"
    )


def _open_failed_message(config: Any, spec: DatasetSpec, builder: Any, split: str, error) -> str:
    if not builder.is_prepared():
        return _not_prepared_message(config, spec, builder)
    info = builder.info
    known = sorted(info.splits)
    missing = [name for name in _split_names(split) if name not in known]
    if missing:
        return (
            f"split {split!r} does not exist in {spec.tfds_name}; available splits: "
            f"{', '.join(known)} (set config.data.split / config.data.eval_split)"
        )
    formats = {fmt.value for fmt in info.available_file_formats()}
    if "array_record" not in formats:
        return _no_random_access_message(config, spec, builder, formats)
    return f"cannot read {spec.tfds_name} split {split!r}: {_first_line(error)}"


# ----------------------------------------------------------------------------------------------
# Preparing and opening


def hide_tensorflow_from_accelerators() -> None:
    """Imports TensorFlow and hides every GPU from it, so that JAX keeps the accelerators."""
    import tensorflow as tf  # local: only preparation needs TensorFlow

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:  # TF already initialised its devices (tensorflow-cpu: none)
        logging.warning("could not hide GPUs from TensorFlow: %s", error)


def make_builder(config: Any) -> tfds.core.DatasetBuilder:
    """Returns the (possibly unprepared) ArrayRecord tfds builder of `config.data.dataset`."""
    spec = dataset_spec(config)
    if spec.tfds_name == "digits":
        make = functools.partial(digits.Digits, data_dir=config.data.data_dir)
    else:
        make = functools.partial(tfds.builder, spec.tfds_name, data_dir=config.data.data_dir)
    try:
        return make(file_format="array_record")
    except ValueError as error:  # tfds refuses when the data was prepared in another format
        builder = make()
        formats = {fmt.value for fmt in builder.info.available_file_formats()}
        if builder.is_prepared() and "array_record" not in formats:
            raise DataError(_no_random_access_message(config, spec, builder, formats)) from error
        raise


def _tfds_can_prepare() -> bool:
    # tfds 4.9.10 imports importlib_resources to prepare its own datasets, but declares it
    # only for Python < 3.9 (the digits builder avoids that code path).
    return importlib.util.find_spec("importlib_resources") is not None


def prepare_dataset(config: Any, *, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Downloads (if needed) and prepares the config's dataset as ArrayRecord files.

    Args:
        config: the experiment config (`data.dataset`, `data.data_dir`).
        manual_dir: where manually downloaded files are (default `<data_dir>/downloads/manual`).

    Returns:
        The prepared builder.

    Raises:
        DataError: the download or preparation failed (no network, missing manual files).
    """
    spec = dataset_spec(config)
    builder = make_builder(config)
    if builder.is_prepared():  # (make_builder rejects data prepared without random access)
        return builder
    if spec.tfds_name != "digits" and not _tfds_can_prepare():
        raise DataError(
            f"tensorflow-datasets needs the importlib_resources package to prepare "
            f"{spec.tfds_name} but does not install it on Python >= 3.9: pip install "
            f"importlib_resources, then run: {_prepare_command(config, spec)}"
        )
    hide_tensorflow_from_accelerators()
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    except Exception as error:
        if spec.manual_file:
            raise DataError(
                f"could not prepare {spec.tfds_name}: put {spec.manual_file} (CelebA-HQ from "
                f"github.com/tkarras/progressive_growing_of_gans) in "
                f"{_manual_dir(builder, manual_dir)}, then run: {_prepare_command(config, spec)}"
                f" ({_first_line(error, 150)})"
            ) from error
        raise DataError(
            f"could not download and prepare {spec.tfds_name} in {builder.data_dir_root} "
            f"({_first_line(error, 150)}); with network access, run: "
            f"{_prepare_command(config, spec)}"
        ) from error
    return make_builder(config)


def open_source(config: Any, split: str) -> Sequence[dict]:
    """Opens one split of the config's dataset for random access (the digits prepare here).

    Args:
        config: the experiment config.
        split: a tfds split ("train", "test", "train[:90%]", ...).

    Returns:
        A tfds ArrayRecord data source: `len(source)`, `source[i]` (a dict of numpy features).

    Raises:
        DataError: unknown dataset or split, or a dataset that is not prepared.
    """
    spec = dataset_spec(config)
    builder = make_builder(config)
    if spec.tfds_name == "digits" and not builder.is_prepared():
        try:
            prepare_dataset(config)
        except DataError:
            if not make_builder(config).is_prepared():  # else: another process just prepared it
                raise
        builder = make_builder(config)
    try:
        return builder.as_data_source(split)
    except Exception as error:
        raise DataError(_open_failed_message(config, spec, builder, split, error)) from error


# ----------------------------------------------------------------------------------------------
# Preprocessing (pure numpy / PIL on uint8 HWC images)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes a uint8 HWC image to size x size with PIL's antialiased Lanczos filter."""
    if image.shape[:2] == (size, size):
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = pil.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8).reshape(size, size, channels)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Crops the central square of side min(h, w), then resizes it to size x size."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize_square(image[top : top + side, left : left + side], size)


def pad_or_resize(image: np.ndarray, size: int) -> np.ndarray:
    """MNIST's fit: 28 -> 32 by zero padding (2 pixels per side); other sizes by resizing."""
    if size == 32 and image.shape[:2] == (28, 28):
        return np.pad(image, ((2, 2), (2, 2), (0, 0)))
    return resize_square(image, size)


def _preprocessor(spec: DatasetSpec, size: int) -> Callable[[np.ndarray], np.ndarray]:
    if spec.layout == "pad_or_resize":
        return functools.partial(pad_or_resize, size=size)
    if spec.layout == "crop_resize":
        return functools.partial(center_crop_resize, size=size)
    return lambda image: image


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 x / 127.5 - 1 in [-1, 1]."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def load_images(
    source: Sequence[dict],
    indices: Sequence[int],
    preprocess: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Reads, decodes and preprocesses records into a uint8 [len(indices), *shape] array."""
    out = np.empty((len(indices), *shape), np.uint8)
    for row, key in enumerate(indices):  # one record at a time: as fast as __getitems__ here
        image = preprocess(np.asarray(source[int(key)]["image"]))
        if image.shape != shape:
            raise DataError(f"a record has shape {image.shape} after preprocessing, not {shape}")
        out[row] = image
    return out


# ----------------------------------------------------------------------------------------------
# The index sampler (pure functions of seed, position and shape)


@functools.lru_cache(maxsize=8)
def _cached_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(num_records)
    permutation.setflags(write=False)
    return permutation


def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The record order of one epoch: `default_rng([seed, epoch]).permutation(num_records)`."""
    return _cached_permutation(int(seed), int(epoch), int(num_records))


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows [p*B/P, (p+1)*B/P) of each global batch that process p of P reads."""
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def batch_record_indices(
    seed: int, num_records: int, global_batch: int, batch_index: int, rows: slice
) -> np.ndarray:
    """Record ids of `rows` of global batch `batch_index` in the infinite stream of epochs."""
    positions = batch_index * global_batch + np.arange(rows.start, rows.stop, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_records)
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        ids[here] = epoch_permutation(seed, int(epoch), num_records)[offsets[here]]
    return ids


def batch_flips(seed: int, global_batch: int, batch_index: int, rows: slice) -> np.ndarray:
    """Whether each of `rows` of global batch `batch_index` is mirrored (probability 1/2)."""
    draws = np.random.default_rng([seed, FLIP_STREAM, batch_index]).random(global_batch)
    return draws[rows] < 0.5


# ----------------------------------------------------------------------------------------------
# The reader


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    """Everything that fixes the batches a reader yields (besides the data itself)."""

    seed: int
    global_batch: int
    process_index: int
    process_count: int
    image_shape: tuple[int, int, int]
    random_flip: bool
    prefetch: int
    num_threads: int


class Reader:
    """This process's rows of consecutive global batches, float32 [B / P, H, W, C] in [-1, 1].

    An infinite iterator with a one-integer state (`position`: global batches consumed).
    Close it (or use it as a context manager) to stop its threads.
    """

    def __init__(
        self,
        source: Sequence[dict],
        spec: ReaderSpec,
        preprocess: Callable[[np.ndarray], np.ndarray],
        start_position: int = 0,
    ):
        self.spec = spec
        self.num_records = len(source)
        self._source, self._preprocess = source, preprocess
        self._rows = process_rows(spec.global_batch, spec.process_index, spec.process_count)
        self._pool = None
        if spec.num_threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                spec.num_threads, thread_name_prefix="ddpm-decode"
            )
        self._position = _check_position(start_position)
        self._closed, self._error = False, None
        self._worker, self._stop, self._queue = None, threading.Event(), queue.Queue()
        self._start()

    @property
    def position(self) -> int:
        """Global batches consumed so far (the next batch is global batch `position`)."""
        return self._position

    def get_state(self) -> dict[str, int]:
        """The reader's JSON-serialisable state: `{"position": int}`."""
        return {"position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        """Continues from a saved state: the next batch is global batch `state["position"]`."""
        if not isinstance(state, dict) or "position" not in state:
            raise DataError(f"a reader state is a dict with a 'position' key, got {state!r}")
        self._halt()
        self._position, self._error = _check_position(state["position"]), None
        self._start()

    def read_batch(self, batch_index: int) -> np.ndarray:
        """This process's rows of global batch `batch_index`, computed now (no prefetch)."""
        spec = self.spec
        ids = batch_record_indices(
            spec.seed, self.num_records, spec.global_batch, batch_index, self._rows
        )
        images = self._load(ids)
        if spec.random_flip:
            flips = batch_flips(spec.seed, spec.global_batch, batch_index, self._rows)
            images[flips] = images[flips, :, ::-1]
        return to_model_space(images)

    def _load(self, ids: np.ndarray) -> np.ndarray:
        load = functools.partial(
            load_images, self._source, preprocess=self._preprocess, shape=self.spec.image_shape
        )
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

    def _start(self) -> None:
        if self.spec.prefetch < 1:
            return
        self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self.spec.prefetch)
        self._worker = threading.Thread(
            target=_produce,
            args=(self.read_batch, self._position, self._stop, self._queue),
            name="ddpm-prefetch",
            daemon=True,
        )
        self._worker.start()

    def _halt(self) -> None:
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None

    def close(self) -> None:
        """Stops the prefetch and decode threads; the reader cannot be used afterwards."""
        self._halt()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._closed = True

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_position(position: Any) -> int:
    if isinstance(position, bool) or not isinstance(position, int | np.integer) or position < 0:
        raise DataError(f"a reader position is a non-negative integer, got {position!r}")
    return int(position)


def _produce(
    read_batch: Callable[[int], np.ndarray], start: int, stop: threading.Event, out: queue.Queue
) -> None:
    """Prefetch thread: puts (index, batch or error) for start, start + 1, ... until `stop`."""
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


# ----------------------------------------------------------------------------------------------
# Public entry points


def create_train_reader(
    config: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_position: int = 0,
) -> Reader:
    """Creates this process's reader of `config.data.split` for training.

    Args:
        config: the experiment config (`seed`, `data.*`, `training.batch_size`).
        process_index: this process (default `jax.process_index()`).
        process_count: all processes (default `jax.process_count()`).
        start_position: global batches already consumed (e.g. restored from a checkpoint).

    Returns:
        A `Reader` yielding float32 [batch_size // process_count, H, W, C] in [-1, 1].

    Raises:
        DataError: unknown dataset or split, data not prepared, image size or channels that
            do not match the data, or a batch not divisible by the process count.
    """
    spec = dataset_spec(config)
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    check_batch_divisible(config.training.batch_size, 1, process_count)
    if not isinstance(config.seed, int) or config.seed < 0:
        raise DataError(f"config.seed must be a non-negative integer, got {config.seed!r}")
    size = config.data.image_size
    reader_spec = ReaderSpec(
        seed=config.seed,
        global_batch=config.training.batch_size,
        process_index=process_index,
        process_count=process_count,
        image_shape=(size, size, spec.channels),
        random_flip=bool(config.data.random_flip),
        prefetch=int(config.data.prefetch),
        num_threads=max(1, int(config.data.num_threads)),
    )
    source = open_source(config, config.data.split)
    if len(source) == 0:
        raise DataError(f"split {config.data.split!r} of {spec.tfds_name} has no records")
    return Reader(source, reader_spec, _preprocessor(spec, size), start_position)


def load_split(config: Any, split: str, num_examples: int | None = None) -> np.ndarray:
    """Reads a split in stored order, cropped / resized / padded, without flips (evaluation).

    Args:
        config: the experiment config.
        split: the tfds split, e.g. `config.data.eval_split`.
        num_examples: read only the first this many records (default: all).

    Returns:
        uint8 [N, H, W, C] images.

    Raises:
        DataError: as `create_train_reader`, or more examples asked than the split holds.
    """
    spec = dataset_spec(config)
    source = open_source(config, split)
    count = len(source) if num_examples is None else num_examples
    if not 0 <= count <= len(source):
        raise DataError(
            f"asked for {count} examples of {spec.tfds_name} split {split!r}, "
            f"which holds {len(source)}"
        )
    size = config.data.image_size
    load = functools.partial(
        load_images, source, preprocess=_preprocessor(spec, size), shape=(size, size, spec.channels)
    )
    chunks = np.array_split(np.arange(count), max(1, math.ceil(count / 256)))
    with concurrent.futures.ThreadPoolExecutor(max(1, int(config.data.num_threads))) as pool:
        return np.concatenate(list(pool.map(load, chunks)))


def make_global_batch(
    local_batch: np.ndarray, mesh: jax.sharding.Mesh, axis: str = "data"
) -> jax.Array:
    """Assembles every process's local rows into one global array sharded over `axis`.

    Args:
        local_batch: this process's rows, [global_batch // process_count, ...].
        mesh: the device mesh.
        axis: the mesh axis the batch dimension is sharded over.

    Returns:
        A `jax.Array` [global_batch, ...] with sharding `NamedSharding(mesh, P(axis))`.
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    return jax.make_array_from_process_local_data(sharding, local_batch)
