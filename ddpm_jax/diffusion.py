"""The Gaussian diffusion process of Ho et al. (2020) as pure, jittable functions.

Notation follows the paper with 0-based indices: ``t in [0, T)`` in code is the paper's ``t + 1``.
Images are ``[B, H, W, C]`` float32 in [-1, 1]; timesteps are ``int32 [B]``.

Every constant of the process, the logarithms included, is computed in float64 with numpy and
cast to float32 once (``Diffusion.create``); nothing is derived from the float32 copies at trace
time. Every function here is a pure function of a ``Diffusion`` pytree and arrays, so it can be
jitted, vmapped and scanned. What is computed from the float64 betas when a function is traced
(respaced processes, sampler coefficients) takes them from a ``Schedule64``, a host object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import schedules

MEAN_TYPES = ("eps", "xstart", "xprev")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")

# Improved DDPM's weight of L_vlb in the hybrid objective.
HYBRID_LAMBDA = 0.001

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """The process of a config's ``diffusion`` section: its beta schedule and the network's
    parameterisation (``config_lib.validate`` builds it and checks how the fields fit)."""

    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    model_mean_type: str = "eps"
    model_var_type: str = "fixedlarge"
    loss_type: str = "mse"

    @classmethod
    def from_config(cls, config: Any) -> ProcessSpec:
        c = config.diffusion
        return cls(c.beta_schedule, c.beta_start, c.beta_end, c.num_timesteps,
                   c.model_mean_type, c.model_var_type, c.loss_type)

    def betas(self) -> np.ndarray:
        """The float64 betas ``[T]`` (``schedules.get_beta_schedule``)."""
        return schedules.config_betas(self)


def is_learned_variance(model_var_type: str) -> bool:
    """Whether the network outputs the variance too (2C channels)."""
    return model_var_type in ("learned", "learned_range")


@flax.struct.dataclass
class Diffusion:
    """Float32 constants of the forward process and the model's parameterisation.

    Arrays are indexed by the 0-based timestep ``t``; all are ``float32 [T]``, computed in
    float64, but ``betas64_bits``: the float64 betas the process was built from, as their bits
    (uint32 ``[T, 2]``; jax holds no float64 by default), read back exactly by ``betas64``.
    Every field is an array except the three strings that choose the parameterisation: they are
    static because they choose what is traced (Python branches, the output channels), and short,
    so hashing them costs nothing. A jitted function of a Diffusion compiles once for every
    process of the same T and types.
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    fixedlarge_variance: jax.Array
    fixedlarge_log_variance: jax.Array
    betas64_bits: jax.Array
    model_mean_type: str = flax.struct.field(pytree_node=False, default="eps")
    model_var_type: str = flax.struct.field(pytree_node=False, default="fixedlarge")
    loss_type: str = flax.struct.field(pytree_node=False, default="mse")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def create(
        cls,
        betas: np.ndarray,
        *,
        model_mean_type: str = "eps",
        model_var_type: str = "fixedlarge",
        loss_type: str = "mse",
    ) -> Diffusion:
        """Builds the constants from float64 betas (see ``schedules.get_beta_schedule``)."""
        _check_choice("diffusion.model_mean_type", model_mean_type, MEAN_TYPES)
        _check_choice("diffusion.model_var_type", model_var_type, VAR_TYPES)
        _check_choice("diffusion.loss_type", loss_type, LOSS_TYPES)
        betas = np.asarray(betas, dtype=np.float64)
        schedules.validate_betas(betas)
        consts = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in _constants(betas).items()}
        bits = np.ascontiguousarray(betas).view(np.uint32).reshape(-1, 2)
        return cls(
            **consts,
            betas64_bits=jnp.asarray(bits),
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
        )

    @classmethod
    def from_spec(cls, spec: ProcessSpec) -> Diffusion:
        """Builds the process ``spec`` describes."""
        return cls.create(spec.betas(), model_mean_type=spec.model_mean_type,
                          model_var_type=spec.model_var_type, loss_type=spec.loss_type)

    @classmethod
    def from_config(cls, config: Any) -> Diffusion:
        """Builds the process of ``config.diffusion``."""
        return cls.from_spec(ProcessSpec.from_config(config))

    @property
    def learned_variance(self) -> bool:
        return is_learned_variance(self.model_var_type)

    @property
    def betas64(self) -> np.ndarray:
        """The float64 betas of the process (read-only ``[T]``), on the host.

        Raises:
          ValueError: inside a trace, where the Diffusion is traced; give the traced function
            the ``Schedule64`` of the process instead.
        """
        try:
            bits = np.asarray(self.betas64_bits)
        except jax.errors.TracerArrayConversionError:
            raise ValueError(
                "the float64 betas of a traced Diffusion are not known when tracing; pass its "
                "Schedule64 (diffusion.Schedule64.of(d), made outside the jit)") from None
        return bits.reshape(-1).view(np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule64:
    """The float64 betas of a process on the host, for what is computed from them when a
    function is traced: respaced processes, step spacings, sampler coefficients.

    Compared and hashed by value (the hash computed once), so it can be a static argument of
    a jitted function: two schedules of the same betas share its compilations.
    """

    betas: np.ndarray
    _hash: int = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        betas = np.array(self.betas, dtype=np.float64)
        betas.flags.writeable = False
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "_hash", hash(betas.tobytes()))

    @classmethod
    def of(cls, process: Diffusion | Schedule64) -> Schedule64:
        """The schedule of a (host) Diffusion; a Schedule64 is returned as it is."""
        return process if isinstance(process, Schedule64) else cls(process.betas64)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Schedule64) and self._hash == other._hash
                                 and np.array_equal(self.betas, other.betas))

    def __repr__(self) -> str:
        b = self.betas
        return f"Schedule64(T={self.num_timesteps}, betas {b[0]:.6g}..{b[-1]:.6g})"


