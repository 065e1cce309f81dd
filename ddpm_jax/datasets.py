"""Datasets: the registry, preparation, opening for random access, and preprocessing.

Datasets (``config.data.dataset``), all read from tfds ArrayRecord files in
``config.data.data_dir`` (None: tfds' default, ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets; a
``gs://`` bucket works too):

* ``digits``: the project's embedded builder (ddpm_jax/digits.py), 8x8x1; prepares itself on
  first use, offline.
* ``cifar10``: 32x32x3, used as stored.
* ``mnist``: 28x28x1; zero-padded by 2 pixels on each side when ``config.data.image_size`` is 32
  (the usual way to fit it to a 32px model), otherwise resized to the configured size (see below).
* ``celeb_a_hq/256``: 256x256x3, used as stored. tfds cannot download it: put ``data256x256.tar``
  (CelebA-HQ at 256px, built with github.com/tkarras/progressive_growing_of_gans) in
  ``<data_dir>/downloads/manual/`` (or pass ``--manual_dir`` to prepare_data).
* ``lsun/church_outdoor``, ``lsun/bedroom``, ``lsun/cat``: JPEGs of varying size, center-cropped
  to a square of their short side ((h - s) // 2 rows and (w - s) // 2 columns cut before), then
  resized to ``config.data.image_size`` with PIL's antialiased Lanczos filter: the crop and
  filter of progressive GAN's ``dataset_tool.py create_lsun`` (PIL.Image.ANTIALIAS is LANCZOS).
  Images already at the size are left untouched.

Every dataset except ``digits`` is prepared once, explicitly, with
``python -m ddpm_jax.prepare_data --config=configs/<exp>.py [--config.data.data_dir=DIR]``
(downloads, then writes ArrayRecord files); readers never download (hundreds of GB for LSUN,
and many processes must not race to write one data_dir). Preparation imports TensorFlow, which
is kept off accelerators first. Multi-host runs with a shared data_dir should prepare digits
that way too, before training.

Images leave this module as uint8 ``[H, W, C]``; they become float32 in [-1, 1] on the devices
(``images.to_model_space`` inside the jitted steps). The order in which training reads them is
``input_pipeline``'s business.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from ddpm_jax import errors

if TYPE_CHECKING:
    import tensorflow_datasets as tfds


def _not_the_opencv_note(record) -> bool:
    # tfds notes on every image decode set-up that OpenCV is missing; PIL decodes these images
    # (uint8 PNG) to the same pixels, so the note is noise on every run.
    return "OpenCV is not installed" not in record.getMessage()


logging.get_absl_logger().addFilter(_not_the_opencv_note)


class DataError(errors.UserError, ValueError):
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
        num_classes: classes of the records' ``label`` feature; 0 when there is none.
    """

    tfds_name: str
    channels: int
    stored_size: int | None
    layout: str
    config_hint: str
    manual_file: str | None = None
    num_classes: int = 0


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data a config reads: its ``data`` section with the classes the model asks for
    (``model.num_classes``); ``DatasetSpec`` holds the dataset's own facts.

    Attributes:
        dataset: a name of ``DATASETS``.
        image_size, channels: the images the model sees (after cropping, resizing or padding).
        data_dir: the tfds data folder; None: tfds' default.
        split, eval_split: the tfds splits trained on and evaluated against.
        random_flip: training flips images horizontally at random.
        prefetch, num_threads: batches prepared ahead, threads that decode them.
        num_classes: the labels read with each image; 0: none.
    """

    dataset: str
    image_size: int
    channels: int
    data_dir: str | None = None
    split: str = "train"
    eval_split: str = "test"
    random_flip: bool = True
    prefetch: int = 2
    num_threads: int = 4
    num_classes: int = 0

    @classmethod
    def from_config(cls, config: Any) -> DataSpec:
        """The section of ``config``, with the classes its model asks for."""
        d = config.data
        return cls(d.dataset, d.image_size, d.channels, d.data_dir, d.split, d.eval_split,
                   bool(d.random_flip), int(d.prefetch), max(1, int(d.num_threads)),
                   int(config.model.num_classes))


_SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 1, 8, "exact", "configs/digits.py", num_classes=10),
    "cifar10": DatasetSpec("cifar10", 3, 32, "exact", "configs/cifar10.py", num_classes=10),
    "mnist": DatasetSpec(
        "mnist",
        1,
        28,
        "pad_or_resize",
        "configs/default.py --config.data.dataset=mnist --config.data.channels=1",
        num_classes=10,
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


def spec_by_name(name: str, what: str = "dataset") -> DatasetSpec:
    """The spec of a dataset name; DataError naming the known ones if there is none."""
    if name not in _SPECS:
        raise DataError(f"unknown dataset {what}={name!r}; known datasets: {', '.join(DATASETS)}")
    return _SPECS[name]


def dataset_spec(data: DataSpec) -> DatasetSpec:
    """Returns the spec of `data.dataset` after checking its size, channels and classes.

    Args:
        data: the config's data section.

    Returns:
        The dataset's `DatasetSpec`.

    Raises:
        DataError: unknown dataset, or an image size / channel count the data cannot give.
    """
    name = data.dataset
    spec = spec_by_name(name, "config.data.dataset")
    size, channels = data.image_size, data.channels
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
    classes = data.num_classes
    if classes and classes != spec.num_classes:
        have = f"has {spec.num_classes} classes" if spec.num_classes else "has no labels"
        fix = (f"set --config.model.num_classes={spec.num_classes}" if spec.num_classes
               else "set --config.model.num_classes=0 (unconditional)")
        raise DataError(f"config.model.num_classes={classes} does not match {name}, which "
                        f"{have}; {fix}")
    return spec


def _prepare_command(data: DataSpec, spec: DatasetSpec, data_dir: str | None = None) -> str:
    command = f"python -m ddpm_jax.prepare_data --config={spec.config_hint}"
    data_dir = data_dir or data.data_dir
    return command + (f" --config.data.data_dir={data_dir}" if data_dir else "")


def _manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None) -> str:
    return str(manual_dir or builder.data_dir_root / "downloads" / "manual")


def _not_prepared_message(data: DataSpec, spec: DatasetSpec, builder: Any) -> str:
    message = f"dataset {spec.tfds_name} is not prepared in {builder.data_dir_root}; "
    if spec.manual_file:
        message += (
            f"put {spec.manual_file} (CelebA-HQ from github.com/tkarras/"
            f"progressive_growing_of_gans) in {_manual_dir(builder)}, then "
        )
    return message + f"prepare it once with: {_prepare_command(data, spec)}"


def _split_names(split: str) -> list[str]:
    return [part.split("[")[0].strip() for part in split.split("+")]


def _no_random_access_message(data: DataSpec, spec: DatasetSpec, builder: Any, formats) -> str:
    return (
        f"{spec.tfds_name} in {builder.data_dir_root} is stored as {', '.join(sorted(formats))}, "
        "which has no random access; prepare it as array_record into another data_dir: "
        f"{_prepare_command(data, spec, data_dir='OTHER_DIR')}"
    )


def _open_failed_message(data: DataSpec, spec: DatasetSpec, builder: Any, split: str, error) -> str:
    if not builder.is_prepared():
        return _not_prepared_message(data, spec, builder)
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
        return _no_random_access_message(data, spec, builder, formats)
    return f"cannot read {spec.tfds_name} split {split!r}: {errors.first_line(error, 300)}"


# ----------------------------------------------------------------------------------------------
# Preparing and opening


def _tfds():
    """tensorflow_datasets, imported on first use: only opening or preparing a dataset needs it
    (the train step, sampling, checkpoints and the benchmarks run without it)."""
    import tensorflow_datasets  # noqa: PLC0415

    return tensorflow_datasets


def hide_tensorflow_from_accelerators() -> None:
    """Imports TensorFlow and hides every GPU from it, so that JAX keeps the accelerators."""
    import tensorflow as tf  # local: only preparation needs TensorFlow

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:  # TF already initialised its devices (tensorflow-cpu: none)
        logging.warning("could not hide GPUs from TensorFlow: %s", error)


def make_builder(data: DataSpec) -> tfds.core.DatasetBuilder:
    """Returns the (possibly unprepared) ArrayRecord tfds builder of `data.dataset`."""
    spec = dataset_spec(data)
    data_dir = data.data_dir
    if data_dir and epath.Path(data_dir).exists() and not epath.Path(data_dir).is_dir():
        raise DataError(f"config.data.data_dir={data_dir} is a file, not a folder; set it to the "
                        "folder that holds (or will hold) the prepared datasets")
    if spec.tfds_name == "digits":
        from ddpm_jax import digits  # noqa: PLC0415 - a tfds builder: imports tfds

        make = functools.partial(digits.Digits, data_dir=data_dir)
    else:
        make = functools.partial(_tfds().builder, spec.tfds_name, data_dir=data_dir)
    try:
        return make(file_format="array_record")
    except ValueError as error:  # tfds refuses when the data was prepared in another format
        builder = make()
        formats = {fmt.value for fmt in builder.info.available_file_formats()}
        if builder.is_prepared() and "array_record" not in formats:
            raise DataError(_no_random_access_message(data, spec, builder, formats)) from error
        raise


def _tfds_can_prepare() -> bool:
    # tfds 4.9.10 imports importlib_resources to prepare its own datasets, but declares it
    # only for Python < 3.9 (the digits builder avoids that code path).
    return importlib.util.find_spec("importlib_resources") is not None


def prepare_dataset(data: DataSpec, *, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Downloads (if needed) and prepares the config's dataset as ArrayRecord files.

    Args:
        data: the config's data section (`dataset`, `data_dir`).
        manual_dir: where manually downloaded files are (default `<data_dir>/downloads/manual`).

    Returns:
        The prepared builder.

    Raises:
        DataError: the download or preparation failed (no network, missing manual files).
    """
    spec = dataset_spec(data)
    builder = make_builder(data)
    if builder.is_prepared():  # (make_builder rejects data prepared without random access)
        return builder
    if spec.tfds_name != "digits" and not _tfds_can_prepare():
        raise DataError(
            f"tensorflow-datasets needs the importlib_resources package to prepare "
            f"{spec.tfds_name} but does not install it on Python >= 3.9: pip install "
            f"importlib_resources, then run: {_prepare_command(data, spec)}"
        )
    hide_tensorflow_from_accelerators()
    download_config = _tfds().download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    except Exception as error:
        if spec.manual_file:
            raise DataError(
                f"could not prepare {spec.tfds_name}: put {spec.manual_file} (CelebA-HQ from "
                f"github.com/tkarras/progressive_growing_of_gans) in "
                f"{_manual_dir(builder, manual_dir)}, then run: {_prepare_command(data, spec)}"
                f" ({errors.first_line(error, 150)})"
            ) from error
        raise DataError(
            f"could not download and prepare {spec.tfds_name} in {builder.data_dir_root} "
            f"({errors.first_line(error, 150)}); with network access, run: "
            f"{_prepare_command(data, spec)}"
        ) from error
    return make_builder(data)


