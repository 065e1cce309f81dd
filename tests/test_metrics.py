"""ddpm_jax.metrics without torch: resizes, pooling and the metrics against independent
references (numpy loops, SciPy, scikit-learn), float64 statistics, the weight file and its
checks, the network's outputs, and every bad input as one line. The parity of the network with
torch-fidelity's is in tests/test_metrics_torch.py."""

import os

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
from conftest import run_python
from safetensors.numpy import load_file, save_file

from ddpm_jax import metrics
from ddpm_jax.benchmarks import inception as bench
from ddpm_jax.metrics import inception, network, scores, weights
from ddpm_jax.metrics.errors import MetricsError


def _rel(a, b) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# -- the weight file's names and shapes, written from pytorch-fid's block definitions ----------
def _spec_conv_shapes() -> dict[str, tuple[int, ...]]:
    """Conv weight shapes (out, in, kh, kw) of pytorch-fid's FID Inception."""
    convs = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3),
             "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_3b_1x1": (80, 64, 1, 1),
             "Conv2d_4a_3x3": (192, 80, 3, 3)}

    def add(block, **branches):
        convs.update({f"{block}.{name}": shape for name, shape in branches.items()})

    for block, cin, p in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        add(block, branch1x1=(64, cin, 1, 1), branch5x5_1=(48, cin, 1, 1),
            branch5x5_2=(64, 48, 5, 5), branch3x3dbl_1=(64, cin, 1, 1),
            branch3x3dbl_2=(96, 64, 3, 3), branch3x3dbl_3=(96, 96, 3, 3),
            branch_pool=(p, cin, 1, 1))
    add("Mixed_6a", branch3x3=(384, 288, 3, 3), branch3x3dbl_1=(64, 288, 1, 1),
        branch3x3dbl_2=(96, 64, 3, 3), branch3x3dbl_3=(96, 96, 3, 3))
    for block, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        add(block, branch1x1=(192, 768, 1, 1), branch7x7_1=(c, 768, 1, 1),
            branch7x7_2=(c, c, 1, 7), branch7x7_3=(192, c, 7, 1),
            branch7x7dbl_1=(c, 768, 1, 1), branch7x7dbl_2=(c, c, 7, 1),
            branch7x7dbl_3=(c, c, 1, 7), branch7x7dbl_4=(c, c, 7, 1),
            branch7x7dbl_5=(192, c, 1, 7), branch_pool=(192, 768, 1, 1))
    add("Mixed_7a", branch3x3_1=(192, 768, 1, 1), branch3x3_2=(320, 192, 3, 3),
        branch7x7x3_1=(192, 768, 1, 1), branch7x7x3_2=(192, 192, 1, 7),
        branch7x7x3_3=(192, 192, 7, 1), branch7x7x3_4=(192, 192, 3, 3))
    for block, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        add(block, branch1x1=(320, cin, 1, 1), branch3x3_1=(384, cin, 1, 1),
            branch3x3_2a=(384, 384, 1, 3), branch3x3_2b=(384, 384, 3, 1),
            branch3x3dbl_1=(448, cin, 1, 1), branch3x3dbl_2=(384, 448, 3, 3),
            branch3x3dbl_3a=(384, 384, 1, 3), branch3x3dbl_3b=(384, 384, 3, 1),
            branch_pool=(192, cin, 1, 1))
    return convs


def test_weight_names_and_shapes_match_the_spec():
    expected = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for module, shape in _spec_conv_shapes().items():
        expected[f"{module}.conv.weight"] = shape
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{module}.bn.{leaf}"] = (shape[0],)
    assert len(_spec_conv_shapes()) == 94
    assert weights.expected_tensors() == expected
    assert len(expected) == weights.NUM_TENSORS == 472
    # pytorch-fid's file holds 23,885,392 float32 parameters.
    assert sum(int(np.prod(s)) for s in expected.values()) == 23_885_392


