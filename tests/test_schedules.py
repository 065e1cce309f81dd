"""Beta schedules and the float32 constants of ``Diffusion.create``, against float64 references.

The references below are written from the paper's equations (Ho et al. 2020, section 2), not
from the code under test.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import config_lib, diffusion, schedules
from ddpm_jax.schedules import ScheduleError

T = 1000
B0, B1 = 1e-4, 0.02
ALL_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _cosine_f(t: np.ndarray, big_t: int, s: float = 0.008) -> np.ndarray:
    return np.cos((t / big_t + s) / (1.0 + s) * (math.pi / 2.0)) ** 2


def reference_betas(name: str, big_t: int = T, start: float = B0, end: float = B1) -> np.ndarray:
    """Float64 betas of each schedule, from the definitions (i is the 0-based index)."""
    i = np.arange(big_t, dtype=np.float64)
    frac = i / (big_t - 1)
    if name == "linear":  # beta_i = start + (end - start) i / (T - 1)
        return start + (end - start) * frac
    if name == "quad":  # sqrt(beta) linear in i
        return (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * frac) ** 2
    if name == "const":
        return np.full(big_t, end)
    if name == "jsd":  # 1/T, 1/(T-1), ..., 1
        return 1.0 / (big_t - i)
    if name in ("warmup10", "warmup50"):
        n = int(big_t * (0.1 if name == "warmup10" else 0.5))
        out = np.full(big_t, end)
        out[:n] = start + (end - start) * np.arange(n) / (n - 1)
        return out
    if name == "cosine":  # beta_t = 1 - abar(t+1)/abar(t), abar = f/f(0), clipped at 0.999
        abar = _cosine_f(np.arange(big_t + 1.0), big_t) / _cosine_f(np.zeros(1), big_t)
        return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_schedule_matches_float64_reference(name):
    # betas == the schedule's defining formula, float64, length T.
    betas = schedules.get_beta_schedule(name, beta_start=B0, beta_end=B1, num_timesteps=T)
    assert betas.dtype == np.float64
    assert betas.shape == (T,)
    np.testing.assert_allclose(betas, reference_betas(name), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "name, first, last",
    [
        ("linear", B0, B1),
        ("quad", B0, B1),
        ("const", B1, B1),
        ("jsd", 1.0 / T, 1.0),
        ("warmup10", B0, B1),
        ("warmup50", B0, B1),
        ("cosine", None, 0.999),
    ],
)
def test_schedule_first_and_last_values(name, first, last):
    # betas[0], betas[T-1] from the schedule definitions.
    betas = schedules.get_beta_schedule(name, beta_start=B0, beta_end=B1, num_timesteps=T)
    if first is not None:
        assert betas[0] == pytest.approx(first, rel=1e-12)
    assert betas[-1] == pytest.approx(last, rel=1e-12)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_alphabar_strictly_decreasing_in_unit_interval(name):
    # alphabar_t = prod_{s<=t} (1 - beta_s) is strictly decreasing, > 0 before the last step.
    betas = schedules.get_beta_schedule(name, num_timesteps=T)
    abar = np.cumprod(1.0 - betas)
    assert np.all(np.diff(abar) < 0)
    assert np.all(abar[:-1] > 0) and abar[0] < 1
    assert np.all((betas > 0) & (betas <= 1))
    if name == "jsd":  # the last step destroys all information
        assert abar[-1] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name, warmup", [("warmup10", 100), ("warmup50", 500)])
@pytest.mark.parametrize("big_t", [1000, 40])
def test_warmup_lengths(name, warmup, big_t):
    # Linear from beta_start over the first frac*T steps (ending at beta_end), constant after.
    n = warmup * big_t // 1000
    betas = schedules.get_beta_schedule(name, beta_start=B0, beta_end=B1, num_timesteps=big_t)
    assert betas[0] == pytest.approx(B0)
    assert np.all(np.diff(betas[:n]) > 0)
    assert betas[n - 1] == pytest.approx(B1)
    np.testing.assert_array_equal(betas[n:], B1)


@pytest.mark.parametrize("big_t", [50, 1000, 4000])
def test_cosine_alphabar_is_f_over_f0(big_t):
    # alphabar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) pi/2), s = 0.008, while unclipped.
    betas = schedules.get_beta_schedule("cosine", num_timesteps=big_t)
    t = np.arange(1, big_t + 1, dtype=np.float64)
    abar_ref = _cosine_f(t, big_t) / _cosine_f(np.zeros(1), big_t)
    abar = np.cumprod(1.0 - betas)
    clipped = betas >= 0.999
    assert clipped[-1] and clipped.sum() <= 2  # only the last step(s) reach the clip
    np.testing.assert_allclose(abar[~clipped], abar_ref[~clipped], rtol=1e-9)
    assert betas.max() == 0.999
    np.testing.assert_allclose(
        schedules.cosine_alphas_cumprod(big_t),
        _cosine_f(np.arange(big_t + 1.0), big_t) / _cosine_f(np.zeros(1), big_t),
        rtol=1e-12,
        atol=1e-30,
    )


@pytest.mark.parametrize("name", ["cosin", "Linear", "", "sigmoid"])
def test_unknown_schedule_name_raises_with_choices(name):
    # Unknown name -> ScheduleError naming the bad value and the valid choices.
    with pytest.raises(ScheduleError, match="unknown beta schedule") as err:
        schedules.get_beta_schedule(name)
    assert repr(name) in str(err.value)
    assert all(choice in str(err.value) for choice in ALL_SCHEDULES)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["linear", "quad", "warmup10", "warmup50"])
@pytest.mark.parametrize("beta_start", [0.0, -1e-4, float("nan")])
def test_nonpositive_beta_start_raises(name, beta_start):
    # beta_start <= 0 is not a diffusion step (quad once silently took sqrt(-x) -> ~0).
    with pytest.raises(ScheduleError, match="beta_start"):
        schedules.get_beta_schedule(name, beta_start=beta_start, beta_end=B1, num_timesteps=T)


@pytest.mark.parametrize("name", ["linear", "quad", "const", "warmup10", "warmup50"])
@pytest.mark.parametrize("beta_end", [1.5, 0.0, -0.02])
def test_beta_end_out_of_range_raises(name, beta_end):
    # beta_end must lie in (0, 1].
    with pytest.raises(ScheduleError, match="beta_end"):
        schedules.get_beta_schedule(name, beta_start=B0, beta_end=beta_end, num_timesteps=T)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [1, 0, -5, 10.0])
def test_bad_num_timesteps_raises(name, num_timesteps):
    # T must be an integer >= 2.
    with pytest.raises(ScheduleError, match="num_timesteps"):
        schedules.get_beta_schedule(name, num_timesteps=num_timesteps)


def test_numpy_integer_num_timesteps_accepted():
    # An integer T given as a numpy integer is still an integer.
    betas = schedules.get_beta_schedule("linear", num_timesteps=np.int64(10))
    np.testing.assert_allclose(betas, reference_betas("linear", 10), rtol=1e-12)


@pytest.mark.parametrize(
    "betas, match",
    [
        (np.array([0.1, 0.0, 0.2]), "must lie in"),
        (np.array([0.1, 1.2]), "must lie in"),
        (np.array([0.1, np.inf]), "must lie in"),
        (np.array([1.0, 0.5, 0.5]), "strictly decreasing"),
        (np.array([0.1]), "length >= 2"),
    ],
)
def test_validate_betas_rejects_invalid(betas, match):
    # A forward process needs 0 < beta <= 1 and alphabar > 0 before the last step.
    with pytest.raises(ScheduleError, match=match):
        schedules.validate_betas(betas)


# ---------------------------------------------------------------------------------------------
# Diffusion.create: float64 constants cast once to float32.
# ---------------------------------------------------------------------------------------------


def reference_constants(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 constants from the paper's equations."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    log_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    return dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log1p(-abar),
        sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt((1.0 - abar) / abar),
        posterior_variance=post_var,
        posterior_log_variance_clipped=log_clipped,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


@pytest.mark.parametrize("name", ["linear", "quad", "cosine", "warmup10"])
def test_diffusion_constants_are_float64_cast_to_float32(name):
    # Every constant == float32(float64 value) up to 2 ulp (float32 arithmetic would lose digits).
    betas = schedules.get_beta_schedule(name, num_timesteps=T)
    d = diffusion.Diffusion.create(betas)
    ref = reference_constants(betas)
    for key, value in ref.items():
        got = np.asarray(getattr(d, key))
        assert got.dtype == np.float32, key
        assert got.shape == (T,), key
        np.testing.assert_allclose(got, value.astype(np.float32), rtol=2.5e-7, atol=0, err_msg=key)
    assert d.num_timesteps == T


def test_diffusion_constants_edge_entries():
    # alphabar_prev[0] = 1, beta~[0] = 0, log-variance clipped: entry 0 = log beta~[1].
    betas = schedules.get_beta_schedule("linear", num_timesteps=T)
    d = diffusion.Diffusion.create(betas)
    post_var = reference_constants(betas)["posterior_variance"]
    assert float(d.alphas_cumprod_prev[0]) == 1.0
    assert float(d.posterior_variance[0]) == 0.0
    assert float(d.posterior_log_variance_clipped[0]) == np.float32(np.log(post_var[1]))
    assert float(d.posterior_log_variance_clipped[0]) == float(d.posterior_log_variance_clipped[1])
    assert float(d.posterior_mean_coef1[0]) == 1.0  # q(x_0 | x_1, x_0) is a point mass at x_0
    assert float(d.posterior_mean_coef2[0]) == 0.0


def test_diffusion_is_arrays_and_three_short_static_names():
    # A jitted function hashes the static fields of its pytree arguments at every call and
    # compiles once per distinct value: a Diffusion's are the three type names, its betas are
    # data, so processes of different betas (and the same T) share one compilation.
    a = diffusion.Diffusion.create(schedules.get_beta_schedule("linear", num_timesteps=50))
    b = diffusion.Diffusion.create(schedules.get_beta_schedule("cosine", num_timesteps=50))
    static = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)
              if not f.metadata.get("pytree_node", True)}
    assert static == {"model_mean_type": "eps", "model_var_type": "fixedlarge",
                      "loss_type": "mse"}
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(a))
    f = jax.jit(lambda d: d.betas[-1] + d.posterior_variance[1])
    assert float(f(a)) != float(f(b))  # each call computes with its own process
    assert f._cache_size() == 1


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_float64_betas_read_back_exactly(name):
    # The float64 betas travel as bits: d.betas64 and its Schedule64 hold them bit for bit.
    betas = schedules.get_beta_schedule(name, num_timesteps=T)
    d = diffusion.Diffusion.create(betas)
    assert d.betas64.dtype == np.float64 and d.betas64.tobytes() == betas.tobytes()
    s = diffusion.Schedule64.of(d)
    assert diffusion.Schedule64.of(s) is s and not s.betas.flags.writeable
    same = diffusion.Schedule64(betas.copy())
    assert s == same and hash(s) == hash(same) and s.num_timesteps == T
    assert s != diffusion.Schedule64(np.nextafter(betas, 1.0))  # one ulp apart: another key


def test_validate_builds_the_process_section_the_diffusion_takes():
    # config.diffusion as a frozen section, built and checked by validate: it holds each key
    # and builds the same process as the config, bit for bit.
    config = test_config.get_config()
    c = config.diffusion
    c.beta_schedule, c.model_var_type, c.loss_type = "cosine", "learned_range", "hybrid"
    spec = config_lib.validate(config).process
    assert spec == diffusion.ProcessSpec("cosine", c.beta_start, c.beta_end, 50, "eps",
                                         "learned_range", "hybrid")
    d = diffusion.Diffusion.from_spec(spec)
    assert d.betas64.tobytes() == schedules.get_beta_schedule("cosine", num_timesteps=50).tobytes()
    assert (d.model_var_type, d.loss_type) == ("learned_range", "hybrid")
    assert d.betas64.tobytes() == diffusion.Diffusion.from_config(config).betas64.tobytes()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_timesteps = 10


def test_schedule_of_a_traced_diffusion_is_refused():
    # Inside a jit the betas are tracers: a clear error, not a silent float32 copy.
    d = diffusion.Diffusion.create(schedules.get_beta_schedule("linear", num_timesteps=8))
    with pytest.raises(ValueError, match="Schedule64"):
        jax.jit(lambda d: diffusion.Schedule64.of(d).num_timesteps)(d)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_posterior_variance_between_zero_and_beta(name):
    # 0 <= beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) <= beta_t, for every schedule.
    d = diffusion.Diffusion.create(schedules.get_beta_schedule(name, num_timesteps=100))
    post_var, betas = np.asarray(d.posterior_variance), np.asarray(d.betas)
    assert np.all(np.isfinite(post_var))
    assert np.all(post_var[1:] > 0) and post_var[0] == 0
    assert np.all(post_var <= betas * (1 + 1e-6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_mean_type="x0"), "model_mean_type"),
        (dict(model_var_type="fixed"), "model_var_type"),
        (dict(loss_type="l2"), "loss_type"),
    ],
)
def test_create_rejects_unknown_types(kwargs, match):
    # Unknown parameterisation names -> ValueError naming the config key.
    with pytest.raises(ValueError, match=match):
        diffusion.Diffusion.create(schedules.get_beta_schedule("linear", num_timesteps=8), **kwargs)
