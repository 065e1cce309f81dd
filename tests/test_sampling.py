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
    noise = jax.jit(lambda t: jax.random.normal(jax.random.fold_in(chain_key, t), shape))
    for i, t in enumerate(range(d.num_timesteps - 1, -1, -1)):
        x = step(x, jnp.full((3,), t, jnp.int32), noise(t))
        np.testing.assert_allclose(xs[i], x, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(x_final, x, atol=1e-5, rtol=1e-5)


def test_no_noise_on_the_last_step():
    d, _ = _process()
    x = jnp.ones((2, 4, 4, 1))
    t0 = jnp.zeros((2,), jnp.int32)
    a, _ = sampling.p_sample(d, _toy_eps, x, t0, jnp.zeros_like(x))
    b, _ = sampling.p_sample(d, _toy_eps, x, t0, 100.0 * jnp.ones_like(x))
    np.testing.assert_array_equal(a, b)


def test_ddim_eta0_is_deterministic():
    d, _ = _process()
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    run = jax.jit(lambda k: sampling.ddim_sample_loop(
        d, _toy_eps, k, x_T.shape, num_steps=10, eta=0.0, x_T=x_T))
    np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(2)))


def _true_eps_model(d, x0):
    """The noise model that knows x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def fn(x_t, t):
        return (x_t - diffusion.extract(d.sqrt_alphas_cumprod, t, x_t.shape) * x0) / \
            diffusion.extract(d.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    return fn


def _posterior64(betas, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) in float64 from the betas alone (paper Eqs. 6-7)."""
    abar = np.cumprod(1.0 - betas)
    prev = abar[t - 1] if t > 0 else 1.0
    mean = (np.sqrt(prev) * betas[t] / (1 - abar[t]) * x0
            + np.sqrt(1 - betas[t]) * (1 - prev) / (1 - abar[t]) * x_t)
    return mean, betas[t] * (1 - prev) / (1 - abar[t])


@pytest.mark.parametrize("var", ["fixedlarge", "fixedsmall"])
def test_ancestral_step_has_the_posterior_mean_and_algorithm_2s_sigma(var):
    # x_{t-1} = mu~(x_t, x0) + sigma_t z with the true-noise model: the mean is the posterior's,
    # and sigma_t^2 is beta_t (fixedlarge) or beta~_t (fixedsmall), from the betas in float64.
    d, betas = _process(var=var)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-0.9, 0.9, (2, 4, 4, 1))
    x_t = rng.normal(size=x0.shape)
    z = rng.normal(size=x0.shape)
    step = jax.jit(lambda x, t, z: sampling.p_sample(
        d, _true_eps_model(d, jnp.asarray(x0, jnp.float32)), x, t, z)[0])
    for t in (1, 7, 30, 49):
        tb = jnp.full((2,), t, jnp.int32)
        mean = np.asarray(step(jnp.asarray(x_t, jnp.float32), tb, jnp.zeros(x0.shape)))
        noisy = np.asarray(step(jnp.asarray(x_t, jnp.float32), tb, jnp.asarray(z, jnp.float32)))
        ref_mean, beta_tilde = _posterior64(betas, x0, x_t, t)
        np.testing.assert_allclose(mean, ref_mean, atol=2e-5, err_msg=f"t={t}")
        sigma = np.sqrt(betas[t] if var == "fixedlarge" else beta_tilde)
        np.testing.assert_allclose((noisy - mean) / z, sigma, rtol=1e-4, err_msg=f"t={t}")


def test_ancestral_samples_have_the_posterior_moments():
    # Monte Carlo over the chain's own noise: 4096 draws of x_{t-1} given one x_t.
    d, betas = _process(var="fixedsmall")
    n, t = 4096, 20
    x0, x_t = jnp.full((n, 1, 1, 1), 0.4), jnp.full((n, 1, 1, 1), -0.3)
    z = jax.random.normal(jax.random.key(1), (n, 1, 1, 1))
    out = np.asarray(sampling.p_sample(d, _true_eps_model(d, x0), x_t,
                                       jnp.full((n,), t, jnp.int32), z)[0]).ravel()
    mean, var = _posterior64(betas, 0.4, -0.3, t)
    assert abs(out.mean() - mean) < 4 * np.sqrt(var / n)
    assert abs(out.var() / var - 1) < 4 * np.sqrt(2 / n)


