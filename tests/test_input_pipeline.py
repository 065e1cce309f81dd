"""Datasets and the input pipeline: preprocessing, the documented index stream, resume, rows,
errors."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import run_script
from PIL import Image

from configs import default
from configs import test as test_config
from ddpm_jax import datasets as ds
from ddpm_jax import images as im
from ddpm_jax import input_pipeline as ip
from ddpm_jax import sharding

# ------------------------------------------------------------------------------------------------
# Helpers


def make_config(dataset="cifar10", image_size=32, channels=3, batch=8, **data):
    config = default.get_config()
    config.data.dataset = dataset
    config.data.image_size = image_size
    config.data.channels = channels
    config.data.random_flip = False
    config.data.num_threads = 2
    config.training.batch_size = batch
    for key, value in data.items():
        if key == "seed":
            config.seed = value
        else:
            setattr(config.data, key, value)
    return config


def mock_images(config, num_records):
    """The uint8 source images that tfds.testing.mock_data serves (call inside the mock)."""
    source = ds.make_builder(data_of(config)).as_data_source("train")
    return [np.asarray(source[i]["image"]) for i in range(num_records)]


def identify(batch, images):
    """Maps each uint8 row back to (record id, flipped) by exact match with the source."""
    table = {img[:, ::-1].tobytes(): (i, True) for i, img in enumerate(images)}
    table.update({img.tobytes(): (i, False) for i, img in enumerate(images)})
    assert batch.dtype == np.uint8
    found = [table[row.tobytes()] for row in batch]
    return np.array([i for i, _ in found]), np.array([f for _, f in found])


def data_of(config):
    return ds.DataSpec.from_config(config)


def train_reader(config, rows, *, position=0):
    """The training reader of ``config``, as ``training.setup`` opens it."""
    return ip.create_train_reader(data_of(config), rows, seed=config.seed,
                                  global_batch=config.training.batch_size, position=position)


def all_rows(config):
    """Every row of the global batch: what a single process reads."""
    return np.arange(config.training.batch_size)


def take(reader, count):
    return [next(reader) for _ in range(count)]


def stream(seed, num_records, epochs):
    return np.concatenate([ip.epoch_permutation(seed, e, num_records) for e in range(epochs)])


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
    config = test_config.get_config()
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    ds.load_split(data_of(config), "test", num_examples=1)  # prepares the dataset once
    return config


# ------------------------------------------------------------------------------------------------
# Datasets and preprocessing


def test_cifar10_batches_are_scaled_rows_of_the_documented_stream():
    config = make_config(batch=8, seed=3)
    with tfds.testing.mock_data(num_examples=20):
        images = mock_images(config, 20)
        with train_reader(config, all_rows(config)) as reader:
            batches = take(reader, 6)  # 48 positions: crosses two epoch boundaries
    assert all(b.shape == (8, 32, 32, 3) and b.dtype == np.uint8 for b in batches)
    ids, flipped = identify(np.concatenate(batches), images)
    np.testing.assert_array_equal(ids, stream(3, 20, 3)[:48])
    assert not flipped.any()


def test_uint8_maps_to_minus_one_to_one_and_back():
    pixels = np.arange(256, dtype=np.uint8)
    x = np.asarray(im.to_model_space(pixels))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, pixels / 127.5 - 1.0, atol=1e-7)
    assert x[0] == -1.0 and x[255] == 1.0
    np.testing.assert_array_equal(im.to_uint8(x), pixels)  # the round trip is exact


@pytest.mark.parametrize("random_flip", [True, False])
def test_random_flip_mirrors_exactly_the_drawn_rows(random_flip):
    config = make_config(batch=16, random_flip=random_flip)
    with tfds.testing.mock_data(num_examples=24):
        images = mock_images(config, 24)
        with train_reader(config, all_rows(config)) as reader:
            batches = take(reader, 3)
    flips = [identify(batch, images)[1] for batch in batches]
    if random_flip:
        expected = [ip.batch_flips(0, 16, b, np.arange(16)) for b in range(3)]
        np.testing.assert_array_equal(flips, expected)
        assert 0 < np.sum(flips) < 48
    else:
        assert not np.any(flips)


def test_mnist_is_zero_padded_to_32_and_resized_otherwise():
    config = make_config("mnist", 32, 1, batch=4)
    with tfds.testing.mock_data(num_examples=4):
        images = np.stack(mock_images(config, 4))
        with train_reader(config, all_rows(config)) as reader:
            batch = next(reader)
        small = ds.load_split(data_of(make_config("mnist", 16, 1)), "train", num_examples=4)
    assert batch.shape == (4, 32, 32, 1)
    ids = ip.batch_record_indices(0, 4, 4, 0, np.arange(4))
    np.testing.assert_array_equal(batch[:, 2:30, 2:30], images[ids])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(batch[:, border] == 0)
    expected = [
        np.asarray(Image.fromarray(im[..., 0]).resize((16, 16), Image.Resampling.LANCZOS))
        for im in images
    ]
    np.testing.assert_array_equal(small[..., 0], np.stack(expected))


def test_center_crop_takes_the_middle_square_of_the_short_side():
    rng = np.random.default_rng(0)
    wide = np.full((40, 61, 3), 255, np.uint8)
    wide[:, 10:50] = rng.integers(0, 100, (40, 40, 3))  # left = (61 - 40) // 2 = 10
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    np.testing.assert_array_equal(ds.center_crop_resize(wide, 40), wide[:, 10:50])
    np.testing.assert_array_equal(ds.center_crop_resize(tall, 40), tall[10:50])
    half = np.asarray(Image.fromarray(wide[:, 10:50]).resize((20, 20), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(ds.center_crop_resize(wide, 20), half)
    assert ds.center_crop_resize(wide, 20).max() < 200  # nothing of the cut border leaks in


def test_lsun_images_of_any_shape_come_out_center_cropped_at_the_config_size():
    rng = np.random.default_rng(1)
    shapes = [(24, 40), (40, 24), (17, 17), (33, 20)]
    records = [{"image": rng.integers(0, 256, (*hw, 3), dtype=np.uint8)} for hw in shapes]
    config = make_config("lsun/church_outdoor", 16, 3, batch=4, random_flip=False)
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: records):
        images = ds.load_split(data_of(config), "train")
        with train_reader(config, all_rows(config)) as reader:
            batch = next(reader)
    for record, image in zip(records, images, strict=True):
        height, width = record["image"].shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        crop = record["image"][top : top + side, left : left + side]
        np.testing.assert_array_equal(
            image, np.asarray(Image.fromarray(crop).resize((16, 16), Image.Resampling.LANCZOS))
        )
    ids = ip.batch_record_indices(0, 4, 4, 0, np.arange(4))
    np.testing.assert_array_equal(batch, images[ids])
    with tfds.testing.mock_data(num_examples=3):  # tfds' own mock: random sizes from 5 to 50
        mocked = ds.load_split(data_of(make_config("lsun/cat", 24, 3)), "train")
    assert mocked.shape == (3, 24, 24, 3) and mocked.dtype == np.uint8


def test_celeb_a_hq_batches_keep_their_256px_images():
    config = make_config("celeb_a_hq/256", 256, 3, batch=2)
    with tfds.testing.mock_data(num_examples=3):
        images = mock_images(config, 3)
        with train_reader(config, all_rows(config)) as reader:
            batch = next(reader)
    assert batch.shape == (2, 256, 256, 3) and batch.dtype == np.uint8
    ids, _ = identify(batch, images)
    np.testing.assert_array_equal(ids, stream(0, 3, 1)[:2])


# ------------------------------------------------------------------------------------------------
# Determinism, resume, processes


def test_same_seed_same_batches_other_seed_other_batches(digits_config):
    config = digits_config.copy_and_resolve_references()
    with train_reader(config, all_rows(config)) as reader:
        first = take(reader, 3)
    config.data.num_threads, config.data.prefetch = 3, 0  # threads and prefetch change nothing
    with train_reader(config, all_rows(config)) as reader:
        np.testing.assert_array_equal(take(reader, 3), first)
    config.seed = 1
    with train_reader(config, all_rows(config)) as reader:
        assert not np.array_equal(take(reader, 3), first)
    assert first[0].shape == (8, 8, 8, 1) and first[0].dtype == np.uint8
    assert np.min(first) == 0 and np.max(first) == 255  # digits hold 0 and 255


@pytest.mark.parametrize("num_classes", [0, 10])
def test_restored_reader_continues_like_the_uninterrupted_one_across_epochs(num_classes):
    config = make_config(batch=4, random_flip=True, seed=5)  # 10 records: an epoch is 2.5 batches
    config.model.num_classes = num_classes  # 10: (images, labels) batches
    with tfds.testing.mock_data(num_examples=10):
        with train_reader(config, all_rows(config)) as reader:
            uninterrupted = take(reader, 8)
        with train_reader(config, all_rows(config)) as reader:
            take(reader, 3)
            assert reader.position == 3  # the whole state: one integer
        for position in (3, 1, 6):  # resuming, rewinding and jumping ahead
            with train_reader(config, all_rows(config), position=position) as reader:
                for got, want in zip(take(reader, 2), uninterrupted[position:position + 2],
                                     strict=True):
                    for a, b in zip(*(x if num_classes else (x,) for x in (got, want)),
                                    strict=True):
                        np.testing.assert_array_equal(a, b)
                assert reader.position == position + 2
        if num_classes:  # each label is its image's record's label
            source = ds.make_builder(data_of(config)).as_data_source("train")
            labels = np.array([int(source[i]["label"]) for i in range(10)])
            for images, batch_labels in uninterrupted:
                ids, _ = identify(images, mock_images(config, 10))
                assert batch_labels.dtype == np.int32
                np.testing.assert_array_equal(batch_labels, labels[ids])
            assert len(set(labels)) > 1  # the check can fail


def test_labels_need_a_dataset_with_as_many_classes():
    config = make_config(dataset="celeb_a_hq/256", image_size=256)
    config.model.num_classes = 10
    with pytest.raises(ds.DataError, match=r"model.num_classes=10 does not match "
                       r"celeb_a_hq/256, which has no labels; set --config.model.num_classes=0"):
        ds.dataset_spec(data_of(config))
    config = make_config()
    config.model.num_classes = 100
    with pytest.raises(ds.DataError, match=r"which has 10 classes; set "
                       r"--config.model.num_classes=10"):
        ds.dataset_spec(data_of(config))


def test_two_processes_read_disjoint_halves_of_the_single_process_batch():
    config = make_config(batch=8, random_flip=True, seed=2)
    with tfds.testing.mock_data(num_examples=10):
        with train_reader(config, all_rows(config)) as reader:
            single = take(reader, 4)
        halves = []
        for rows in (np.arange(0, 4), np.arange(4, 8)):
            with train_reader(config, rows) as reader:
                halves.append(take(reader, 4))
        # Rows owned by devices that are not contiguous (a permuted mesh) are read as well.
        with train_reader(config, np.array([1, 2, 5, 7])) as reader:
            scattered = take(reader, 4)
    for step in range(4):
        assert halves[0][step].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step], halves[1][step]]), single[step]
        )
        np.testing.assert_array_equal(scattered[step], single[step][[1, 2, 5, 7]])


def test_closed_reader_stops_its_threads(digits_config):
    reader = train_reader(digits_config, all_rows(digits_config))
    with reader:
        next(reader)
        worker = reader._worker
        assert worker.is_alive()
    assert not worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(reader)


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(dataset="imagenet"),
            "unknown dataset config.data.dataset='imagenet'; known "
            "datasets: digits, cifar10, mnist, celeb_a_hq/256, lsun/church_outdoor, lsun/bedroom",
        ),
        (
            dict(dataset="digits", image_size=8, channels=3),
            "config.data.channels=3 does not "
            "match digits, which has 1 channel(s); set --config.data.channels=1",
        ),
        (
            dict(image_size=64),
            "config.data.image_size=64 does not match cifar10, whose images "
            "are 32x32; set --config.data.image_size=32",
        ),
        (
            dict(dataset="celeb_a_hq/256", image_size=128),
            "config.data.image_size=128 does not match celeb_a_hq/256",
        ),
        (dict(dataset="lsun/cat", channels=1), "config.data.channels=1 does not match lsun/cat"),
    ],
)
def test_config_that_does_not_fit_the_data(overrides, message):
    config = make_config(**overrides)
    with pytest.raises(ds.DataError, match="^" + re.escape(message)):
        train_reader(config, all_rows(config))
    with pytest.raises(ds.DataError):
        ds.load_split(data_of(config), "test")


def test_batch_not_divisible():
    with pytest.raises(
        sharding.ShardingError,
        match=r"batch_size=130 is not divisible by the 8 devices \(1 process\(es\)\); "
        r"use a multiple of 8, e\.g\. --config\.training\.batch_size=128",
    ):
        sharding.check_batch(130, 8)
    with pytest.raises(sharding.ShardingError, match="must be positive, got 0"):
        sharding.check_batch(0, 1)
    sharding.check_batch(128, 8)
    config = make_config(batch=8)
    with pytest.raises(ds.DataError, match=r"rows must lie in \[0, 8\)"):
        train_reader(config, np.arange(4, 12))


def test_dataset_not_prepared_names_the_command(tmp_path):
    config = make_config(data_dir=str(tmp_path))
    with pytest.raises(ds.DataError) as error:
        train_reader(config, all_rows(config))
    assert str(error.value) == (
        f"dataset cifar10 is not prepared in {tmp_path}; prepare it once with: python -m "
        f"ddpm_jax.prepare_data --config=configs/cifar10.py --config.data.data_dir={tmp_path}"
    )
    config = make_config("celeb_a_hq/256", 256, 3, data_dir=str(tmp_path))
    with pytest.raises(
        ds.DataError, match=f"put data256x256.tar .* in {tmp_path}/downloads/manual"
    ):
        ds.load_split(data_of(config), "train")


def test_failed_download_names_the_command(tmp_path, monkeypatch):
    def offline(self, **kwargs):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setattr(ds, "hide_tensorflow_from_accelerators", lambda: None)
    monkeypatch.setattr(ds, "_tfds_can_prepare", lambda: True)
    config = make_config(data_dir=str(tmp_path))
    with pytest.raises(ds.DataError) as error:
        ds.prepare_dataset(data_of(config))
    assert str(error.value) == (
        f"could not download and prepare cifar10 in {tmp_path} (Failed to resolve "
        "'www.cs.toronto.edu'); with network access, run: python -m ddpm_jax.prepare_data "
        f"--config=configs/cifar10.py --config.data.data_dir={tmp_path}"
    )
    monkeypatch.setattr(ds, "_tfds_can_prepare", lambda: False)
    with pytest.raises(ds.DataError, match="pip install importlib_resources, then run: python"):
        ds.prepare_dataset(data_of(config))


def test_unknown_split_bad_state_and_too_many_examples(digits_config):
    with pytest.raises(
        ds.DataError,
        match=r"^split 'validation' does not exist in digits; "
        r"available splits: test, train",
    ):
        ds.load_split(data_of(digits_config), "validation")
    with pytest.raises(ds.DataError, match="asked for 301 examples of digits split 'test'"):
        ds.load_split(data_of(digits_config), "test", num_examples=301)
    with pytest.raises(ds.DataError, match="non-negative integer, got -1"):
        train_reader(digits_config, all_rows(digits_config), position=-1)


# ------------------------------------------------------------------------------------------------
# Devices


def test_make_global_batch_on_the_default_cpu_mesh():
    mesh = sharding.create_mesh()
    local = np.arange(8 * 2 * 2 * 1, dtype=np.uint8).reshape(8, 2, 2, 1)
    rows = sharding.process_rows(mesh, 8)
    np.testing.assert_array_equal(rows, np.arange(8))
    array = sharding.make_global_batch(local, mesh, rows, 8)
    assert array.sharding == sharding.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(array), local)


def test_make_global_batch_puts_rows_on_their_devices_for_any_device_order():
    out = run_script("global_batch.py", devices=8)
    assert out == {"default": "ok", "permuted": "ok"}


def test_dataset_prepared_without_random_access_says_so(tmp_path):
    from ddpm_jax import digits

    digits.Digits(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    config = test_config.get_config()
    config.data.data_dir = str(tmp_path)
    message = (
        f"^digits in {tmp_path} is stored as tfrecord, which has no random access; prepare it as "
        "array_record into another data_dir: python -m ddpm_jax.prepare_data "
        "--config=configs/digits.py --config.data.data_dir=OTHER_DIR$"
    )
    with pytest.raises(ds.DataError, match=message):
        train_reader(config, all_rows(config))
    with pytest.raises(ds.DataError, match=message):
        ds.prepare_dataset(data_of(config))
