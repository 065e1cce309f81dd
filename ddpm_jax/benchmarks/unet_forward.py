"""Speed and FLOPs of the U-Net's evaluation forward pass (no dropout), for one config.

  python -m ddpm_jax.benchmarks.unet_forward --config=cifar10 --batch=16 [--dtype=bfloat16]

Builds the U-Net of ``configs/<config>.py`` (random weights), jits ``unet.apply`` on a batch of
the config's image shape with random t, and reports:

* compile time (lower + compile);
* forward time per batch and per image: the median of ``--num_runs`` timed calls after
  ``--warmup`` untimed ones, each ended by ``block_until_ready``;
* XLA's FLOP count of the compiled forward (``cost_analysis()['flops']``) per image, the implied
  GFLOP/s, and the ratio to the paper's model where one is known (about 6.2 GMACs =
  12.4 GFLOPs per CIFAR10 image; about 248.5 GMACs = 497 GFLOPs for the 256x256 model). XLA
  counts 2 FLOPs per multiply-add but none for the taps of a 3x3 conv that fall on the SAME
  padding (about 4% of a 32x32 conv's, more at 8x8 and 4x4), and adds the elementwise work
  (GroupNorm, swish, softmax), so expect a ratio a little under 1;
* the parameter count.

A short table goes to stdout, then one JSON line with every figure.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

from ddpm_jax import config_lib, unet
from ddpm_jax.benchmarks import timing

_CONFIG = flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per forward pass.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES),
                           "Override config.model.dtype (activation dtype).")
_NUM_RUNS = flags.DEFINE_integer("num_runs", 10, "Timed forward passes (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed forward passes after compiling.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and inputs.")

# Forward GFLOPs per image (2 x GMACs) of the paper's models.
REFERENCE_GFLOPS = {
    "cifar10": 12.4,
    "celebahq": 497.0,
    "lsun_bedroom": 497.0,
    "lsun_cat": 497.0,
    "lsun_church": 497.0,
}


def config_name(name: str) -> str:
    """``cifar10``, ``cifar10.py`` or ``configs/cifar10.py`` -> ``cifar10``."""
    return os.path.splitext(os.path.basename(name))[0]


def load_config(name: str, dtype: str | None = None):
    """The locked config of ``configs/<name>.py``, with ``model.dtype`` overridden if given."""
    config = importlib.import_module(f"configs.{config_name(name)}").get_config()
    if dtype is not None:
        config.model.dtype = dtype
    return config


def xla_flops(compiled) -> float:
    """Total FLOPs of a compiled computation (``cost_analysis`` is a dict or a list of dicts)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(a.get("flops", 0.0) for a in analysis or []))


def inputs(config, batch: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """Random x ``[B, H, W, C]`` float32 and t ``int32 [B]`` in [0, T)."""
    d = config.data
    x_key, t_key = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(x_key, (batch, d.image_size, d.image_size, d.channels), jnp.float32)
    t = jax.random.randint(t_key, (batch,), 0, config.diffusion.num_timesteps, jnp.int32)
    return x, t


def measure(config, batch: int, *, num_runs: int, warmup: int, seed: int) -> dict:
    """Compiles and times the eval forward pass; returns the figures."""
    graphdef, params = unet.split(unet.create_model(config, seed=seed))
    x, t = inputs(config, batch, seed)
    forward = jax.jit(lambda p, x, t: unet.apply(graphdef, p, x, t))
    start = time.perf_counter()
    compiled = forward.lower(params, x, t).compile()
    compile_s = time.perf_counter() - start
    batch_s = timing.median_seconds(lambda: compiled(params, x, t).block_until_ready(), num_runs,
                                    warmup)
    flops = xla_flops(compiled)
    return dict(
        params=unet.count_params(params),
        compile_s=compile_s,
        batch_s=batch_s,
        image_ms=1e3 * batch_s / batch,
        images_per_s=batch / batch_s,
        gflops_per_image=flops / batch / 1e9,
        gflops_per_s=flops / batch_s / 1e9,
    )


def report(name: str, config, batch: int, num_runs: int, r: dict) -> dict:
    """Prints the table and returns the JSON record."""
    ref = REFERENCE_GFLOPS.get(name)
    d = config.data
    print(f"U-Net forward (eval, no dropout): config {name}, batch {batch}, "
          f"{d.image_size}x{d.image_size}x{d.channels}, dtype {config.model.dtype}, "
          f"{jax.devices()[0].platform} x{jax.device_count()}, median of {num_runs} runs")
    rows = [
        ("parameters", f"{r['params']:,}"),
        ("compile", f"{r['compile_s']:.2f} s"),
        ("forward / batch", f"{1e3 * r['batch_s']:.1f} ms"),
        ("forward / image", f"{r['image_ms']:.2f} ms  ({r['images_per_s']:.1f} images/s)"),
        ("XLA GFLOPs / image", f"{r['gflops_per_image']:.4g}  (no MACs on SAME padding)"),
        ("reference GFLOPs / image",
         f"{ref:.1f}  (XLA / reference = {r['gflops_per_image'] / ref:.3f})" if ref else "n/a"),
        ("achieved", f"{r['gflops_per_s']:.4g} GFLOP/s (XLA FLOPs / forward time)"),
    ]
    for label, value in rows:
        print(f"  {label:<26} {value}")
    return dict(benchmark="unet_forward", config=name, batch=batch, dtype=config.model.dtype,
                platform=jax.devices()[0].platform, devices=jax.device_count(),
                num_runs=num_runs, reference_gflops_per_image=ref, **r)


def main(argv: Sequence[str]) -> None:
    """Measures the forward pass of --config and prints the table and a JSON line."""
    del argv
    name = config_name(_CONFIG.value)
    config = load_config(name, _DTYPE.value)
    r = measure(config, _BATCH.value, num_runs=_NUM_RUNS.value, warmup=_WARMUP.value,
                seed=_SEED.value)
    print(json.dumps(report(name, config, _BATCH.value, _NUM_RUNS.value, r)))


if __name__ == "__main__":
    app.run(main)