# -- preprocessing ------------------------------------------------------------------------------
def _tf1_resize_loop(img: np.ndarray, size: int) -> np.ndarray:
    """TF 1.x resize_bilinear(align_corners=False), pixel by pixel in float32: [H, W] -> [S, S]."""
    h, w = img.shape
    sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
    out = np.zeros((size, size), np.float32)
    for i in range(size):
        fy = np.float32(i) * sy
        y0, y1 = int(np.floor(fy)), min(int(np.ceil(fy)), h - 1)
        dy = fy - np.float32(np.floor(fy))
        for j in range(size):
            fx = np.float32(j) * sx
            x0, x1 = int(np.floor(fx)), min(int(np.ceil(fx)), w - 1)
            dx = fx - np.float32(np.floor(fx))
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def _half_pixel_resize_loop(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel bilinear (PyTorch align_corners=False upsampling) in float64: [H, W] -> [S, S]."""
    h, w = img.shape

    def taps(n, i):
        src = max((i + 0.5) * n / size - 0.5, 0.0)
        lo = int(np.floor(src))
        return lo, min(lo + 1, n - 1), src - lo

    out = np.zeros((size, size))
    for i in range(size):
        y0, y1, dy = taps(h, i)
        for j in range(size):
            x0, x1, dx = taps(w, j)
            out[i, j] = ((1 - dy) * ((1 - dx) * img[y0, x0] + dx * img[y0, x1])
                         + dy * ((1 - dx) * img[y1, x0] + dx * img[y1, x1]))
    return out


@pytest.mark.parametrize("shape,size", [((5, 7), 11), ((32, 32), 299)])
def test_tf1_resize_matches_a_loop(shape, size):
    img = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    ours = np.asarray(network.tf1_resize_bilinear(img[None, :, :, None], size))[0, :, :, 0]
    assert np.max(np.abs(ours - _tf1_resize_loop(img, size))) <= 2e-5  # 0..255: float32 ulps


@pytest.mark.parametrize("shape,size", [((5, 7), 11), ((32, 32), 299)])
def test_half_pixel_resize_matches_a_loop(shape, size):
    img = np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)
    ours = np.asarray(network.half_pixel_resize_bilinear(img[None, :, :, None], size))
    # Float32 tap weights: within 1/1000 of a grey level (1/255) of the float64 loop.
    assert np.max(np.abs(ours[0, :, :, 0] - _half_pixel_resize_loop(img, size))) <= 4e-6


def test_the_two_modes_differ():
    # The resize conventions differ by about half a source pixel.
    img = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    tf1 = np.asarray(network.preprocess(img, "tf1"))
    pt = np.asarray(network.preprocess(img, "pytorch_fid"))
    assert tf1.shape == pt.shape == (1, 299, 299, 3)
    assert -1 <= tf1.min() and tf1.max() <= 1 and -1 <= pt.min() and pt.max() <= 1
    assert np.mean(np.abs(tf1 - pt)) > 0.1
    # Corners: TF1 starts exactly on pixel (0, 0); normalisation (x - 128) / 128.
    np.testing.assert_allclose(tf1[0, 0, 0], (img[0, 0, 0] - 128.0) / 128.0, rtol=0, atol=1e-7)


def test_avg_pool_leaves_the_padding_out():
    x = np.random.default_rng(3).normal(size=(2, 5, 6, 3)).astype(np.float32)
    ref = np.zeros_like(x, dtype=np.float64)
    for i in range(5):
        for j in range(6):
            window = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            ref[:, i, j] = window.mean(axis=(1, 2))
    assert np.max(np.abs(np.asarray(network.avg_pool_exclude_pad(x)) - ref)) <= 1e-6
    one = np.full((1, 1, 1, 2), 3.0, np.float32)
    np.testing.assert_array_equal(network.avg_pool_exclude_pad(one), one)


# -- FID, IS, KID ---------------------------------------------------------------------------------
def _gaussian(rng, d, n=300, offset=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + offset
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _fid_sqrtm(mu1, s1, mu2, s2) -> float:
    """The classic formula with scipy.linalg.sqrtm (pytorch-fid, TTUR)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(4)
    mu1, s1 = _gaussian(rng, 64)
    mu2, s2 = _gaussian(rng, 64, offset=0.2)
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(fid, float) and fid > 1
    assert abs(fid - _fid_sqrtm(mu1, s1, mu2, s2)) <= 1e-10 * abs(fid)
    assert abs(metrics.frechet_distance(mu2, s2, mu1, s1) - fid) <= 1e-10 * abs(fid)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) <= 1e-9 * np.trace(s1)
    # A rank-deficient covariance (fewer samples than dimensions) is fine too.
    x = rng.normal(size=(20, 64))
    mu3, s3 = x.mean(0), np.cov(x, rowvar=False)
    ref = _fid_sqrtm(mu1, s1, mu3, s3)
    assert abs(metrics.frechet_distance(mu1, s1, mu3, s3) - ref) <= 1e-8 * abs(ref)


