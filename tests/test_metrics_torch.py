"""Parity of ddpm_jax.metrics with torch-fidelity 0.4.0 (the torch extra; skipped without it).

torch-fidelity's ``FeatureExtractorInceptionV3`` is the FID Inception in PyTorch, with TF 1.x's
resize ported exactly; it is imported without its package ``__init__`` (which needs
torchvision). Both networks get the same random weights, written as a ``.pth`` and converted by
our converter: He-scaled convolutions, BatchNorm running statistics measured on a calibration
batch, so every layer's activations are of order one (a real test of every block, not of
near-zero numbers), and random BatchNorm affines with scale in [0.5, 1] and shift in [0.5, 1].
The positive shifts keep most units active, so the random network damps float32 rounding from
block to block instead of amplifying it (with zero-mean shifts each block amplifies it ~1.5x and
torch's own float32 features drift 5e-5 from float64), while the features still differ by tens
of percent between images and between the two preprocessing modes.
"""

import copy

import numpy as np
import pytest

from ddpm_jax import metrics
from ddpm_jax.benchmarks import inception as bench
from ddpm_jax.metrics import convert, network, scores

torch = pytest.importorskip("torch")
if not bench.have_torch_fidelity():
    pytest.skip("needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0",
                allow_module_level=True)
F = torch.nn.functional

OUTPUTS = ("pool3", "logits_unbiased", "logits")  # torch-fidelity's order
TOLERANCE = 1e-5  # relative to each output's largest magnitude
TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
         "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
         "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
         "AvgPool")


def _rel(a, b) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _nchw(images: np.ndarray):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch-fidelity extractor, converted file, test images): calibrated random weights."""
    tmp = tmp_path_factory.mktemp("inception_torch")
    rng = np.random.default_rng(11)
    tensors = bench.random_tensors(seed=11)
    for name in tensors:
        if name.endswith("bn.weight"):
            tensors[name] = rng.uniform(0.5, 1.0, tensors[name].shape).astype(np.float32)
        elif name.endswith("bn.bias"):
            tensors[name] = rng.uniform(0.5, 1.0, tensors[name].shape).astype(np.float32)
    tensors["fc.bias"] = rng.normal(size=1008).astype(np.float32)
    bench.save_pth(tensors, str(tmp / "init.pth"))
    extractor = bench.torch_fidelity_extractor(str(tmp / "init.pth"))
    # Running statistics := the statistics of a calibration batch (momentum None: a plain mean
    # over the one batch), so that BatchNorm outputs have unit scale.
    for m in extractor.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    extractor.train()
    with torch.no_grad():
        extractor(_nchw(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)))
    extractor.eval()
    torch.save(extractor.state_dict(), tmp / "calibrated.pth")  # num_batches_tracked too
    out = str(tmp / "calibrated.safetensors")
    info = convert.convert_file(str(tmp / "calibrated.pth"), out, allow_other_weights=True)
    assert not info["official"] and metrics.weights_sha256(out) == info["sha256"]
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return extractor, out, images


def _trunk(extractor, x):
    """The extractor's layers after its preprocessing: [N, 3, 299, 299] -> three outputs."""
    for name in TRUNK:
        x = getattr(extractor, name)(x)
    pool3 = torch.flatten(x, 1)
    unbiased = pool3.mm(extractor.fc.weight.T)
    return pool3, unbiased, unbiased + extractor.fc.bias


