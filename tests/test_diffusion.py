"""The diffusion process (``ddpm_jax.diffusion``) against float64 numpy references.

Every reference here is written from the paper's equations (Ho et al. 2020, section 2 and
appendix; paper notation, 0-based index t in code), in float64, independently of the code under
test. Float32 results are compared with tolerances derived from float32 rounding (eps32 ~ 1.2e-7)
times the amplification of the formula at hand.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from ddpm_jax import diffusion as dm
from ddpm_jax import schedules

EPS32 = float(np.finfo(np.float32).eps)
LN2 = math.log(2.0)
SHAPE = (4, 4, 4, 2)  # [B, H, W, C]; C = 2 so that the learned-variance split is non-trivial
T_STEPS = np.array([0, 1, 300, 999], dtype=np.int32)  # 0-based, T = 1000


# ---------------------------------------------------------------------------------------------
# Float64 references.
# ---------------------------------------------------------------------------------------------


class Ref:
    """Float64 schedule quantities from their definitions (paper eqs. 4, 6, 7)."""

    def __init__(self, betas: np.ndarray):
        self.T = betas.shape[0]
        self.betas = b = np.asarray(betas, np.float64)
        self.alphas = a = 1.0 - b
        self.abar = abar = np.cumprod(a)
        self.abar_prev = abar_prev = np.concatenate([[1.0], abar[:-1]])
        self.post_var = b * (1.0 - abar_prev) / (1.0 - abar)  # beta~_t
        self.post_logvar = np.log(np.concatenate([[self.post_var[1]], self.post_var[1:]]))
        self.c1 = b * np.sqrt(abar_prev) / (1.0 - abar)
        self.c2 = (1.0 - abar_prev) * np.sqrt(a) / (1.0 - abar)
        self.large_var = np.concatenate([[self.post_var[1]], b[1:]])  # fixedlarge sigma^2

    @staticmethod
    def at(arr: np.ndarray, t) -> np.ndarray:
        """arr[t] as [B, 1, 1, 1]."""
        return np.asarray(arr)[np.asarray(t)].reshape(-1, 1, 1, 1)

    def x0_from_eps(self, x_t, t, eps):  # x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
        abar = self.at(self.abar, t)
        return x_t / np.sqrt(abar) - np.sqrt(1.0 / abar - 1.0) * eps

    def eps_from_x0(self, x_t, t, x0):  # the same equation solved for eps
        abar = self.at(self.abar, t)
        return (x_t / np.sqrt(abar) - x0) / np.sqrt(1.0 / abar - 1.0)

    def post_mean(self, x0, x_t, t):  # mu~ = c1 x0 + c2 x_t
        return self.at(self.c1, t) * x0 + self.at(self.c2, t) * x_t


@functools.cache
def _betas(name: str, big_t: int, beta_end: float = 0.02) -> np.ndarray:
    return schedules.get_beta_schedule(name, num_timesteps=big_t, beta_end=beta_end)


def make(big_t: int = 1000, name: str = "linear", beta_end: float = 0.02, **kwargs):
    betas = _betas(name, big_t, beta_end)
    return dm.Diffusion.create(betas, **kwargs), Ref(betas)


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def approx_cdf64(z):
    """The original's tanh approximation of Phi, in float64."""
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def decoder_logp64(x, mean, log_scale, cdf=approx_cdf64, floor=1e-12):
    """log of the Gaussian mass on [x - 1/255, x + 1/255], edge bins open, float64."""
    x, mean, s = f64(x), f64(mean), np.exp(f64(log_scale))
    hi = np.where(x > 0.999, 1.0, cdf((x + 1.0 / 255.0 - mean) / s))
    lo = np.where(x < -0.999, 0.0, cdf((x - 1.0 / 255.0 - mean) / s))
    with np.errstate(divide="ignore"):  # floor = 0 gives log 0 = -inf far in the tails
        return np.log(np.maximum(hi - lo, floor))


