"""Config validation: every mistake is one clear line at start-up, before anything compiles.

ml_collections already refuses unknown keys (configs are locked) and values of the wrong type;
``validate`` checks the values themselves and how they fit together.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from ddpm_jax import diffusion, schedules

DTYPES = ("float32", "bfloat16", "float16")
SAMPLERS = ("ancestral", "ddim")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive_int(config, key: str) -> None:
    value = _get(config, key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{key} must be a positive integer, got {value!r}",
    )


def _get(config, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _choice(config, key: str, choices) -> None:
    value = _get(config, key)
    _require(value in choices, f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first invalid setting of a full training config."""
    for key in ("data.image_size", "data.channels", "model.ch", "model.num_res_blocks",
                "model.block_size", "diffusion.num_timesteps", "training.batch_size",
                "training.num_train_steps", "training.log_every", "training.checkpoint_every",
                "training.sample_every", "training.max_to_keep", "training.num_sample_images",
                "sampling.batch_size", "data.prefetch", "data.num_threads"):
        _positive_int(config, key)
    _choice(config, "diffusion.beta_schedule", schedules.BETA_SCHEDULES)
    _choice(config, "diffusion.model_mean_type", diffusion.MEAN_TYPES)
    _choice(config, "diffusion.model_var_type", diffusion.VAR_TYPES)
    _choice(config, "diffusion.loss_type", diffusion.LOSS_TYPES)
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "sampling.sampler", SAMPLERS)
    _require(
        not (config.diffusion.loss_type == "hybrid"
             and config.diffusion.model_var_type not in ("learned", "learned_range")),
        "diffusion.loss_type='hybrid' trains a learned variance: set "
        "diffusion.model_var_type to 'learned' or 'learned_range'",
    )
    try:
        schedules.get_beta_schedule(
            config.diffusion.beta_schedule,
            beta_start=config.diffusion.beta_start,
            beta_end=config.diffusion.beta_end,
            num_timesteps=config.diffusion.num_timesteps,
        )
    except schedules.ScheduleError as e:
        raise ConfigError(str(e)) from None
    _validate_model(config)
    _validate_optim(config)
    _validate_sampling(config)


def _validate_sampling(config) -> None:
    s, T = config.sampling, config.diffusion.num_timesteps
    _require(s.num_steps is None or (isinstance(s.num_steps, int) and 1 <= s.num_steps <= T),
             f"sampling.num_steps must be None (all T steps) or in [1, {T}], got {s.num_steps!r}")
    _require(s.eta >= 0.0, f"sampling.eta must be >= 0, got {s.eta!r}")


def _validate_model(config) -> None:
    m, size = config.model, config.data.image_size
    _require(len(m.ch_mult) >= 1 and all(isinstance(c, int) and c > 0 for c in m.ch_mult),
             f"model.ch_mult must be a non-empty tuple of positive integers, got {m.ch_mult!r}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout!r}")
    _require(size % m.block_size == 0,
             f"data.image_size={size} is not divisible by model.block_size={m.block_size}")
    res = size // m.block_size
    down = 2 ** (len(m.ch_mult) - 1)
    _require(res % down == 0,
             f"data.image_size={size} (after block_size {m.block_size}) cannot be halved "
             f"{len(m.ch_mult) - 1} times for model.ch_mult={tuple(m.ch_mult)}; use fewer levels")
    resolutions = {res // 2**i for i in range(len(m.ch_mult))}
    bad = [r for r in m.attn_resolutions if r not in resolutions]
    _require(not bad, f"model.attn_resolutions {tuple(bad)} are not resolutions of this U-Net "
             f"(it has {sorted(resolutions, reverse=True)})")
    channels = {m.ch} | {m.ch * c for c in m.ch_mult}
    _require(all(c % 32 == 0 for c in channels),
             f"model.ch * ch_mult must be multiples of 32 for GroupNorm(32), got "
             f"{sorted(channels)}")


def _validate_optim(config) -> None:
    o, t = config.optim, config.training
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr!r}")
    _require(isinstance(o.warmup, int) and o.warmup >= 0,
             f"optim.warmup must be a non-negative integer, got {o.warmup!r}")
    _require(o.warmup <= t.num_train_steps,
             f"optim.warmup={o.warmup} is larger than training.num_train_steps="
             f"{t.num_train_steps}; lower the warmup or train longer")
    _require(o.grad_clip > 0, f"optim.grad_clip must be positive, got {o.grad_clip!r}")
    _require(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay must be in [0, 1), got {o.ema_decay!r}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    """The locked config saved with a run (JSON lists come back as tuples)."""

    def tuples(node):
        if isinstance(node, dict):
            return {k: tuples(v) for k, v in node.items()}
        if isinstance(node, list):
            return tuple(tuples(v) for v in node)
        return node

    config = ml_collections.ConfigDict(tuples(json.loads(text)))
    config.lock()
    return config
