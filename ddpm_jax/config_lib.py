"""Config validation and the small helpers every config-reading module shares.

ml_collections already refuses unknown keys (configs are locked) and values of the wrong type;
``validate`` checks the values themselves and how they fit together, so every mistake is one
clear line at start-up, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import datasets, diffusion, errors, schedules, unet

DTYPES = ("float32", "bfloat16", "float16")
# The samplers (``sampling.VARIANTS`` says what each computes) and step spacings, by name.
SAMPLERS = ("ancestral", "ddim", "ddim_clipped", "ddim_iddpm", "dpm_solver++", "dpm_solver++_3m",
            "heun")
SPACINGS = ("uniform", "quadratic", "linspace", "leading", "trailing", "karras")
OPTIM_SCHEDULES = ("constant", "cosine")  # the learning rate after the warm-up
MISSING = object()  # what ``lookup`` returns for a key that is not there
# Keys added after runs were already saved: a saved config without them reads as these values
# (the behaviour those runs had), so old checkpoints still load and resume.
ADDED_KEYS = {"model.num_classes": 0, "model.cond_drop_prob": 0.1, "sampling.guidance": 0.0,
              "sampling.churn": 0.0, "model.num_groups": 32}


class ConfigError(errors.UserError, ValueError):
    """A config value that cannot run; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The ``optim`` section with the run length its schedule spans: what training builds the
    optimiser, the learning-rate schedule and the EMA from.

    Attributes:
      lr, warmup: Adam's rate, reached linearly over ``warmup`` steps.
      grad_clip: the global gradient norm clipped to before Adam.
      beta1, beta2, eps: Adam's.
      schedule: after the warm-up, "constant" or "cosine" (a half cosine to 0 at
        ``num_train_steps``).
      ema_decay, ema_warmup: the EMA's decay; with ``ema_warmup``, TF's
        ``min(decay, (1 + step) / (10 + step))``.
      skip_nonfinite: the loop goes on past a non-finite update (which is never applied).
      num_train_steps: ``training.num_train_steps``.
    """

    lr: float
    warmup: int
    grad_clip: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    skip_nonfinite: bool = False
    num_train_steps: int = 1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> OptimizerSpec:
        """The section of ``config`` (keys added after older runs were saved take their
        behaviour: a constant rate, no EMA warm-up, stop at a non-finite update)."""
        o = config.optim
        return cls(o.lr, o.warmup, o.grad_clip, o.beta1, o.beta2, o.eps,
                   o.get("schedule", "constant"), o.ema_decay, o.get("ema_warmup", False),
                   o.get("skip_nonfinite", False), config.training.num_train_steps)

    def check(self) -> None:
        """Raises ConfigError naming the first setting that cannot train."""
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr!r}")
        _require(isinstance(self.warmup, int) and self.warmup >= 0,
                 f"optim.warmup must be a non-negative integer, got {self.warmup!r}")
        _require(self.grad_clip > 0,
                 f"optim.grad_clip must be positive, got {self.grad_clip!r}")
        _require(0.0 <= self.ema_decay < 1.0,
                 f"optim.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        _require(self.schedule in OPTIM_SCHEDULES, f"optim.schedule={self.schedule!r} is not "
                 f"one of: {', '.join(OPTIM_SCHEDULES)}")


@dataclasses.dataclass(frozen=True)
class Sections:
    """The typed, checked sections of a config that modules take instead of the whole config
    (``validate`` builds them): the process (``diffusion``), the optimiser (``optim``), the
    network (``model`` with its image) and the data (``data``)."""

    process: diffusion.ProcessSpec
    optimizer: OptimizerSpec
    model: unet.ModelSpec
    data: datasets.DataSpec


def lookup(tree: Any, key: str, default: Any = MISSING) -> Any:
    """The value at a dotted ``key`` ("model.ch") of a ConfigDict or nested dict."""
    node = tree
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def num_classes(config: Any) -> int:
    """``model.num_classes`` of a config: 0 for an unconditional model."""
    return int(config.model.num_classes)


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The leaves where two nested dicts differ: ``[(dotted key, old, new)]``, sorted by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys()):
            out += differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [(prefix, old, new)]


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
    """Names an unknown dotted config key and the nearest valid keys."""
    parts = key.split(".")
    known, parent = [], []
    node = config
    for part in parts:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            break
        node = node[part]
        parent.append(part)
    prefix = ".".join(parent)
    full = [f"{prefix}.{k}" if prefix else k for k in known]
    close = difflib.get_close_matches(key, full, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"unknown config key {key}; {hint}the keys of {prefix or 'the config'} are: "
            f"{', '.join(known)}")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive_int(config, key: str) -> None:
    value = lookup(config, key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{key} must be a positive integer, got {value!r}",
    )


def _choice(config, key: str, choices) -> None:
    value = lookup(config, key)
    _require(value in choices, f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def validate(config: ml_collections.ConfigDict) -> Sections:
    """Raises ConfigError naming the first invalid setting of a full training config; returns
    its typed sections."""
    for key in ("data.image_size", "data.channels", "model.ch", "model.num_res_blocks",
                "model.block_size", "diffusion.num_timesteps", "training.batch_size",
                "training.num_train_steps", "training.log_every", "training.checkpoint_every",
                "training.sample_every", "training.max_to_keep", "training.num_sample_images",
                "training.steps_per_dispatch", "sampling.batch_size", "data.prefetch",
                "data.num_threads"):
        _positive_int(config, key)
    _choice(config, "diffusion.beta_schedule", schedules.BETA_SCHEDULES)
    _choice(config, "diffusion.model_mean_type", diffusion.MEAN_TYPES)
    _choice(config, "diffusion.model_var_type", diffusion.VAR_TYPES)
    _choice(config, "diffusion.loss_type", diffusion.LOSS_TYPES)
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "sampling.sampler", SAMPLERS)
    _require(
        not (config.diffusion.loss_type == "hybrid"
             and not diffusion.is_learned_variance(config.diffusion.model_var_type)),
        "diffusion.loss_type='hybrid' trains a learned variance: set "
        "diffusion.model_var_type to 'learned' or 'learned_range'",
    )
    process = diffusion.ProcessSpec.from_config(config)
    try:
        betas = process.betas()
    except schedules.ScheduleError as e:
        raise ConfigError(str(e)) from None
    _validate_process(process, betas)
    _validate_conditioning(config.model)  # the raw values, before the section converts them
    model = unet.ModelSpec.from_config(config)
    _validate_model(model)
    check_guidance(config.sampling.guidance, prefix="sampling.")
    optimizer = OptimizerSpec.from_config(config)
    optimizer.check()
    _validate_training(config)
    s = config.sampling
    check_sampler(s.sampler, s.num_steps, s.eta, config.diffusion.num_timesteps,
                  spacing=s.spacing, thresholding=s.thresholding, churn=s.churn,
                  prefix="sampling.")
    return Sections(process, optimizer, model, datasets.DataSpec.from_config(config))


def check_sampler(sampler: str, num_steps: int | None, eta: float, num_timesteps: int, *,
                  spacing: str | None = None, thresholding: bool = False, churn: float = 0.0,
                  prefix: str = "--") -> None:
    """Checks a sampler choice; ``prefix`` names the settings as flags or config keys."""
    _require(sampler in SAMPLERS,
             f"{prefix}sampler={sampler!r} is not one of: {', '.join(SAMPLERS)}")
    _require(spacing is None or spacing in SPACINGS,
             f"{prefix}spacing={spacing!r} is not one of: {', '.join(SPACINGS)}")
    _require(num_steps is None or (isinstance(num_steps, int) and not isinstance(num_steps, bool)
                                   and 1 <= num_steps <= num_timesteps),
             f"{prefix}num_steps must be in [1, {num_timesteps}] (the process has T = "
             f"{num_timesteps} steps), got {num_steps!r}")
    _require(not (sampler == "heun" and num_steps == 1),
             f"{prefix}num_steps=1 leaves EDM's Heun sampler no step to correct; use >= 2")
    _require(isinstance(eta, int | float) and eta >= 0.0,
             f"{prefix}eta must be >= 0 (0 = deterministic DDIM), got {eta!r}")
    ddims = ", ".join(s for s in SAMPLERS if s.startswith("ddim"))
    _require(eta == 0.0 or sampler.startswith("ddim"),
             f"{prefix}eta={eta} applies to the DDIM samplers only ({ddims}); add "
             f"{prefix}sampler=ddim or drop {prefix}eta")
    _require(not thresholding or sampler.startswith("dpm_solver++"),
             f"{prefix}thresholding applies to the DPM-Solvers only (dpm_solver++, "
             f"dpm_solver++_3m; the clipped DDIMs are "
             f"ddim_clipped and ddim_iddpm, the ancestral sampler clips with "
             f"sampling.clip_denoised); drop {prefix}thresholding")
    _require(isinstance(churn, int | float) and not isinstance(churn, bool)
             and math.isfinite(churn) and churn >= 0.0,
             f"{prefix}churn must be a finite number >= 0 (EDM's S_churn; 0 = deterministic), "
             f"got {churn!r}")
    _require(churn == 0.0 or sampler == "heun",
             f"{prefix}churn={churn} applies to the heun sampler only (EDM's S_churn); add "
             f"{prefix}sampler=heun or drop {prefix}churn")


def _validate_process(d: diffusion.ProcessSpec, betas: np.ndarray) -> None:
    """The loss, variance and schedule fit together (what the original asserts, and more)."""
    _require(not (d.loss_type == "mse" and diffusion.is_learned_variance(d.model_var_type)),
             f"diffusion.loss_type='mse' trains the mean only: the learned variance "
             f"(model_var_type={d.model_var_type!r}) would get no gradient; use "
             "loss_type='hybrid' or 'kl', or model_var_type='fixedlarge' or 'fixedsmall'")
    _require(bool(np.all(np.diff(betas) >= 0.0)),
             f"the betas of diffusion.beta_schedule={d.beta_schedule!r} decrease (beta_start="
             f"{d.beta_start} > beta_end={d.beta_end}?); the forward process adds more noise at "
             "each step: swap diffusion.beta_start and diffusion.beta_end")
    abar_last = float(np.prod(1.0 - betas))
    _require(d.model_mean_type != "eps" or (float(np.max(betas)) < 1.0 and abar_last > 0.0),
             f"diffusion.beta_schedule={d.beta_schedule!r} (beta_end={d.beta_end}) ends with "
             f"beta = 1, so the last alpha-bar is 0 and model_mean_type='eps' divides by it "
             "(all-zero samples, NaN bits/dim): use betas in (0, 1), e.g. beta_end < 1, or "
             "model_mean_type='xstart'")


def _validate_model(m: unet.ModelSpec) -> None:
    _require(len(m.ch_mult) >= 1 and all(isinstance(c, int) and c > 0 for c in m.ch_mult),
             f"model.ch_mult must be a non-empty tuple of positive integers, got {m.ch_mult!r}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout!r}")
    size = m.image_size
    _require(size % m.block_size == 0,
             f"data.image_size={size} is not divisible by model.block_size={m.block_size}")
    res = size // m.block_size
    down = 2 ** (len(m.ch_mult) - 1)
    _require(res % down == 0,
             f"data.image_size={size} (after block_size {m.block_size}) cannot be halved "
             f"{len(m.ch_mult) - 1} times for model.ch_mult={m.ch_mult}; use fewer levels")
    resolutions = m.levels()
    bad = [r for r in m.attn_resolutions if r not in resolutions]
    _require(not bad, f"model.attn_resolutions {tuple(bad)} are not resolutions of this U-Net "
             f"(it has {resolutions})")
    channels = {m.ch} | {m.ch * c for c in m.ch_mult}
    g = m.num_groups
    _require(isinstance(g, int) and not isinstance(g, bool) and g > 0,
             f"model.num_groups must be a positive integer (the paper's 32), got {g!r}")
    _require(all(c % g == 0 for c in channels),
             f"model.ch * ch_mult must be multiples of model.num_groups={g} for GroupNorm, got "
             f"{sorted(channels)}; change model.ch or model.num_groups")


def _validate_conditioning(m) -> None:
    _require(isinstance(m.num_classes, int) and not isinstance(m.num_classes, bool)
             and m.num_classes >= 0,
             f"model.num_classes must be a non-negative integer (0 = unconditional), got "
             f"{m.num_classes!r}")
    _require(0.0 <= m.cond_drop_prob < 1.0,
             f"model.cond_drop_prob must be in [0, 1), got {m.cond_drop_prob!r}")


def check_guidance(guidance: float, *, prefix: str = "--") -> None:
    """A guidance scale w: finite and >= 0 (0 = the conditional model without guidance)."""
    _require(isinstance(guidance, int | float) and not isinstance(guidance, bool)
             and math.isfinite(guidance) and guidance >= 0.0,
             f"{prefix}guidance must be a finite number >= 0 (0 = no guidance), got "
             f"{guidance!r}")


def _validate_training(config) -> None:
    t = config.training
    k = t.steps_per_dispatch
    for key in ("num_train_steps", "log_every", "checkpoint_every", "sample_every"):
        _require(t[key] % k == 0,
                 f"training.{key}={t[key]} is not a multiple of training.steps_per_dispatch={k}"
                 f"; use a multiple of {k} or a smaller steps_per_dispatch")


def warnings(config: ml_collections.ConfigDict, *, backend: str | None = None) -> list[str]:
    """Settings that run but are probably not what was meant (one line each); ``backend``:
    the platform the run trains on (``jax.default_backend()``), None when unknown."""
    out = []
    o, t = config.optim, config.training
    if o.warmup > t.num_train_steps:
        out.append(f"optim.warmup={o.warmup} is longer than training.num_train_steps="
                   f"{t.num_train_steps}: the learning rate never reaches optim.lr={o.lr}")
    m = config.model
    if m.num_groups in {m.ch * c for c in m.ch_mult}:  # a level as wide as the group count
        out.append(f"model.num_groups={m.num_groups} puts one channel in each group at "
                   f"{m.num_groups} channels: GroupNorm then removes the time embedding's shift "
                   "in those blocks; use fewer groups (configs/digits.py uses 8)")
    if backend == "cpu" and t.steps_per_dispatch > 1:
        out.append(f"training.steps_per_dispatch={t.steps_per_dispatch} on CPU: XLA:CPU runs "
                   "the convolutions' weight gradients inside the step loop about 20x slower "
                   "(the digits: 0.6 steps/s against 13); use 1 on CPU")
    return out


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists), as it is saved with a run."""
    return json.loads(to_json(config))


def from_json(text: str) -> ml_collections.ConfigDict:
    """The locked config saved with a run (JSON lists come back as tuples)."""
    return from_dict(json.loads(text))


def from_dict(tree: dict) -> ml_collections.ConfigDict:
    """A locked config from plain JSON types (lists become tuples)."""

    def tuples(node):
        if isinstance(node, dict):
            return {k: tuples(v) for k, v in node.items()}
        if isinstance(node, list):
            return tuple(tuples(v) for v in node)
        return node

    tree = tuples(tree)
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        if isinstance(tree.get(section), dict) and name not in tree[section]:
            tree[section] = {**tree[section], name: value}
    config = ml_collections.ConfigDict(tree)
    config.lock()
    return config