def kl64(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) closed form."""
    return 0.5 * (lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2) - 1.0)


def images(key, shape=SHAPE):
    """8-bit data scaled to [-1, 1] (k / 127.5 - 1)."""
    k = jax.random.randint(key, shape, 0, 256)
    return (k.astype(jnp.float32) / 127.5 - 1.0).astype(jnp.float32)


def batch_t(values, batch=SHAPE[0]):
    return jnp.asarray(np.resize(np.asarray(values, np.int32), batch))


# ---------------------------------------------------------------------------------------------
# Forward process q.
# ---------------------------------------------------------------------------------------------


def test_q_mean_variance_matches_reference():
    # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
    d, ref = make()
    x0 = images(jax.random.key(0))
    t = jnp.asarray(T_STEPS)
    mean, var, logvar = dm.q_mean_variance(d, x0, t)
    abar = ref.at(ref.abar, T_STEPS)
    np.testing.assert_allclose(mean, np.sqrt(abar) * f64(x0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.broadcast_to(var, SHAPE), np.broadcast_to(1 - abar, SHAPE), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.broadcast_to(logvar, SHAPE), np.broadcast_to(np.log1p(-abar), SHAPE), rtol=1e-6
    )


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_q_sample_moments(t):
    # Over many draws, x_t has mean sqrt(abar_t) x_0 and variance 1 - abar_t.
    d, ref = make()
    n = 40000
    x0 = jnp.broadcast_to(jnp.asarray([[-0.9, 0.2], [0.6, 1.0]])[None, :, :, None], (n, 2, 2, 1))
    noise = jax.random.normal(jax.random.key(t), x0.shape)
    xt = f64(dm.q_sample(d, x0, jnp.full((n,), t, jnp.int32), noise))
    abar = ref.abar[t]
    mean_ref, var_ref = np.sqrt(abar) * f64(x0[0]), 1.0 - abar
    np.testing.assert_allclose(xt.mean(0), mean_ref, atol=5 * math.sqrt(var_ref / n))
    np.testing.assert_allclose(xt.var(0), var_ref, rtol=5 * math.sqrt(2.0 / n))
    # And the draw itself is the reparameterisation sqrt(abar) x0 + sqrt(1 - abar) eps.
    np.testing.assert_allclose(
        xt[:8],
        np.sqrt(abar) * f64(x0[:8]) + np.sqrt(1 - abar) * f64(noise[:8]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_q_marginal_matches_markov_chain():
    # Iterating q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s), s <= t, gives q(x_t | x_0).
    d, ref = make(20, beta_end=0.2)
    rng = np.random.default_rng(0)
    n, x0 = 40000, np.array([-0.7, 0.0, 0.9])
    x = np.broadcast_to(x0, (n, 3)).copy()
    for t in range(20):
        x = np.sqrt(1 - ref.betas[t]) * x + np.sqrt(ref.betas[t]) * rng.standard_normal(x.shape)
        if t in (0, 7, 19):
            mean, var, _ = dm.q_mean_variance(
                d, jnp.asarray(x0[None, :, None, None], jnp.float32), jnp.asarray([t], jnp.int32)
            )
            var = float(np.ravel(var)[0])
            np.testing.assert_allclose(x.mean(0), np.ravel(mean), atol=5 * math.sqrt(var / n))
            np.testing.assert_allclose(x.var(0), var, rtol=5 * math.sqrt(2.0 / n))


# ---------------------------------------------------------------------------------------------
# Posterior q(x_{t-1} | x_t, x_0) by numerical Bayes' rule.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 100, 500, 998, 999])
def test_posterior_is_bayes_rule_on_a_grid(t):
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised on a fine 1-D grid.
    d, ref = make()
    x0 = np.array([-0.9, 0.1, 0.8, 1.0])
    eps = np.array([0.5, -1.2, 2.0, 0.0])
    x0_32 = jnp.asarray(x0[None, :, None, None], jnp.float32)
    xt_32 = dm.q_sample(
        d, x0_32, jnp.asarray([t], jnp.int32), jnp.asarray(eps[None, :, None, None], jnp.float32)
    )
    mean, var, logvar = dm.q_posterior_mean_variance(d, x0_32, xt_32, jnp.asarray([t], jnp.int32))

    xt = f64(xt_32).ravel()
    prior_mean = np.sqrt(ref.abar[t - 1]) * x0  # q(x_{t-1} | x_0), paper's t-1 is index t-1
    prior_sd = np.sqrt(1.0 - ref.abar[t - 1])
    grid = prior_mean[None, :] + prior_sd * np.linspace(-12.0, 12.0, 60001)[:, None]
    log_w = (
        -0.5 * (xt[None, :] - np.sqrt(ref.alphas[t]) * grid) ** 2 / ref.betas[t]
        - 0.5 * (grid - prior_mean[None, :]) ** 2 / prior_sd**2
    )
    w = np.exp(log_w - log_w.max(0))
    w /= w.sum(0)
    grid_mean = (w * grid).sum(0)
    grid_var = (w * (grid - grid_mean) ** 2).sum(0)

    np.testing.assert_allclose(np.ravel(mean), grid_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.broadcast_to(var, (1, 4, 1, 1)).ravel(), grid_var, rtol=1e-4)
    np.testing.assert_allclose(float(np.ravel(logvar)[0]), np.log(grid_var[0]), atol=1e-4)


def test_posterior_at_first_step_is_point_mass_at_x0():
    # q(x_0 | x_1, x_0) = delta(x_0): mean x_0, variance 0, log-variance clipped to log beta~_2.
    d, ref = make()
    x0 = images(jax.random.key(1))
    xt = jax.random.normal(jax.random.key(2), SHAPE)
    t = jnp.zeros((SHAPE[0],), jnp.int32)
    mean, var, logvar = dm.q_posterior_mean_variance(d, x0, xt, t)
    np.testing.assert_array_equal(mean, x0)
    np.testing.assert_array_equal(np.ravel(var), 0.0)
    np.testing.assert_allclose(np.ravel(logvar), np.log(ref.post_var[1]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Reparameterisations between x_0, eps and x_{t-1}.
# ---------------------------------------------------------------------------------------------


def _draw(d, seed=0, t_values=(0, 1, 10, 100, 500, 999)):
    shape = (len(t_values), 4, 4, 1)
    x0 = jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)
    eps = jax.random.normal(jax.random.key(seed + 1), shape)
    t = jnp.asarray(t_values, jnp.int32)
    return x0, eps, t, dm.q_sample(d, x0, t, eps)


def test_predict_xstart_from_eps_recovers_x0():
    # x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, with the eps that made x_t.
    d, ref = make()
    x0, eps, t, xt = _draw(d)
    got = f64(dm.predict_xstart_from_eps(d, xt, t, eps))
    r, rm1 = np.sqrt(1 / ref.at(ref.abar, t)), np.sqrt(1 / ref.at(ref.abar, t) - 1)
    tol = 4 * EPS32 * (r * np.abs(f64(xt)) + rm1 * np.abs(f64(eps)) + 1.0)
    assert np.all(np.abs(got - f64(x0)) <= tol)


def test_predict_xstart_from_xprev_recovers_x0():
    # x_0 = (mu~ - c2 x_t) / c1, with mu~ the true posterior mean.
    d, ref = make()
    x0, _, t, xt = _draw(d, seed=3)
    xprev = ref.post_mean(f64(x0), f64(xt), np.asarray(t))
    got = f64(dm.predict_xstart_from_xprev(d, xt, t, jnp.asarray(xprev, jnp.float32)))
    tol = 4 * EPS32 * (np.abs(xprev) + ref.at(ref.c2, t) * np.abs(f64(xt))) / ref.at(ref.c1, t)
    assert np.all(np.abs(got - f64(x0)) <= tol + 1e-7)
    np.testing.assert_array_equal(got[0], f64(x0[0]))  # t = 0: c1 = 1, c2 = 0


def test_predict_eps_from_xstart_inverts_predict_xstart_from_eps():
    # eps = (sqrt(1/abar) x_t - x_0) / sqrt(1/abar - 1) undoes x_0(x_t, eps).
    d, ref = make()
    x0, eps, t, xt = _draw(d, seed=5)
    r, rm1 = np.sqrt(1 / ref.at(ref.abar, t)), np.sqrt(1 / ref.at(ref.abar, t) - 1)
    tol = 8 * EPS32 * (r * np.abs(f64(xt)) + rm1 * np.abs(f64(eps)) + 1.0) / rm1
    round_trip = dm.predict_eps_from_xstart(d, xt, t, dm.predict_xstart_from_eps(d, xt, t, eps))
    assert np.all(np.abs(f64(round_trip) - f64(eps)) <= tol)
    direct = dm.predict_eps_from_xstart(d, xt, t, x0)  # from the true x_0
    assert np.all(np.abs(f64(direct) - f64(eps)) <= tol)


# ---------------------------------------------------------------------------------------------
# p(x_{t-1} | x_t) for every parameterisation.
# ---------------------------------------------------------------------------------------------


def _model_output(var_type, key, shape=SHAPE):
    k1, k2 = jax.random.split(key)
    mean_part = jax.random.normal(k1, shape)
    if var_type == "learned":  # a log-variance
        return jnp.concatenate([mean_part, jax.random.normal(k2, shape) - 6.0], axis=-1)
    if var_type == "learned_range":  # v in [-1, 1]
        return jnp.concatenate([mean_part, jax.random.uniform(k2, shape, minval=-1.0)], axis=-1)
    return mean_part


def p_mean_variance64(ref, mean_type, var_type, out, xt, t, clip):
    """Float64 reference of p(x_{t-1} | x_t): (mean, variance, log variance, x0, eps)."""
    out, xt, c = f64(out), f64(xt), xt.shape[-1]
    mean_out, var_out = out[..., :c], out[..., c:]
    ones = np.ones(xt.shape)
    if var_type == "fixedlarge":  # sigma^2 = [beta~_1, beta_1, beta_2, ...] (0-based index 1)
        logvar = np.log(ref.at(ref.large_var, t)) * ones
    elif var_type == "fixedsmall":  # sigma^2 = beta~_t, log clipped
        logvar = ref.at(ref.post_logvar, t) * ones
    elif var_type == "learned":
        logvar = var_out
    else:  # log sigma^2 = v log beta + (1 - v) log beta~, v = (out + 1) / 2
        v = (var_out + 1.0) / 2.0
        logvar = v * np.log(ref.at(ref.betas, t)) + (1 - v) * ref.at(ref.post_logvar, t)
    maybe_clip = (lambda x: np.clip(x, -1.0, 1.0)) if clip else (lambda x: x)
    if mean_type == "eps":
        x0 = maybe_clip(ref.x0_from_eps(xt, t, mean_out))
    elif mean_type == "xstart":
        x0 = maybe_clip(mean_out)
    else:
        x0 = maybe_clip((mean_out - ref.at(ref.c2, t) * xt) / ref.at(ref.c1, t))
    mean = mean_out if mean_type == "xprev" else ref.post_mean(x0, xt, t)
    eps = mean_out if mean_type == "eps" else ref.eps_from_x0(xt, t, x0)
    if var_type == "fixedsmall":
        var = ref.at(ref.post_var, t) * ones  # beta~_0 = 0 exactly, not exp(clipped log)
    else:
        var = np.exp(logvar)
    return dict(mean=mean, variance=var, log_variance=logvar, pred_xstart=x0, eps=eps)


@pytest.mark.parametrize("var_type", dm.VAR_TYPES)
@pytest.mark.parametrize("mean_type", dm.MEAN_TYPES)
def test_p_mean_variance_matches_reference(mean_type, var_type):
    # Mean from the mean parameterisation, variance from the variance type (section 3.2).
    d, ref = make(model_mean_type=mean_type, model_var_type=var_type)
    t = jnp.asarray(T_STEPS)
    xt = jax.random.normal(jax.random.key(7), SHAPE)
    out = _model_output(var_type, jax.random.key(8))
    got = dm.p_mean_variance(d, out, xt, t, clip_denoised=True)
    want = p_mean_variance64(ref, mean_type, var_type, out, xt, np.asarray(t), clip=True)
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == SHAPE, key
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-6, err_msg=key)


def test_fixedlarge_variance_replaces_first_entry():
    # fixedlarge sigma^2 = [beta~ at index 1, betas[1:]]; fixedsmall sigma^2 = beta~.
    d, ref = make(model_var_type="fixedlarge")
    t = jnp.arange(1000, dtype=jnp.int32)
    xt = jnp.zeros((1000, 1, 1, 1))
    var, logvar = dm.model_variance(d, None, xt, t)
    np.testing.assert_allclose(np.ravel(var), ref.large_var, rtol=1e-6)
    np.testing.assert_allclose(np.ravel(logvar), np.log(ref.large_var), rtol=1e-6)
    assert float(np.ravel(var)[0]) == pytest.approx(ref.post_var[1], rel=1e-6)
    d_small = dm.Diffusion.create(ref.betas, model_var_type="fixedsmall")
    var, logvar = dm.model_variance(d_small, None, xt, t)
    np.testing.assert_allclose(np.ravel(var), ref.post_var, rtol=1e-6)
    np.testing.assert_allclose(np.ravel(logvar), ref.post_logvar, rtol=1e-6)


@pytest.mark.parametrize("v, which", [(-1.0, "small"), (1.0, "large"), (0.0, "mid")])
def test_learned_range_interpolates_log_variance(v, which):
    # v = -1 -> log beta~ (clipped), v = 1 -> log beta, v = 0 -> their midpoint.
    d, ref = make(model_var_type="learned_range")
    t = jnp.asarray(T_STEPS)
    xt = jnp.zeros((4, 1, 1, 1))
    _, logvar = dm.model_variance(d, jnp.full(xt.shape, v), xt, t)
    lo, hi = ref.post_logvar[T_STEPS], np.log(ref.betas[T_STEPS])
    want = {"small": lo, "large": hi, "mid": 0.5 * (lo + hi)}[which]
    np.testing.assert_allclose(np.ravel(logvar), want, rtol=1e-6)


@pytest.mark.parametrize("mean_type", dm.MEAN_TYPES)
def test_clip_denoised_clips_pred_xstart(mean_type):
    # clip_denoised: x0_hat <- clip(x0_hat, -1, 1) before the posterior mean; off: unclipped.
    d, ref = make(model_mean_type=mean_type)
    t = jnp.asarray([0, 5, 50, 300], jnp.int32)
    xt = 2.5 * jax.random.normal(jax.random.key(9), SHAPE)
    out = 3.0 * jax.random.normal(jax.random.key(10), SHAPE)
    clipped = dm.p_mean_variance(d, out, xt, t, clip_denoised=True)
    raw = dm.p_mean_variance(d, out, xt, t, clip_denoised=False)
    raw_x0 = f64(raw["pred_xstart"])
    assert np.any(np.abs(raw_x0) > 1.0)  # the test is meaningful
    assert np.all(np.abs(f64(clipped["pred_xstart"])) <= 1.0)
    np.testing.assert_allclose(clipped["pred_xstart"], np.clip(raw_x0, -1, 1), rtol=1e-5, atol=1e-5)
    for clip, got in ((True, clipped), (False, raw)):
        want = p_mean_variance64(ref, mean_type, "fixedlarge", out, xt, np.asarray(t), clip)
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mean_type", dm.MEAN_TYPES)
def test_true_model_output_gives_true_posterior_mean(mean_type):
    # Output = true eps / x_0 / mu~(x_0, x_t)  =>  model mean = mu~(x_0, x_t), x0_hat = x_0.
    d, ref = make(model_mean_type=mean_type)
    x0, eps, t, xt = _draw(d, seed=11)
    x0 = jnp.clip(x0, -0.99, 0.99)  # keep x0 off the clip boundary
    xt = dm.q_sample(d, x0, t, eps)
    true_mean = ref.post_mean(f64(x0), f64(xt), np.asarray(t))
    out = {"eps": eps, "xstart": x0, "xprev": jnp.asarray(true_mean, jnp.float32)}[mean_type]
    got = dm.p_mean_variance(d, out, xt, t, clip_denoised=True)
    np.testing.assert_allclose(got["mean"], true_mean, rtol=1e-5, atol=2e-6)
    mean_from_q, _, _ = dm.q_posterior_mean_variance(d, x0, xt, t)
    np.testing.assert_allclose(got["mean"], mean_from_q, rtol=1e-5, atol=2e-6)
    # x0_hat agrees with x_0 up to the amplification of the inversion (large at t = T-1).
    amp = 1.0 / np.minimum(ref.at(ref.c1, t), np.sqrt(ref.at(ref.abar, t)))
    assert np.all(np.abs(f64(got["pred_xstart"]) - f64(x0)) <= 8 * EPS32 * amp * 3)


def test_wrong_number_of_output_channels_raises():
    # Learned variance needs 2C output channels, fixed variance C.
    d, _ = make(model_var_type="learned")
    xt = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="2C"):
        dm.p_mean_variance(d, xt, xt, jnp.asarray(T_STEPS))
    d, _ = make(model_var_type="fixedsmall")
    with pytest.raises(ValueError, match="C = 2"):
        dm.p_mean_variance(d, jnp.zeros(SHAPE[:-1] + (4,)), xt, jnp.asarray(T_STEPS))


# ---------------------------------------------------------------------------------------------
# Likelihood pieces.
# ---------------------------------------------------------------------------------------------

PIXELS = np.arange(256) / 127.5 - 1.0


@pytest.mark.parametrize("mean", [-1.0, -0.5, 0.0, 0.3, 0.99, 1.2])
@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.1, 1.0])
def test_discretized_decoder_is_a_distribution_over_256_values(mean, scale):
    # sum_k p(x = k/127.5 - 1) = 1, and p matches the exact erf masses within the tanh error.
    x = jnp.asarray(PIXELS, jnp.float32)
    log_p = dm.discretized_gaussian_log_likelihood(
        x, means=jnp.full(x.shape, mean), log_scales=jnp.full(x.shape, math.log(scale))
    )
    p = np.exp(f64(log_p))
    assert p.sum() == pytest.approx(1.0, abs=1e-4)
    # vs. the same tanh-approximated masses in float64: only float32 rounding apart.
    p_tanh = np.exp(decoder_logp64(PIXELS, mean, math.log(scale)))
    np.testing.assert_allclose(p, p_tanh, atol=2e-5)
    np.testing.assert_allclose(f64(log_p)[p_tanh > 1e-3], np.log(p_tanh[p_tanh > 1e-3]), atol=2e-3)
    # vs. exact Gaussian masses: each bin is a difference of two CDFs, each within max|tanh - Phi|.
    z = np.linspace(-8, 8, 16001)
    approx_err = np.abs(approx_cdf64(z) - ndtr(z)).max()  # ~1.8e-4
    p_exact = np.exp(decoder_logp64(PIXELS, mean, math.log(scale), cdf=ndtr, floor=0.0))
    assert p_exact.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(p, p_exact, atol=2 * approx_err + 2e-5)


def test_decoder_edge_bins_extend_to_infinity():
    # p(x = -1) = Phi((-1 + 1/255 - mu)/s), p(x = 1) = 1 - Phi((1 - 1/255 - mu)/s).
    x = jnp.asarray([-1.0, 1.0, -1.0, 1.0])
    means = jnp.asarray([-3.0, 3.0, 0.0, 0.0])
    log_p = dm.discretized_gaussian_log_likelihood(x, means=means, log_scales=jnp.zeros(4))
    want = decoder_logp64(f64(x), f64(means), np.zeros(4))
    np.testing.assert_allclose(log_p, want, rtol=1e-5, atol=1e-6)
    assert float(log_p[0]) > math.log(0.97)  # mass far below -1 all belongs to x = -1


@pytest.mark.parametrize(
    "m1, lv1, m2, lv2",
    [
        (0.0, 0.0, 0.0, 0.0),
        (0.3, -2.0, 0.3, -2.0),
        (1.0, 0.0, 0.0, 0.0),
        (0.2, -1.0, -0.4, 0.5),
        (-1.5, 0.7, 0.1, -0.3),
    ],
)
def test_normal_kl_closed_form_and_monte_carlo(m1, lv1, m2, lv2):
    # KL = E_{x~N1}[log N1(x) - log N2(x)] = 0.5 (lv2 - lv1 + e^{lv1-lv2} + (m1-m2)^2 e^{-lv2} - 1).
    got = float(dm.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    if (m1, lv1) == (m2, lv2):
        assert got == 0.0
        return
    closed = kl64(m1, lv1, m2, lv2)
    assert got == pytest.approx(closed, rel=1e-5)
    rng = np.random.default_rng(0)
    x = m1 + math.exp(0.5 * lv1) * rng.standard_normal(400000)
    log_ratio = (
        -0.5 * lv1
        - 0.5 * (x - m1) ** 2 / math.exp(lv1)
        + 0.5 * lv2
        + 0.5 * (x - m2) ** 2 / math.exp(lv2)
    )
    se = log_ratio.std() / math.sqrt(x.size)
    assert abs(got - log_ratio.mean()) < 5 * se


def test_prior_bpd_matches_reference():
    # L_T = mean_dims KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) / ln 2.
    for big_t, beta_end in ((1000, 0.02), (20, 0.2)):
        d, ref = make(big_t, beta_end=beta_end)
        x0 = images(jax.random.key(12))
        abar = ref.abar[-1]
        want = kl64(np.sqrt(abar) * f64(x0), np.log1p(-abar), 0.0, 0.0).mean((1, 2, 3)) / LN2
        np.testing.assert_allclose(dm.prior_bpd(d, x0), want, rtol=1e-3, atol=2e-7)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned_range"])
@pytest.mark.parametrize("mean_type", dm.MEAN_TYPES)
def test_vb_terms_bpd_matches_reference(mean_type, var_type):
    # L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2 (t > 0); L_0 = -log p(x_0|x_1)/ln 2.
    d, ref = make(model_mean_type=mean_type, model_var_type=var_type)
    t = jnp.asarray(T_STEPS)
    x0 = images(jax.random.key(13))
    xt = dm.q_sample(d, x0, t, jax.random.normal(jax.random.key(14), SHAPE))
    out = _model_output(var_type, jax.random.key(15))
    if mean_type == "xprev":  # keep the mean near the truth so that L_0 is not at the 1e-12 floor
        true_mean = ref.post_mean(f64(x0), f64(xt), T_STEPS)
        out = out.at[..., :2].set(jnp.asarray(true_mean, jnp.float32) + 0.003 * out[..., :2])
    elif mean_type == "xstart":
        out = out.at[..., :2].set(x0 + 0.003 * out[..., :2])
    got, pred_x0 = dm.vb_terms_bpd(d, out, x0, xt, t, clip_denoised=True)
    p = p_mean_variance64(ref, mean_type, var_type, out, xt, T_STEPS, clip=True)
    kl = (
        kl64(
            ref.post_mean(f64(x0), f64(xt), T_STEPS),
            ref.at(ref.post_logvar, T_STEPS),
            p["mean"],
            p["log_variance"],
        ).mean((1, 2, 3))
        / LN2
    )
    nll = -decoder_logp64(x0, p["mean"], 0.5 * p["log_variance"]).mean((1, 2, 3)) / LN2
    want = np.where(T_STEPS == 0, nll, kl)
    assert got.shape == (SHAPE[0],)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # x0_hat from x_{t-1} divides by c1 (~1e-4 at t = T-1): float32 error grows as 1/c1.
    amp = 1.0 / ref.at(ref.c1, T_STEPS) if mean_type == "xprev" else 1.0
    assert np.all(np.abs(f64(pred_x0) - p["pred_xstart"]) <= 1e-5 + 16 * EPS32 * amp)


# ---------------------------------------------------------------------------------------------
# Training objectives.
# ---------------------------------------------------------------------------------------------


def documented_draw(d, x_start, key):
    """The (t, noise) that training_losses draws from key (its docstring's recipe)."""
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x_start.shape[0],), 0, d.num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(noise_key, x_start.shape, dtype=x_start.dtype)


