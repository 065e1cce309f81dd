"""The reverse chains, each one ``lax.scan``: ancestral (Algorithm 2, respaced), DDIM and its
clipped variants, DPM-Solver++(2M) and (3M), EDM's Heun (deterministic, or stochastic with
churn); spacings, progressive, interpolation.

Every sampler is a pure function of (diffusion, model_fn, key, ...) that compiles to a single
scan over its steps: one dispatch for the whole chain, no Python loop and no ``lax.cond`` per
step. Per-step coefficients are float64 numpy constants computed from the process's betas when
the chain is traced: from its ``diffusion.Schedule64`` (``schedule=``), which is read from the
Diffusion itself when that is not traced.

The model interface (what a step calls, and all it calls):

    model_fn(x_t, t) -> output

``x_t`` float32 ``[B, H, W, C]``, ``t`` int32 ``[B]`` trained timesteps in [0, T); ``output`` is
the network's raw output as training defines it (eps, x0 or x_{t-1} by
``diffusion.model_mean_type``; with the variance channels for learned-variance models). Steps
read it through ``diffusion.p_mean_variance``, so a wrapper that returns the same kind of output
(classifier-free guidance: ``(1 + w) f(x, t, y) - w f(x, t, null)``) needs no other sampler. In
the compiled chain (``get_sampling_fn``) the model_fn is built inside the jit by
``build_model_fn(graphdef, params, model_args)``, where ``model_args`` is any pytree passed at
call time (labels, a guidance scale): traced, so new values never recompile. ``eta`` is traced
too; only the sampler, the number of steps, the spacing, thresholding, churn, the shape and the
mesh compile.

Samplers (``VARIANTS`` says exactly what each computes; the README cites the papers):
``ancestral``, ``ddim`` (x0 not clipped), ``ddim_clipped``, ``ddim_iddpm``, ``dpm_solver++``
(2M), ``dpm_solver++_3m``, ``heun``. Spacings (``spacing_timesteps``): ``uniform``,
``quadratic``, ``linspace``, ``leading``, ``trailing``, ``karras``.

Randomness: ``x_T ~ N(0, I)`` is drawn from ``split(key)[0]``, and the noise of the step at
(model) timestep t from ``fold_in(split(key)[1], t)``; draws do not depend on how the batch is
sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import config_lib, diffusion, images, sharding, unet, xla_cpu
from ddpm_jax.diffusion import Diffusion, Schedule64

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_key, chain_key = jax.random.split(key)
    return x_key, chain_key


def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T ~ N(0, I) exactly as the samplers draw it from ``key``."""
    return jax.random.normal(_keys(key)[0], shape, dtype=jnp.float32)


