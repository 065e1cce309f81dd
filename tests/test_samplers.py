"""The fast samplers against their references: diffusers' schedulers step by step (same model
output, same noise), EDM's and DPM-Solver++'s formulas and whole chains in float64 numpy, the
spacings against their sources, and one compile per number of steps.

Everything here runs on the paper's T = 1000 linear schedule with a smooth toy model (no U-Net),
so each chain is one small compile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_lib, diffusion, sampling, schedules

T = 1000
BETAS = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
ABAR = np.cumprod(1.0 - BETAS)
SHAPE = (2, 4, 4, 1)


def _process(mean="eps"):
    return diffusion.Diffusion.create(BETAS, model_mean_type=mean)


def toy_eps(x, t):
    """A smooth stand-in for a network (numpy or jax): 0.3 x (1 + t / T) + 0.05 sin(3 x)."""
    xp = jnp if isinstance(x, jax.Array) else np
    t = xp.asarray(t).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.3 * x * (1.0 + t / T) + 0.05 * xp.sin(3.0 * x)


def _x_T(seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), SHAPE), np.float64)


# -- spacings ----------------------------------------------------------------------------------
def _diffusers_timesteps(cls, spacing, steps):
    scheduler = cls(num_train_timesteps=T, trained_betas=BETAS, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    return np.asarray(scheduler.timesteps)


@pytest.mark.parametrize("steps", [7, 10, 20, 50, 100])
def test_spacings_are_the_sets_their_sources_compute(steps):
    diffusers = pytest.importorskip("diffusers")
    ours = lambda name, sampler="ddim": sampling.spacing_timesteps(name, BETAS, steps, sampler)
    # The DDIM paper's uniform skips (ermongroup/ddim "uniform": range(0, T, T // S)) and its
    # quadratic ones, written out from its runners/diffusion.py.
    np.testing.assert_array_equal(ours("uniform"), np.arange(0, T, T // steps)[:steps][::-1])
    quad = sorted({int(s) for s in np.linspace(0, np.sqrt(0.8 * T), steps) ** 2}, reverse=True)
    np.testing.assert_array_equal(ours("quadratic"), quad)
    for name in ("linspace", "leading", "trailing"):
        np.testing.assert_array_equal(
            ours(name), _diffusers_timesteps(diffusers.DDIMScheduler, name, steps), err_msg=name)
        np.testing.assert_array_equal(
            ours(name, "dpm_solver++"),
            _diffusers_timesteps(diffusers.DPMSolverMultistepScheduler, name, steps),
            err_msg=f"dpm_solver++ {name}")
    # EDM's rho = 7 sigmas (generate.py), each rounded to the nearest trained sigma
    # (iDDPMPrecond.round_sigma), written out here in float64.
    levels = np.sqrt((1 - ABAR) / ABAR)
    smax, smin = min(80.0, levels[-1]), max(0.002, levels[0])
    i = np.arange(steps)
    edm = (smax ** (1 / 7) + i / (steps - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    nearest = [int(np.argmin(np.abs(levels - s))) for s in edm]
    np.testing.assert_array_equal(ours("karras"), sorted(set(nearest), reverse=True))
    assert ours("karras")[0] < T - 1 and abs(levels[ours("karras")[0]] - 80.0) < 1.0


def test_spacing_names_are_the_config_names():
    assert set(sampling.DEFAULT_SPACING.values()) <= set(config_lib.SPACINGS)
    assert set(sampling.DEFAULT_SPACING) == set(config_lib.SAMPLERS) == set(sampling.VARIANTS)
    with pytest.raises(config_lib.ConfigError, match="spacing='cosine' is not one of"):
        sampling.SamplerSpec("ddim", 10, spacing="cosine").check(T)
    with pytest.raises(config_lib.ConfigError,
                       match="thresholding applies to the DPM-Solvers only"):
        sampling.SamplerSpec("ddim", 10, thresholding=True).check(T)
    with pytest.raises(config_lib.ConfigError, match="eta=0.5 applies to the DDIM samplers"):
        sampling.SamplerSpec("dpm_solver++", 10, eta=0.5).check(T)


# -- DDIM against diffusers' DDIMScheduler, step by step ---------------------------------------
@pytest.mark.parametrize("variant,clip,clipped_eps", [("ddim", False, False),
                                                      ("ddim_clipped", True, False),
                                                      ("ddim_iddpm", True, True)])
def test_ddim_steps_equal_diffusers_ddim_scheduler(variant, clip, clipped_eps):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    steps, eta = 10, 0.6
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=BETAS,
                                        clip_sample=clip, timestep_spacing="leading",
                                        set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(steps)
    d, chain_key = _process(), jax.random.key(7)
    ts = sampling.spacing_timesteps("uniform", BETAS, steps)
    np.testing.assert_array_equal(ts, np.asarray(scheduler.timesteps))
    xs = sampling._as_xs(ts, sampling.ddim_coefficients(BETAS, ts))
    step = jax.jit(sampling.ddim_step_fn(d, toy_eps, chain_key, eta, variant=variant))
    x = (3.0 * _x_T()).astype(np.float32)  # large enough that clipping x0 matters
    clipped_any = False
    for i, t in enumerate(ts):
        ours = np.asarray(step(jnp.asarray(x), jax.tree.map(lambda a, i=i: a[i], xs))[0])
        noise = np.asarray(jax.random.normal(jax.random.fold_in(chain_key, int(t)), SHAPE))
        ref = scheduler.step(torch.from_numpy(toy_eps(x, t)).permute(0, 3, 1, 2), int(t),
                             torch.from_numpy(x).permute(0, 3, 1, 2), eta=eta,
                             use_clipped_model_output=clipped_eps,
                             variance_noise=torch.from_numpy(noise.copy()).permute(0, 3, 1, 2))
        ref_x = ref.prev_sample.permute(0, 2, 3, 1).numpy()
        x0 = (x - np.sqrt(1 - ABAR[t]) * toy_eps(x, t)) / np.sqrt(ABAR[t])
        clipped_any |= bool(np.abs(x0).max() > 1)
        np.testing.assert_allclose(ours, ref_x, atol=1e-5, rtol=1e-5, err_msg=f"step {i}")
        x = ref_x
    assert clipped_any  # the clipped variants were exercised


# -- DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler ---------------------------
@pytest.mark.parametrize("thresholding", [False, True])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpm_solver_steps_equal_diffusers(thresholding, spacing):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    steps = 8
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS, timestep_spacing=spacing,
        thresholding=thresholding, sample_max_value=1.0)  # its defaults otherwise: 2M, midpoint
    scheduler.set_timesteps(steps)
    d = _process()
    ts = sampling.spacing_timesteps(spacing, BETAS, steps, "dpm_solver++")
    np.testing.assert_array_equal(ts, np.asarray(scheduler.timesteps))
    xs = sampling._as_xs(ts, sampling.dpm_solver_coefficients(BETAS, ts))
    step = jax.jit(sampling.dpm_solver_step_fn(d, toy_eps, thresholding=thresholding))
    x = (2.0 * _x_T(1)).astype(np.float32)
    d_prev = np.zeros_like(x)
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    for i, t in enumerate(ts):
        (ours, d_prev), _ = step((jnp.asarray(x), jnp.asarray(d_prev)),
                                 jax.tree.map(lambda a, i=i: a[i], xs))
        ref = scheduler.step(to_torch(toy_eps(x, t)), int(t), to_torch(x)).prev_sample
        ref = ref.permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5, err_msg=f"step {i}")
        # Fed diffusers' state, ours continues from the same history.
        x, d_prev = ref, np.asarray(d_prev)


# -- DPM-Solver++(3M) against DPMSolverMultistepScheduler(solver_order=3) ---------------------
@pytest.mark.parametrize("thresholding", [False, True])
@pytest.mark.parametrize("steps", [8, 14, 15])  # below 15: the second to last is 2nd order
def test_dpm_solver_3m_steps_equal_diffusers(thresholding, steps):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS, solver_order=3, thresholding=thresholding,
        sample_max_value=1.0)
    scheduler.set_timesteps(steps)
    d = _process()
    ts = sampling.SamplerSpec("dpm_solver++_3m", steps).timesteps(d)
    np.testing.assert_array_equal(ts, np.asarray(scheduler.timesteps))
    orders = sampling.dpm_solver_3m_orders(steps)
    assert orders[0] == orders[-1] == 1 and orders[1] == 2 and (orders[-2] == 2) == (steps < 15)
    xs = sampling._as_xs(ts, sampling.dpm_solver_3m_coefficients(BETAS, ts))
    step = jax.jit(sampling.dpm_solver_step_fn(d, toy_eps, thresholding=thresholding, order=3))
    x = (2.0 * _x_T(1)).astype(np.float32)
    history = (np.zeros_like(x), np.zeros_like(x))
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    for i, t in enumerate(ts):
        (ours, *history), _ = step((jnp.asarray(x), *map(jnp.asarray, history)),
                                   jax.tree.map(lambda a, i=i: a[i], xs))
        ref = scheduler.step(to_torch(toy_eps(x, t)), int(t), to_torch(x)).prev_sample
        ref = ref.permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5, err_msg=f"step {i}")
        x, history = ref, [np.asarray(h) for h in history]


# -- float64 references of whole chains --------------------------------------------------------
def ddim_reference(x, ts, *, eta=0.0, variant="ddim", noise_fn=None):
    """Song et al. Eq. 12 (and the clipped variants) in float64."""
    for i, t in enumerate(ts):
        a_t, a_prev = ABAR[t], (ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        eps = toy_eps(x, t)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        if variant != "ddim":
            x0 = np.clip(x0, -1, 1)
        if variant == "ddim_iddpm":
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        s = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - s**2) * eps
        if noise_fn is not None:
            x = x + s * noise_fn(t)
    return x


def dpm_solver_reference(x, ts, *, thresholding=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2 with lower order at the end) in float64."""
    alpha = np.sqrt(ABAR[ts])
    sigma = np.sqrt(1 - ABAR[ts])
    lam = np.log(alpha / sigma)
    prev = None
    for i, t in enumerate(ts):
        x0 = (x - sigma[i] * toy_eps(x, t)) / alpha[i]
        if thresholding:
            x0 = np.clip(x0, -1, 1)
        if i + 1 == len(ts):
            return x0  # the last step lands on sigma = 0: x = x0
        h = lam[i + 1] - lam[i]
        if prev is None:
            D = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * D
        prev = x0
    return x