def test_inception_score_matches_scipy_entropy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(103, 1008)) * 3
    mean, std = metrics.inception_score(logits.astype(np.float32), splits=10)
    ref = []
    x = logits.astype(np.float32).astype(np.float64)
    for part in (x[i * 103 // 10:(i + 1) * 103 // 10] for i in range(10)):  # consecutive splits
        p = scipy.special.softmax(part, axis=1)
        ref.append(np.exp(np.mean(scipy.stats.entropy(p, p.mean(axis=0), axis=1))))
    assert abs(mean - np.mean(ref)) <= 1e-9 * mean and abs(std - np.std(ref)) <= 1e-9 * std
    one, zero = metrics.inception_score(logits, splits=1)
    assert zero == 0.0 and one > mean


def test_kid_matches_a_numpy_formula():
    from sklearn.metrics.pairwise import polynomial_kernel

    rng = np.random.default_rng(6)
    x = rng.gamma(2.0, 0.25, size=(60, 32))
    y = rng.gamma(2.0, 0.27, size=(50, 32))
    mean, std = metrics.kernel_inception_distance(x, y, subsets=5, subset_size=40, seed=3)
    draw = np.random.default_rng(3)
    mmds = []
    for _ in range(5):
        xs = x[draw.choice(60, 40, replace=False)]
        ys = y[draw.choice(50, 40, replace=False)]
        kxx, kyy, kxy = (polynomial_kernel(a, b, degree=3, gamma=1 / 32, coef0=1)
                         for a, b in ((xs, xs), (ys, ys), (xs, ys)))
        off = ~np.eye(40, dtype=bool)
        mmds.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    assert abs(mean - np.mean(mmds)) <= 1e-9 * abs(mean)
    assert abs(std - np.std(mmds)) <= 1e-9 * std
    assert metrics.kernel_inception_distance(x, y, subsets=5, subset_size=40, seed=3) == (mean, std)


# -- statistics ----------------------------------------------------------------------------------
def test_streaming_stats_keep_float64_accuracy():
    # 50,000 pool3-like features: non-negative, mean about 0.5.
    rng = np.random.default_rng(7)
    feats = (rng.gamma(2.0, 0.25, size=(50_000, 64))
             + rng.normal(size=(50_000, 1)) * 0.05).astype(np.float32)
    ref_mu = feats.astype(np.float64).mean(axis=0)
    ref_sigma = np.cov(feats.astype(np.float64), rowvar=False)
    acc = metrics.FeatureStats(64)  # combines chunks of 4096 rows
    halves = metrics.FeatureStats(64, chunk_rows=1)  # combines every batch
    for i in range(0, 50_000, 64):
        (acc if i < 25_000 else halves).update(feats[i:i + 64])
    mu, sigma, n = acc.merge(halves).result()
    assert n == 50_000 and mu.dtype == sigma.dtype == np.float64
    assert _rel(mu, ref_mu) <= 1e-13 and _rel(sigma, ref_sigma) <= 1e-12
    # A float32 one-pass E[x x^T] - mu mu^T misses by orders of magnitude more (the test's teeth).
    s, ss = np.zeros(64, np.float32), np.zeros((64, 64), np.float32)
    for i in range(0, 50_000, 64):
        s += feats[i:i + 64].sum(0)
        ss += feats[i:i + 64].T @ feats[i:i + 64]
    naive = (ss - np.outer(s, s) / 50_000) / (50_000 - 1)
    assert _rel(naive, ref_sigma) > 1e-6


def test_reference_stats_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = _gaussian(rng, 2048, n=50)
    path = str(tmp_path / "ref.npz")
    metrics.save_reference_stats(path, mu, sigma, 50, mode="tf1", weights_sha256="ab" * 32)
    got = metrics.load_reference_stats(path, mode="tf1", weights_sha256="ab" * 32)
    np.testing.assert_array_equal(got.mu, mu)
    np.testing.assert_array_equal(got.sigma, sigma)
    assert (got.n, got.mode, got.weights_sha256) == (50, "tf1", "ab" * 32)
    with pytest.raises(MetricsError, match="--mode=tf1"):
        metrics.load_reference_stats(path, mode="pytorch_fid")
    with pytest.raises(MetricsError, match="other Inception weights"):
        metrics.load_reference_stats(path, weights_sha256="cd" * 32)
    # Foreign files (TTUR, pytorch-fid, clean-fid): mu and sigma only.
    foreign = str(tmp_path / "fid_stats_cifar10_train.npz")
    np.savez(foreign, mu=mu.astype(np.float32), sigma=sigma)
    got = metrics.load_reference_stats(foreign, mode="tf1", weights_sha256="cd" * 32)
    assert got.mode is None and got.n is None and got.mu.dtype == np.float64


def test_cached_reference_stats_computes_once(tmp_path):
    path = str(tmp_path / "cache" / "ref.npz")
    calls = []

    def compute():
        calls.append(1)
        return np.zeros(2048), np.eye(2048), 10

    first = metrics.cached_reference_stats(path, compute, mode="tf1", weights_sha256="ab" * 32)
    second = metrics.cached_reference_stats(path, compute, mode="tf1", weights_sha256="ab" * 32)
    assert len(calls) == 1 and second.n == first.n == 10
    with pytest.raises(MetricsError, match="computed with --mode=tf1"):
        metrics.cached_reference_stats(path, compute, mode="pytorch_fid", weights_sha256="ab" * 32)


# -- the weight file and the network ---------------------------------------------------------------
@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """(converted file of random weights, their PyTorch-layout tensors)."""
    tensors = bench.random_tensors(seed=0)
    path = str(tmp_path_factory.mktemp("inception") / "random.safetensors")
    weights.save_tensors(tensors, path, "0" * 64)
    return path, tensors


def test_converted_file_round_trips_bit_exact(random_weights):
    path, tensors = random_weights
    stored = load_file(path)
    assert set(stored) == set(tensors)
    for name, value in tensors.items():
        assert stored[name].dtype == np.float32
        np.testing.assert_array_equal(stored[name], value)
    assert metrics.weights_sha256(path) == "0" * 64 and not metrics.is_official("0" * 64)
    params = metrics.load_weights(path)
    conv = params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]  # [kh, kw, in, out] = [1, 7, ...]
    np.testing.assert_array_equal(
        conv, tensors["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["kernel"], tensors["fc.weight"].T)
    np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  tensors["Mixed_7c.branch_pool.bn.running_var"])


def test_features_shapes_padding_and_grey(random_weights, monkeypatch):
    path, _ = random_weights
    rng = np.random.default_rng(9)
    grey = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    rgb = np.repeat(grey, 3, axis=-1)
    monkeypatch.setenv(weights.ENV_VAR, path)  # weights found through the environment
    done = []
    three = metrics.inception_features(rgb, batch_size=2, progress=done.append)  # pads 3 -> 4
    assert done == [2, 3]
    assert {k: (v.shape, v.dtype) for k, v in three.items()} == {
        "pool3": ((3, 2048), np.float32), "logits": ((3, 1008), np.float32),
        "logits_unbiased": ((3, 1008), np.float32), "spatial": ((3, 2023), np.float32)}
    assert 0.05 < three["pool3"].mean() < 5  # activations of order one (not vanishing)
    np.testing.assert_allclose(three["logits"] - three["logits_unbiased"],
                               np.broadcast_to(load_file(path)["fc.bias"], (3, 1008)), atol=1e-5)
    # Grey images are RGB images with three equal channels; batch size changes nothing.
    grey_out = metrics.inception_features(grey[1:], weights=path, batch_size=2)
    for k in inception.OUTPUTS:
        assert _rel(grey_out[k], three[k][1:]) <= 1e-6, k
    assert metrics.inception_features(rgb[:0], weights=path)["pool3"].shape == (0, 2048)


SHARDED = """
import sys
import jax
import numpy as np
from ddpm_jax import metrics
images = np.load(sys.argv[1])["images"]
assert jax.device_count() == 2
out = metrics.inception_features(images, weights=sys.argv[2], batch_size=3)  # 4 rows: 2 + 2
np.savez(sys.argv[3], **out)
"""


def test_sfid_features_are_the_first_7_channels_of_mixed_6d_1x1(random_weights):
    """guided-diffusion's ``mixed_6/conv:0`` = Mixed_6d.branch1x1 after its ReLU, [..., :7],
    flattened: recomputed here in float64 from the weight file's tensors."""
    import jax.numpy as jnp
    from flax import nnx

    from ddpm_jax.metrics import network

    path, tensors = random_weights
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = metrics.inception_features(images, weights=path)["spatial"]
    model = nnx.merge(network.abstract_model()[0], metrics.load_weights(path))
    x = network.preprocess(jnp.asarray(images), "tf1")
    x = network._chain(x, model.Conv2d_1a_3x3, model.Conv2d_2a_3x3, model.Conv2d_2b_3x3)
    x = network.max_pool(x, stride=2)
    x = network._chain(x, model.Conv2d_3b_1x1, model.Conv2d_4a_3x3)
    x = network.max_pool(x, stride=2)
    x = network._chain(x, model.Mixed_5b, model.Mixed_5c, model.Mixed_5d, model.Mixed_6a,
                       model.Mixed_6b, model.Mixed_6c)
    x = np.asarray(x, np.float64)  # [2, 17, 17, 768]: Mixed_6d's input

    def branch(block, channels):
        t = {k.split(f"{block}.branch1x1.")[1]: v.astype(np.float64) for k, v in
             tensors.items() if k.startswith(f"{block}.branch1x1.")}
        y = x @ t["conv.weight"][:, :, 0, 0].T  # a 1x1 convolution, [2, 17, 17, 192]
        y = (y - t["bn.running_mean"]) / np.sqrt(t["bn.running_var"] + 1e-3)
        y = np.maximum(y * t["bn.weight"] + t["bn.bias"], 0.0)
        return y[..., channels].reshape(2, -1)

    want = branch("Mixed_6d", slice(0, 7))
    assert got.shape == (2, 17 * 17 * 7) and _rel(got, want) <= 1e-5
    # Another block or other channels are far off (the comparison can fail).
    assert _rel(got, branch("Mixed_6d", slice(1, 8))) > 0.1
    assert _rel(got, branch("Mixed_6e", slice(0, 7))) > 0.1
    # sFID is the Fréchet distance of these features (float64 scipy reference).
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.3, 1.2, size=(30, 6))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (a, b)]
    assert metrics.frechet_distance(*stats[0], *stats[1]) == pytest.approx(
        _fid_sqrtm(*stats[0], *stats[1]), rel=1e-10)


