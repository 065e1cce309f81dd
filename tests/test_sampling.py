"""The reverse chain: scan == Python loop, DDIM against float64 numpy, exactness, sharding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_script

import ddpm_jax
from configs import test as test_config
from ddpm_jax import diffusion, generate, images, sampling, schedules, unet


def _process(T=50, var="fixedlarge", mean="eps"):
    betas = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.2, num_timesteps=T)
    return diffusion.Diffusion.create(betas, model_var_type=var, model_mean_type=mean), betas


def _toy_eps(x, t):
    """A smooth stand-in for a network: eps(x, t) = 0.3 x (1 + t / 50) + 0.05."""
    return 0.3 * x * (1.0 + t.astype(jnp.float32)[:, None, None, None] / 50.0) + 0.05


@pytest.fixture(scope="module")
def model():
    m = ddpm_jax.create(test_config.get_config(), seed=0)
    leaves, tree = jax.tree.flatten(m.params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return m.replace(params=jax.tree.unflatten(tree, noisy))


def _model_fn(model):
    return lambda x, t: unet.apply(model.graphdef, model.params, x, t)


def test_scan_equals_python_loop_step_for_step(model):
    d, shape, key = model.diffusion, (3, 8, 8, 1), jax.random.key(11)
    model_fn = _model_fn(model)
    x_final, xs, _ = jax.jit(lambda k: sampling.sample_loop(
        d, model_fn, k, shape, record_every=1))(key)
    # The same step function in a plain Python loop, with the documented keys.
    x_key, chain_key = jax.random.split(key)
    x = jax.random.normal(x_key, shape)
    step = jax.jit(lambda x, t, z: sampling.p_sample(d, model_fn, x, t, z)[0])
    for i, t in enumerate(range(d.num_timesteps - 1, -1, -1)):
        z = jax.random.normal(jax.random.fold_in(chain_key, t), shape)
        x = step(x, jnp.full((3,), t, jnp.int32), z)
        np.testing.assert_allclose(xs[i], x, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(x_final, x, atol=1e-5, rtol=1e-5)


def test_no_noise_on_the_last_step():
    d, _ = _process()
    x = jnp.ones((2, 4, 4, 1))
    t0 = jnp.zeros((2,), jnp.int32)
    a, _ = sampling.p_sample(d, _toy_eps, x, t0, jnp.zeros_like(x))
    b, _ = sampling.p_sample(d, _toy_eps, x, t0, 100.0 * jnp.ones_like(x))
    np.testing.assert_array_equal(a, b)


def _ddim_numpy(betas, eps_fn, x_T, num_steps, eta=0.0, noises=None):
    """DDIM (Song et al. Eq. 12) in float64 numpy, without clipping."""
    abar = np.cumprod(1.0 - betas)
    T = len(betas)
    taus = np.arange(num_steps) * (T // num_steps)
    x = x_T.astype(np.float64)
    for i in reversed(range(num_steps)):
        t = taus[i]
        a_t, a_prev = abar[t], (abar[taus[i - 1]] if i > 0 else 1.0)
        eps = eps_fn(x, t)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
        if noises is not None:
            x = x + sigma * noises[t]
    return x


def test_ddim_eta0_is_deterministic_and_matches_float64():
    d, betas = _process()
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    run = jax.jit(lambda k: sampling.ddim_sample_loop(
        d, _toy_eps, k, x_T.shape, num_steps=10, eta=0.0, x_T=x_T, clip_denoised=False))
    a, b = run(jax.random.key(1)), run(jax.random.key(2))  # the key only feeds eta > 0 noise
    np.testing.assert_array_equal(a, b)
    ref = _ddim_numpy(betas, lambda x, t: 0.3 * x * (1 + t / 50) + 0.05, np.asarray(x_T), 10)
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_matches_float64_with_the_same_noise():
    d, betas = _process()
    key = jax.random.key(3)
    x_T = sampling.initial_noise(key, (2, 4, 4, 1))
    out = sampling.ddim_sample_loop(d, _toy_eps, key, x_T.shape, num_steps=5, eta=1.0,
                                    clip_denoised=False)
    chain_key = jax.random.split(key)[1]
    noises = {t: np.asarray(jax.random.normal(jax.random.fold_in(chain_key, t), x_T.shape))
              for t in range(0, 50, 10)}
    ref = _ddim_numpy(betas, lambda x, t: 0.3 * x * (1 + t / 50) + 0.05, np.asarray(x_T), 5,
                      eta=1.0, noises=noises)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def _true_eps_model(d, x0):
    """The noise model that knows x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def fn(x_t, t):
        return (x_t - diffusion.extract(d.sqrt_alphas_cumprod, t, x_t.shape) * x0) / \
            diffusion.extract(d.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    return fn


@pytest.mark.parametrize("var", ["fixedlarge", "fixedsmall"])
def test_chain_with_the_true_noise_model_ends_at_x0(var):
    d, _ = _process(var=var)
    x0 = jnp.linspace(-0.9, 0.9, 2 * 16).reshape(2, 4, 4, 1)
    out = sampling.sample_loop(d, _true_eps_model(d, x0), jax.random.key(0), x0.shape)
    np.testing.assert_allclose(out, x0, atol=1e-4)
    out = sampling.ddim_sample_loop(d, _true_eps_model(d, x0), jax.random.key(0), x0.shape,
                                    num_steps=7, eta=0.5)
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_respaced_chain_with_learned_variance_ends_at_x0():
    d, betas = _process(var="learned_range")
    x0 = jnp.linspace(-0.5, 0.5, 16).reshape(1, 4, 4, 1)
    sub, tmap = sampling.respace(d, sampling.ddim_timesteps(50, 10))
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(sub.betas, np.float64)),
                               np.cumprod(1 - betas)[np.asarray(tmap)], rtol=1e-5)
    eps = _true_eps_model(d, x0)
    fn = lambda x, t: jnp.concatenate([eps(x, t), jnp.zeros_like(x)], axis=-1)
    out = sampling.sample_loop(sub, fn, jax.random.key(0), x0.shape, timestep_map=tmap)
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_x_T_is_honoured_and_output_is_uint8(model):
    key = jax.random.key(4)
    default = model.sample(key, 4, batch_size=4)
    same = model.sample(key, 4, batch_size=4,
                        x_T=sampling.initial_noise(jax.random.fold_in(key, 0), (4, 8, 8, 1)))
    other = model.sample(key, 4, batch_size=4, x_T=jnp.zeros((4, 8, 8, 1)))
    np.testing.assert_array_equal(default, same)
    assert not np.array_equal(default, other)
    assert default.dtype == np.uint8 and default.shape == (4, 8, 8, 1)
    assert default.min() >= 0 and default.max() <= 255 and default.std() > 0