def _constants(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every float64 constant of the process with betas ``betas`` (float64 ``[T]``)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    # q(x_{t-1} | x_t, x_0): beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # log beta~ clipped: the first entry (beta~ = 0) is replaced by beta~ of the next step.
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    # fixedlarge: sigma^2 = beta_t, the first entry set to beta~ of t=1 for a better decoder.
    large_var = np.append(post_var[1], betas[1:])
    with np.errstate(divide="ignore"):
        return dict(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            log_one_minus_alphas_cumprod=np.log(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            fixedlarge_variance=large_var,
            fixedlarge_log_variance=np.log(large_var),
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def extract(a: jax.Array, t: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
    """a[t] broadcast against x: ``[T], int [B] -> [B, 1, ..., 1]``."""
    out = jnp.take(a, t, axis=0)
    return out.reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------
# Forward process q.
# ---------------------------------------------------------------------------------------------


def q_mean_variance(d: Diffusion, x_start: jax.Array, t: jax.Array):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log variance)."""
    mean = extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    # (sqrt(1 - abar))^2 rather than 1 - abar in float32, which loses ~3 digits at small t.
    variance = extract(jnp.square(d.sqrt_one_minus_alphas_cumprod), t, x_start.shape)
    log_variance = extract(d.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance


def q_sample(d: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (paper Eq. 4)."""
    return (
        extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + extract(d.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )


def q_posterior_mean_variance(d: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
    """q(x_{t-1} | x_t, x_0) (paper Eqs. 6-7): (mean, variance, clipped log variance)."""
    mean = (
        extract(d.posterior_mean_coef1, t, x_t.shape) * x_start
        + extract(d.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(d.posterior_variance, t, x_t.shape)
    log_variance_clipped = extract(d.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance_clipped


def predict_xstart_from_eps(d: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array):
    """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps."""
    return (
        extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_xstart(d: Diffusion, x_t: jax.Array, t: jax.Array, x_start: jax.Array):
    """The inverse of ``predict_xstart_from_eps``."""
    return (
        extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_start
    ) / extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.shape)


def predict_xstart_from_xprev(d: Diffusion, x_t: jax.Array, t: jax.Array, xprev: jax.Array):
    """Solves the posterior mean for x_0: x_0 = (x_{t-1} - c2 x_t) / c1."""
    return (
        xprev - extract(d.posterior_mean_coef2, t, x_t.shape) * x_t
    ) / extract(d.posterior_mean_coef1, t, x_t.shape)


# ---------------------------------------------------------------------------------------------
# Reverse process p_theta.
# ---------------------------------------------------------------------------------------------


def split_model_output(d: Diffusion, model_output: jax.Array, channels: int):
    """Splits a learned-variance output ``[B, H, W, 2C]`` into (mean part, variance part)."""
    if d.learned_variance:
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(
                f"model_var_type {d.model_var_type!r} needs 2C = {2 * channels} output channels, "
                f"got {model_output.shape[-1]}"
            )
        return model_output[..., :channels], model_output[..., channels:]
    if model_output.shape[-1] != channels:
        raise ValueError(
            f"model_var_type {d.model_var_type!r} needs C = {channels} output channels, "
            f"got {model_output.shape[-1]}"
        )
    return model_output, None


def model_variance(d: Diffusion, var_output: jax.Array | None, x_t: jax.Array, t: jax.Array):
    """sigma_t^2 of p(x_{t-1} | x_t) for each variance type: (variance, log variance)."""
    if d.model_var_type == "learned":
        return jnp.exp(var_output), var_output
    if d.model_var_type == "learned_range":
        # log sigma^2 = v log beta_t + (1 - v) log beta~_t, v = (out + 1) / 2.
        min_log = extract(d.posterior_log_variance_clipped, t, x_t.shape)
        max_log = extract(d.log_betas, t, x_t.shape)
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if d.model_var_type == "fixedlarge":
        # sigma^2 = beta_t, the first entry set to beta~ of t=1 for a better decoder likelihood.
        variance = extract(d.fixedlarge_variance, t, x_t.shape)
        log_variance = extract(d.fixedlarge_log_variance, t, x_t.shape)
        return jnp.broadcast_to(variance, x_t.shape), jnp.broadcast_to(log_variance, x_t.shape)
    # fixedsmall: sigma^2 = beta~_t.
    variance = extract(d.posterior_variance, t, x_t.shape)
    log_variance = extract(d.posterior_log_variance_clipped, t, x_t.shape)
    return jnp.broadcast_to(variance, x_t.shape), jnp.broadcast_to(log_variance, x_t.shape)


def p_mean_variance(
    d: Diffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """p(x_{t-1} | x_t) from the network output, for every mean and variance type.

    Returns a dict of ``[B, H, W, C]`` arrays: ``mean``, ``variance``, ``log_variance``,
    ``pred_xstart`` (clipped to [-1, 1] when ``clip_denoised``) and ``eps`` (the noise
    prediction implied by the output).
    """
    mean_output, var_output = split_model_output(d, model_output, x_t.shape[-1])
    variance, log_variance = model_variance(d, var_output, x_t, t)
    maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if d.model_mean_type == "xprev":
        pred_xstart = maybe_clip(predict_xstart_from_xprev(d, x_t, t, mean_output))
        mean = mean_output
    else:
        if d.model_mean_type == "xstart":
            pred_xstart = maybe_clip(mean_output)
        else:  # eps
            pred_xstart = maybe_clip(predict_xstart_from_eps(d, x_t, t, mean_output))
        mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
    eps = mean_output if d.model_mean_type == "eps" else predict_eps_from_xstart(
        d, x_t, t, pred_xstart
    )
    return dict(
        mean=mean,
        variance=variance,
        log_variance=log_variance,
        pred_xstart=pred_xstart,
        eps=eps,
    )


# ---------------------------------------------------------------------------------------------
# Log-likelihood helpers.
# ---------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The original's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(
    x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """log p(x) of the discretized Gaussian decoder, elementwise, in nats.

    ``x`` holds 8-bit data scaled to [-1, 1]; each value owns the bin [x - 1/255, x + 1/255],
    with the bins of -1 and 1 extended to -inf and +inf.
    """
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )
    return log_probs


def prior_bpd(d: Diffusion, x_start: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension: ``[B]``."""
    t = jnp.full((x_start.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
    qt_mean, _, qt_log_variance = q_mean_variance(d, x_start, t)
    kl = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
    return mean_flat(kl) / math.log(2.0)


def vb_terms_bpd(
    d: Diffusion,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    clip_denoised: bool,
) -> tuple[jax.Array, jax.Array]:
    """One term of the variational bound, in bits per dimension: (``[B]``, pred_xstart).

    ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for t > 0 and the decoder term
    ``L_0 = -log p(x_0 | x_1)`` at t = 0 (0-based).
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
    out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    kl = kl / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), out["pred_xstart"]


# ---------------------------------------------------------------------------------------------
# Training objectives.
# ---------------------------------------------------------------------------------------------


def training_losses(
    d: Diffusion, model_fn: ModelFn, x_start: jax.Array, key: jax.Array
) -> jax.Array:
    """The per-example training loss ``[B]`` of ``d.loss_type`` (Algorithm 1).

    Draws t ~ Uniform{0..T-1} and eps ~ N(0, I) from ``key`` and evaluates ``model_fn(x_t, t)``.

    - ``mse``: L_simple, the mean of (target - output)^2 over all dims; the target is eps,
      x_0 or the posterior mean for mean type eps, xstart or xprev.
    - ``kl``: the variational-bound term L_{t-1} (or L_0 at t = 0) in bits per dim, as the
      original ``loss_type='kl'``.
    - ``hybrid``: L_simple + (T / 1000) * L_vlb term with a stop-gradient on the mean output, so
      the bound trains only the variance (Improved DDPM, lambda = 0.001 on L_vlb = T E_t[L_t]).
    """
    t_key, noise_key = jax.random.split(key)
    batch = x_start.shape[0]
    t = jax.random.randint(t_key, (batch,), 0, d.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x_start.shape, dtype=x_start.dtype)
    x_t = q_sample(d, x_start, t, noise)
    model_output = model_fn(x_t, t).astype(jnp.float32)
    return losses_from_output(d, model_output, x_start, x_t, t, noise)


def losses_from_output(
    d: Diffusion,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
) -> jax.Array:
    """The per-example loss ``[B]`` given the network output at (x_t, t) drawn with ``noise``."""
    if d.loss_type == "kl":
        losses, _ = vb_terms_bpd(d, model_output, x_start, x_t, t, clip_denoised=False)
        return losses
    mean_output, var_output = split_model_output(d, model_output, x_start.shape[-1])
    if d.model_mean_type == "eps":
        target = noise
    elif d.model_mean_type == "xstart":
        target = x_start
    else:
        target, _, _ = q_posterior_mean_variance(d, x_start, x_t, t)
    losses = mean_flat(jnp.square(target - mean_output))
    if d.loss_type == "hybrid":
        if var_output is None:
            raise ValueError(
                "loss_type 'hybrid' trains a learned variance; set diffusion.model_var_type to "
                "'learned' or 'learned_range'"
            )
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
        vb, _ = vb_terms_bpd(d, frozen, x_start, x_t, t, clip_denoised=False)
        losses = losses + vb * (d.num_timesteps * HYBRID_LAMBDA)
    return losses


# ---------------------------------------------------------------------------------------------
# The full variational bound (bits/dim).
# ---------------------------------------------------------------------------------------------


def calc_bpd_loop(
    d: Diffusion,
    model_fn: ModelFn,
    x_start: jax.Array,
    key: jax.Array,
    *,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """The full variational bound of each image in bits per dim, term by term.

    One ``lax.scan`` over all T steps (compiled once). For every t a fresh x_t ~ q(x_t | x_0) is
    drawn with ``fold_in(key, t)``, as the original ``calc_bpd_loop`` does.

    Returns:
      ``total_bpd [B]`` (= prior + sum of terms), ``prior_bpd [B]``, ``terms_bpd [B, T]``
      (``terms_bpd[:, 0]`` is the decoder term L_0, ``terms_bpd[:, t]`` is L_t for t >= 1),
      ``xstart_mse [B, T]`` and ``mse [B, T]`` (the eps prediction error).
    """
    batch = x_start.shape[0]

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x_start.shape)
        x_t = q_sample(d, x_start, t, noise)
        model_output = model_fn(x_t, t).astype(jnp.float32)
        vb, pred_xstart = vb_terms_bpd(
            d, model_output, x_start, x_t, t, clip_denoised=clip_denoised
        )
        eps = predict_eps_from_xstart(d, x_t, t, pred_xstart)
        return None, (vb, mean_flat(jnp.square(pred_xstart - x_start)), mean_flat(
            jnp.square(eps - noise)
        ))

    ts = jnp.arange(d.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, xstart_mse, mse) = jax.lax.scan(term, None, ts)
    # Scanned from t = T-1 down to 0: reverse so that index t holds the term of step t.
    terms = jnp.flip(vb, axis=0).T
    prior = prior_bpd(d, x_start)
    return dict(
        total_bpd=jnp.sum(terms, axis=1) + prior,
        prior_bpd=prior,
        terms_bpd=terms,
        xstart_mse=jnp.flip(xstart_mse, axis=0).T,
        mse=jnp.flip(mse, axis=0).T,
    )