def test_features_sharded_over_two_devices(random_weights, tmp_path):
    path, _ = random_weights
    images = np.random.default_rng(10).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    proc = run_python(["-c", SHARDED, str(tmp_path / "images.npz"), path,
                       str(tmp_path / "out.npz")], devices=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = np.load(tmp_path / "out.npz")
    single = metrics.inception_features(images, weights=path, batch_size=2)
    for k in inception.OUTPUTS:
        assert _rel(sharded[k], single[k]) <= 1e-6, k


# -- bad input: one line each, before any compile --------------------------------------------------
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_weight_files(random_weights, tmp_path, monkeypatch):
    path, tensors = random_weights
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(MetricsError) as e:
        metrics.load_weights(missing)
    assert "python -m ddpm_jax.metrics.convert --source=PTH" in _one_line(e)
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    with pytest.raises(MetricsError, match=weights.ENV_VAR):
        metrics.inception_features(np.zeros((1, 8, 8, 3), np.uint8))
    bad = dict(tensors)
    bad["Mixed_6e.branch7x7_3.conv.weight"] = np.zeros((192, 192, 1, 7), np.float32)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata={"source_sha256": "0" * 64})
    with pytest.raises(MetricsError) as e:
        metrics.load_weights(str(tmp_path / "shape.safetensors"))
    assert "Mixed_6e.branch7x7_3.conv.weight" in _one_line(e) and "(192, 192, 7, 1)" in str(e.value)
    del bad["Mixed_6e.branch7x7_3.conv.weight"]
    save_file(bad, str(tmp_path / "lacks.safetensors"), metadata={"source_sha256": "0" * 64})
    with pytest.raises(MetricsError, match="lacks tensor Mixed_6e.branch7x7_3.conv.weight"):
        metrics.load_weights(str(tmp_path / "lacks.safetensors"))
    (tmp_path / "weights.pth").write_bytes(b"a pickle")
    with pytest.raises(MetricsError, match="is a PyTorch file, which is never unpickled") as e:
        metrics.load_weights(str(tmp_path / "weights.pth"))
    assert "--out=" + str(tmp_path / "weights.safetensors") in _one_line(e)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MetricsError) as e:
        metrics.load_weights(str(tmp_path / "junk.safetensors"))
    assert "not a safetensors file" in _one_line(e)