def test_batches_depend_only_on_key_count_and_batch_size(model):
    key = jax.random.key(9)
    a = model.sample(key, 5, batch_size=2, sampler="ddim", num_steps=5)  # 3 chunks, padded
    b = model.sample(key, 6, batch_size=2, sampler="ddim", num_steps=5)
    np.testing.assert_array_equal(a, b[:5])
    assert a.shape == (5, 8, 8, 1)


def test_progressive_records_every_k_steps(model):
    spec = sampling.SamplerSpec(record_every=10)
    x0, xs, x0s = model.progressive(jax.random.key(0), 2, spec)
    assert xs.shape == x0s.shape == (2, 5, 8, 8, 1) and x0s.dtype == np.uint8
    np.testing.assert_array_equal(xs[:, -1], x0)  # the last record is the final sample
    np.testing.assert_array_equal(x0, model.sample_batch(jax.random.key(0), 2))
    # x0s[:, k] is the x_0 predicted at the last step of chunk k: recompute it step by step.
    d, model_fn = model.diffusion, _model_fn(model)
    _, xs_f, x0s_f = jax.jit(lambda k: sampling.sample_loop(
        d, model_fn, k, (2, 8, 8, 1), record_every=1))(jax.random.key(0))
    np.testing.assert_array_equal(x0s, np.swapaxes(images.to_uint8(x0s_f[9::10]), 0, 1))
    np.testing.assert_array_equal(xs, np.swapaxes(images.to_uint8(xs_f[9::10]), 0, 1))
    assert len({x0s[0, k].tobytes() for k in range(5)}) == 5  # the prediction sharpens
    ddim = sampling.SamplerSpec("ddim", 10, record_every=5)
    x0, xs, x0s = model.progressive(jax.random.key(0), 3, ddim)  # 3 rows: padded to the devices
    assert xs.shape == x0s.shape == (3, 2, 8, 8, 1)
    np.testing.assert_array_equal(x0, model.sample_batch(
        jax.random.key(0), 3, sampling.SamplerSpec("ddim", 10)))


