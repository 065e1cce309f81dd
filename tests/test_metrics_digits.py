"""The digits' Fréchet distance, precision / recall and classifier (ddpm_jax.metrics.digits),
and improved precision and recall against a float64 reference of their definition."""

import json
import os
import warnings

import numpy as np
import pytest
from conftest import initial_params, run_python

from ddpm_jax import datasets, digits
from ddpm_jax.metrics import MetricsError, precision_recall
from ddpm_jax.metrics import digits as dm


# -- precision and recall (Kynkäänniemi et al. 2019) -------------------------------------------
def _reference_precision_recall(real, fake, k):
    """Float64 loops over the definition: a point's radius is the Euclidean distance to its
    k-th nearest *other* point of its own set; precision is the share of fake points within
    some real point's radius, recall the share of real points within some fake point's."""
    def radii(x):
        out = []
        for i in range(len(x)):
            d = [np.sqrt(np.sum((x[i] - x[j]) ** 2)) for j in range(len(x)) if j != i]
            out.append(sorted(d)[k - 1])
        return np.array(out)

    def share_inside(points, centres, r):
        inside = [any(np.sqrt(np.sum((p - c) ** 2)) <= rc for c, rc in
                      zip(centres, r, strict=True))
                  for p in points]
        return float(np.mean(inside))

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


@pytest.fixture(scope="module")
def two_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5))
    fake = np.concatenate([rng.normal(0.4, 0.7, size=(35, 5)), rng.normal(2.5, 0.3, (10, 5))])
    return real, fake


def test_precision_recall_match_the_float64_definition(two_sets):
    real, fake = two_sets
    want = _reference_precision_recall(real, fake, 3)
    got = precision_recall(real, fake, k=3)
    assert got == pytest.approx(want, abs=1e-12)
    assert precision_recall(real, fake, k=3, block=7) == got  # blocks change nothing
    # The data tells k, the radius and the direction apart (so a wrong one would fail above).
    assert _reference_precision_recall(real, fake, 2) != want
    assert _reference_precision_recall(real, fake, 4) != want
    assert want[0] != want[1] and 0 < want[0] < 1 and 0 < want[1] < 1
    # Duplicated real points: a twin is a neighbour at distance 0, the point itself is not.
    twins = np.concatenate([real[:20], real[:20]])
    assert precision_recall(twins, fake, k=1) == pytest.approx(
        _reference_precision_recall(twins, fake, 1), abs=1e-12)
    with pytest.raises(MetricsError, match="need features"):
        precision_recall(real, fake[:, :3])


# -- the digits' feature network -----------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(digits_dir):
    return dm.load_reference(digits_dir)


@pytest.fixture(scope="module")
def real_digits(digits_dir):
    images, labels = digits.load_sklearn_digits()
    return images, labels


def test_feature_network_is_trained_once_deterministically_and_cached(reference, digits_dir):
    ref = reference
    assert ref.test_accuracy > 0.9 and ref.test_confidence > 0.85  # a classifier of digits
    assert ref.test_features.shape == (300, dm.FEATURE_DIM) and ref.fd_real > 0
    # Cached beside the prepared data, with its seed and hashes.
    builder = datasets.make_builder(dm._digits_data(digits_dir))
    assert ref.path.startswith(str(builder.data_dir)) and os.path.exists(ref.path)
    with np.load(ref.path, allow_pickle=False) as f:
        assert int(f["seed"]) == dm.SEED and str(f["params_sha256"]) == ref.params_sha256
        assert str(f["data_sha256"]) == ref.data_sha256
    # The same seed trains the same bits (a short run of the same recipe).
    images, labels = digits.load_sklearn_digits()
    a = dm.train_params(images[:1497], labels[:1497], steps=5)
    b = dm.train_params(images[:1497], labels[:1497], steps=5)
    assert dm.params_sha256(a) == dm.params_sha256(b)
    assert dm.params_sha256(a) != dm.params_sha256(
        dm.train_params(images[:1497], labels[:1497], steps=5, seed=1))


def test_a_damaged_cache_is_refused_in_one_line(reference, tmp_path):
    with np.load(reference.path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["dense"] = arrays["dense"] + 1e-3
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(MetricsError, match="damaged.*delete it") as e:
        dm._load_reference.__wrapped__(str(bad), os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.dirname(reference.path)))), dm.SEED)
    assert "\n" not in str(e.value)