def test_bad_images_and_modes(random_weights):
    path, _ = random_weights
    for images, match in ((np.zeros((2, 8, 8, 3), np.float32), "must be uint8"),
                          (np.zeros((8, 8, 3), np.uint8), "NHWC"),
                          (np.zeros((2, 8, 8, 4), np.uint8), "NHWC")):
        with pytest.raises(MetricsError, match=match) as e:
            metrics.inception_features(images, weights=path)
        _one_line(e)
    with pytest.raises(MetricsError, match="unknown Inception preprocessing mode"):
        metrics.inception_features(np.zeros((1, 8, 8, 3), np.uint8), weights=path, mode="clean")


def test_bad_statistics_and_metric_inputs(tmp_path):
    np.savez(tmp_path / "feats.npz", feats=np.zeros((3, 2048)))
    with pytest.raises(MetricsError, match="no 'mu' and 'sigma'") as e:
        metrics.load_reference_stats(str(tmp_path / "feats.npz"))
    _one_line(e)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(MetricsError, match=r"expected mu \(2048,\)") as e:
        metrics.load_reference_stats(str(tmp_path / "small.npz"))
    _one_line(e)
    np.savez(tmp_path / "pickled.npz", mu=np.array([{}], dtype=object), sigma=np.eye(2))
    with pytest.raises(MetricsError, match="cannot read") as e:
        metrics.load_reference_stats(str(tmp_path / "pickled.npz"))
    _one_line(e)
    with pytest.raises(MetricsError, match="no statistics file"):
        metrics.load_reference_stats(str(tmp_path / "absent.npz"))
    with pytest.raises(MetricsError, match="subsets of 1000 images need") as e:
        metrics.kernel_inception_distance(np.zeros((999, 8)), np.zeros((5000, 8)))
    _one_line(e)
    with pytest.raises(MetricsError, match="different dimensions"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricsError, match="at least one image per split"):
        metrics.inception_score(np.zeros((5, 1008)), splits=10)
    with pytest.raises(MetricsError, match="at least 2 images"):
        _ = metrics.FeatureStats(4).update(np.zeros((1, 4))).sigma
    with pytest.raises(MetricsError, match=r"features must be \[B, 4\]"):
        metrics.FeatureStats(4).update(np.zeros((2, 5)))