def test_ddim_step_moments_eta_1_is_the_posterior_and_sigma_scales_with_eta():
    # Song et al.: with eta = 1 on consecutive steps, DDIM's step is q(x_{t-1} | x_t, x0).
    d, betas = _process()
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-0.9, 0.9, (2, 4, 4, 1))
    x_t = rng.normal(size=x0.shape)
    ts = sampling.spacing_timesteps("uniform", betas, 50)
    xs = sampling._as_xs(ts, sampling.ddim_coefficients(betas, ts))
    key = jax.random.key(0)

    @jax.jit
    def step(x, i, eta):
        fn = sampling.ddim_step_fn(d, _true_eps_model(d, jnp.asarray(x0, jnp.float32)), key,
                                   eta)
        return fn(x, jax.tree.map(lambda a: a[i], xs))[0]

    for t in (5, 30, 49):
        i = int(np.where(ts == t)[0][0])
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape))
        x = jnp.asarray(x_t, jnp.float32)
        mean, var = _posterior64(betas, x0, x_t, t)
        out = np.asarray(step(x, i, 1.0))
        np.testing.assert_allclose(out, mean + np.sqrt(var) * noise, atol=3e-5, err_msg=str(t))
        # Any eta: sqrt(abar') x0 + sqrt(1 - abar' - eta^2 beta~) eps + eta sqrt(beta~) z.
        abar, prev = np.cumprod(1 - betas)[t], np.cumprod(1 - betas)[t - 1]
        eps = (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
        for eta in (0.0, 0.5):
            ref = (np.sqrt(prev) * x0 + np.sqrt(1 - prev - eta**2 * var) * eps
                   + eta * np.sqrt(var) * noise)
            np.testing.assert_allclose(step(x, i, eta), ref, atol=3e-5, err_msg=f"{t} {eta}")


def test_respaced_chain_calls_the_model_at_the_timestep_map_with_respaced_sigmas():
    d, betas = _process(var="learned_range")
    x0 = jnp.linspace(-0.5, 0.5, 16).reshape(1, 4, 4, 1)
    taus = sampling.spacing_timesteps("quadratic", betas, 10)[::-1]
    sub, tmap = sampling.respace(d, taus)
    np.testing.assert_array_equal(tmap, taus)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(sub.betas, np.float64)), abar[taus],
                               rtol=1e-5)
    calls = []
    eps = _true_eps_model(d, x0)

    def fn(x, t):
        jax.debug.callback(lambda t: calls.append(int(t[0])), t, ordered=True)
        return jnp.concatenate([eps(x, t), jnp.zeros_like(x)], axis=-1)

    jax.jit(lambda k: sampling.sample_loop(sub, fn, k, x0.shape, timestep_map=tmap))(
        jax.random.key(0))
    jax.effects_barrier()
    assert calls == list(taus[::-1])
    # The respaced step's sigma^2 (learned_range at v = 0: the geometric mean of beta' and
    # beta~') comes from beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}].
    new_betas = 1 - abar[taus] / np.append(1.0, abar[taus][:-1])
    i = 5
    post = new_betas[i] * (1 - np.prod(1 - new_betas[:i])) / (1 - np.prod(1 - new_betas[:i + 1]))
    x, z = jnp.zeros_like(x0), jnp.ones_like(x0)
    t = jnp.full((1,), i, jnp.int32)
    model = lambda x, s: fn(x, tmap[s])
    step = lambda z: sampling.p_sample(sub, model, x, t, z)[0]
    np.testing.assert_allclose(step(z) - step(0 * z), np.sqrt(np.sqrt(new_betas[i] * post)),
                               rtol=1e-4)


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


def test_progressive_records_the_x0_predicted_from_each_recorded_x_t():
    d, betas = _process()
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    _, xs, x0s = sampling.sample_loop(d, _toy_eps, jax.random.key(0), x_T.shape, x_T=x_T,
                                      record_every=1)
    abar = np.cumprod(1 - betas)
    inputs = np.concatenate([np.asarray(x_T)[None], np.asarray(xs[:-1])]).astype(np.float64)
    for i, t in enumerate(range(49, -1, -1)):
        eps = 0.3 * inputs[i] * (1 + t / 50) + 0.05
        ref = np.clip((inputs[i] - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
        np.testing.assert_allclose(x0s[i], ref, atol=1e-4, err_msg=f"t={t}")


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
    for sampler in ("ancestral", "ddim", "dpm_solver++", "heun"):
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
    record = json.loads((tmp_path / "full" / "samples.json").read_text())
    assert {k: record[k] for k in ("sampler", "spacing", "num_steps", "nfe", "eta", "seed")} == \
        dict(sampler="ddim", spacing="uniform", num_steps=5, nfe=5, eta=0.0, seed=0)
    assert record["variant"] == sampling.VARIANTS["ddim"]

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
    with pytest.raises(generate.Interrupted):  # Ctrl-C: one line, finished batches kept
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
