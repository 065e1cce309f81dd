"""Sampler throughput in images/s, without running all T steps of the ancestral chain.

  python -m ddpm_jax.benchmarks.sampling --config=cifar10 --batch=16 --timed_steps=20
  python -m ddpm_jax.benchmarks.sampling --config=cifar10 --batch=32 --chains=none \
      --xla_options=default,project --vs_diffusers

The model is ``ddpm_jax.create(config)``: random weights, which cost exactly what trained ones
cost. For each ``--xla_options`` setting (``default``: XLA's compiler options; ``project``:
``ddpm_jax.xla_cpu.compiler_options("forward")``, None off CPU), three chains, each the median
of ``--num_runs`` timed runs after one untimed run, ended by ``block_until_ready``:

* scan: the ancestral sampler (``sampling.sample_loop``, one ``lax.scan``) on the first K =
  ``--timed_steps`` steps of the process (``sampling.respace(d, arange(K))``: the same betas, so
  each step costs what a step of the full chain costs). Nothing is subtracted (the x_T draw is
  included); seconds per step = time / K, extrapolated to the config's T steps.
* loop: the same K steps as a Python loop over a jitted single ``sampling.p_sample`` step (the
  usual way of other implementations), to compare dispatch per step with one scan.
* DDIM: ``sampling.ddim_sample_loop`` (Song et al., x0 not clipped) with ``--ddim_steps`` steps
  (eta 0), run in full.

Then one chain step alone (the jitted ``p_sample`` step of the loop), timed interleaved for
every setting and, with ``--vs_diffusers`` (needs the torch extra), against diffusers'
``UNet2DModel`` in the same layout (float32, channels_last, all CPU threads) followed by
``DDPMScheduler.step`` on our betas: the peer's one sampling step at the same batch. The ratio
is ours / theirs in images/s. ``--chains=none`` skips the chains.

A short table goes to stdout, then one JSON line per setting (and one for the peer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import ddpm_jax
from ddpm_jax import config_lib, sampling, unet
from ddpm_jax.benchmarks import common
from ddpm_jax.benchmarks import train as train_bench

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when this module is the program)."""
    flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
    flags.DEFINE_integer("batch", 16, "Images per chain.")
    flags.DEFINE_integer("timed_steps", 20, "K: ancestral steps run by scan and loop.")
    flags.DEFINE_integer("ddim_steps", 50, "Steps of the DDIM chain (run in full).")
    flags.DEFINE_integer("num_runs", 3, "Timed runs of each chain (median reported).")
    flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES),
                      "Override config.model.dtype (activation dtype).")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and the noise.")
    flags.DEFINE_list("xla_options", ["project"],
                      "Compiler options to measure: default and/or project.")
    flags.DEFINE_enum("chains", "all", ["all", "none"],
                      "Time the scan, loop and DDIM chains (all) or only one step (none).")
    flags.DEFINE_bool("vs_diffusers", False,
                      "Also time diffusers' UNet2DModel + DDPMScheduler.step (torch).")
    flags.DEFINE_integer("step_runs", 5, "Timed single steps per contender.")


