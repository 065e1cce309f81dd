"""python -m ddpm_jax.evaluate: the bound on a real split, written as JSON."""

import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import command_flags, completed_here, initial_params, run_script_here

from configs import test as test_config
from ddpm_jax import checkpoints, datasets


def test_evaluate_writes_the_bound_of_the_test_split(digits_dir, tmp_path):
    config = test_config.get_config()
    config.data.data_dir = digits_dir
    params = initial_params(config, 0)
    checkpoints.save_weights(str(tmp_path), config, params)
    proc = completed_here("-m", "ddpm_jax.evaluate", f"--workdir={tmp_path}", "--num_examples=6",
                          "--batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(tmp_path, "bpd_test.json")))
    assert result["num_examples"] == 6 and result["split"] == "test"
    # total = prior + decoder + sum of the KL terms (means over the same images).
    parts = result["prior_bpd"] + result["decoder_bpd"] + result["terms_bpd_sum"]
    np.testing.assert_allclose(result["bits_per_dim"], parts, rtol=1e-5)
    assert 0 < result["bits_per_dim"] < 100 and result["stderr"] > 0
    assert "bits/dim" in proc.stdout


def test_evaluate_refuses_a_missing_checkpoint(tmp_path):
    proc = completed_here("-m", "ddpm_jax.evaluate", f"--workdir={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "error: no checkpoint at" in proc.stderr


# -- FID, IS and KID end to end --------------------------------------------------------------------
LIBRARY_SAMPLES = dict(num_samples=12, sample_batch_size=12, inception_batch_size=16, is_splits=2,
                       kid_subsets=4, kid_subset_size=10)
SAMPLE_FLAGS = [f"--{k}={v}" for k, v in LIBRARY_SAMPLES.items()]
REF_N = 12  # reference images: as many as samples, enough for KID's subsets of 10


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
    checkpoints.save_weights(workdir, config, initial_params(config, 0))
    tensors = bench.random_tensors(seed=0)
    ours, other = str(root / "inception.safetensors"), str(root / "other.safetensors")
    weights.save_tensors(tensors, ours, "0" * 64)
    weights.save_tensors(tensors, other, "1" * 64)
    return workdir, config.data.data_dir, ours, other


def _evaluate(*args, weights=None):
    env = {"DDPM_JAX_INCEPTION_WEIGHTS": weights} if weights else None
    return completed_here("-m", "ddpm_jax.evaluate", *args, env=env)


def _frechet_few(x, mu2, sigma2):
    """The Frechet distance from the n feature rows ``x`` (n much less than their dimension) to
    N(mu2, sigma2), in float64 without a d x d square root: with sigma1 = A^T A, A the centred
    rows over sqrt(n - 1), tr sqrt(sigma1^1/2 sigma2 sigma1^1/2) is the sum of the square roots
    of the eigenvalues of the n x n matrix A sigma2 A^T (the same non-zero eigenvalues)."""
    x = np.asarray(x, np.float64)
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    root = np.sqrt(np.clip(np.linalg.eigvalsh(a @ sigma2 @ a.T), 0, None)).sum()
    return float(np.sum((x.mean(0) - mu2) ** 2) + np.sum(a * a) + np.trace(sigma2) - 2 * root)


def test_evaluate_fid_is_kid_bpd_end_to_end(tiny_run, capsys):
    import ddpm_jax
    from ddpm_jax import evaluate, metrics

    workdir, data_dir, weights, _ = tiny_run
    out = os.path.join(workdir, "eval1.json")
    proc = _evaluate(f"--workdir={workdir}", "--metrics=fid,is,kid,bpd,sfid,precision,recall",
                     *SAMPLE_FLAGS,
                     "--ref=digits:train", f"--ref_num_examples={REF_N}", "--num_examples=4",
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
    assert p["reference"]["n"] == REF_N and p["reference"]["reused_cache"] is False
    assert "not comparable with published" in proc.stdout
    # The samples are sample.py's file, and the scores are those of the library on them.
    samples = np.load(os.path.join(workdir, "samples.npz"))["images"]
    assert samples.shape == (12, 8, 8, 1)
    cache = p["reference"]["stats_file"]
    ref = metrics.load_reference_stats(cache, mode="tf1", weights_sha256="0" * 64)
    assert ref.n == REF_N
    # The command's batch of 16: the programs it compiled (the persistent cache).
    feats = metrics.inception_features(samples, weights=weights, batch_size=16)
    np.testing.assert_allclose(result["fid"], _frechet_few(feats["pool3"], ref.mu, ref.sigma),
                               rtol=1e-5)
    np.testing.assert_allclose(
        (result["is_mean"], result["is_std"]),
        metrics.inception_score(feats["logits_unbiased"], splits=2), rtol=1e-5)
    # sFID: the spatial features against the reference's cached spatial statistics (float64
    # numpy); precision / recall in pool3 against the reference images' features.
    assert p["precision_recall_features"] == "inception_pool3" and p["precision_recall_k"] == 3
    spatial = metrics.load_reference_stats(p["sfid_stats_file"], dim=2023, mode="tf1",
                                           weights_sha256="0" * 64)
    assert spatial.n == REF_N
    np.testing.assert_allclose(result["sfid"],
                               _frechet_few(feats["spatial"], spatial.mu, spatial.sigma), rtol=1e-5)
    ref_config = test_config.get_config()
    ref_config.data.data_dir = data_dir
    ref_images = datasets.load_split(datasets.DataSpec.from_config(ref_config), "train", REF_N)
    ref_feats = metrics.inception_features(ref_images, weights=weights, batch_size=16)
    s_ref = ref_feats["spatial"].astype(np.float64)
    np.testing.assert_allclose(spatial.mu, s_ref.mean(0), rtol=1e-4, atol=1e-6)
    assert (result["precision"], result["recall"]) == pytest.approx(
        metrics.precision_recall(ref_feats["pool3"], feats["pool3"], k=3), abs=1e-9)
    # The cached pool3 statistics are those of the reference images' own features, and KID is
    # the unbiased cubic-kernel MMD^2 of the samples' and the references' features over the
    # recorded subsets (the draws: samples first, then references, default_rng(seed)).
    r64, f64 = ref_feats["pool3"].astype(np.float64), feats["pool3"].astype(np.float64)
    np.testing.assert_allclose(ref.mu, r64.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(r64, rowvar=False), rtol=1e-3, atol=1e-6)
    rng, m, d = np.random.default_rng(p["kid_seed"]), p["kid_subset_size"], r64.shape[1]
    mmd2 = []
    for _ in range(p["kid_subsets"]):
        x, y = f64[rng.choice(len(f64), m, replace=False)], r64[rng.choice(REF_N, m, replace=False)]
        k = lambda a, b: (a @ b.T / d + 1.0) ** 3
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        off = lambda q: (q.sum() - np.trace(q)) / (m * (m - 1))
        mmd2.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    np.testing.assert_allclose((result["kid_mean"], result["kid_std"]),
                               (np.mean(mmd2), np.std(mmd2)), rtol=1e-6, atol=1e-12)

    # Again, through the library (no flags): the samples and the reference statistics are
    # reused, and the numbers are the same.
    capsys.readouterr()
    spec = evaluate.EvalSpec(metrics=("fid", "is"), **LIBRARY_SAMPLES, ref="digits:train",
                             ref_num_examples=REF_N, inception_weights=weights)
    again = evaluate.evaluate(ddpm_jax.load(workdir), spec, samples_dir=workdir)
    captured = capsys.readouterr()
    assert "reusing" in captured.out and "reference digits:train" not in captured.err
    assert again["provenance"]["reference"]["reused_cache"] is True
    assert again["fid"] == result["fid"] and again["is_mean"] == result["is_mean"]
    assert again["provenance"]["sample_seed"] == 0 and "kid_mean" not in again

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


def _refusal(args) -> str:
    """What ``python -m ddpm_jax.evaluate ARGS`` prints after ``error:`` when it refuses (exit
    code 2), run in this process (every refusal comes before anything compiles, so this takes a
    second). A message of several lines comes back whole."""
    code, _, err = run_script_here("-m", "ddpm_jax.evaluate", *args)
    assert code == 2 and "error: " in err, err[-2000:]
    return err[err.rindex("error: ") + len("error: "):].rstrip("\n")


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


# -- the library, piece by piece (no flags, nothing compiled) ------------------------------------
def test_eval_spec_checks_and_normalises_the_metrics():
    from ddpm_jax import evaluate

    spec = evaluate.EvalSpec(metrics=["FID", " is", "fid", "recall"], sampler={"num_steps": 5})
    assert spec.metrics == ("fid", "is", "recall") and spec.sampler == (("num_steps", 5),)
    assert spec.inception_metrics == ("fid", "is", "recall") and spec.pr_space == "inception"
    digits = evaluate.EvalSpec(metrics=("digits_fd", "precision", "bpd"))
    assert digits.pr_space == "digits" and digits.inception_metrics == ()
    assert digits.wants_samples and not evaluate.EvalSpec().wants_samples
    with pytest.raises(evaluate.EvaluationError, match=r"unknown or empty \(fd\)"):
        evaluate.EvalSpec(metrics=("fid", "fd"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_samples = 3


def test_another_data_dir_is_a_new_model():
    from ddpm_jax import api, evaluate

    config = test_config.get_config()
    config.lock()
    model = api.DDPM(config, None, {"w": 1}, None, None)
    moved = evaluate.with_data_dir(model, "/elsewhere")
    assert moved.config.data.data_dir == "/elsewhere" and moved.params is model.params
    assert model.config.data.data_dir == test_config.get_config().data.data_dir
    assert evaluate.with_data_dir(model, None) is model


def _record(**changes):
    record = dict(checkpoint="/run/checkpoints", checkpoint_step=4, ema=True, num_samples=12,
                  batch_size=12, seed=0, sampler="ancestral", num_steps=50, image_shape=[8, 8, 1])
    return record | changes


@pytest.mark.parametrize("made, want, reused", [
    (_record(), _record(), True),
    (_record(num_samples=20, batch_size=5), _record(), True),  # more images, other batches
    (_record(num_samples=6), _record(), False),  # too few
    (_record(seed=1), _record(), False),
    (_record(ema=False), _record(), False),
    (_record(checkpoint="/other/checkpoints"), _record(), False),
    ({k: v for k, v in _record().items() if k != "num_steps"}, _record(), False),  # older file
])
def test_samples_are_reused_only_with_the_same_settings(tmp_path, made, want, reused):
    from ddpm_jax import files, generate

    files.write_json(tmp_path / "samples.json", made)
    (tmp_path / "samples.npz").write_bytes(b"")
    assert (generate.find_reusable(tmp_path, want) == made) is reused
    assert generate.find_reusable(tmp_path / "nothing", want) is None


def test_record_changes_name_the_fields():
    from ddpm_jax import generate

    assert generate.record_changes(None, _record()) is None
    assert generate.record_changes(_record(), _record()) == ""
    assert generate.record_changes(_record(seed=1, batch_size=3), _record()) == (
        "batch_size: 3 -> 12, seed: 1 -> 0")
    assert generate.record_changes(_record(batch_size=3), _record(), ignore=("batch_size",)) == ""


def test_bits_per_dim_leaves_out_the_padding():
    from ddpm_jax import evaluation

    def bound_terms(batch, key):  # every image's bound is its first pixel
        v = batch[:, 0, 0, 0].astype(np.float32)
        return dict(total_bpd=v, terms_bpd=np.stack([v / 2, v / 4, v / 4], 1), prior_bpd=v * 0)

    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
    out = evaluation.bits_per_dim(bound_terms, images, batch_size=4, seed=0)
    assert out["num_examples"] == 5 and out["bits_per_dim"] == pytest.approx(2.0)
    assert out["decoder_bpd"] == pytest.approx(1.0) and out["terms_bpd_sum"] == pytest.approx(1.0)
    assert out["stderr"] == pytest.approx(np.std(np.arange(5), ddof=1) / np.sqrt(5))


def test_reference_features_read_the_reference_once_then_the_cache(tmp_path):
    from ddpm_jax import evaluation, metrics

    class Net:  # stands for evaluation.Inception: pool3 and sFID statistics of fixed features
        mode, sha256 = "tf1", "ab" * 32
        passes = 0

        def features(self, batches, total, *, what, keep_pool3=False, spatial=False, **_):
            Net.passes += 1
            rng = np.random.default_rng(0)
            stats, sp = metrics.FeatureStats(2048), metrics.FeatureStats(2023)
            pool3 = rng.normal(size=(total, 2048))
            stats.update(pool3)
            sp.update(rng.normal(size=(total, 2023)))
            return evaluation.Features(stats, sp if spatial else None,
                                       pool3 if keep_pool3 else None, None, 0.0)

    path = tmp_path / "stats" / "train_8px_tf1_abab.npz"
    first = evaluation.reference_features(Net(), lambda: [], 6, path, what="ref", sfid=True)
    assert Net.passes == 1 and first.stats.n == 6 and first.spatial.mu.shape == (2023,)
    assert first.pool3 is None and evaluation.spatial_stats_path(path).exists()
    again = evaluation.reference_features(Net(), lambda: [], 6, path, what="ref", sfid=True)
    assert Net.passes == 1  # both from the cache
    np.testing.assert_array_equal(again.spatial.sigma, first.spatial.sigma)
    kept = evaluation.reference_features(Net(), lambda: [], 6, path, what="ref", keep_pool3=True)
    assert Net.passes == 2 and kept.pool3.shape == (6, 2048) and kept.spatial is None


def test_the_spec_defaults_are_the_flag_defaults():
    from ddpm_jax import evaluate

    fields = [f for f in dataclasses.fields(evaluate.EvalSpec) if f.name != "sampler"]
    assert len(fields) == 18
    with command_flags() as flag_values:
        evaluate.define_flags()
        for f in fields:
            default = flag_values[f.name].default
            assert (tuple(default) if f.name == "metrics" else default) == f.default, f.name