def dpm_solver_3m_reference(x, ts):
    """DPM-Solver++(3M) in float64, written from the authors' multistep third-order update
    (the D1 / D2 differences), orders as ``sampling.dpm_solver_3m_orders``."""
    alpha, sigma = np.sqrt(ABAR[ts]), np.sqrt(1 - ABAR[ts])
    lam = np.log(alpha / sigma)
    n, hist = len(ts), []
    for i, t in enumerate(ts):
        m0 = (x - sigma[i] * toy_eps(x, t)) / alpha[i]
        hist.insert(0, m0)
        if i + 1 == n:
            return m0  # to sigma = 0
        h = lam[i + 1] - lam[i]
        order = 1 if i == 0 else 2 if (i == 1 or (n < 15 and i == n - 2)) else 3
        base = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * m0
        if order == 1:
            x = base
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            x = base - 0.5 * alpha[i + 1] * np.expm1(-h) * (m0 - hist[1]) / r0
        else:
            m1, m2 = hist[1], hist[2]
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = (base + alpha[i + 1] * (np.expm1(-h) / h + 1) * d1
                 - alpha[i + 1] * ((np.expm1(-h) + h) / h**2 - 0.5) * d2)
    return x


def edm_reference(x_T, ts, *, churn=0.0, noise_fn=None):
    """NVlabs/edm ``edm_sampler`` with iDDPMPrecond's denoiser and ``round_sigma`` (the nearest
    trained level), S_churn = ``churn``, S_tmin = 0, S_tmax = inf, S_noise = 1, float64."""
    levels = np.sqrt((1 - ABAR) / ABAR)
    sig = np.append(levels[ts], 0.0)

    def denoise(x, s):
        t = int(np.argmin(np.abs(levels - s)))  # the trained step of level s
        return x - s * toy_eps(x / np.sqrt(s**2 + 1), t)

    x = x_T * sig[0]
    trace = [x]
    for i in range(len(ts)):
        gamma = min(churn / len(ts), np.sqrt(2) - 1)
        s_hat = levels[np.argmin(np.abs(levels - (sig[i] + gamma * sig[i])))]
        x_hat = x
        if churn:
            x_hat = x + np.sqrt(s_hat**2 - sig[i] ** 2) * noise_fn(ts[i])
        else:
            s_hat = sig[i]
        d_cur = (x_hat - denoise(x_hat, s_hat)) / s_hat
        x_next = x_hat + (sig[i + 1] - s_hat) * d_cur
        if i < len(ts) - 1:
            d_prime = (x_next - denoise(x_next, sig[i + 1])) / sig[i + 1]
            x_next = x_hat + (sig[i + 1] - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        trace.append(x)
    return x, trace


def _run(spec, x_T):
    d = _process()
    return np.asarray(jax.jit(lambda k, x: sampling.chain(d, toy_eps, k, SHAPE, spec, x_T=x))(
        jax.random.key(3), jnp.asarray(x_T, jnp.float32)))


@pytest.mark.parametrize("sampler,spacing,steps", [
    ("ddim", "quadratic", 10), ("ddim_clipped", "trailing", 10), ("ddim_iddpm", "uniform", 10),
    ("dpm_solver++", "linspace", 10), ("dpm_solver++", "karras", 12), ("heun", "karras", 8),
    ("dpm_solver++_3m", "linspace", 10), ("dpm_solver++_3m", "trailing", 16),
])
def test_whole_chains_match_float64_references(sampler, spacing, steps):
    x_T = 1.5 * _x_T(2)
    spec = sampling.SamplerSpec(sampler, steps, spacing=spacing)
    ts = spec.timesteps(_process())
    if sampler.startswith("ddim"):
        ref = ddim_reference(x_T, ts, variant=sampler)
    elif sampler == "dpm_solver++":
        ref = dpm_solver_reference(x_T, ts)
    elif sampler == "dpm_solver++_3m":
        ref = dpm_solver_3m_reference(x_T, ts)
    else:
        ref = edm_reference(x_T, ts)[0]
    np.testing.assert_allclose(_run(spec, x_T), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("churn", [3.0, 40.0])  # 40 / 8 steps: gamma capped at sqrt(2) - 1
def test_heun_with_churn_matches_edm_stochastic_sampler_in_float64(churn):
    x_T, key = 1.5 * _x_T(6), jax.random.key(8)
    chain_key = jax.random.split(key)[1]
    noise = lambda t: np.asarray(jax.random.normal(jax.random.fold_in(chain_key, int(t)), SHAPE))
    spec = sampling.SamplerSpec("heun", 8, churn=churn)
    ts = spec.timesteps(_process())
    d = _process()
    ours = np.asarray(jax.jit(lambda k, x: sampling.chain(d, toy_eps, k, SHAPE, spec, x_T=x))(
        key, jnp.asarray(x_T, jnp.float32)))
    ref = edm_reference(x_T, ts, churn=churn, noise_fn=noise)[0]
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
    assert np.abs(ours - edm_reference(x_T, ts)[0]).max() > 1e-2  # the churn was applied
    assert "Algorithm 2, S_churn = " in spec.variant and spec.record(d)["churn"] == churn
    # Records without churn are as before it existed (old heun sample runs still resume).
    assert "churn" not in sampling.SamplerSpec("heun", 8).record(d)
    with pytest.raises(config_lib.ConfigError, match="churn=1.0 applies to the heun sampler"):
        sampling.SamplerSpec("ddim", 8, churn=1.0).check(T)
    with pytest.raises(config_lib.ConfigError, match="churn must be a finite number >= 0"):
        sampling.SamplerSpec("heun", 8, churn=-1.0).check(T)


def test_ddim_with_eta_matches_float64_and_eta_is_not_compiled_in():
    x_T, key = _x_T(4), jax.random.key(5)
    chain_key = jax.random.split(key)[1]
    noise = lambda t: np.asarray(jax.random.normal(jax.random.fold_in(chain_key, int(t)), SHAPE))
    spec = sampling.SamplerSpec("ddim", 10, spacing="quadratic")
    ts = spec.timesteps(_process())
    d = _process()
    run = jax.jit(lambda k, x, e: sampling.chain(d, toy_eps, k, SHAPE, spec, eta=e, x_T=x))
    for eta in (0.0, 0.5, 1.0):
        np.testing.assert_allclose(run(key, jnp.asarray(x_T, jnp.float32), eta),
                                   ddim_reference(x_T, ts, eta=eta, noise_fn=noise),
                                   atol=2e-5, rtol=1e-5, err_msg=f"eta={eta}")
    assert run._cache_size() == 1


def test_heun_steps_match_edm_step_by_step():
    ts = sampling.spacing_timesteps("karras", BETAS, 6, "heun")
    _, trace = edm_reference(_x_T(6), ts)
    d = _process()
    # Each prefix of the chain (N steps on ts[:N] would change the last step), so check the
    # Heun part through one scan step at a time: x_{i+1} from the reference's x_i.
    step = jax.jit(lambda x, i: sampling.heun_step_fn(d, toy_eps, ts)(x, i)[0])
    sig = np.append(np.sqrt((1 - ABAR[ts]) / ABAR[ts]), 0.0)
    for i in range(len(ts) - 1):
        ours = np.asarray(step(jnp.asarray(trace[i], jnp.float32), i))
        scale = max(1.0, sig[i])
        np.testing.assert_allclose(ours / scale, trace[i + 1] / scale, atol=1e-5, err_msg=str(i))


def test_x0_models_take_the_same_path():
    # A model that predicts x0 gives the chain of the eps model it implies.
    d_eps, d_x0 = _process("eps"), _process("xstart")
    x0_model = lambda x, t: diffusion.predict_xstart_from_eps(d_eps, x, t, toy_eps(x, t))
    spec = sampling.SamplerSpec("dpm_solver++", 10)
    x_T = jnp.asarray(_x_T(8), jnp.float32)
    a = jax.jit(lambda x: sampling.chain(d_eps, toy_eps, jax.random.key(0), SHAPE, spec,
                                         x_T=x))(x_T)
    b = jax.jit(lambda x: sampling.chain(d_x0, x0_model, jax.random.key(0), SHAPE, spec,
                                         x_T=x))(x_T)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_records_name_the_variant_spacing_and_network_calls():
    d = _process()
    heun = sampling.SamplerSpec("heun").record(d)
    assert heun["spacing"] == "karras" and heun["num_steps"] == 18 and heun["nfe"] == 35
    assert "Karras" in heun["variant"]
    dpm = sampling.SamplerSpec("dpm_solver++", thresholding=True).record(d)
    assert dpm["spacing"] == "linspace" and dpm["nfe"] == 20 and "clipped" in dpm["variant"]
    old = sampling.SamplerSpec("ddim_iddpm", 100).record(d)
    assert "Improved DDPM" in old["variant"] and old["spacing"] == "uniform"
    assert "not clipped" in sampling.SamplerSpec("ddim", 100).record(d)["variant"]


# -- compilation: one per number of steps, none per eta or model argument ----------------------
def _toy_builder(graphdef, params, model_args):
    """A ``build_model_fn``: the toy model, scaled by a traced ``model_args`` (as a guidance
    scale would be)."""
    del graphdef, params
    return lambda x, t: toy_eps(x, t) * (1.0 if model_args is None else model_args["scale"])


def test_one_compile_per_number_of_steps_and_none_per_eta_or_model_args():
    from ddpm_jax import sharding

    mesh, d, key = sharding.create_mesh(), _process(), jax.random.key(0)
    shape = (mesh.size,) + SHAPE[1:]
    get = lambda spec: sampling.get_sampling_fn(None, spec, shape, mesh, _toy_builder)
    fn = get(sampling.SamplerSpec("ddim", 5))
    outs = [np.asarray(fn(None, d, key, None, eta)) for eta in (0.0, 0.3, 1.0)]
    assert fn._cache_size() == 1
    assert not np.array_equal(outs[0], outs[2])  # eta is used, not compiled in
    assert get(sampling.SamplerSpec("ddim", 5, eta=0.7)) is fn
    dpm = get(sampling.SamplerSpec("dpm_solver++", 6))
    scaled = [np.asarray(dpm(None, d, key, None, 0.0, {"scale": jnp.float32(s)}))
              for s in (1.0, 0.5)]
    assert dpm._cache_size() == 1 and not np.array_equal(*scaled)
    assert get(sampling.SamplerSpec("dpm_solver++", 7)) is not dpm
    again = diffusion.Diffusion.create(BETAS.copy())  # another object, the same betas
    assert np.array_equal(dpm(None, again, key, None, 0.0, {"scale": jnp.float32(1.0)}),
                          scaled[0])
    assert dpm._cache_size() == 1
    other = diffusion.Diffusion.create(schedules.get_beta_schedule("cosine", num_timesteps=T))
    dpm(None, other, key, None, 0.0, {"scale": jnp.float32(1.0)})
    assert dpm._cache_size() == 2  # steps and coefficients come from the betas: compiled again
