"""Beta schedules of the forward process, computed in float64.

Every schedule returns a float64 numpy array ``betas[i]`` for the 0-based index ``i in [0, T)``
(the paper's ``beta_{i+1}``). The diffusion constants derived from it are computed in float64 as
well and cast to float32 once, exactly as the original implementation does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ddpm_jax import errors

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


class ScheduleError(errors.UserError, ValueError):
    """A beta schedule that is unknown or not a valid diffusion process."""


def _warmup_betas(beta_start: float, beta_end: float, num_timesteps: int, frac: float):
    """Linear warm-up from beta_start to beta_end over ``frac * T`` steps, then beta_end."""
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
    warmup_time = int(num_timesteps * frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """alphabar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), t = 0..T."""
    t = np.arange(num_timesteps + 1, dtype=np.float64)
    f = np.cos(((t / num_timesteps) + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return f / f[0]


def get_beta_schedule(
    name: str,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_timesteps: int = 1000,
) -> np.ndarray:
    """Returns the float64 betas ``[T]`` of a named schedule.

    Args:
      name: one of ``BETA_SCHEDULES``.
      beta_start: first beta (``linear``, ``quad``, ``warmup*``).
      beta_end: last beta (``linear``, ``quad``, ``warmup*``, ``const``).
      num_timesteps: T.

    Raises:
      ScheduleError: for an unknown name or betas that do not define a diffusion process.
    """
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 2:
        raise ScheduleError(
            f"num_timesteps must be an integer >= 2, got {num_timesteps!r}; "
            "set diffusion.num_timesteps (the paper uses 1000)"
        )
    T = int(num_timesteps)
    # Check the parameters a schedule uses before computing it: `quad` takes square roots, and
    # (-x) ** 0.5 is complex in Python, which numpy would silently truncate to a real ~0.
    uses_start = name in ("linear", "quad", "warmup10", "warmup50")
    uses_end = uses_start or name == "const"
    if uses_start and not 0.0 < beta_start <= 1.0:
        raise ScheduleError(
            f"beta_start of schedule {name!r} must lie in (0, 1], got {beta_start!r}; "
            "check diffusion.beta_start (the paper uses 1e-4)"
        )
    if uses_end and not 0.0 < beta_end <= 1.0:
        raise ScheduleError(
            f"beta_end of schedule {name!r} must lie in (0, 1], got {beta_end!r}; "
            "check diffusion.beta_end (the paper uses 0.02)"
        )
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif name == "jsd":
        # 1/T, 1/(T-1), ..., 1: the last step destroys all information (alphabar_T = 0).
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name == "warmup10":
        betas = _warmup_betas(beta_start, beta_end, T, 0.1)
    elif name == "warmup50":
        betas = _warmup_betas(beta_start, beta_end, T, 0.5)
    elif name == "cosine":
        # Improved DDPM: beta_t = 1 - alphabar(t + 1) / alphabar(t), clipped at 0.999.
        abar = cosine_alphas_cumprod(T)
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    else:
        raise ScheduleError(
            f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}"
        )
    validate_betas(betas, name)
    return betas


def config_betas(diffusion_config: Any) -> np.ndarray:
    """The float64 betas of a config's ``diffusion`` section."""
    c = diffusion_config
    return get_beta_schedule(c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end,
                             num_timesteps=c.num_timesteps)


def validate_betas(betas: np.ndarray, name: str = "custom") -> None:
    """Checks that betas define a forward process: 0 < beta <= 1, alphabar strictly decreasing.

    beta = 1 is allowed only because the original ``jsd`` schedule ends with it.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ScheduleError(f"betas of schedule {name!r} must be a 1-D array of length >= 2")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0.0) or np.any(betas > 1.0):
        lo, hi = float(np.min(betas)), float(np.max(betas))
        raise ScheduleError(
            f"betas of schedule {name!r} must lie in (0, 1], got range [{lo:g}, {hi:g}]; "
            "check diffusion.beta_start and diffusion.beta_end"
        )
    abar = np.cumprod(1.0 - betas)
    if np.any(np.diff(abar) >= 0.0) or np.any(abar[:-1] <= 0.0):
        raise ScheduleError(
            f"alphabar of schedule {name!r} is not strictly decreasing and positive before the "
            "last step; use smaller betas"
        )