def test_progressive_with_the_true_noise_model_predicts_x0_all_along():
    d, _ = _process()
    x0 = jnp.linspace(-0.9, 0.9, 2 * 16).reshape(2, 4, 4, 1)
    _, _, x0s = sampling.sample_loop(d, _true_eps_model(d, x0), jax.random.key(0), x0.shape,
                                     record_every=10)
    for k in range(5):
        np.testing.assert_allclose(x0s[k], x0, atol=1e-4)


def test_default_progressive_interval_divides_the_steps():
    for steps, every in ((1000, 100), (100, 10), (25, 5), (50, 5), (7, 1), (13, 1)):
        assert sampling.default_record_every(steps) == every
        assert steps % every == 0


def test_interpolation_endpoints_are_the_decoded_inputs(model):
    img = model.sample(jax.random.key(1), 2, batch_size=2)
    out = model.interpolate(jax.random.key(2), img[0], img[1], t=20, num=5)
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.uint8
    # The endpoints are the chains from image1 and image2 alone (rows share every draw).
    for lam, row in ((0.0, 0), (1.0, 4)):
        alone = jax.jit(lambda key, lam=lam: sampling.interpolate(
            model.diffusion, _model_fn(model), key, images.to_model_space(img[0]),
            images.to_model_space(img[1]), t=20, lambdas=[lam]))(jax.random.key(2))
        np.testing.assert_array_equal(out[row], images.to_uint8(alone[0]))
    assert not np.array_equal(out[0], out[4])
    # With the true noise model of x1 (or x2), the chain from x1 (or x2) ends exactly there.
    d, _ = _process()
    x1 = jnp.linspace(-0.8, 0.8, 16).reshape(4, 4, 1)
    x2 = -x1
    for x, row in ((x1, 0), (x2, -1)):
        out = sampling.interpolate(d, _true_eps_model(d, x[None]), jax.random.key(3), x1, x2,
                                   t=40, lambdas=jnp.linspace(0, 1, 3))
        np.testing.assert_allclose(out[row], x, atol=1e-4)


def test_sampling_on_8_devices_equals_1_device_and_splits_the_work():
    one, eight = run_script("sharded_sampling.py", devices=1), run_script(
        "sharded_sampling.py", devices=8)
    for sampler in ("ancestral", "ddim"):
        assert one[sampler]["devices"] == 1 and eight[sampler]["devices"] == 8
        np.testing.assert_array_equal(np.array(eight[sampler]["images"]),
                                      np.array(one[sampler]["images"]))
        # Each device runs an eighth of the chain's network evaluations.
        assert eight[sampler]["flops"] < 0.2 * one[sampler]["flops"]


DDIM5 = sampling.SamplerSpec("ddim", 5)


