"""The embedded digits builder: prepared offline, documented splits, exact sklearn pixels."""

import socket

import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import test as test_config
from ddpm_jax import datasets, digits

data_of = datasets.DataSpec.from_config


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this test")


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
    """The test config with a fresh data_dir, prepared on first use with the network cut."""
    config = test_config.get_config()
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "getaddrinfo", _no_network)
        datasets.load_split(data_of(config), "test", num_examples=1)  # prepares the dataset
    return config


def test_prepared_offline_as_array_record_with_documented_splits(digits_config):
    builder = datasets.make_builder(data_of(digits_config))
    assert builder.is_prepared()
    assert builder.info.file_format.value == "array_record"
    assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
        "train": 1497,
        "test": 300,
    }
    features = builder.info.features
    assert features["image"].shape == (8, 8, 1)
    assert features["label"].num_classes == 10
    assert features["index"].np_dtype == np.int64


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_equal_rounded_sklearn_pixels(digits_config, split):
    bunch = load_digits()
    source = datasets.make_builder(data_of(digits_config)).as_data_source(split)
    records = [source[i] for i in range(len(source))]
    start, stop = digits.SPLIT_ROWS[split]
    index = np.array([r["index"] for r in records])
    np.testing.assert_array_equal(index, np.arange(start, stop))  # stored in sklearn row order
    images = np.stack([r["image"] for r in records])
    assert images.dtype == np.uint8 and images.shape == (stop - start, 8, 8, 1)
    expected = np.round(bunch.images[index] * 255 / 16)
    np.testing.assert_array_equal(images[..., 0], expected)
    np.testing.assert_array_equal([r["label"] for r in records], bunch.target[index])
    assert images.min() == 0 and images.max() == 255


def test_load_split_returns_the_test_rows_in_order(digits_config):
    images = datasets.load_split(data_of(digits_config), "test")
    expected, _ = digits.load_sklearn_digits()
    assert images.shape == (300, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected[1497:])
    first = datasets.load_split(data_of(digits_config), "train", num_examples=5)
    np.testing.assert_array_equal(first, expected[:5])
