"""The reverse chain as one ``lax.scan``: ancestral (Algorithm 2), DDIM, progressive, interpolation.

Every sampler is a pure function of (diffusion, model_fn, key, ...) that compiles to a single
scan over the chain: one dispatch for all T steps, no Python loop and no ``lax.cond`` per step.

Randomness: ``x_T ~ N(0, I)`` is drawn from ``split(key)[0]``, and the noise of (0-based) step t
from ``fold_in(split(key)[1], t)``; draws do not depend on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import config_lib, diffusion, images, sharding, unet, xla_cpu
from ddpm_jax.diffusion import Diffusion

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


def _chain(step_fn, x_T, ts, record_every: int | None, carry_sharding=None):
    """Runs ``step_fn(x, t) -> (x, pred_xstart)`` over ``ts`` as scans.

    Without ``record_every``: one scan, returns x_0. With it: an outer scan of
    ``len(ts) / record_every`` chunks of an inner scan, returning (x_0, xs, x0s) where
    ``xs[k]`` / ``x0s[k]`` are x_t and the predicted x_0 after chunk k (``[K, B, H, W, C]``).
    ``carry_sharding`` pins the chain's x_t to a layout (the batch split over the devices).
    """
    if carry_sharding is not None:
        pin = lambda x: jax.lax.with_sharding_constraint(x, carry_sharding)
        inner = step_fn
        step_fn = lambda x, t: (lambda out: (pin(out[0]), out[1]))(inner(x, t))
        x_T = pin(x_T)
    if record_every is None:
        x, _ = jax.lax.scan(lambda x, t: (step_fn(x, t)[0], None), x_T, ts)
        return x
    n = ts.shape[0]
    if n % record_every:
        raise ValueError(f"record_every={record_every} must divide the {n} steps of the chain")

    def chunk(x, ts_chunk):
        x, preds = jax.lax.scan(step_fn, x, ts_chunk)
        return x, (x, preds[-1])

    x, (xs, x0s) = jax.lax.scan(
        chunk, x_T, ts.reshape(n // record_every, record_every, *ts.shape[1:]))
    return x, xs, x0s


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


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The uniform subsequence tau_i = i * (T // S), i = 0..S-1 (int32 [S])."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    return (np.arange(num_steps) * (num_timesteps // num_steps)).astype(np.int32)


def ddim_step(
    d: Diffusion,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise: jax.Array,
    *,
    eta: float,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update from step t to t_prev (t_prev = -1 means x_0; alphabar_{-1} = 1).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    """
    out = diffusion.p_mean_variance(d, model_fn(x_t, t).astype(jnp.float32), x_t, t,
                               clip_denoised=clip_denoised)
    x0 = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(d, x_t, t, x0)
    abar = diffusion.extract(d.alphas_cumprod, t, x_t.shape)
    abar_prev = jnp.where(
        (t_prev >= 0).reshape(abar.shape),
        diffusion.extract(d.alphas_cumprod, jnp.maximum(t_prev, 0), x_t.shape),
        1.0,
    )
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    x_prev = (
        jnp.sqrt(abar_prev) * x0
        + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
        + sigma * noise
    )
    return x_prev, x0


def ddim_sample_loop(
    d: Diffusion,
    model_fn: ModelFn,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    num_steps: int,
    eta: float = 0.0,
    x_T: jax.Array | None = None,
    clip_denoised: bool = True,
    record_every: int | None = None,
    carry_sharding=None,
):
    """DDIM (Song et al. 2021) on tau_i = i * (T // S); deterministic when eta = 0. One scan."""
    x_key, chain_key = _keys(key)
    if x_T is None:
        x_T = jax.random.normal(x_key, shape, dtype=jnp.float32)
    taus = ddim_timesteps(d.num_timesteps, num_steps)
    pairs = jnp.asarray(np.stack([taus, np.append(-1, taus[:-1])], axis=1)[::-1])

    def step_fn(x, pair):
        t = jnp.full((x.shape[0],), pair[0], dtype=jnp.int32)
        t_prev = jnp.full((x.shape[0],), pair[1], dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(chain_key, pair[0]), x.shape, x.dtype)
        return ddim_step(d, model_fn, x, t, t_prev, noise, eta=eta, clip_denoised=clip_denoised)

    return _chain(step_fn, x_T, pairs, record_every, carry_sharding)


def respace(d: Diffusion, timesteps) -> tuple[Diffusion, jax.Array]:
    """The process restricted to a subsequence of steps (Improved DDPM's respacing).

    beta'_i = 1 - alphabar[tau_i] / alphabar[tau_{i-1}], computed in float64 from the betas the
    process was built from (``d.betas64``). Returns the new process (with the mean/variance types
    of ``d``) and the map from its steps to the model's timesteps.
    """
    taus = np.asarray(timesteps, dtype=np.int64)
    abar = np.cumprod(1.0 - np.asarray(d.betas64, dtype=np.float64))
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
) -> jax.Array:
    """Paper Fig. 8: diffuse x1 and x2 to step t with shared noise, lerp, then denoise.

    The reverse chain's noise is shared by every row too, so each row is the same function of
    its own x_t: the endpoints (lambda 0 and 1) are exactly the decodings of x1 and x2 alone.

    Args:
      x1, x2: ``[H, W, C]`` images in [-1, 1].
      t: 0-based step to diffuse to (the paper uses t = 500 of 1000).
      lambdas: ``[L]`` interpolation weights.
    Returns:
      ``[L, H, W, C]`` decoded interpolations.
    """
    lambdas = jnp.asarray(lambdas, dtype=jnp.float32)
    q_key, chain_key = jax.random.split(key)
    noise = jax.random.normal(q_key, x1.shape, dtype=jnp.float32)
    ts = jnp.full((1,), t, dtype=jnp.int32)
    z1 = diffusion.q_sample(d, x1[None], ts, noise[None])[0]
    z2 = diffusion.q_sample(d, x2[None], ts, noise[None])[0]
    lam = lambdas[:, None, None, None]
    x_t = (1.0 - lam) * z1[None] + lam * z2[None]
    step_fn = ancestral_step_fn(d, model_fn, chain_key, clip_denoised=clip_denoised,
                                shared_noise=True)
    return _chain(step_fn, x_t, jnp.arange(t, -1, -1, dtype=jnp.int32), None)