def test_converter_is_bit_exact(setup):
    from safetensors.numpy import load_file

    extractor, out, _ = setup
    stored = load_file(out)
    state = {k: v for k, v in extractor.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert len(state) == len(stored) == 472
    for name, value in state.items():
        np.testing.assert_array_equal(stored[name], value.numpy())


def _float64(extractor):
    """The same extractor computing in float64 (torch-fidelity's internal-dtype option)."""
    twin = copy.deepcopy(extractor).double()
    twin.feature_extractor_internal_dtype = torch.float64
    return twin


def _check(ours: dict, ref32, ref64, what: str) -> None:
    """Our float32 outputs against the float32 and float64 references (pool3, logits)."""
    vs64 = {k: _rel(ours[k], r) for k, r in zip(OUTPUTS, ref64, strict=True)}
    vs32 = {k: _rel(ours[k], r) for k, r in zip(OUTPUTS, ref32, strict=True)}
    own = {k: _rel(r32, r64) for k, r32, r64 in zip(OUTPUTS, ref32, ref64, strict=True)}
    print(f"\n{what}: max relative error vs float64 {vs64}; vs float32 {vs32}; the float32 "
          f"reference's own vs float64 {own}")
    # As accurate as the float32 reference itself, and within 1e-5 of the exact features;
    # two float32 computations each a few 1e-6 off float64 differ by up to the sum.
    for k in OUTPUTS:
        assert vs64[k] <= TOLERANCE and vs64[k] <= 2 * own[k] + 1e-6, (k, vs64, own)
        assert vs32[k] <= 2 * TOLERANCE, (k, vs32)


def test_tf1_mode_matches_torch_fidelity(setup):
    extractor, out, images = setup
    with torch.no_grad():
        ref32 = [t.numpy() for t in extractor(_nchw(images))]  # pool3, logits_unbiased, logits
        ref64 = [t.numpy() for t in _float64(extractor)(_nchw(images))]
    assert 0.1 < ref32[0].mean() < 10  # activations of order one
    ours = metrics.inception_features(images, weights=out, mode="tf1", batch_size=2)
    _check(ours, ref32, ref64, "tf1 vs torch-fidelity's FeatureExtractorInceptionV3")
    # The test's teeth: the other resize convention, or another image, is far off.
    other = metrics.inception_features(images, weights=out, mode="pytorch_fid", batch_size=2)
    assert _rel(other["pool3"], ref64[0]) > 1e-2 and _rel(ours["pool3"][::-1], ref64[0]) > 1e-2


def _pytorch_fid_input(images: np.ndarray, dtype):
    """pytorch-fid's preprocessing: 2 * interpolate(x / 255, half-pixel bilinear) - 1."""
    x = _nchw(images).to(dtype) / 255
    return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1


def test_pytorch_fid_mode_matches_torch_layers(setup):
    extractor, out, images = setup
    (mod,) = bench.import_torch_fidelity("torch_fidelity.interpolate_compat_tensorflow")
    x = _nchw(images).float()
    with torch.no_grad():
        # The trunk is the extractor's own forward after its TF1 preprocessing ...
        tf1 = mod.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299),
                                                            align_corners=False)
        for a, b in zip(_trunk(extractor, (tf1 - 128) / 128), extractor(_nchw(images)),
                        strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        # ... so pytorch-fid's features are the trunk on pytorch-fid's input.
        ref32 = [t.numpy() for t in _trunk(extractor, _pytorch_fid_input(images, torch.float32))]
        ref64 = [t.float().numpy() for t in
                 _trunk(_float64(extractor), _pytorch_fid_input(images, torch.float64))]
    ours = metrics.inception_features(images, weights=out, mode="pytorch_fid", batch_size=2)
    _check(ours, ref32, ref64, "pytorch_fid vs the same layers on pytorch-fid's input")


def test_resizes_match_torch():
    (mod,) = bench.import_torch_fidelity("torch_fidelity.interpolate_compat_tensorflow")
    img = np.random.default_rng(12).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    theirs = mod.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    ours = np.asarray(network.tf1_resize_bilinear(img, 299)).transpose(0, 3, 1, 2)
    assert np.max(np.abs(ours - theirs.numpy())) <= 3e-5  # 0..255; at most a few float32 ulps
    half = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
    ours = np.asarray(network.half_pixel_resize_bilinear(img / 255, 299)).transpose(0, 3, 1, 2)
    assert np.max(np.abs(ours - half.numpy())) <= 4e-6  # [0, 1]


def test_metrics_match_torch_fidelity():
    fid_mod, isc_mod, kid_mod = bench.import_torch_fidelity(
        "torch_fidelity.metric_fid", "torch_fidelity.metric_isc", "torch_fidelity.metric_kid")
    rng = np.random.default_rng(13)
    a = rng.gamma(2.0, 0.25, size=(1000, 256)) @ rng.normal(size=(256, 256)) * 0.1
    b = rng.gamma(2.1, 0.25, size=(900, 256)) @ rng.normal(size=(256, 256)) * 0.1
    sa, sb = scores.feature_statistics(a), scores.feature_statistics(b)
    theirs = fid_mod.fid_statistics_to_metric(
        {"mu": sa[0], "sigma": sa[1]}, {"mu": sb[0], "sigma": sb[1]}, False)
    fid = metrics.frechet_distance(*sa, *sb)
    assert abs(fid - theirs["frechet_inception_distance"]) <= 1e-9 * fid
    np.testing.assert_allclose(sa[1], np.cov(a, rowvar=False), rtol=1e-12, atol=1e-14)

    logits = rng.normal(size=(500, 1008)) * 4
    theirs = isc_mod.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = metrics.inception_score(logits, splits=10)
    assert abs(mean - theirs["inception_score_mean"]) <= 1e-9 * mean
    assert abs(std - theirs["inception_score_std"]) <= 1e-9 * std

    x, y = a[:200], b[:200]
    theirs = kid_mod.kernel_mmd(x, y)  # their defaults: poly, degree 3, gamma 1/d, coef0 1
    ours = scores.polynomial_mmd2(x, y)
    assert abs(ours - theirs) <= 1e-9 * abs(theirs)


def test_the_torch_free_reference_is_torch_fidelity_s(tmp_path):
    from conftest import script_module

    ir = script_module("inception_reference")
    fresh = ir.torch_outputs(str(tmp_path / "w.pth"))
    for key, ref in ir.reference().items():
        np.testing.assert_allclose(ref, fresh[key], rtol=0, atol=1e-6, err_msg=key)
