"""Class conditioning and classifier-free guidance: the U-Net, the train step, the guided model
call, sampling without recompiling, the commands and their refusals, the diffusers round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import completed_here, run_command_here, run_script_here, train_program
from test_export_weights import assert_same_tree, random_params

import ddpm_jax
from configs import test as test_config
from ddpm_jax import (
    api,
    checkpoints,
    config_lib,
    diffusion,
    generate,
    sampling,
    training,
    trees,
    unet,
)
from ddpm_jax.weights import checkpoint as weights_io

K = 10


def cond_config(**overrides):
    config = test_config.get_config()
    config.unlock()
    config.model.num_classes = K
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    config.lock()
    return config


@pytest.fixture(scope="module")
def cond_model():
    """The conditional test config with every weight random (outputs depend on the label)."""
    config = cond_config()
    graphdef, _ = unet.split(unet.create_model(unet.ModelSpec.from_config(config)))
    return api.DDPM.build(config, graphdef, random_params(config, seed=0))


def _inputs(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 8, 8, 1)).astype(np.float32),
            rng.integers(0, 50, n).astype(np.int32))


# -- the U-Net -----------------------------------------------------------------------------------
def test_num_classes_0_is_the_unconditional_unet_and_k_adds_only_the_embedding():
    g0, p0 = unet.split(unet.create_model(unet.ModelSpec.from_config(test_config.get_config())))
    g1, p1 = unet.split(unet.create_model(unet.ModelSpec.from_config(cond_config())))
    flat0, flat1 = trees.flatten(p0), trees.flatten(p1)
    assert flat1.keys() - flat0.keys() == {"label_emb/embedding"}  # and nothing else changes
    # K classes + the null class, each a vector of the time embedding's width (4 ch)
    assert flat1["label_emb/embedding"].shape == (K + 1, 4 * 64)
    for path, leaf in flat0.items():  # the same draws for every other parameter
        np.testing.assert_array_equal(leaf, flat1[path], err_msg=path)
    assert unet.count_params(p1) == unet.count_params(p0) + (K + 1) * 4 * 64

    params = random_params(cond_config(), seed=1)
    uncond = {k: v for k, v in params.items() if k != "label_emb"}
    zero = dict(params, label_emb={"embedding": np.zeros_like(params["label_emb"]["embedding"])})
    x, t = _inputs()
    y = np.array([0, 3, 7, 9], np.int32)
    base = unet.apply(g0, uncond, x, t)  # eager: op for op the same computation
    np.testing.assert_array_equal(unet.apply(g1, zero, x, t, labels=y), base)
    out = unet.apply(g1, params, x, t, labels=y)
    null = unet.apply(g1, params, x, t, labels=np.full(4, K, np.int32))
    np.testing.assert_array_equal(unet.apply(g1, params, x, t), null)  # None = the null class
    assert np.abs(out - null).min() > 0  # every row's label changes it
    # A row depends on its own label only.
    other = unet.apply(g1, params, x, t, labels=np.array([0, 3, 7, 1], np.int32))
    np.testing.assert_array_equal(other[:3], out[:3])
    assert not np.array_equal(other[3], out[3])
    with pytest.raises(ValueError, match="unconditional U-Net"):
        unet.apply(g0, uncond, x, t, labels=y)


# -- training ------------------------------------------------------------------------------------
def test_label_drops_follow_the_key_at_the_configured_rate():
    labels = jnp.asarray(np.arange(20000) % K, jnp.int32)
    key = jax.random.key(0)
    dropped = np.asarray(training.drop_labels(labels, K, 0.1, key))
    drop = dropped == K
    assert abs(drop.mean() - 0.1) < 0.01  # binomial sd 0.002
    np.testing.assert_array_equal(dropped[~drop], np.asarray(labels)[~drop])
    np.testing.assert_array_equal(training.drop_labels(labels, K, 0.1, key), dropped)
    assert not np.array_equal(training.drop_labels(labels, K, 0.1, jax.random.key(1)), dropped)
    assert not (np.asarray(training.drop_labels(labels, K, 0.0, key)) == K).any()


def test_conditional_train_step_drops_the_labels_the_step_key_says(cond_model):
    config = cond_config()  # cond_run's config: train.py's compiled step (one in the cache)
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    d = diffusion.Diffusion.from_config(config)
    sections = config_lib.validate(config)
    state = training.init_train_state(jax.device_get(cond_model.params), tx)
    step = train_program(training.make_train_step(sections, cond_model.graphdef, d, tx), state)
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
    labels = np.arange(8, dtype=np.int32)

    def dropped_by(base_key):  # the rows that step 0 drops
        step_key = jax.random.fold_in(base_key, 0)
        return np.asarray(training.drop_labels(
            labels, K, config.model.cond_drop_prob,
            jax.random.fold_in(step_key, training.LABEL_DROP_STREAM))) == K

    # The first key whose step drops some rows and keeps others (both kinds are needed).
    base_key = next(k for k in map(jax.random.key, range(100))
                    if 0 < dropped_by(k).sum() < 8)
    dropped = dropped_by(base_key)
    loss = lambda y: float(step(state, (images, y), base_key)[1]["loss"])
    changed_dropped = np.where(dropped, (labels + 1) % K, labels)
    changed_kept = np.where(np.arange(8) == np.flatnonzero(~dropped)[0], (labels + 1) % K,
                            labels)
    assert loss(changed_dropped) == loss(labels)  # a dropped label is not seen
    assert loss(changed_kept) != loss(labels)  # a kept one reaches the network


@pytest.fixture(scope="module")
def cond_run(digits_dir, tmp_path_factory):
    """A 4-step run of the conditional test config (trained once for the tests below)."""
    workdir = str(tmp_path_factory.mktemp("cond") / "run")
    training.train_and_evaluate(cond_config(data__data_dir=digits_dir), workdir)
    return workdir


# Two more conditional runs (about a minute and a half on two cores): slow. The faster tests
# covering it: the unconditional resume, bit for bit (test_fault_tolerance.py), the labels read
# with their images at every reader position (test_input_pipeline.py), and the conditional run
# and its checkpoint (cond_run, used above and below).
@pytest.mark.slow
def test_a_conditional_run_resumes_bit_exactly(cond_run, digits_dir, tmp_path):
    resumed = str(tmp_path / "resumed")
    training.train_and_evaluate(cond_config(data__data_dir=digits_dir,
                                            training__num_train_steps=2), resumed)
    training.train_and_evaluate(cond_config(data__data_dir=digits_dir), resumed)
    a, b = ddpm_jax.load(cond_run, ema=False), ddpm_jax.load(resumed, ema=False)
    assert_same_tree(jax.device_get(a.params), jax.device_get(b.params))
    assert a.num_classes == K and "label_emb" in a.params
    assert os.path.exists(os.path.join(cond_run, "samples", "step_0000004.png"))


def test_sample_py_writes_the_labels_and_refuses_bad_ones(cond_run, tmp_path):
    out = str(tmp_path / "samples")
    code, _, err = run_script_here("sample.py", f"--workdir={cond_run}", f"--output_dir={out}",
                                   "--num_samples=10", "--labels=all", "--guidance=2",
                                   "--sampler=ddim", "--num_steps=2")
    assert code == 0, err[-3000:]
    with np.load(os.path.join(out, "samples.npz"), allow_pickle=False) as f:
        assert f["images"].shape == (10, 8, 8, 1) and f["labels"].dtype == np.int32
        np.testing.assert_array_equal(f["labels"], np.arange(10))
    made = json.load(open(os.path.join(out, "samples.json")))
    assert made["guidance"] == 2.0 and made["labels"] == "all" and made["num_classes"] == K
    # --churn reaches EDM's stochastic sampler and the record; elsewhere it is refused.
    churned = str(tmp_path / "churned")
    code, _, err = run_script_here("sample.py", f"--workdir={cond_run}",
                                   f"--output_dir={churned}", "--num_samples=10",
                                   "--labels=all", "--sampler=heun", "--num_steps=2",
                                   "--churn=1.5")
    assert code == 0, err[-3000:]
    made = json.load(open(os.path.join(churned, "samples.json")))
    assert made["churn"] == 1.5 and "Algorithm 2, S_churn = 1.5" in made["variant"]
    code, _, err = run_script_here("sample.py", f"--workdir={cond_run}",
                                   f"--output_dir={churned}", "--num_samples=10",
                                   "--sampler=ddim", "--churn=1")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: --churn=1.0 applies to the heun sampler only")
    code, _, err = run_script_here("sample.py", f"--workdir={cond_run}", f"--output_dir={out}",
                                   "--num_samples=10", "--labels=10")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: --labels must lie in [0, 10) (this model's classes), got values in [10, 10]")


def test_the_guidance_benchmark_and_the_class_share(cond_run, tmp_path):
    from ddpm_jax.benchmarks import guidance

    out = str(tmp_path / "g.png")
    stdout, _ = run_command_here("ddpm_jax.benchmarks.guidance", f"--workdir={cond_run}",
                                 "--num_per_class=1", "--guidance=0,2", "--num_steps=2",
                                 f"--out={out}")
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["guidance"] for r in rows] == [0.0, 2.0] and os.path.getsize(out) > 1000
    for r in rows:
        assert 0.0 <= r["min_class_share"] <= r["class_share"] <= 1.0 and r["pixel_fd"] > 0
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert r["digits_fd"] > 0 and 0.0 < r["digits_confidence"] <= 1.0
    assert rows[0]["pixel_fd"] != rows[1]["pixel_fd"]  # w changes the samples
    assert guidance.table(rows) in stdout
    # The row of w = 2 is the project's digits metric of those samples.
    import jax

    import ddpm_jax
    from ddpm_jax.metrics import digits as dm

    model = ddpm_jax.load(cond_run)
    images = model.sample(jax.random.key(0), 10, sampler="ddim", num_steps=2,
                          labels=np.arange(10, dtype=np.int32), guidance=2.0)
    want = dm.evaluate_digits(images, data_dir=model.config.data.data_dir)
    for key in ("digits_fd", "digits_fd_ratio", "precision", "recall", "digits_confidence"):
        assert rows[1][key] == pytest.approx(want[key], rel=1e-6), key
    probs = dm.digits_features(images, dm.load_reference(model.config.data.data_dir).params)
    assert rows[1]["class_share"] == pytest.approx(
        (probs["probs"].argmax(1) == np.arange(10)).mean())
    # The pixel FD of the real digits against themselves is 0; of noise, large.
    real = np.round(guidance.real_pixels() * 255).astype(np.uint8).reshape(-1, 8, 8, 1)
    assert abs(guidance.pixel_fd(real, guidance.real_pixels())) < 1e-6
    noise = np.random.default_rng(0).integers(0, 256, real.shape).astype(np.uint8)
    assert guidance.pixel_fd(noise, guidance.real_pixels()) > 1.0
    # evaluate: the share of the samples' own labels, computed from samples.npz.
    samples, out = tmp_path / "s", tmp_path / "eval.json"
    proc = completed_here("-m", "ddpm_jax.evaluate", f"--workdir={cond_run}",
                          "--metrics=digits_class_share", "--num_samples=10", "--labels=all",
                          "--guidance=1", "--sampler=ddim", "--num_steps=2",
                          f"--samples_dir={samples}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    assert result["provenance"]["guidance"] == 1.0 and result["provenance"]["labels"] == "all"

    with np.load(samples / "samples.npz") as f:
        np.testing.assert_array_equal(f["labels"], np.arange(10))  # class-balanced
        ref = dm.load_reference(ddpm_jax.load(cond_run).config.data.data_dir)
        probs = dm.digits_features(f["images"], ref.params)["probs"]
        want = (probs.argmax(1) == np.arange(10)).mean()
    assert result["digits_class_share"] == pytest.approx(want)


def test_the_conditional_configs_validate():
    from configs import cifar10, cifar10_cond, digits, digits_cond

    for base, cond in ((digits, digits_cond), (cifar10, cifar10_cond)):
        config = cond.get_config()
        config_lib.validate(config)
        assert config.model.num_classes == 10 and config.model.cond_drop_prob == 0.1
        diffs = config_lib.differences(config_lib.to_dict(base.get_config()),
                                       config_lib.to_dict(config))
        assert {k for k, _, _ in diffs} <= {"model.num_classes", "sampling.guidance"}


# -- guidance ------------------------------------------------------------------------------------
def test_guided_model_fn_is_the_formula_in_one_batched_call():
    calls = []

    def apply_fn(x, t, y):  # out = x (y + 1) + t, in closed form; 2C channels: eps, variance
        calls.append(x.shape[0])
        y = jnp.full(x.shape[0], K) if y is None else y
        out = x * (y + 1.0).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)
        return jnp.concatenate([out, -out], axis=-1)

    x, t = _inputs(3)
    y = np.array([0, 4, 9], np.int32)
    for w in (0.0, 0.5, 3.0):
        calls.clear()
        got = np.asarray(sampling.guided_model_fn(apply_fn, y, w, K, eps_channels=1)(
            jnp.asarray(x), jnp.asarray(t)))
        x64, t64 = x.astype(np.float64), t.astype(np.float64).reshape(-1, 1, 1, 1)
        cond = x64 * (y + 1.0).reshape(-1, 1, 1, 1) + t64
        uncond = x64 * (K + 1.0) + t64
        np.testing.assert_allclose(got[..., :1], (1 + w) * cond - w * uncond, rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_allclose(got[..., 1:], -cond, rtol=1e-6)  # the variance: conditional
        assert calls == [6]  # one call on the batch and its copy
    x, t = jnp.asarray(x), jnp.asarray(t)
    np.testing.assert_array_equal(  # no labels: the network as it is
        sampling.guided_model_fn(apply_fn, None, 0.0, K)(x, t), apply_fn(x, t, None))


@pytest.mark.parametrize("sampler", ["ddim", "ancestral", "dpm_solver++", "heun"])
def test_guidance_changes_samples_without_recompiling(cond_model, sampler):
    steps, n = 3, 8
    spec = sampling.SamplerSpec(sampler, steps)
    fn = sampling.get_sampling_fn(cond_model.graphdef, spec, (n,) + cond_model.image_shape,
                                  cond_model.mesh, sampling.guided_network_fn)
    y = np.arange(n, dtype=np.int32) % K
    key = jax.random.key(0)
    outs = {}
    for w in (0.0, 1.0, 4.0):
        outs[w] = cond_model.sample(key, n, sampler=sampler, num_steps=steps, labels=y,
                                    guidance=w)
        assert fn._cache_size() == 1  # one compilation for every w
    assert not np.array_equal(outs[0.0], outs[1.0]) and not np.array_equal(outs[1.0], outs[4.0])
    if sampler == "ddim":  # the compiled chain against two separate calls of the network
        d, g, p = cond_model.diffusion, cond_model.graphdef, cond_model.params

        def two_calls(x, t, w=4.0):
            cond = unet.apply(g, p, x, t, labels=jnp.asarray(y))
            uncond = unet.apply(g, p, x, t, labels=jnp.full(n, K, jnp.int32))
            return (1 + w) * cond - w * uncond

        ref = jax.jit(lambda k: jax.tree.map(ddpm_jax.images.to_uint8, sampling.chain(
            d, two_calls, k, (n,) + cond_model.image_shape, spec)))(
            jax.random.fold_in(key, 0))
        assert np.abs(np.asarray(ref, int) - outs[4.0].astype(int)).max() <= 1


def test_bad_conditioning_requests_are_refused_in_one_line(cond_model):
    with pytest.raises(config_lib.ConfigError, match=r"--guidance=1.0 needs --labels"):
        api.check_labels(None, 1.0, 4, K, prefix="--")
    with pytest.raises(config_lib.ConfigError, match="this model is unconditional"):
        api.check_labels(np.zeros(4, int), 0.0, 4, 0, prefix="--")
    with pytest.raises(config_lib.ConfigError, match=r"labels must lie in \[0, 10\)"):
        cond_model.sample(jax.random.key(0), 2, labels=[0, 10])
    with pytest.raises(config_lib.ConfigError, match=r"guidance must be a finite number >= 0"):
        cond_model.sample(jax.random.key(0), 2, labels=[0, 1], guidance=-1.0)
    with pytest.raises(config_lib.ConfigError, match=r"one per sample \(\[2\]\)"):
        cond_model.sample(jax.random.key(0), 2, labels=[0, 1, 2])
    assert generate.parse_labels("3", 4, K).tolist() == [3, 3, 3, 3]
    assert generate.parse_labels("0,1,2", 6, K).tolist() == [0, 1, 2, 0, 1, 2]
    assert generate.parse_labels("all", 20, K).tolist() == list(range(10)) * 2
    assert generate.parse_labels(None, 20, K) is None
    for text, n, classes, message in (
            ("all", 15, K, r"--num_samples=15 is not a multiple of 10; use e.g. "
                           r"--num_samples=10"),
            ("0,x", 4, K, r"must be a class \(3\), a comma list"),
            ("3", 4, 0, r"this model is unconditional")):
        with pytest.raises(config_lib.ConfigError, match=message):
            generate.parse_labels(text, n, classes)


# -- diffusers -----------------------------------------------------------------------------------
def test_a_conditional_model_round_trips_through_diffusers(cond_model, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = cond_model.config
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    params = jax.device_get(cond_model.params)
    checkpoints.save_weights(workdir, config, params, ema_params=params, step=1)
    weights_io.export_checkpoint(workdir, out)
    back = str(tmp_path / "back")
    weights_io.import_checkpoint(out, config, back)
    assert_same_tree(jax.device_get(ddpm_jax.load(back).params), params)  # bit for bit
    theirs_unet = diffusers.UNet2DModel.from_pretrained(os.path.join(out, "unet")).eval()
    assert theirs_unet.config.num_class_embeds == K + 1
    np.testing.assert_array_equal(theirs_unet.class_embedding.weight.detach().numpy(),
                                  params["label_emb"]["embedding"])  # null class: the last row
    x, t = _inputs()
    y = np.array([0, 5, 9, K], np.int32)  # K: the null class
    with torch.no_grad():
        theirs = theirs_unet(torch.from_numpy(x).permute(0, 3, 1, 2),
                             torch.from_numpy(t.astype(np.int64)),
                             class_labels=torch.from_numpy(y.astype(np.int64))).sample
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(cond_model.predict_noise(x, t, labels=y))
    assert theirs.std() > 0.1 and np.abs(ours - theirs).max() <= 1e-4