def test_the_frechet_ratio_orders_real_noisy_and_collapsed_digits(reference, real_digits,
                                                                   digits_dir):
    images, labels = real_digits
    train = images[:1497]
    real = dm.evaluate_digits(train, data_dir=digits_dir)
    # The real training digits are the ratio's unit.
    assert real["digits_fd"] == pytest.approx(real["digits_fd_real"], rel=1e-9)
    assert real["digits_fd_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert sum(real["digits_classes"]) == 1497 and min(real["digits_classes"]) > 130
    rng = np.random.default_rng(0)
    noisy = np.clip(train + rng.normal(0, 40, train.shape), 0, 255).astype(np.uint8)
    worse = dm.evaluate_digits(noisy, data_dir=digits_dir)
    assert worse["digits_fd_ratio"] > 1.3 and worse["precision"] < real["precision"]
    threes = dm.evaluate_digits(train[labels[:1497] == 3], data_dir=digits_dir)
    assert threes["digits_fd_ratio"] > 5 and threes["recall"] < 0.2
    assert np.argmax(threes["digits_classes"]) == 3
    # The pieces are the library's: features, float64 statistics, the Fréchet distance.
    from ddpm_jax import metrics

    feats = dm.digits_features(noisy, reference.params)
    mu, sigma = metrics.feature_statistics(feats["features"])
    assert worse["digits_fd"] == pytest.approx(metrics.frechet_distance(
        mu, sigma, *metrics.feature_statistics(reference.test_features)), rel=1e-12)
    assert worse["digits_confidence"] == pytest.approx(float(feats["probs"].max(1).mean()))
    p = worse["provenance"]
    assert p["seed"] == 0 and p["k"] == 3 and p["reference"] == "digits:test"
    assert p["reference_n"] == 300 and p["params_sha256"] == reference.params_sha256
    with pytest.raises(MetricsError, match="8x8x1"):
        dm.evaluate_digits(np.zeros((4, 32, 32, 3), np.uint8), data_dir=digits_dir)


def _scipy_frechet(a, b):
    """Float64 Fréchet distance of two feature sets by scipy's matrix square root (the FID
    tests' reference formula)."""
    from scipy import linalg
    from test_metrics import _fid_sqrtm

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with warnings.catch_warnings():  # units that never fire make S1 S2 singular; sqrtm is fine
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return _fid_sqrtm(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_the_ratio_of_as_many_real_digits_is_the_mean_over_its_documented_subsets(
        reference, real_digits, digits_dir):
    """digits_fd_ratio_real_n: N real training digits' ratio, the figure a generator of the
    training digits would get with N samples, recomputed from the images with scipy."""
    images = real_digits[0]
    train, test = images[:1497], images[1497:]
    feats = lambda x: dm.digits_features(x, reference.params)["features"]  # noqa: E731
    test_feats = feats(test)
    unit = _scipy_frechet(feats(train), test_feats)
    assert unit == pytest.approx(reference.fd_real, rel=1e-6)
    # The documented subsets: the first 200 of default_rng([200, i])'s permutation, i < 8.
    subsets = [np.random.default_rng([200, i]).permutation(1497)[:200] for i in range(8)]
    want = np.mean([_scipy_frechet(feats(train[i]), test_feats) for i in subsets]) / unit
    got = dm.evaluate_digits(train[:200], data_dir=digits_dir)
    assert got["digits_fd_ratio_real_n"] == pytest.approx(want, rel=1e-6)
    # Few samples bias the distance upwards; the whole training split is the unit.
    assert dm.real_n_ratio(reference, 200) > dm.real_n_ratio(reference, 500) > 1.02
    assert dm.real_n_ratio(reference, 1497) == pytest.approx(1.0, rel=1e-9)


def test_evaluate_command_digits_fd_precision_recall_on_two_devices(reference, digits_dir,
                                                                    tmp_path):
    """The command's whole path (samples made and streamed, features sharded over 2 devices,
    the cached reference) gives the library's numbers on the same samples."""
    from configs import test as test_config
    from ddpm_jax import checkpoints

    config = test_config.get_config()
    config.data.data_dir = digits_dir
    workdir = str(tmp_path / "run")
    checkpoints.save_weights(workdir, config, initial_params(config, 0))
    out = tmp_path / "eval.json"
    proc = run_python(["-m", "ddpm_jax.evaluate", f"--workdir={workdir}",
                       "--metrics=digits_fd,precision,recall", "--num_samples=40",
                       "--sample_batch_size=20", f"--out={out}"], devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    samples = np.load(os.path.join(workdir, "samples.npz"))["images"]
    want = dm.evaluate_digits(samples[:40], data_dir=digits_dir)
    for key in ("digits_fd", "digits_fd_ratio", "digits_fd_ratio_real_n", "precision", "recall",
                "digits_confidence"):
        assert result[key] == pytest.approx(want[key], rel=1e-5), key
    assert result["digits_classes"] == want["digits_classes"]
    p = result["provenance"]
    assert p["digits"]["params_sha256"] == reference.params_sha256
    assert p["precision_recall_features"] == "digits" and p["num_samples"] == 40
    assert "inception_weights_sha256" not in p  # no Inception needed