# ---------------------------------------------------------------------------------------------
# The sampling function of a U-Net: what ``DDPM`` and the training grids call.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample; hashable, so that it keys the cache of compiled chains.

    Attributes:
      sampler: "ancestral" (Algorithm 2, or a respaced chain when num_steps < T) or "ddim".
      num_steps: S steps on tau_i = i * (T // S); None for all T steps.
      eta: DDIM noise (0 = deterministic); must be 0 for the ancestral sampler.
      clip_denoised: clip the predicted x_0 to [-1, 1].
      record_every: also return x_t and the predicted x_0 every k steps (progressive).
    """

    sampler: str = "ancestral"
    num_steps: int | None = None
    eta: float = 0.0
    clip_denoised: bool = True
    record_every: int | None = None

    def check(self, num_timesteps: int) -> None:
        """Raises ConfigError for settings that cannot run on a process of T steps."""
        config_lib.check_sampler(self.sampler, self.num_steps, self.eta, num_timesteps)
        steps = self.num_steps or num_timesteps
        if self.record_every is not None and (self.record_every < 1
                                              or steps % self.record_every):
            raise config_lib.ConfigError(
                f"--progressive_every={self.record_every} must divide the {steps} steps of the "
                f"chain; divisors near {steps // 10}: {', '.join(map(str, _divisors(steps)))}")


ANCESTRAL = SamplerSpec()  # Algorithm 2 on all T steps, x_0 clipped: the default


def spec_from_config(config, *, sampler: str | None = None, num_steps: int | None = None,
                     eta: float | None = None, record_every: int | None = None) -> SamplerSpec:
    """The sampler of ``config.sampling`` with command-line overrides, checked.

    A sampler other than the config's starts from its own defaults (all T steps, eta 0) rather
    than inheriting the config's steps and eta.
    """
    c = config.sampling
    same = sampler in (None, c.sampler)
    spec = SamplerSpec(
        sampler or c.sampler,
        num_steps if num_steps is not None else (c.num_steps if same else None),
        float(eta if eta is not None else (c.eta if same else 0.0)),
        c.clip_denoised, record_every)
    spec.check(config.diffusion.num_timesteps)
    return spec


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def default_record_every(num_steps: int, columns: int = 10) -> int:
    """The divisor of ``num_steps`` that gives the number of columns nearest to ``columns``."""
    return min(_divisors(num_steps), key=lambda k: (abs(num_steps // k - columns), k))


def chain(d: Diffusion, model_fn: ModelFn, key: jax.Array, shape: tuple[int, ...],
          spec: SamplerSpec, *, x_T: jax.Array | None = None, carry_sharding=None):
    """The chain ``spec`` describes, in [-1, 1] (the tuple of ``_chain`` with record_every)."""
    spec.check(d.num_timesteps)
    common = dict(x_T=x_T, clip_denoised=spec.clip_denoised, record_every=spec.record_every,
                  carry_sharding=carry_sharding)
    if spec.sampler == "ddim":
        return ddim_sample_loop(d, model_fn, key, shape, num_steps=spec.num_steps or
                                d.num_timesteps, eta=spec.eta, **common)
    if spec.num_steps in (None, d.num_timesteps):
        return sample_loop(d, model_fn, key, shape, **common)
    respaced, tmap = respace(d, ddim_timesteps(d.num_timesteps, spec.num_steps))
    return sample_loop(respaced, model_fn, key, shape, timestep_map=tmap, **common)


@functools.lru_cache(maxsize=32)
def get_sampling_fn(graphdef: Any, spec: SamplerSpec, shape: tuple[int, ...],
                    mesh: jax.sharding.Mesh) -> Callable:
    """The compiled chain of a U-Net: ``fn(params, d, key, x_T=None) -> uint8``.

    Returns uint8 ``[B, H, W, C]`` (with ``record_every``: the tuple x_0 ``[B, ...]``, xs and
    x0s ``[K, B, ...]``), converted inside the jit. The batch ``shape[0]`` must divide over the
    mesh's devices: the chain's x_t is split over them (``sharding.data_sharding``), the
    parameters and the process constants are replicated. Cached per (graphdef, spec, shape,
    mesh), so a repeated call reuses the compiled chain.
    """
    sharding.check_batch(shape[0], mesh.size, what="sampling batch")
    data = sharding.data_sharding(mesh)
    trajectory = NamedSharding(mesh, P(None, sharding.DATA))  # [K, B, ...]
    out = data if spec.record_every is None else (data, trajectory, trajectory)

    def sample_fn(params, d, key, x_T=None):
        model_fn = lambda x, t: unet.apply(graphdef, params, x, t)
        x = chain(d, model_fn, key, shape, spec, x_T=x_T, carry_sharding=data)
        return jax.tree.map(images.to_uint8, x)

    return jax.jit(sample_fn, out_shardings=out,
                   compiler_options=xla_cpu.compiler_options("forward"))