def true_target_model(ref, mean_type, x_start, noise, var_half=None):
    """model_fn(x_t, t) returning the exact mse target: eps, x_0 or mu~(x_0, x_t)."""
    c1 = jnp.asarray(ref.c1, jnp.float32)
    c2 = jnp.asarray(ref.c2, jnp.float32)

    def model_fn(x_t, t):
        if mean_type == "eps":
            out = noise
        elif mean_type == "xstart":
            out = x_start
        else:
            out = c1[t][:, None, None, None] * x_start + c2[t][:, None, None, None] * x_t
        return out if var_half is None else jnp.concatenate([out, var_half], axis=-1)

    return model_fn


@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
@pytest.mark.parametrize("mean_type", dm.MEAN_TYPES)
def test_mse_loss_is_zero_for_the_true_target(mean_type, var_type):
    # L_simple = mean (target - output)^2 = 0 when output = target (eps / x_0 / mu~).
    d, ref = make(model_mean_type=mean_type, model_var_type=var_type, loss_type="mse")
    x0, key = images(jax.random.key(16)), jax.random.key(17)
    t, noise = documented_draw(d, x0, key)
    var_half = jnp.zeros(SHAPE) if d.learned_variance else None
    seen = {}

    def spy(x_t, t_in):
        seen["t"], seen["x_t"] = t_in, x_t
        return true_target_model(ref, mean_type, x0, noise, var_half)(x_t, t_in)

    losses = dm.training_losses(d, spy, x0, key)
    assert losses.shape == (SHAPE[0],)
    np.testing.assert_array_equal(seen["t"], t)
    np.testing.assert_allclose(seen["x_t"], dm.q_sample(d, x0, t, noise), rtol=1e-6, atol=1e-6)
    assert float(jnp.max(losses)) < 1e-10
    # A model off by 0.1 everywhere gets exactly mean((0.1)^2) = 0.01 (a mean, not a sum).
    off = lambda x_t, t_in: spy(x_t, t_in).at[..., :2].add(0.1)
    np.testing.assert_allclose(dm.training_losses(d, off, x0, key), 0.01, rtol=1e-4)