def test_generate_writes_files_and_resumes_a_killed_run(model, tmp_path, monkeypatch):
    full = generate.generate(model, str(tmp_path / "full"), num_samples=5, batch_size=2,
                             spec=DDIM5, progress=False)
    expected = np.load(full)["images"]
    assert expected.shape == (5, 8, 8, 1) and expected.dtype == np.uint8
    assert os.path.exists(tmp_path / "full" / "samples.png")

    calls = []
    real = generate.iter_chunks

    def dies_after_two(*a, start=0, **k):
        for i, chunk in enumerate(real(*a, start=start, **k), start=start):
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
            calls.append(i)
            yield chunk

    monkeypatch.setattr(generate, "iter_chunks", dies_after_two)
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        generate.generate(model, out, num_samples=5, batch_size=2, spec=DDIM5,
                          progress=False)
    assert sorted(os.listdir(os.path.join(out, generate.SHARDS))) == [
        "shard_000000.npz", "shard_000001.npz", "spec.json"]
    calls.clear()

    def counting(*a, start=0, **k):
        for i, chunk in enumerate(real(*a, start=start, **k), start=start):
            calls.append(i)
            yield chunk

    monkeypatch.setattr(generate, "iter_chunks", counting)
    path = generate.generate(model, out, num_samples=5, batch_size=2, spec=DDIM5,
                             progress=False)
    assert calls == [2]  # only the missing batch was sampled
    np.testing.assert_array_equal(np.load(path)["images"], expected)
    # Finished samples of other settings are moved aside, never overwritten.
    generate.generate(model, out, num_samples=2, batch_size=2, seed=1, spec=DDIM5,
                      progress=False)
    np.testing.assert_array_equal(
        np.load(os.path.join(out, "previous_samples", "0", "samples.npz"))["images"], expected)
    assert np.load(os.path.join(out, "samples.npz"))["images"].shape[0] == 2
    # An unfinished run of other settings is refused.
    os.makedirs(os.path.join(out, generate.SHARDS))
    with open(os.path.join(out, generate.SHARDS, "spec.json"), "w") as f:
        json.dump({"seed": 7}, f)
    with pytest.raises(generate.SampleSpecError, match="unfinished run with other settings"):
        generate.generate(model, out, num_samples=5, batch_size=2, seed=3, progress=False)


def test_bad_settings_change_nothing_in_the_output_dir(model, tmp_path):
    out = tmp_path / "out"
    generate.generate(model, str(out), num_samples=2, batch_size=2, spec=DDIM5, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for spec in (sampling.SamplerSpec("ddim", 5000), sampling.SamplerSpec("ddim", 5, eta=-1.0),
                 sampling.SamplerSpec("ancestral", eta=0.5)):
        with pytest.raises(ddpm_jax.config_lib.ConfigError):
            generate.generate(model, str(out), num_samples=3, spec=spec, progress=False)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing moved aside, no shard folder, no spec written


def test_samples_npz_is_streamed_chunk_by_chunk_into_what_np_savez_writes(tmp_path):
    from etils import epath

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (3, 3, 2)]
    path = epath.Path(tmp_path) / "s.npz"
    generate.write_npz_stream(path, "images", (8, 4, 4, 3), np.uint8, iter(chunks))
    with np.load(path, allow_pickle=False) as f:
        assert list(f.keys()) == ["images"]
        np.testing.assert_array_equal(f["images"], np.concatenate(chunks))
    with pytest.raises(ValueError, match="wrote 6 rows of images, expected 8"):
        generate.write_npz_stream(path, "images", (8, 4, 4, 3), np.uint8, iter(chunks[:2]))
    with np.load(path, allow_pickle=False) as f:  # the complete file was not replaced
        assert f["images"].shape == (8, 4, 4, 3)


def test_predict_noise_refuses_timesteps_outside_the_process(model):
    x = np.zeros((2, 8, 8, 1), np.float32)
    eps = model.predict_noise(x, np.array([0, 49]))
    assert eps.shape == (2, 8, 8, 1) and eps.dtype == np.float32
    for t in ([0, 50], [-3, 1], [5000, 0]):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 50\)"):
            model.predict_noise(x, np.array(t))
    with pytest.raises(ValueError, match="t must be integer"):
        model.predict_noise(x, np.array([0.5, 1.0]))