def compile_seconds(fn, *args, options=None):
    """(compiled ``jax.jit(fn)`` for ``args`` with ``options``, seconds to lower and compile)."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    compiled, _ = common.compile_timed(lowered, options)
    return compiled, time.perf_counter() - start


def model_fn(model: ddpm_jax.DDPM, params):
    return lambda x, t: unet.apply(model.graphdef, params, x, t)


def scan_chain(model: ddpm_jax.DDPM, batch: int, num_steps: int):
    """``(params, key) -> x_0`` of the ancestral scan over the first ``num_steps`` steps."""
    short, timestep_map = sampling.respace(model.diffusion, np.arange(num_steps))
    shape = (batch,) + model.image_shape
    clip = model.config.sampling.clip_denoised
    return lambda params, key: sampling.sample_loop(
        short, model_fn(model, params), key, shape, clip_denoised=clip,
        timestep_map=timestep_map)


def ddim_chain(model: ddpm_jax.DDPM, batch: int, num_steps: int):
    """``(params, key) -> x_0`` of DDIM (Song et al., eta 0) with ``num_steps`` steps."""
    shape = (batch,) + model.image_shape
    return lambda params, key: sampling.ddim_sample_loop(
        model.diffusion, model_fn(model, params), key, shape, num_steps=num_steps, eta=0.0)


def single_step(model: ddpm_jax.DDPM):
    """``(params, x_t, t, key) -> x_{t-1}``: one ancestral step with its noise, as the scan."""
    clip = model.config.sampling.clip_denoised

    def step(params, x, t, key):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
        return sampling.p_sample(model.diffusion, model_fn(model, params), x, tb, noise,
                                 clip_denoised=clip)[0]

    return step


def measure(model: ddpm_jax.DDPM, batch: int, k: int, ddim_steps: int, num_runs: int,
            key: jax.Array, options=None) -> dict:
    """Compiles (with ``options``) and times the three chains; returns the figures."""
    params = model.params
    scan, scan_compile = compile_seconds(scan_chain(model, batch, k), params, key,
                                         options=options)
    ddim, ddim_compile = compile_seconds(ddim_chain(model, batch, ddim_steps), params, key,
                                         options=options)
    x_T = sampling.initial_noise(key, (batch,) + model.image_shape)
    step, step_compile = compile_seconds(single_step(model), params, x_T, np.int32(0), key,
                                         options=options)

    def loop():
        x = sampling.initial_noise(key, x_T.shape)
        for t in range(k - 1, -1, -1):
            x = step(params, x, np.int32(t), key)
        return x

    scan_s = common.median_seconds(lambda: scan(params, key).block_until_ready(), num_runs, 1)
    loop_s = common.median_seconds(lambda: loop().block_until_ready(), num_runs, 1)
    ddim_s = common.median_seconds(lambda: ddim(params, key).block_until_ready(), num_runs, 1)
    T = model.config.diffusion.num_timesteps
    return dict(
        T=T, timed_steps=k, ddim_steps=ddim_steps,
        scan_compile_s=scan_compile, loop_step_compile_s=step_compile,
        ddim_compile_s=ddim_compile,
        scan_step_s=scan_s / k, loop_step_s=loop_s / k, loop_over_scan=loop_s / scan_s,
        ancestral_chain_s=T * scan_s / k, ancestral_images_per_s=batch * k / (T * scan_s),
        loop_images_per_s=batch * k / (T * loop_s),
        ddim_chain_s=ddim_s, ddim_step_s=ddim_s / ddim_steps, ddim_images_per_s=batch / ddim_s,
    )


def compare_steps(model: ddpm_jax.DDPM, batch: int, settings: Sequence[str], num_runs: int,
                  key: jax.Array, peer=None) -> dict:
    """One chain step per setting (and the peer's), timed interleaved; seconds per contender."""
    params, t = model.params, np.int32(model.config.diffusion.num_timesteps // 2)
    x = sampling.initial_noise(key, (batch,) + model.image_shape)
    runners = {}
    for setting in settings:
        options = train_bench.options_for(setting, "forward")
        step, _ = compile_seconds(single_step(model), params, x, t, key, options=options)
        runners[setting] = lambda step=step: step(params, x, t, key).block_until_ready()
    if peer is not None:
        runners["diffusers"] = lambda: peer.sample_step(int(t))
    return common.interleaved(runners, num_runs, warmup=1)


def report(name: str, model: ddpm_jax.DDPM, batch: int, num_runs: int, setting: str,
           r: dict | None, step: dict) -> dict:
    """Prints the table of one setting and returns its JSON record."""
    print(f"Sampling: config {name}, batch {batch}, {model.num_params:,} parameters (random "
          f"weights: timing only), dtype {model.config.model.dtype}, xla_options {setting}, "
          f"{jax.devices()[0].platform} x{jax.device_count()}, median of {num_runs} runs")
    r = dict(r or {})
    if "scan_step_s" in r:
        print(f"  {'chain':<34} {'compile s':>10} {'s / step':>10} {'s / batch':>10} "
              f"{'images/s':>10}")
        rows = [
            (f"ancestral scan (K={r['timed_steps']} -> T={r['T']})", r["scan_compile_s"],
             r["scan_step_s"], r["ancestral_chain_s"], r["ancestral_images_per_s"]),
            (f"ancestral loop (K={r['timed_steps']} -> T={r['T']})", r["loop_step_compile_s"],
             r["loop_step_s"], r["T"] * r["loop_step_s"], r["loop_images_per_s"]),
            (f"DDIM {r['ddim_steps']} steps (run in full)", r["ddim_compile_s"],
             r["ddim_step_s"], r["ddim_chain_s"], r["ddim_images_per_s"]),
        ]
        for label, compile_s, step_s, chain_s, rate in rows:
            print(f"  {label:<34} {compile_s:>10.2f} {step_s:>10.4g} {chain_s:>10.4g} "
                  f"{rate:>10.4g}")
        print(f"  loop / scan time per step: {r['loop_over_scan']:.3f}")
    ours = step.median(setting)
    r.update(step_s=ours, step_images_per_s=batch / ours,
             **{f"step_{k}": v for k, v in step.load().items()})
    line = f"  one chain step (interleaved): {1e3 * ours:.1f} ms, {batch / ours:.2f} images/s"
    if "diffusers" in step.times:
        theirs = step.median("diffusers")
        r["vs_diffusers"] = dict(step_s=theirs, images_per_s=batch / theirs, ratio=theirs / ours)
        line += f"; diffusers {1e3 * theirs:.1f} ms: x{theirs / ours:.3f}"
    print(line)
    return dict(benchmark="sampling", config=name, batch=batch, dtype=model.config.model.dtype,
                params=model.num_params, **common.device_fields(), num_runs=num_runs,
                xla_options=setting,
                compiler_options=train_bench.options_for(setting, "forward"), **r)


def main(argv: Sequence[str]) -> None:
    """Measures the samplers of --config and prints the tables and JSON lines."""
    del argv
    f = FLAGS
    name = common.config_name(f.config)
    config = common.load_config(f.config, f.dtype)
    T, k = config.diffusion.num_timesteps, f.timed_steps
    if not 2 <= k <= T:
        raise app.UsageError(f"--timed_steps must be in [2, {T}], got {k}")
    settings = tuple(dict.fromkeys(f.xla_options))
    if not settings or set(settings) - set(train_bench.XLA_OPTIONS):
        raise app.UsageError(f"--xla_options takes {train_bench.XLA_OPTIONS}, got {settings}")
    sampling.ddim_timesteps(T, f.ddim_steps)  # validates --ddim_steps
    model = ddpm_jax.create(config, seed=f.seed)
    key = jax.random.key(f.seed + 1)
    chains = {}
    if f.chains == "all":
        for setting in settings:
            chains[setting] = measure(model, f.batch, k, f.ddim_steps, f.num_runs, key,
                                      train_bench.options_for(setting, "forward"))
    peer = train_bench.DiffusersPeer(config, f.batch, f.seed) if f.vs_diffusers else None
    step = compare_steps(model, f.batch, settings, f.step_runs, key, peer)
    for setting in settings:
        common.emit(report(name, model, f.batch, f.num_runs, setting, chains.get(setting), step))
    if peer is not None:
        theirs = step.median("diffusers")
        common.emit(dict(benchmark="sampling", config=name, batch=f.batch, impl="diffusers",
                         dtype=peer.dtype, step_s=theirs, step_images_per_s=f.batch / theirs,
                         torch_device=peer.device.type))


if __name__ == "__main__":
    define_flags()
    app.run(main)