def p_sample(
    d: Diffusion,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{t-1} = mean + sigma_t z (z = 0 at t = 0): (x_{t-1}, x0_hat).

    ``t`` is ``int32 [B]`` (all equal inside the chain); ``noise`` is z ~ N(0, I).
    """
    out = diffusion.p_mean_variance(d, model_fn(x_t, t).astype(jnp.float32), x_t, t,
                               clip_denoised=clip_denoised)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["pred_xstart"]


def _chain(step_fn, carry, xs, record_every: int | None, carry_sharding=None):
    """Runs ``step_fn(carry, xs_i) -> (carry, pred_xstart)`` over the steps ``xs`` as scans.

    ``carry`` is x_t or a tuple whose first entry is x_t (the other entries have its shape);
    ``xs`` an array or a dict of arrays with one row per step. Without ``record_every``: one
    scan, returns x_0. With it: an outer scan of ``steps / record_every`` chunks of an inner
    scan, returning (x_0, xs, x0s) where ``xs[k]`` / ``x0s[k]`` are x_t and the predicted x_0
    after chunk k (``[K, B, H, W, C]``). ``carry_sharding`` pins the carry to a layout (the batch
    split over the devices).
    """
    first = lambda c: c[0] if isinstance(c, tuple) else c
    if carry_sharding is not None:
        pin = lambda c: jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, carry_sharding), c)
        inner = step_fn
        step_fn = lambda c, x: (lambda out: (pin(out[0]), out[1]))(inner(c, x))
        carry = pin(carry)
    if record_every is None:
        carry, _ = jax.lax.scan(lambda c, x: (step_fn(c, x)[0], None), carry, xs)
        return first(carry)
    n = jax.tree.leaves(xs)[0].shape[0]
    if n % record_every:
        raise ValueError(f"record_every={record_every} must divide the {n} steps of the chain")

    def chunk(c, xs_chunk):
        c, preds = jax.lax.scan(step_fn, c, xs_chunk)
        return c, (first(c), preds[-1])

    chunks = jax.tree.map(lambda a: a.reshape(n // record_every, record_every, *a.shape[1:]), xs)
    carry, (xs_out, x0s) = jax.lax.scan(chunk, carry, chunks)
    return first(carry), xs_out, x0s


def ancestral_step_fn(d: Diffusion, model_fn: ModelFn, chain_key: jax.Array, *,
                      clip_denoised: bool = True, timestep_map: jax.Array | None = None,
                      shared_noise: bool = False):
    """The step ``(x_t, t) -> (x_{t-1}, pred_xstart)`` of Algorithm 2 for a scan over t.

    The noise of step t is ``normal(fold_in(chain_key, t))``, one draw per row, or one draw
    shared by every row with ``shared_noise`` (interpolation). ``timestep_map[t]`` is the
    model's timestep of step t of a respaced process.
    """
    model_t = (lambda t: t) if timestep_map is None else (lambda t: timestep_map[t])
    fn = lambda x, t: model_fn(x, model_t(t))

    def step_fn(x, t_scalar):
        t = jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)
        shape = (1,) + x.shape[1:] if shared_noise else x.shape
        noise = jax.random.normal(jax.random.fold_in(chain_key, t_scalar), shape, x.dtype)
        return p_sample(d, fn, x, t, jnp.broadcast_to(noise, x.shape),
                        clip_denoised=clip_denoised)

    return step_fn


def sample_loop(
    d: Diffusion,
    model_fn: ModelFn,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    x_T: jax.Array | None = None,
    clip_denoised: bool = True,
    record_every: int | None = None,
    timestep_map: jax.Array | None = None,
    carry_sharding=None,
):
    """Ancestral sampling (Algorithm 2) from x_T to x_0, one ``lax.scan`` over all steps.

    Args:
      d: the process (a respaced one from ``respace`` samples on a subsequence).
      model_fn: ``(x_t, t) -> output``; it receives ``timestep_map[t]`` when a map is given.
      key: randomness of x_T (unless ``x_T`` is given) and of every step's noise.
      shape: ``[B, H, W, C]``.
      x_T: optional starting noise.
      clip_denoised: clip the predicted x_0 to [-1, 1], as the original does.
      record_every: also return the chain every k steps (see ``_chain``).
      timestep_map: model timestep of each step of ``d`` (for respaced chains).
      carry_sharding: the layout of x_t over the devices (see ``_chain``).
    Returns:
      x_0 ``[B, H, W, C]`` float32 (or (x_0, xs, x0s) with ``record_every``).
    """
    x_key, chain_key = _keys(key)
    if x_T is None:
        x_T = jax.random.normal(x_key, shape, dtype=jnp.float32)
    step_fn = ancestral_step_fn(d, model_fn, chain_key, clip_denoised=clip_denoised,
                                timestep_map=timestep_map)
    ts = jnp.arange(d.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    return _chain(step_fn, x_T, ts, record_every, carry_sharding)


# ---------------------------------------------------------------------------------------------
# Step spacings: the model timesteps a short chain evaluates, from its first step down.
# ---------------------------------------------------------------------------------------------

# The sampler's own spacing when none is given (diffusers defaults DPM-Solver++ to linspace).
DEFAULT_SPACING = {"ancestral": "uniform", "ddim": "uniform", "ddim_clipped": "uniform",
                   "ddim_iddpm": "uniform", "dpm_solver++": "linspace",
                   "dpm_solver++_3m": "linspace", "heun": "karras"}
# The sampler's own step count when none is given: all T steps, DPM-Solver++ 20 (its authors'
# "can almost converge"), EDM's Heun 18 (its paper's CIFAR10 setting, 35 network calls).
DEFAULT_STEPS = {"dpm_solver++": 20, "dpm_solver++_3m": 20, "heun": 18}
DPM_SOLVERS = {"dpm_solver++": 2, "dpm_solver++_3m": 3}  # the multistep order of each
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0


def sigma_levels(betas64) -> np.ndarray:
    """EDM's noise level of every trained step: sigma_t = sqrt((1 - abar_t) / abar_t), float64."""
    abar = np.cumprod(1.0 - np.asarray(betas64, np.float64))
    return np.sqrt((1.0 - abar) / abar)


def nearest_levels(levels: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The index of the trained level nearest to each sigma (EDM iDDPMPrecond's
    ``round_sigma``): int ``[len(sigmas)]``."""
    return np.abs(np.asarray(sigmas)[:, None] - levels[None, :]).argmin(1)


def karras_sigmas(levels: np.ndarray, n: int) -> np.ndarray:
    """EDM's rho = 7 spacing between max(0.002, sigma_0) and min(80, sigma_{T-1}): ``[n]``.

    sigma_i = (smax^(1/rho) + i / (n - 1) (smin^(1/rho) - smax^(1/rho)))^rho (EDM Eq. 5).
    """
    smin, smax = max(EDM_SIGMA_MIN, levels[0]), min(EDM_SIGMA_MAX, levels[-1])
    i = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    return (smax ** (1 / EDM_RHO) + i * (smin ** (1 / EDM_RHO) - smax ** (1 / EDM_RHO))) ** EDM_RHO


def spacing_timesteps(spacing: str, betas64, num_steps: int, sampler: str = "ddim") -> np.ndarray:
    """The distinct model timesteps of a ``num_steps`` chain, descending: int64 ``[<= S]``.

    Every spacing is the set its source computes (README, "Step spacings"); a timestep listed
    twice (quadratic or karras at many steps) is kept once: a DDIM step from t to t is the
    identity, so the chain is unchanged and one network call is saved. ``linspace`` and
    ``leading`` follow the scheduler of the sampler in diffusers: ``DDIMScheduler`` for all but
    the DPM-Solvers, whose ``DPMSolverMultistepScheduler`` takes S + 1 points and drops the
    smallest.
    """
    T, S = len(betas64), num_steps
    if not 1 <= S <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {S}")
    dpm = sampler in DPM_SOLVERS
    if spacing == "uniform" or (spacing == "leading" and not dpm):
        ts = np.arange(S) * (T // S)  # DDIM paper; diffusers leading, steps_offset = 0
    elif spacing == "leading":
        ts = (np.arange(S + 1) * (T // (S + 1)))[1:]
    elif spacing == "quadratic":  # ermongroup/ddim skip_type "quad"
        ts = np.array([int(s) for s in np.linspace(0, np.sqrt(0.8 * T), S) ** 2])
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, S + 1).round()[1:] if dpm else np.linspace(0, T - 1, S).round()
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / S)) - 1
    elif spacing == "karras":  # each EDM sigma rounded to the nearest trained level
        levels = sigma_levels(betas64)
        ts = nearest_levels(levels, karras_sigmas(levels, S))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of "
                         f"{', '.join(config_lib.SPACINGS)}")
    return np.unique(ts.astype(np.int64))[::-1]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The uniform subsequence tau_i = i * (T // S), i = 0..S-1 (int32 [S], ascending)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    return (np.arange(num_steps) * (num_timesteps // num_steps)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The samplers. Each takes ``model_fn``; its per-step coefficients are float64 numpy constants
# computed from the process's betas when the chain is traced.
# ---------------------------------------------------------------------------------------------


def _schedule(d: Diffusion, schedule: Schedule64 | None) -> Schedule64:
    return Schedule64.of(d) if schedule is None else schedule


def _denoise(d: Diffusion, model_fn: ModelFn, x_t: jax.Array, t_scalar) -> dict[str, jax.Array]:
    """The network at (x_t, t) as (unclipped) ``pred_xstart`` and ``eps`` (``p_mean_variance``)."""
    t = jnp.full((x_t.shape[0],), t_scalar, dtype=jnp.int32)
    return diffusion.p_mean_variance(d, model_fn(x_t, t).astype(jnp.float32), x_t, t,
                                     clip_denoised=False)


def _clip(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -1.0, 1.0)


def ddim_coefficients(betas64, ts: np.ndarray) -> dict[str, np.ndarray]:
    """Per step i (t_i -> t_{i+1}, then -> x_0 with abar = 1): float64 ``[S]`` arrays.

    ``sqrt_abar_prev``, ``one_minus_abar_prev`` and ``sigma1``, the step's sigma at eta = 1:
    sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Song et al. Eq. 16).
    """
    abar = np.cumprod(1.0 - np.asarray(betas64, np.float64))
    a_t = abar[ts]
    a_prev = np.append(abar[ts[1:]], 1.0)
    sigma1 = np.sqrt((1.0 - a_prev) / (1.0 - a_t)) * np.sqrt(1.0 - a_t / a_prev)
    return dict(sqrt_abar_prev=np.sqrt(a_prev), one_minus_abar_prev=1.0 - a_prev, sigma1=sigma1)


def ddim_step_fn(d: Diffusion, model_fn: ModelFn, chain_key: jax.Array, eta, *,
                 variant: str = "ddim"):
    """The DDIM step ``(x_t, xs_i) -> (x_{t'}, x0_hat)`` for a scan over ``ddim_coefficients``.

    x_{t'} = sqrt(abar_t') x0 + sqrt(1 - abar_t' - s^2) eps + s z, s = eta sigma1; z from
    ``fold_in(chain_key, t)``. ``variant``: "ddim" (Song et al.: x0 and eps as the model gives
    them), "ddim_clipped" (x0 clipped, the model's eps: diffusers' ``clip_sample=True``),
    "ddim_iddpm" (x0 clipped, eps derived again from it: Improved DDPM's ``ddim_sample``).
    """

    def step_fn(x, xs):
        out = _denoise(d, model_fn, x, xs["t"])
        x0, eps = out["pred_xstart"], out["eps"]
        if variant != "ddim":
            x0 = _clip(x0)
        if variant == "ddim_iddpm":
            t = jnp.full((x.shape[0],), xs["t"], dtype=jnp.int32)
            eps = diffusion.predict_eps_from_xstart(d, x, t, x0)
        sigma = eta * xs["sigma1"]
        noise = jax.random.normal(jax.random.fold_in(chain_key, xs["t"]), x.shape, x.dtype)
        direction = jnp.sqrt(jnp.maximum(xs["one_minus_abar_prev"] - sigma**2, 0.0))
        return xs["sqrt_abar_prev"] * x0 + direction * eps + sigma * noise, x0

    return step_fn


def _dpm_points(betas64, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(EDM sigma, alpha = sqrt(abar), sigma = sqrt(1 - abar)) at ``ts`` and then at sigma = 0:
    float64 ``[S + 1]``, the points the DPM-Solvers step between."""
    s_edm = np.append(sigma_levels(betas64)[ts], 0.0)
    alpha = 1.0 / np.sqrt(1.0 + s_edm**2)
    return s_edm, alpha, s_edm * alpha


def dpm_solver_coefficients(betas64, ts: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++(2M) on ``ts`` then to sigma = 0, midpoint form, as float64 ``[S]`` arrays.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_{i+1} - lambda_i, step i is x <- a x + b D0 + c (D0 - D_prev), where D is the
    predicted x0: a = sigma_{i+1} / sigma_i, b = -alpha_{i+1} (e^{-h} - 1) (first order: DDIM,
    eta 0) and c = b / (2 r), r = h_{i-1} / h (second order, Lu et al. 2022 Alg. 2); c = 0 at
    the first step (no history) and at the last (to sigma = 0; diffusers' ``lower_order_final``).
    """
    s_edm, alpha, sigma = _dpm_points(betas64, ts)
    ratio = s_edm[1:] / s_edm[:-1]  # e^{-h_i}
    a = sigma[1:] / sigma[:-1]
    b = alpha[1:] * (1.0 - ratio)
    c = np.zeros_like(b)
    with np.errstate(divide="ignore"):
        h = np.log(s_edm[:-1]) - np.log(s_edm[1:])
    second = np.arange(1, len(ts) - 1)
    c[second] = b[second] / (2.0 * (h[second - 1] / h[second]))
    return dict(a=a, b=b, c=c)


def dpm_solver_3m_orders(num_steps: int) -> np.ndarray:
    """The order of each step of DPM-Solver++(3M) as diffusers runs it (``solver_order=3``,
    ``lower_order_final``, ``final_sigmas_type="zero"``): 1 at the first step (no history) and
    at the last (to sigma = 0), 2 at the second and, below 15 steps, at the second to last; 3
    everywhere else."""
    orders = np.full(num_steps, 3)
    orders[1:2] = 2
    if num_steps < 15:
        orders[-2:] = 2
    orders[0] = orders[-1] = 1
    return orders


def dpm_solver_3m_coefficients(betas64, ts: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++(3M) on ``ts`` then to sigma = 0, as float64 ``[S]`` arrays: step i is
    x <- a x + w0 D_i + w1 D_{i-1} + w2 D_{i-2} over the predicted x0 of this and the two
    previous steps, at the order of ``dpm_solver_3m_orders``.

    With h = lambda_{i+1} - lambda_i, r0 = h_{i-1} / h, r1 = h_{i-2} / h and E = e^{-h} - 1,
    third order is x <- a x - alpha' E D0 + alpha' (E / h + 1) D1 - alpha' ((E + h) / h^2 - 1/2)
    D2, where D1_0 = (D_i - D_{i-1}) / r0, D1_1 = (D_{i-1} - D_{i-2}) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) and D2 = (D1_0 - D1_1) / (r0 + r1) (Lu et al. 2022;
    the authors' ``multistep_dpm_solver_third_update``); second order is 2M's midpoint step.
    """
    s_edm, alpha, sigma = _dpm_points(betas64, ts)
    with np.errstate(divide="ignore"):
        lam = -np.log(s_edm)  # log(alpha / sigma)
    n = len(ts)
    a = sigma[1:] / sigma[:-1]
    w = np.zeros((3, n))
    for i, order in enumerate(dpm_solver_3m_orders(n)):
        if order == 1:
            w[0, i] = alpha[i + 1] * (1.0 - s_edm[i + 1] / s_edm[i])
            continue
        h = lam[i + 1] - lam[i]
        e = np.expm1(-h)
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if order == 2:
            w[:, i] = -alpha[i + 1] * e * (np.array([1.0, 0.0, 0.0]) + 0.5 * d1_0)
            continue
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        w[:, i] = alpha[i + 1] * (-e * np.array([1.0, 0.0, 0.0]) + (e / h + 1.0) * d1
                                  - ((e + h) / h**2 - 0.5) * d2)
    return dict(a=a, w0=w[0], w1=w[1], w2=w[2])


def dpm_solver_step_fn(d: Diffusion, model_fn: ModelFn, *, thresholding: bool = False,
                       order: int = 2):
    """The DPM-Solver++(2M) step ``((x, D_prev), xs_i) -> ((x', D0), D0)``, or with
    ``order=3`` the (3M) step ``((x, D_prev, D_prev2), xs_i) -> ((x', D0, D_prev), D0)`` (the
    coefficients of ``dpm_solver_coefficients`` / ``dpm_solver_3m_coefficients``).

    ``thresholding``: clip each predicted x0 to [-1, 1] (diffusers' ``thresholding=True`` with
    ``sample_max_value=1``; the paper's thresholding for bounded data).
    """

    def predict(x, t):
        x0 = _denoise(d, model_fn, x, t)["pred_xstart"]
        return _clip(x0) if thresholding else x0

    def step_fn(carry, xs):
        x, d_prev = carry
        x0 = predict(x, xs["t"])
        x = xs["a"] * x + xs["b"] * x0 + xs["c"] * (x0 - d_prev)
        return (x, x0), x0

    def step_fn_3m(carry, xs):
        x, d_prev, d_prev2 = carry
        x0 = predict(x, xs["t"])
        x = xs["a"] * x + xs["w0"] * x0 + xs["w1"] * d_prev + xs["w2"] * d_prev2
        return (x, x0, d_prev), x0

    if order not in (2, 3):
        raise ValueError(f"DPM-Solver++ order must be 2 or 3, got {order!r}")
    return step_fn if order == 2 else step_fn_3m


def heun_coefficients(betas64, ts: np.ndarray, churn: float = 0.0) -> dict[str, np.ndarray]:
    """EDM's sigmas of ``ts`` (trained levels) with sigma_N = 0 and each level's input scale
    c_in = 1 / sqrt(sigma^2 + 1) = sqrt(abar_t) (float64 ``[N + 1]``); with ``churn``
    (S_churn), also each step's raised level (``[N]``): gamma = min(S_churn / N, sqrt(2) - 1),
    sigma_hat = sigma (1 + gamma) rounded to the nearest trained level (iDDPMPrecond's
    ``round_sigma``) at timestep ``t_hat``, and the noise scale sqrt(sigma_hat^2 - sigma^2)."""
    levels = sigma_levels(betas64)
    sigma = np.append(levels[ts], 0.0)
    out = dict(sigma=sigma, c_in=1.0 / np.sqrt(sigma**2 + 1.0))
    if churn:
        gamma = min(churn / len(ts), np.sqrt(2.0) - 1.0)
        t_hat = nearest_levels(levels, sigma[:-1] * (1.0 + gamma))
        s_hat = levels[t_hat]
        out.update(t_hat=t_hat, sigma_hat=s_hat, c_in_hat=1.0 / np.sqrt(s_hat**2 + 1.0),
                   noise=np.sqrt(np.maximum(s_hat**2 - sigma[:-1] ** 2, 0.0)))
    return out


def heun_step_fn(d: Diffusion, model_fn: ModelFn, ts: np.ndarray,
                 schedule: Schedule64 | None = None, *, churn: float = 0.0,
                 chain_key: jax.Array | None = None):
    """EDM's step ``(x, i) -> (x_{i+1}, D(x_i))`` on ``ts`` (Karras et al. 2022, Algorithm 1;
    with ``churn`` > 0, Algorithm 2 with S_churn = ``churn``, S_tmin = 0, S_tmax = inf,
    S_noise = 1, EDM's ``generate.py`` defaults), and ``final(x)``, the last step to sigma = 0.

    On x = x_t / sqrt(abar_t), the denoiser is D(x; sigma_i) = x0_hat(c_in x, t_i) (for an eps
    model: x - sigma_i eps(c_in x, t_i), EDM's ``iDDPMPrecond`` at a trained level). Step i is
    Euler from sigma_i to sigma_{i+1} with Heun's correction (two network calls). With churn,
    step i first raises x to sigma_hat_i (``heun_coefficients``) with the noise
    ``N(0, I)`` of ``fold_in(chain_key, t_i)``, and steps from there.
    """
    k = heun_coefficients(_schedule(d, schedule).betas, ts, churn)
    c_in, sig = (jnp.asarray(k[name], jnp.float32) for name in ("c_in", "sigma"))
    ts_j = jnp.asarray(ts, jnp.int32)

    def denoise_at(x, scale, t):
        return _denoise(d, model_fn, scale * x, t)["pred_xstart"]

    def denoise(x, i):
        return denoise_at(x, c_in[i], ts_j[i])

    if churn:
        if chain_key is None:
            raise ValueError("churn > 0 draws noise: give heun_step_fn a chain_key")
        c_hat, s_hat_all, noise = (jnp.asarray(k[name], jnp.float32)
                                   for name in ("c_in_hat", "sigma_hat", "noise"))
        t_hat = jnp.asarray(k["t_hat"], jnp.int32)

        def raise_level(x, i):
            z = jax.random.normal(jax.random.fold_in(chain_key, ts_j[i]), x.shape, x.dtype)
            x = x + noise[i] * z
            return x, s_hat_all[i], denoise_at(x, c_hat[i], t_hat[i])
    else:
        def raise_level(x, i):
            return x, sig[i], denoise(x, i)

    def step_fn(x, i):
        x, s, x0 = raise_level(x, i)
        s_next = sig[i + 1]
        slope = (x - x0) / s
        x_euler = x + (s_next - s) * slope
        slope_next = (x_euler - denoise(x_euler, i + 1)) / s_next
        return x + (s_next - s) * 0.5 * (slope + slope_next), x0

    def final(x):
        return raise_level(x, len(ts) - 1)[2]  # x + (0 - s) (x - D) / s = D

    step_fn.denoise = denoise
    step_fn.final = final
    step_fn.sigma = sig
    return step_fn


def heun_sample_loop(d: Diffusion, model_fn: ModelFn, x_T: jax.Array, ts: np.ndarray, *,
                     carry_sharding=None, schedule: Schedule64 | None = None,
                     churn: float = 0.0, chain_key: jax.Array | None = None) -> jax.Array:
    """EDM's sampler on ``ts`` from x = sigma_0 x_T: a scan over the N - 1 Heun steps
    (``heun_step_fn``), then Euler to sigma = 0, which is D: 2N - 1 network calls."""
    step_fn = heun_step_fn(d, model_fn, ts, schedule, churn=churn, chain_key=chain_key)
    pin = (lambda x: x) if carry_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(x, carry_sharding))
    x, _ = jax.lax.scan(lambda x, i: (pin(step_fn(x, i)[0]), None),
                        pin(step_fn.sigma[0] * x_T), jnp.arange(len(ts) - 1))
    return step_fn.final(x)


def _as_xs(ts: np.ndarray, coefficients: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    xs = {k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()}
    xs["t"] = jnp.asarray(ts, jnp.int32)
    return xs


def ddim_sample_loop(d: Diffusion, model_fn: ModelFn, key: jax.Array, shape: tuple[int, ...], *,
                     num_steps: int, eta=0.0, spacing: str = "uniform", variant: str = "ddim",
                     x_T: jax.Array | None = None, record_every: int | None = None,
                     carry_sharding=None, schedule: Schedule64 | None = None):
    """DDIM (Song et al. 2021, or a clipped ``variant``) on a spacing; one scan.

    Deterministic when eta = 0; ``eta`` may be traced (changing it does not recompile).
    """
    x_key, chain_key = _keys(key)
    if x_T is None:
        x_T = jax.random.normal(x_key, shape, dtype=jnp.float32)
    betas64 = _schedule(d, schedule).betas
    ts = spacing_timesteps(spacing, betas64, num_steps, variant)
    step_fn = ddim_step_fn(d, model_fn, chain_key, eta, variant=variant)
    return _chain(step_fn, x_T, _as_xs(ts, ddim_coefficients(betas64, ts)), record_every,
                  carry_sharding)


def dpm_solver_sample_loop(d: Diffusion, model_fn: ModelFn, key: jax.Array,
                           shape: tuple[int, ...], *, num_steps: int = 20,
                           spacing: str = "linspace", thresholding: bool = False,
                           order: int = 2, x_T: jax.Array | None = None,
                           record_every: int | None = None, carry_sharding=None,
                           schedule: Schedule64 | None = None):
    """DPM-Solver++(2M), or (3M) with ``order=3`` (Lu et al. 2022), with diffusers' defaults
    for a DDPM; one scan."""
    if x_T is None:
        x_T = jax.random.normal(_keys(key)[0], shape, dtype=jnp.float32)
    betas64 = _schedule(d, schedule).betas
    ts = spacing_timesteps(spacing, betas64, num_steps, "dpm_solver++")
    step_fn = dpm_solver_step_fn(d, model_fn, thresholding=thresholding, order=order)
    coefficients = (dpm_solver_coefficients if order == 2 else dpm_solver_3m_coefficients)(
        betas64, ts)
    history = (jnp.zeros_like(x_T),) * (order - 1)
    return _chain(step_fn, (x_T, *history), _as_xs(ts, coefficients), record_every,
                  carry_sharding)


def heun_sample(d: Diffusion, model_fn: ModelFn, key: jax.Array, shape: tuple[int, ...], *,
                num_steps: int = 18, spacing: str = "karras", churn: float = 0.0,
                x_T: jax.Array | None = None, carry_sharding=None,
                schedule: Schedule64 | None = None) -> jax.Array:
    """EDM's Heun sampler with N = ``num_steps`` (``heun_sample_loop``), x_T drawn from key
    (and with ``churn``, each step's noise from the chain key)."""
    x_key, chain_key = _keys(key)
    if x_T is None:
        x_T = jax.random.normal(x_key, shape, dtype=jnp.float32)
    schedule = _schedule(d, schedule)
    ts = spacing_timesteps(spacing, schedule.betas, num_steps, "heun")
    return heun_sample_loop(d, model_fn, x_T, ts, carry_sharding=carry_sharding,
                            schedule=schedule, churn=churn, chain_key=chain_key)

def respace(d: Diffusion, timesteps,
            schedule: Schedule64 | None = None) -> tuple[Diffusion, jax.Array]:
    """The process restricted to a subsequence of steps (Improved DDPM's respacing).

    beta'_i = 1 - alphabar[tau_i] / alphabar[tau_{i-1}], computed in float64 from the betas the
    process was built from (``schedule``, by default ``d``'s). Returns the new process (with the
    mean/variance types of ``d``) and the map from its steps to the model's timesteps.
    """
    taus = np.asarray(timesteps, dtype=np.int64)
    abar = np.cumprod(1.0 - _schedule(d, schedule).betas)
    kept = abar[taus]
    new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
    new = Diffusion.create(
        new_betas,
        model_mean_type=d.model_mean_type,
        model_var_type=d.model_var_type,
        loss_type=d.loss_type,
    )
    return new, jnp.asarray(taus, dtype=jnp.int32)


def interpolate(
    d: Diffusion,
    model_fn: ModelFn,
    key: jax.Array,
    x1: jax.Array,
    x2: jax.Array,
    *,
    t: int,
    lambdas,
    clip_denoised: bool = True,
    shared_noise: bool = False,
) -> jax.Array:
    """Paper Fig. 8: diffuse x1 and x2 by t steps, lerp the latents, then denoise t steps.

    As the original's ``interpolate``, each image is diffused with its own noise (with
    ``shared_noise``, a variant, both use the same noise, so the latent blend is the pixel
    blend, diffused). The reverse chain's noise is shared by every row, so each row is the same
    function of its own x_t: the endpoints (lambda 0 and 1) are the decodings of z1 and z2.

    Args:
      x1, x2: ``[H, W, C]`` images in [-1, 1].
      t: the paper's number of diffusion steps, in [1, T] (it uses t = 500 of 1000): the
        latents are x_t at the 0-based index t - 1, and the chain runs indices t - 1, ..., 0.
      lambdas: ``[L]`` interpolation weights.
      shared_noise: diffuse both images with one noise draw (not the original's choice).
    Returns:
      ``[L, H, W, C]`` decoded interpolations.
    """
    lambdas = jnp.asarray(lambdas, dtype=jnp.float32)
    q_key, chain_key = jax.random.split(key)
    noise1, noise2 = jax.random.normal(q_key, (2, *x1.shape), dtype=jnp.float32)
    noise2 = noise1 if shared_noise else noise2
    ts = jnp.full((1,), t - 1, dtype=jnp.int32)
    z1 = diffusion.q_sample(d, x1[None], ts, noise1[None])[0]
    z2 = diffusion.q_sample(d, x2[None], ts, noise2[None])[0]
    lam = lambdas[:, None, None, None]
    x_t = (1.0 - lam) * z1[None] + lam * z2[None]
    step_fn = ancestral_step_fn(d, model_fn, chain_key, clip_denoised=clip_denoised,
                                shared_noise=True)
    return _chain(step_fn, x_t, jnp.arange(t - 1, -1, -1, dtype=jnp.int32), None)


# ---------------------------------------------------------------------------------------------
# The sampling function of a U-Net: what ``DDPM`` and the training grids call.
# ---------------------------------------------------------------------------------------------


VARIANTS = {
    "ancestral": "Ho et al. 2020 Algorithm 2; on fewer steps the process respaced (Nichol & "
                 "Dhariwal 2021)",
    "ddim": "Song et al. 2021 DDIM: x0 not clipped",
    "ddim_clipped": "DDIM with x0 clipped to [-1, 1], the model's eps kept (diffusers "
                    "DDIMScheduler, clip_sample=True)",
    "ddim_iddpm": "DDIM with x0 clipped to [-1, 1] and eps derived again from the clipped x0 "
                  "(Improved DDPM's ddim_sample)",
    "dpm_solver++": "DPM-Solver++(2M), Lu et al. 2022: data prediction, midpoint, first order "
                    "at the first and the last step (diffusers' defaults)",
    "dpm_solver++_3m": "DPM-Solver++(3M), Lu et al. 2022: data prediction, third order from the "
                       "third step; first order at the first and the last step, second order "
                       "at the second and, below 15 steps, the second to last (diffusers' "
                       "solver_order=3)",
    "heun": "EDM's Heun sampler, Karras et al. 2022 Algorithm 1, S_churn = 0, on trained "
            "sigma levels (iDDPMPrecond)",
}
# With churn > 0 (EDM's stochastic sampler) ``heun`` computes this instead.
HEUN_CHURN_VARIANT = ("EDM's stochastic Heun sampler, Karras et al. 2022 Algorithm 2, "
                      "S_churn = {churn:g}, S_tmin = 0, S_tmax = inf, S_noise = 1, on trained "
                      "sigma levels (iDDPMPrecond)")
DDIM_VARIANTS = ("ddim", "ddim_clipped", "ddim_iddpm")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample; hashable, so that it keys the cache of compiled chains.

    Attributes:
      sampler: one of ``config_lib.SAMPLERS`` (``VARIANTS`` says what each one computes).
      num_steps: S; None for the sampler's own (``DEFAULT_STEPS``, else all T steps). For
        ``heun`` it is EDM's N: 2N - 1 network calls.
      eta: DDIM noise (0 = deterministic); DDIM variants only. Not compiled in: a traced input.
      clip_denoised: the ancestral sampler clips its predicted x_0 to [-1, 1] (as the original).
      record_every: also return x_t and the predicted x_0 every k steps (progressive).
      spacing: one of ``config_lib.SPACINGS``; None for the sampler's own (``DEFAULT_SPACING``).
      thresholding: the DPM-Solvers clip each predicted x_0 to [-1, 1].
      churn: EDM's S_churn for ``heun`` (0: the deterministic sampler); compiled in.
    """

    sampler: str = "ancestral"
    num_steps: int | None = None
    eta: float = 0.0
    clip_denoised: bool = True
    record_every: int | None = None
    spacing: str | None = None
    thresholding: bool = False
    churn: float = 0.0

    def check(self, num_timesteps: int) -> None:
        """Raises ConfigError for settings that cannot run on a process of T steps."""
        config_lib.check_sampler(self.sampler, self.num_steps, self.eta, num_timesteps,
                                 spacing=self.spacing, thresholding=self.thresholding,
                                 churn=self.churn)
        steps = self.steps(num_timesteps)
        if self.record_every is not None and self.sampler == "heun":
            raise config_lib.ConfigError(
                "--progressive records ancestral, DDIM and DPM-Solver++ chains; heun's steps "
                "are two network calls each: pick another --sampler")
        if self.record_every is not None and (self.record_every < 1
                                              or steps % self.record_every):
            raise config_lib.ConfigError(
                f"--progressive_every={self.record_every} must divide the {steps} steps of the "
                f"chain; divisors near {steps // 10}: {', '.join(map(str, _divisors(steps)))}")

    def steps(self, num_timesteps: int) -> int:
        """S as asked (before repeated timesteps are dropped)."""
        return self.num_steps or DEFAULT_STEPS.get(self.sampler, num_timesteps)

    @property
    def resolved_spacing(self) -> str:
        return self.spacing or DEFAULT_SPACING[self.sampler]

    @property
    def variant(self) -> str:
        """What this sampler computes, in words (recorded with every sample file)."""
        extra = ""
        if self.sampler == "ancestral":
            extra = ", x0 clipped" if self.clip_denoised else ", x0 not clipped"
        elif self.sampler in DPM_SOLVERS and self.thresholding:
            extra = ", x0 thresholded: clipped to [-1, 1]"
        elif self.sampler == "heun" and self.churn:
            return HEUN_CHURN_VARIANT.format(churn=self.churn)
        return VARIANTS[self.sampler] + extra

    def timesteps(self, d: Diffusion | Schedule64) -> np.ndarray:
        """The distinct model timesteps the chain evaluates, descending."""
        schedule = Schedule64.of(d)
        steps = self.steps(schedule.num_timesteps)
        return spacing_timesteps(self.resolved_spacing, schedule.betas, steps, self.sampler)

    def nfe(self, d: Diffusion | Schedule64) -> int:
        """Network evaluations per image."""
        n = len(self.timesteps(d))
        return 2 * n - 1 if self.sampler == "heun" else n

    def record(self, d: Diffusion | Schedule64) -> dict:
        """The fields every samples.json and evaluation provenance carries."""
        out = dict(sampler=self.sampler, variant=self.variant, spacing=self.resolved_spacing,
                   num_steps=self.steps(d.num_timesteps), nfe=self.nfe(d), eta=self.eta,
                   thresholding=self.thresholding, clip_denoised=self.clip_denoised)
        if self.churn:  # only then: records of deterministic heun runs stay as they were
            out["churn"] = self.churn
        return out


ANCESTRAL = SamplerSpec()  # Algorithm 2 on all T steps, x_0 clipped: the default


def spec_from_config(config, *, sampler: str | None = None, num_steps: int | None = None,
                     eta: float | None = None, spacing: str | None = None,
                     thresholding: bool | None = None, churn: float | None = None,
                     record_every: int | None = None) -> SamplerSpec:
    """The sampler of ``config.sampling`` with command-line overrides, checked.

    A sampler other than the config's starts from its own defaults (its steps and spacing,
    eta 0, no thresholding, no churn) rather than inheriting the config's.
    """
    c = config.sampling
    c_spacing, c_threshold = c.get("spacing"), c.get("thresholding", False)  # older runs lack them
    c_churn = c.get("churn", 0.0)
    same = sampler in (None, c.sampler)
    pick = lambda given, configured, own: given if given is not None else (
        configured if same else own)
    spec = SamplerSpec(
        sampler or c.sampler, pick(num_steps, c.num_steps, None), float(pick(eta, c.eta, 0.0)),
        c.clip_denoised, record_every, pick(spacing, c_spacing, None),
        bool(pick(thresholding, c_threshold, False)), float(pick(churn, c_churn, 0.0)))
    spec.check(config.diffusion.num_timesteps)
    return spec


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def default_record_every(num_steps: int, columns: int = 10) -> int:
    """The divisor of ``num_steps`` that gives the number of columns nearest to ``columns``."""
    return min(_divisors(num_steps), key=lambda k: (abs(num_steps // k - columns), k))


def chain(d: Diffusion, model_fn: ModelFn, key: jax.Array, shape: tuple[int, ...],
          spec: SamplerSpec, *, eta=None, x_T: jax.Array | None = None, carry_sharding=None,
          schedule: Schedule64 | None = None):
    """The chain ``spec`` describes, in [-1, 1] (the tuple of ``_chain`` with record_every).

    ``eta`` (default ``spec.eta``) may be a traced scalar. ``schedule``: the float64 betas of
    ``d`` (needed when ``d`` is traced; read from ``d`` otherwise).
    """
    spec.check(d.num_timesteps)
    eta = spec.eta if eta is None else eta
    schedule = _schedule(d, schedule)
    ts = spec.timesteps(schedule)
    if spec.record_every is not None and len(ts) % spec.record_every:
        raise config_lib.ConfigError(
            f"--progressive_every={spec.record_every} must divide the {len(ts)} distinct steps "
            f"of this {spec.resolved_spacing} spacing; divisors: "
            f"{', '.join(map(str, _divisors(len(ts))))}")
    common = dict(x_T=x_T, record_every=spec.record_every, carry_sharding=carry_sharding)
    steps = spec.steps(d.num_timesteps)
    if spec.sampler in DDIM_VARIANTS:
        return ddim_sample_loop(d, model_fn, key, shape, num_steps=steps, eta=eta,
                                spacing=spec.resolved_spacing, variant=spec.sampler,
                                schedule=schedule, **common)
    if spec.sampler in DPM_SOLVERS:
        return dpm_solver_sample_loop(d, model_fn, key, shape, num_steps=steps,
                                      spacing=spec.resolved_spacing,
                                      thresholding=spec.thresholding,
                                      order=DPM_SOLVERS[spec.sampler], schedule=schedule,
                                      **common)
    if spec.sampler == "heun":
        return heun_sample(d, model_fn, key, shape, num_steps=steps,
                           spacing=spec.resolved_spacing, churn=spec.churn, x_T=x_T,
                           carry_sharding=carry_sharding, schedule=schedule)
    if np.array_equal(ts, np.arange(d.num_timesteps)[::-1]):
        return sample_loop(d, model_fn, key, shape, clip_denoised=spec.clip_denoised, **common)
    respaced, tmap = respace(d, ts[::-1], schedule)
    return sample_loop(respaced, model_fn, key, shape, timestep_map=tmap,
                       clip_denoised=spec.clip_denoised, **common)


def network_fn(graphdef: Any, params: Any, model_args: Any) -> ModelFn:
    """The default ``build_model_fn``: the U-Net itself, ``(x, t) -> output``."""
    del model_args
    return lambda x, t: unet.apply(graphdef, params, x, t)


def guided_model_fn(apply_fn: Callable, labels: jax.Array | None, guidance: jax.Array,
                    null_class: int, eps_channels: int | None = None) -> ModelFn:
    """Classifier-free guidance (Ho and Salimans 2021) as a model call for any sampler.

    ``apply_fn(x, t, labels) -> output`` is the network; the returned ``model_fn(x, t)`` gives
    ``(1 + w) out(x, t, y) - w out(x, t, null)`` with w = ``guidance`` (diffusers writes the same
    with ``guidance_scale = 1 + w``; w = 0 is the conditional model alone). Both predictions come
    from ONE forward pass over the batch and its copy (``[x; x]`` with ``[y; null]``). w is an
    array, so a new value is a new argument of the compiled chain, not a new compilation. For a
    learned-variance output only the first ``eps_channels`` channels are guided; the variance
    channels are the conditional ones (as GLIDE does). Without labels: the model as it is (the
    null class for a conditional network).
    """
    if labels is None:
        return lambda x, t: apply_fn(x, t, None)
    labels = jnp.asarray(labels, jnp.int32)
    w = jnp.asarray(guidance, jnp.float32)

    def model_fn(x, t):
        both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([labels, jnp.full_like(labels, null_class)]))
        cond, uncond = jnp.split(both.astype(jnp.float32), 2)
        guided = cond + w * (cond - uncond)
        if eps_channels is None or eps_channels == cond.shape[-1]:
            return guided
        return jnp.concatenate([guided[..., :eps_channels], cond[..., eps_channels:]], axis=-1)

    return model_fn


def guided_network_fn(graphdef: Any, params: Any, model_args: Any = None) -> ModelFn:
    """``model_fn(x, t)`` of a split U-Net: the network itself when ``model_args`` is None,
    else guided towards ``model_args["labels"]`` (int32 ``[B]``) with w =
    ``model_args["guidance"]`` (``guided_model_fn``)."""
    apply_fn = lambda x, t, y: unet.apply(graphdef, params, x, t, labels=y)
    if model_args is None:
        return lambda x, t: apply_fn(x, t, None)
    num_classes, eps_channels = unet.conditioning(graphdef, params)
    return guided_model_fn(apply_fn, model_args["labels"], model_args["guidance"], num_classes,
                           eps_channels)


def guidance_args(labels, guidance: float) -> dict[str, Any]:
    """The ``model_args`` of a guided chain: labels int32 ``[B]``, w float32 ``[]``."""
    return dict(labels=jnp.asarray(labels, jnp.int32), guidance=jnp.float32(guidance))


def get_sampling_fn(graphdef: Any, spec: SamplerSpec, shape: tuple[int, ...],
                    mesh: jax.sharding.Mesh,
                    build_model_fn: Callable = network_fn) -> SamplingFn:
    """The compiled chain of a U-Net: ``fn(params, d, key, x_T=None, eta=0.0, model_args=None)``.

    Returns uint8 ``[B, H, W, C]`` (with ``record_every``: the tuple x_0 ``[B, ...]``, xs and
    x0s ``[K, B, ...]``), converted inside the jit. The batch ``shape[0]`` must divide over the
    mesh's devices: the chain's x_t is split over them (``sharding.data_sharding``), the
    parameters and the process constants are replicated. ``eta`` and ``model_args`` (any
    pytree, handed to ``build_model_fn(graphdef, params, model_args) -> model_fn``) are traced
    inputs: new values never recompile. Cached per (graphdef, spec without eta, shape, mesh,
    build_model_fn), so one compile per number of steps (and per schedule: the float64 betas
    of ``d``, from which the steps and their coefficients are computed).
    """
    return _compiled_chain(graphdef, dataclasses.replace(spec, eta=0.0), shape, mesh,
                           build_model_fn)


class SamplingFn:
    """The jitted chain of ``get_sampling_fn``, called (and lowered) as
    ``fn(params, d, key, x_T=None, eta=0.0, model_args=None)``.

    ``d`` is traced; its ``Schedule64`` (read on the host at each call: a cached copy and one
    hash) is the jit's static argument.
    """

    def __init__(self, jitted):
        self._jitted = jitted

    def __call__(self, params, d: Diffusion, *args, **kwargs):
        return self._jitted(Schedule64.of(d), params, d, *args, **kwargs)

    def lower(self, params, d: Diffusion, *args, **kwargs):
        """``jax.jit(...).lower``; its compiled program takes the arguments without ``d``'s
        schedule, as this function does."""
        return self._jitted.lower(Schedule64.of(d), params, d, *args, **kwargs)

    def _cache_size(self) -> int:
        return self._jitted._cache_size()


@functools.lru_cache(maxsize=32)
def _compiled_chain(graphdef, spec: SamplerSpec, shape, mesh, build_model_fn) -> SamplingFn:
    sharding.check_batch(shape[0], mesh.size, what="sampling batch")
    data = sharding.data_sharding(mesh)
    trajectory = NamedSharding(mesh, P(None, sharding.DATA))  # [K, B, ...]
    out = data if spec.record_every is None else (data, trajectory, trajectory)

    def sample_fn(schedule, params, d, key, x_T=None, eta=0.0, model_args=None):
        model_fn = build_model_fn(graphdef, params, model_args)
        x = chain(d, model_fn, key, shape, spec, eta=jnp.asarray(eta, jnp.float32), x_T=x_T,
                  carry_sharding=data, schedule=schedule)
        return jax.tree.map(images.to_uint8, x)

    return SamplingFn(jax.jit(sample_fn, static_argnums=0, out_shardings=out,
                              compiler_options=xla_cpu.compiler_options("forward")))


# ---------------------------------------------------------------------------------------------
# N samples in compiled chunks.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """How ``num_samples`` images are cut into compiled chunks.

    N images are made in chunks of ``min(batch_size, N)`` rows; chunk i starts from
    ``fold_in(key, i)``. A chunk whose rows do not divide over the devices is padded to a
    multiple of the device count for the compiled chain and the padding is dropped (the first
    rows of a padded draw equal the unpadded draw), so the images depend only on (key, N, batch
    size): the same for any number of devices and processes.

    Attributes:
      num_samples: images wanted (N).
      batch: rows per chunk, ``min(batch_size, N)``; the last chunk may hold fewer.
      padded: rows of the compiled chain: ``batch`` rounded up to a multiple of the devices.
    """

    num_samples: int
    batch: int
    padded: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.batch)

    def rows(self, i: int) -> int:
        """Images kept from chunk i."""
        return min(self.batch, self.num_samples - i * self.batch)


def plan(num_samples: int, batch_size: int, mesh: jax.sharding.Mesh) -> Plan:
    """The chunks of ``num_samples`` images at ``batch_size`` rows per compiled chain."""
    if num_samples < 1 or batch_size < 1:
        raise config_lib.ConfigError(
            f"num_samples and batch_size must be positive, got {num_samples} and "
            f"{batch_size}")
    batch = min(batch_size, num_samples)
    return Plan(num_samples, batch, sharding.padded_size(batch, mesh))


def iter_chunks(sample_batch: Callable[..., jax.Array], image_shape: tuple[int, ...],
                key: jax.Array, chunk_plan: Plan, *, start: int = 0,
                x_T: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """uint8 ``[rows(i), H, W, C]`` host arrays of chunks ``start``, ``start + 1``, ...

    ``sample_batch(key, batch, x_T=..., labels=...)`` is the compiled batch sampler
    (``DDPM.sample_batch`` for one ``SamplerSpec``); ``x_T``, when given, holds the starting
    noise of all N images, and ``labels`` (int32 ``[N]``, checked) the class of each; padding
    rows take the first label of their chunk (and are dropped).
    """
    for i in range(start, chunk_plan.num_chunks):
        chunk_key = jax.random.fold_in(key, i)
        rows = slice(i * chunk_plan.batch, (i + 1) * chunk_plan.batch)
        x0 = y = None
        if x_T is not None:
            x0 = np.asarray(x_T[rows], np.float32)
            fill = initial_noise(chunk_key, (chunk_plan.padded,) + tuple(image_shape))
            x0 = np.concatenate([x0, np.asarray(fill)[x0.shape[0]:]])
        if labels is not None:
            y = np.asarray(labels[rows], np.int32)
            y = np.concatenate([y, np.full(chunk_plan.padded - len(y), y[0], np.int32)])
        out = sample_batch(chunk_key, chunk_plan.padded, x_T=x0, labels=y)
        yield sharding.to_host(out)[:chunk_plan.rows(i)]