def test_convert_refuses_other_weights_in_one_line(tmp_path):
    source = tmp_path / "other.pth"
    source.write_bytes(b"some other weights")
    out = tmp_path / "out.safetensors"
    proc = run_python(["-m", "ddpm_jax.metrics.convert", f"--source={source}", f"--out={out}"],
                      timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "6726825d" in lines[0]
    assert "--allow_other_weights" in lines[0] and not out.exists()
    from ddpm_jax.metrics import convert  # imports without torch

    with pytest.raises(MetricsError, match="give exactly one of"):
        convert.convert_command(out=str(out))
    with pytest.raises(MetricsError, match="give exactly one of"):
        convert.convert_command(out=str(out), source=str(source), download_source=True)
    with pytest.raises(MetricsError, match="no weight file at"):
        convert.convert_command(out=str(out), source=str(tmp_path / "absent.pth"))
    with pytest.raises(MetricsError, match="cannot download"):
        convert.download("http://127.0.0.1:9/none.pth", str(tmp_path / "x.pth"), timeout=5)
    assert not os.path.exists(tmp_path / "x.pth.part")


def test_frechet_distance_closed_form():
    # N(0, I) vs N(1, 4 I) in 2-D: |d|^2 = 2, tr S1 = 2, tr S2 = 8, tr (S1 S2)^(1/2) = tr 2 I = 4.
    fid = scores.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2) * 4)
    assert fid == pytest.approx(2 + 2 + 8 - 2 * 4, rel=1e-12)


def test_fid_network_matches_torch_fidelity_without_torch(tmp_path):
    # tests/data/inception_reference.npz: torch-fidelity's outputs for two images under weights
    # drawn from a seed (tests/scripts/inception_reference.py writes it; test_metrics_torch.py
    # checks that it still does). The two preprocessing modes differ by ~5e-4 here.
    from conftest import script_module

    from ddpm_jax.metrics import weights as weights_lib

    ir = script_module("inception_reference")
    path = str(tmp_path / "w.safetensors")
    weights_lib.save_tensors(ir.weights(), path, "random-weights")
    ours = metrics.inception_features(ir.images(), weights=path, batch_size=2)
    for key, ref in ir.reference().items():
        r = ref.astype(np.float64)
        assert np.abs(ours[key] - r).max() / np.abs(r).max() < 5e-6, key