def open_source(data: DataSpec, split: str) -> Sequence[dict]:
    """Opens one split of the config's dataset for random access (the digits prepare here).

    Args:
        data: the config's data section.
        split: a tfds split ("train", "test", "train[:90%]", ...).

    Returns:
        A tfds ArrayRecord data source: `len(source)`, `source[i]` (a dict of numpy features).

    Raises:
        DataError: unknown dataset or split, or a dataset that is not prepared.
    """
    spec = dataset_spec(data)
    builder = make_builder(data)
    if spec.tfds_name == "digits" and not builder.is_prepared():
        try:
            prepare_dataset(data)
        except DataError:
            if not make_builder(data).is_prepared():  # else: another process just prepared it
                raise
        builder = make_builder(data)
    try:
        return builder.as_data_source(split)
    except Exception as error:
        raise DataError(_open_failed_message(data, spec, builder, split, error)) from error


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


def preprocessor(spec: DatasetSpec, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The per-image crop / pad / resize of a dataset at ``size`` (identity when stored so)."""
    if spec.layout == "pad_or_resize":
        return functools.partial(pad_or_resize, size=size)
    if spec.layout == "crop_resize":
        return functools.partial(center_crop_resize, size=size)
    return lambda image: image


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


def load_labels(source: Sequence[dict], indices: Sequence[int]) -> np.ndarray:
    """The ``label`` feature of records as int32 ``[len(indices)]``."""
    return np.fromiter((int(source[int(key)]["label"]) for key in indices), np.int32,
                       count=len(indices))


def iter_split(data: DataSpec, split: str, *, batch_size: int = 256,
               num_examples: int | None = None) -> Iterator[np.ndarray]:
    """A split in stored order, cropped / resized / padded, without flips, in uint8 batches.

    Args:
        data: the config's data section.
        split: the tfds split, e.g. ``data.eval_split``.
        batch_size: images per yielded batch (the last one may be smaller).
        num_examples: read only the first this many records (default: all).

    Yields:
        uint8 ``[<= batch_size, H, W, C]`` arrays; memory is bounded by one batch.

    Raises:
        DataError: unknown dataset or split, data not prepared, or more examples asked than the
            split holds (raised before the first batch).
    """
    spec = dataset_spec(data)
    source = open_source(data, split)
    count = len(source) if num_examples is None else num_examples
    if not 0 <= count <= len(source):
        raise DataError(
            f"asked for {count} examples of {spec.tfds_name} split {split!r}, "
            f"which holds {len(source)}"
        )
    size = data.image_size
    load = functools.partial(
        load_images, source, preprocess=preprocessor(spec, size), shape=(size, size, spec.channels)
    )
    return _batches(load, count, batch_size, data.num_threads)


def _batches(load, count: int, batch_size: int, threads: int) -> Iterator[np.ndarray]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, count, batch_size):
            ids = np.arange(start, min(start + batch_size, count))
            parts = np.array_split(ids, min(threads, len(ids)))
            yield np.concatenate(list(pool.map(load, parts)))


def load_split(data: DataSpec, split: str, num_examples: int | None = None) -> np.ndarray:
    """The whole of ``iter_split`` as one uint8 ``[N, H, W, C]`` array (small splits)."""
    batches = list(iter_split(data, split, num_examples=num_examples))
    if not batches:
        size = data.image_size
        return np.zeros((0, size, size, dataset_spec(data).channels), np.uint8)
    return np.concatenate(batches)
