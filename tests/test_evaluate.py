"""python -m ddpm_jax.evaluate: the bound on a real split, written as JSON."""

import json
import os

import numpy as np
import pytest
from conftest import run_python

from configs import test as test_config
from ddpm_jax import checkpoints, datasets, unet


def test_evaluate_writes_the_bound_of_the_test_split(digits_dir, tmp_path):
    config = test_config.get_config()
    config.data.data_dir = digits_dir
    params = unet.split(unet.create_model(config, seed=0))[1]
    checkpoints.save_weights(str(tmp_path), config, params)
    proc = run_python(["-m", "ddpm_jax.evaluate", f"--workdir={tmp_path}", "--num_examples=6",
                       "--batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(tmp_path, "bpd_test.json")))
    assert result["num_examples"] == 6 and result["split"] == "test"
    # total = prior + decoder + sum of the KL terms (means over the same images).
    parts = result["prior_bpd"] + result["decoder_bpd"] + result["terms_bpd_sum"]
    np.testing.assert_allclose(result["bits_per_dim"], parts, rtol=1e-5)
    assert 0 < result["bits_per_dim"] < 100 and result["stderr"] > 0
    assert "bits/dim" in proc.stdout


def test_evaluate_refuses_a_missing_checkpoint(tmp_path):
    proc = run_python(["-m", "ddpm_jax.evaluate", f"--workdir={tmp_path / 'nothing'}"])
    assert proc.returncode == 2 and "error: no checkpoint at" in proc.stderr


# -- FID, IS and KID end to end --------------------------------------------------------------------
SAMPLE_FLAGS = ["--num_samples=12", "--sample_batch_size=12", "--inception_batch_size=16",
                "--is_splits=2", "--kid_subsets=4", "--kid_subset_size=10"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(workdir of a random test-config model, its own tfds data_dir (the reference statistics
    are cached there, so no other test's cache is reused), converted random Inception weights,
    the same weights under another provenance hash)."""
    from ddpm_jax.benchmarks import inception as bench
    from ddpm_jax.metrics import weights

    root = tmp_path_factory.mktemp("eval")
    config = test_config.get_config()
    config.data.data_dir = str(root / "tfds")
    workdir = str(root / "run")
    checkpoints.save_weights(workdir, config, unet.split(unet.create_model(config, seed=0))[1])
    tensors = bench.random_tensors(seed=0)
    ours, other = str(root / "inception.safetensors"), str(root / "other.safetensors")
    weights.save_tensors(tensors, ours, "0" * 64)
    weights.save_tensors(tensors, other, "1" * 64)
    return workdir, config.data.data_dir, ours, other


def _evaluate(*args, weights=None):
    env = {"DDPM_JAX_INCEPTION_WEIGHTS": weights} if weights else None
    return run_python(["-m", "ddpm_jax.evaluate", *map(str, args)], env=env)


def test_evaluate_fid_is_kid_bpd_end_to_end(tiny_run):
    from ddpm_jax import metrics

    workdir, data_dir, weights, _ = tiny_run
    out = os.path.join(workdir, "eval1.json")
    proc = _evaluate(f"--workdir={workdir}", "--metrics=fid,is,kid,bpd,sfid,precision,recall",
                     *SAMPLE_FLAGS,
                     "--ref=digits:train", "--ref_num_examples=20", "--num_examples=4",
                     "--batch_size=4", f"--out={out}", weights=weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "bpd", "sfid", "precision",
                "recall"):
        assert np.isfinite(result[key]), key
    assert result["fid"] > 0 and result["is_mean"] >= 1.0 and result["bpd"] > 0
    p = result["provenance"]
    assert p["checkpoint_step"] == 0 and p["ema"] is True and p["num_samples"] == 12
    assert p["sampler"] == "ancestral" and p["num_steps"] == 50 and p["sample_seed"] == 0
    assert p["mode"] == "tf1" and p["inception_weights_sha256"] == "0" * 64
    assert p["is_splits"] == 2 and p["kid_subsets"] == 4 and p["kid_subset_size"] == 10
    assert p["reference"]["n"] == 20 and p["reference"]["reused_cache"] is False
    assert "not comparable with published" in proc.stdout
    # The samples are sample.py's file, and the scores are those of the library on them.
    samples = np.load(os.path.join(workdir, "samples.npz"))["images"]
    assert samples.shape == (12, 8, 8, 1)
    cache = p["reference"]["stats_file"]
    ref = metrics.load_reference_stats(cache, mode="tf1", weights_sha256="0" * 64)
    assert ref.n == 20
    # The command's batch of 16: the programs it compiled (the persistent cache).
    feats = metrics.inception_features(samples, weights=weights, batch_size=16)
    mu, sigma = metrics.feature_statistics(feats["pool3"])
    np.testing.assert_allclose(result["fid"],
                               metrics.frechet_distance(mu, sigma, ref.mu, ref.sigma), rtol=1e-5)
    np.testing.assert_allclose(
        (result["is_mean"], result["is_std"]),
        metrics.inception_score(feats["logits_unbiased"], splits=2), rtol=1e-5)
    # sFID: the spatial features against the reference's cached spatial statistics (float64
    # numpy); precision / recall in pool3 against the reference images' features.
    assert p["precision_recall_features"] == "inception_pool3" and p["precision_recall_k"] == 3
    spatial = metrics.load_reference_stats(p["sfid_stats_file"], dim=2023, mode="tf1",
                                           weights_sha256="0" * 64)
    assert spatial.n == 20
    s = feats["spatial"].astype(np.float64)
    np.testing.assert_allclose(result["sfid"], metrics.frechet_distance(
        s.mean(0), np.cov(s, rowvar=False), spatial.mu, spatial.sigma), rtol=1e-5)
    ref_config = test_config.get_config()
    ref_config.data.data_dir = data_dir
    ref_images = datasets.load_split(ref_config, "train", 20)
    ref_feats = metrics.inception_features(ref_images, weights=weights, batch_size=16)
    s_ref = ref_feats["spatial"].astype(np.float64)
    np.testing.assert_allclose(spatial.mu, s_ref.mean(0), rtol=1e-4, atol=1e-6)
    assert (result["precision"], result["recall"]) == pytest.approx(
        metrics.precision_recall(ref_feats["pool3"], feats["pool3"], k=3), abs=1e-9)

    # Again (the command in this process this time): the samples and the reference statistics
    # are reused, and the numbers are the same.
    out2 = os.path.join(workdir, "eval2.json")
    stdout, stderr = _evaluate_here(f"--workdir={workdir}", "--metrics=fid,is", *SAMPLE_FLAGS,
                                    "--ref=digits:train", "--ref_num_examples=20",
                                    f"--out={out2}", f"--inception_weights={weights}")
    assert "reusing" in stdout and "reference digits:train" not in stderr
    again = json.load(open(out2))
    assert again["provenance"]["reference"]["reused_cache"] is True
    assert again["fid"] == result["fid"] and again["is_mean"] == result["is_mean"]

    # Statistics of one mode or weight file are never mixed with another's features (refused in
    # one line before anything is computed; the command's exit code and single stderr line for
    # such a refusal are checked in test_evaluate_refuses_bad_inputs_in_one_line).
    for flags_, weight_file, message in [
            (["--mode=pytorch_fid"], weights, "computed with --mode=tf1"),
            ([], tiny_run[3], "computed with other Inception weights")]:
        text = _refusal([f"--workdir={workdir}", "--metrics=fid", *SAMPLE_FLAGS,
                         f"--ref_stats={cache}", *flags_, f"--inception_weights={weight_file}",
                         f"--out={workdir}/refused.json"])
        assert message in text and "\n" not in text, text
    assert not os.path.exists(f"{workdir}/refused.json")


def _evaluate_here(*args) -> tuple[str, str]:
    """``python -m ddpm_jax.evaluate ARGS`` run in this process: (stdout, stderr)."""
    import contextlib
    import io

    from absl import flags

    from ddpm_jax import evaluate

    out, err = io.StringIO(), io.StringIO()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", *map(str, args)])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            evaluate.main()
    finally:
        flags.FLAGS.unparse_flags()
    return out.getvalue(), err.getvalue()


def _refusal(args) -> str:
    """The message of the UserError that ``python -m ddpm_jax.evaluate ARGS`` stops with, run in
    this process (every refusal comes before anything compiles, so this takes a second)."""
    from absl import flags

    from ddpm_jax import errors, evaluate

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", *args])
    try:
        with pytest.raises(errors.UserError) as excinfo:
            evaluate.main()
    finally:
        flags.FLAGS.unparse_flags()
    return str(excinfo.value)


def test_evaluate_refuses_bad_inputs_in_one_line(tiny_run, tmp_path, monkeypatch):
    workdir, data_dir, weights, _ = tiny_run
    monkeypatch.setenv("DDPM_JAX_INCEPTION_WEIGHTS", weights)
    no_mu = tmp_path / "no_mu.npz"
    np.savez(no_mu, mean=np.zeros(2048))
    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(64), sigma=np.eye(64))
    cases = [
        (["--metrics=fid,fd"], "unknown or empty (fd)"),
        (["--metrics=fid", f"--ref_stats={no_mu}"], "has no 'mu' and 'sigma'"),
        (["--metrics=fid", f"--ref_stats={small}"], "expected mu (2048,)"),
        (["--metrics=kid", f"--ref_stats={small}"], "KID needs the reference images"),
        (["--metrics=kid", "--num_samples=24", "--ref=digits:train"],
         "need at least as many samples"),
        (["--metrics=kid", *SAMPLE_FLAGS, "--ref=digits:train", "--ref_num_examples=5"],
         "need at least as many reference images"),
        (["--metrics=fid", "--ref=cifar10:train"], "the samples are 8x8 but the reference"),
        (["--metrics=fid", "--ref=digits"], "must be DATASET:SPLIT"),
        (["--metrics=fid", "--ref=digits:nosuchsplit"], "nosuchsplit"),
        (["--metrics=is", f"--inception_weights={tmp_path / 'none.safetensors'}"],
         "no Inception weights at"),
    ]
    out = tmp_path / "out.json"
    for args, message in cases:
        text = _refusal([f"--workdir={workdir}", f"--out={out}", *args])
        assert message in text and "\n" not in text, (args, text)
        assert not out.exists()
    assert not os.path.exists(os.path.join(workdir, "sample_shards"))
    # As a command: one line on stderr and exit code 2.
    proc = _evaluate(f"--workdir={workdir}", f"--out={out}", "--metrics=fid",
                     f"--ref_stats={small}", weights=weights)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [f"error: {small} holds statistics of shape mu "
                                                "(64,), sigma (64, 64); expected mu (2048,), "
                                                "sigma (2048, 2048) (pool3)"]