def test_kl_loss_equals_vb_terms_bpd():
    # loss_type kl = L_{t-1} (or L_0) at the drawn t, with clip_denoised=False (as the original).
    d, _ = make(20, beta_end=0.2, model_mean_type="xstart", loss_type="kl")
    x0 = images(jax.random.key(18), (8, 4, 4, 1))
    model_fn = lambda x_t, t: 3.0 * x_t  # x0_hat outside [-1, 1], so clipping would matter
    for seed in range(3):
        key = jax.random.key(100 + seed)
        t, noise = documented_draw(d, x0, key)
        xt = dm.q_sample(d, x0, t, noise)
        want, _ = dm.vb_terms_bpd(d, model_fn(xt, t), x0, xt, t, clip_denoised=False)
        clipped, _ = dm.vb_terms_bpd(d, model_fn(xt, t), x0, xt, t, clip_denoised=True)
        got = dm.training_losses(d, model_fn, x0, key)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert not np.allclose(got, clipped)


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
@pytest.mark.parametrize("mean_type", ["eps", "xprev"])
def test_hybrid_loss_value_and_gradients(mean_type, var_type):
    # hybrid = L_simple + (T/1000) L_vb with the mean stop-gradiented inside L_vb.
    big_t = 100  # T/1000 = 0.1, so the weight is visible
    kw = dict(model_mean_type=mean_type, model_var_type=var_type, beta_end=0.2)
    d, ref = make(big_t, loss_type="hybrid", **kw)
    d_kl, _ = make(big_t, loss_type="kl", **kw)
    shape = (4, 4, 4, 1)
    x0 = images(jax.random.key(19), shape)
    t = jnp.asarray([0, 1, 50, 99], jnp.int32)
    noise = jax.random.normal(jax.random.key(20), shape)
    xt = dm.q_sample(d, x0, t, noise)
    target = {"eps": noise, "xprev": ref.post_mean(f64(x0), f64(xt), np.asarray(t))}[mean_type]
    target = jnp.asarray(target, jnp.float32)
    # A model near the truth, so that L_0 is not evaluated deep in the tails, where float32
    # cancellation in the decoder's CDF differences makes the gradients noisy.
    out = _model_output(var_type, jax.random.key(21), shape)
    out = out.at[..., :1].set(target + (0.3 if mean_type == "eps" else 0.01) * out[..., :1])

    hybrid = lambda o: dm.losses_from_output(d, o, x0, xt, t, noise)
    vb = lambda o: dm.vb_terms_bpd(d, o, x0, xt, t, clip_denoised=False)[0]
    mse = lambda o: jnp.mean(jnp.square(target - o[..., :1]), axis=(1, 2, 3))
    np.testing.assert_allclose(hybrid(out), mse(out) + 0.1 * vb(out), rtol=1e-5)
    np.testing.assert_allclose(
        dm.losses_from_output(d_kl, out, x0, xt, t, noise), vb(out), rtol=1e-6
    )

    grad = lambda f: jax.jit(jax.grad(lambda o: jnp.sum(f(o))))(out)
    g, g_mse, g_vb = grad(hybrid), grad(mse), grad(vb)
    assert float(jnp.max(jnp.abs(g_vb[..., :1]))) > 1e-3  # without the stop-gradient it would leak
    # (atol: the code's float32 target vs ours differ by an ulp; a leak would be ~1e-3.)
    np.testing.assert_allclose(g[..., :1], g_mse[..., :1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g[..., 1:], 0.1 * g_vb[..., 1:], rtol=1e-4, atol=1e-8)
    assert float(jnp.max(jnp.abs(g[..., 1:]))) > 0


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_hybrid_with_fixed_variance_raises(var_type):
    # hybrid trains a learned variance: a fixed one is a configuration error.
    d, _ = make(20, model_var_type=var_type, loss_type="hybrid")
    x0 = images(jax.random.key(22), (2, 4, 4, 1))
    with pytest.raises(ValueError, match="learned"):
        dm.training_losses(d, lambda x_t, t: x_t, x0, jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# The full bound.
# ---------------------------------------------------------------------------------------------


def test_calc_bpd_loop_of_the_true_posterior_model():
    # With p = q(x_{t-1}|x_t,x_0) (xprev, fixedsmall) every L_{t-1}, t > 1, is 0: bound = L_T + L_0.
    big_t = 20
    d, ref = make(big_t, beta_end=0.2, model_mean_type="xprev", model_var_type="fixedsmall")
    shape = (2, 4, 4, 1)
    x0 = images(jax.random.key(23), shape)
    traces = []

    def model_fn(x_t, t):
        traces.append(t.shape)
        return true_target_model(ref, "xprev", x0, None)(x_t, t)

    bpd = jax.jit(lambda x, k: dm.calc_bpd_loop(d, model_fn, x, k))
    out = bpd(x0, jax.random.key(24))
    assert len(traces) == 1  # one lax.scan body, not T unrolled calls
    out2 = bpd(x0, jax.random.key(25))
    assert len(traces) == 1  # and no retrace on the second call

    assert out["terms_bpd"].shape == (2, big_t)
    assert out["xstart_mse"].shape == out["mse"].shape == (2, big_t)
    assert out["total_bpd"].shape == out["prior_bpd"].shape == (2,)
    np.testing.assert_allclose(out["terms_bpd"][:, 1:], 0.0, atol=1e-5)
    # L_0: decoder with mean x_0 (c1 = 1, c2 = 0) and log-variance log beta~ at index 1.
    nll = -decoder_logp64(x0, f64(x0), 0.5 * ref.post_logvar[0] * np.ones(shape))
    np.testing.assert_allclose(out["terms_bpd"][:, 0], nll.mean((1, 2, 3)) / LN2, rtol=1e-5)
    abar = ref.abar[-1]
    prior = kl64(np.sqrt(abar) * f64(x0), np.log1p(-abar), 0.0, 0.0).mean((1, 2, 3)) / LN2
    np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-5)
    np.testing.assert_allclose(out["total_bpd"], prior + out["terms_bpd"][:, 0], rtol=1e-5)
    np.testing.assert_allclose(out2["total_bpd"], out["total_bpd"], rtol=1e-4)  # x_t-independent
    np.testing.assert_allclose(out["xstart_mse"], 0.0, atol=1e-8)


def test_calc_bpd_loop_term_order():
    # terms_bpd[:, t] is L_t of 0-based step t: a model wrong only at step 7 raises only term 7.
    big_t = 20
    d, ref = make(big_t, beta_end=0.2, model_mean_type="xprev", model_var_type="fixedsmall")
    x0 = images(jax.random.key(26), (2, 4, 4, 1))
    exact = true_target_model(ref, "xprev", x0, None)
    model_fn = lambda x_t, t: exact(x_t, t) + jnp.where(t == 7, 0.05, 0.0)[:, None, None, None]
    terms = np.asarray(dm.calc_bpd_loop(d, model_fn, x0, jax.random.key(27))["terms_bpd"])
    others = np.delete(terms, 7, axis=1)
    assert np.all(terms[:, 7] > 1e-2)
    np.testing.assert_allclose(others[:, 1:], 0.0, atol=1e-5)
    # KL of two Gaussians with equal variance: 0.5 (0.05)^2 / beta~_7, in bits.
    np.testing.assert_allclose(terms[:, 7], 0.5 * 0.05**2 / ref.post_var[7] / LN2, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# jit == eager.
# ---------------------------------------------------------------------------------------------


def _jit_cases():
    d, _ = make(
        50, beta_end=0.2, model_mean_type="eps", model_var_type="learned_range", loss_type="hybrid"
    )
    shape = (2, 4, 4, 1)
    x0 = images(jax.random.key(28), shape)
    t = jnp.asarray([0, 37], jnp.int32)
    noise = jax.random.normal(jax.random.key(29), shape)
    xt = dm.q_sample(d, x0, t, noise)
    out = _model_output("learned_range", jax.random.key(30), shape)
    model_fn = lambda x, tt: jnp.concatenate([0.5 * x, jnp.tanh(x)], axis=-1)
    return {
        "q_sample": (lambda x0, t, n: dm.q_sample(d, x0, t, n), (x0, t, noise)),
        "q_posterior": (lambda x0, xt, t: dm.q_posterior_mean_variance(d, x0, xt, t), (x0, xt, t)),
        "p_mean_variance": (lambda o, xt, t: dm.p_mean_variance(d, o, xt, t), (out, xt, t)),
        "vb_terms_bpd": (
            lambda o, x0, xt, t: dm.vb_terms_bpd(d, o, x0, xt, t, clip_denoised=True),
            (out, x0, xt, t),
        ),
        "training_losses": (
            lambda x0, k: dm.training_losses(d, model_fn, x0, k),
            (x0, jax.random.key(31)),
        ),
        "decoder": (
            lambda x, m, s: dm.discretized_gaussian_log_likelihood(x, means=m, log_scales=s),
            (x0, 0.9 * x0, jnp.full(shape, -3.0)),
        ),
        "normal_kl": (dm.normal_kl, (x0, noise, xt, 0.5 * noise)),
        "prior_bpd": (lambda x0: dm.prior_bpd(d, x0), (x0,)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "q_sample",
        "q_posterior",
        "p_mean_variance",
        "vb_terms_bpd",
        "training_losses",
        "decoder",
        "normal_kl",
        "prior_bpd",
    ],
)
def test_jit_matches_eager(name):
    # f(x) == jit(f)(x).
    fn, args = _jit_cases()[name]
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
