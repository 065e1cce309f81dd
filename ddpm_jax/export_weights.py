"""Exports a run's weights as a diffusers pipeline directory that ``DDPMPipeline`` loads.

  python -m ddpm_jax.export_weights --workdir=runs/cifar10 --out=exports/cifar10 [--raw] [--step=N]

OUT receives (``diffusers.DDPMPipeline.from_pretrained(OUT)`` loads it):

- ``model_index.json``: a ``DDPMPipeline`` of a ``UNet2DModel`` and a ``DDPMScheduler``;
- ``unet/config.json``: the run's ``UNet2DModel`` (``weights.diffusers.diffusers_config``);
- ``unet/diffusion_pytorch_model.safetensors``: the EMA weights (``--raw``: the raw ones) in
  PyTorch layouts, written with the safetensors numpy API (exporting needs no PyTorch);
- ``scheduler/scheduler_config.json``: the run's diffusion process.

The tensors pass through the importer's name mapping and layouts in reverse
(``weights.diffusers.diffusers_state_dict``), so importing OUT gives back every parameter bit for
bit. The process maps as: ``num_timesteps`` -> ``num_train_timesteps``; ``beta_schedule``
``linear`` -> ``linear`` (``beta_start``, ``beta_end``), ``quad`` -> ``scaled_linear``, any other
schedule -> ``trained_betas`` (the float64 betas); ``model_mean_type`` ``eps`` -> ``epsilon``,
``xstart`` -> ``sample``; ``model_var_type`` ``fixedlarge`` -> ``fixed_large``, ``fixedsmall`` ->
``fixed_small``, ``learned`` -> ``learned``, ``learned_range`` -> ``learned_range``;
``sampling.clip_denoised`` -> ``clip_sample`` (``clip_sample_range`` 1.0).

What diffusers cannot express exactly (diffusers' ``DDPMScheduler``, read in version 0.42; the
command prints the lines that apply to the run):

- float32 schedule: diffusers builds betas (``torch.linspace`` for ``linear`` and
  ``scaled_linear``) and ``alphas_cumprod`` (a float32 cumulative product) in float32, and derives
  each step's beta as ``1 - alphas_cumprod[t] / alphas_cumprod[t-1]``; ddpm_jax computes every
  constant in float64 and casts once. betas and alphas_cumprod agree to float32 rounding (at most
  2e-9 and 3e-7 for the paper's schedule), but the derived beta loses digits where beta is small,
  so one ``DDPMScheduler.step`` differs from ``sampling.p_sample`` by up to about 1e-4 near
  t = 0, falling to 1e-6 by t = 500 (for x_t of unit variance). With float64 constants in the
  scheduler the two steps agree to float32 rounding at every t.
- ``fixedlarge``: at t = 0 (0-based) ddpm_jax, like the original, uses sigma^2 = the posterior
  variance of step 1 (the paper's beta~_2) where diffusers' ``fixed_large`` uses beta_0; every
  other step uses beta_t in both. No step adds noise at t = 0, so samples are the same; only the
  decoder likelihood L_0, which diffusers does not compute, depends on it.
- ``fixedsmall`` and ``learned_range``: at t = 0 ddpm_jax clips log beta~_0 = log 0 to
  log beta~_1 where diffusers clamps beta~_0 to 1e-20; again no noise is added at t = 0, so
  samples are the same.
- ``learned``: ddpm_jax, like the original, reads the variance channels as log sigma^2 (noise
  scale exp(v / 2)); diffusers' ``learned`` reads them as sigma^2 itself (noise scale sqrt(v),
  NaN where v < 0), so ``DDPMScheduler`` samples such a model wrongly: sample it with ddpm_jax.
- ``model.dtype`` other than float32: the exported weights are float32 and diffusers runs them
  in float32 unless loaded with ``torch_dtype``; the run computed its activations in
  ``model.dtype``.
- T other than 1000: ``DDPMPipeline`` defaults to ``num_inference_steps=1000``, more than T
  steps; call it with ``num_inference_steps=T``.

Refused with one line each, before anything is written: an OUT that is not empty, a missing
workdir or step, ``model_mean_type='xprev'`` (diffusers has no x_{t-1} prediction type),
``model.block_size`` other than 1 and ``model.resamp_with_conv=False`` (``UNet2DModel`` has no
space-to-depth and always resamples with convolutions).
"""

from __future__ import annotations

from ddpm_jax.weights import checkpoint


def define_flags():
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("workdir", None, "Run to export: a workdir, its checkpoints directory or "
                        "one step directory.")
    flags.DEFINE_string("out", None, "New or empty directory for the diffusers pipeline.")
    flags.DEFINE_bool("raw", False, "Export the raw weights instead of the EMA weights.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
    flags.mark_flags_as_required(["workdir", "out"])


def main() -> None:
    """The command: flags -> ``weights.checkpoint.export_checkpoint`` -> a summary (errors: one
    line, exit 2)."""
    from absl import flags, logging  # noqa: PLC0415

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax reports every file it reads
    info = checkpoint.export_checkpoint(f.workdir, f.out, ema=not f.raw, step=f.step)
    lines = [f"exported {info['num_params']:,} parameters ({'EMA' if info['ema'] else 'raw'} "
             f"weights of step {info['step']}) from {info['source']} to {info['out']} "
             f"({info['seconds']:.1f} s)",
             f'  load:  diffusers.DDPMPipeline.from_pretrained("{info["out"]}")',
             f"  diffusers cannot express {len(info['differences'])} setting(s) of this run "
             "exactly:"]
    lines += [f"    - {line}" for line in info["differences"]]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    from ddpm_jax import cli

    define_flags()
    cli.run(main)
