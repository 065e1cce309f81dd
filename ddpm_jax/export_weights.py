"""Exports a run's weights as a diffusers pipeline directory that ``DDPMPipeline`` loads.

  python -m ddpm_jax.export_weights --workdir=runs/cifar10 --out=exports/cifar10 [--raw] [--step=N]

OUT receives (``diffusers.DDPMPipeline.from_pretrained(OUT)`` loads it):

- ``model_index.json``: a ``DDPMPipeline`` of a ``UNet2DModel`` and a ``DDPMScheduler``;
- ``unet/config.json``: the run's ``UNet2DModel`` (``import_weights.diffusers_config``);
- ``unet/diffusion_pytorch_model.safetensors``: the EMA weights (``--raw``: the raw ones) in
  PyTorch layouts, written with the safetensors numpy API (exporting needs no PyTorch);
- ``scheduler/scheduler_config.json``: the run's diffusion process.

The tensors pass through the importer's name mapping and layouts in reverse
(``import_weights.diffusers_state_dict``), so importing OUT gives back every parameter bit for
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

import json
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpoints, config_lib, diffusion, errors, import_weights, unet

# The diffusers version whose file format the exported configs follow (and were tested with).
DIFFUSERS_VERSION = "0.42.1"
MODEL_INDEX = "model_index.json"
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = f"unet/{import_weights.DIFFUSERS_WEIGHTS}"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"

PREDICTION_TYPES = {"eps": "epsilon", "xstart": "sample"}
VARIANCE_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small",
                  "learned": "learned", "learned_range": "learned_range"}
# DDPMScheduler's defaults: what a scheduler_config.json that omits a field means.
DDPM_SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
    prediction_type="epsilon", thresholding=False, rescale_betas_zero_snr=False,
)


class ExportError(errors.UserError, ValueError):
    """A run or an output directory that cannot be exported as asked; the message says why."""


# -- what diffusers can express ------------------------------------------------------------------
def check_exportable(config: ml_collections.ConfigDict) -> None:
    """Raises ExportError naming each setting of ``config`` that diffusers has no equivalent for."""
    problems = import_weights.unet2d_cannot_express(config)
    if config.diffusion.model_mean_type not in PREDICTION_TYPES:
        problems.append(
            f"diffusion.model_mean_type is {config.diffusion.model_mean_type!r} (the network "
            "predicts x_{t-1}), which diffusers' DDPMScheduler cannot use (it takes epsilon or "
            "sample predictions): only eps and xstart models can be exported")
    if problems:
        raise ExportError("cannot export to diffusers: " + "; ".join(problems))


def differences(config: ml_collections.ConfigDict) -> list[str]:
    """One line for each way diffusers' DDPMPipeline departs from the run's process."""
    d, lines = config.diffusion, []
    lines.append(
        "float32 schedule: diffusers computes betas and alphas_cumprod in float32 and each step's "
        "beta as 1 - alphas_cumprod[t] / alphas_cumprod[t-1] (ddpm_jax: float64, cast once); "
        "one step agrees to about 1e-6 at large t, 1e-4 near t = 0 where beta is small")
    if d.model_var_type == "fixedlarge":
        lines.append(
            "fixedlarge -> fixed_large: sigma^2 at t = 0 is the posterior variance of step 1 in "
            "ddpm_jax but beta_0 in diffusers; no noise is added at t = 0, so samples are the "
            "same (only the decoder likelihood L_0 differs)")
    elif d.model_var_type in ("fixedsmall", "learned_range"):
        lines.append(
            f"{d.model_var_type} -> {VARIANCE_TYPES[d.model_var_type]}: at t = 0 ddpm_jax clips "
            "log beta~_0 = log 0 to log beta~_1, diffusers clamps beta~_0 to 1e-20; no noise is "
            "added at t = 0, so samples are the same")
    else:  # learned
        lines.append(
            "learned -> learned: diffusers reads the variance channels as sigma^2 (noise scale "
            "sqrt(v), NaN where v < 0) but this model outputs log sigma^2 (noise scale "
            "exp(v / 2)): DDPMScheduler samples it wrongly; sample it with ddpm_jax")
    if config.model.dtype != "float32":
        lines.append(
            f"model.dtype is {config.model.dtype}: the weights are float32 and diffusers runs them "
            "in float32 unless loaded with torch_dtype")
    k = config_lib.num_classes(config)
    if k:
        lines.append(
            f"class-conditional: the UNet2DModel has num_class_embeds={k + 1} (classes 0-{k - 1}"
            f" and the null class {k}, the last row); DDPMPipeline passes no labels, so call "
            f"pipe.unet(x, t, class_labels=y) and, for guidance w, combine (1 + w) eps(x, y) - "
            f"w eps(x, {k}) (diffusers' guidance_scale = 1 + w)")
    if d.num_timesteps != 1000:
        lines.append(
            f"T = {d.num_timesteps}: DDPMPipeline defaults to 1000 inference steps; call it "
            f"with num_inference_steps={d.num_timesteps}")
    return lines


# -- the files -----------------------------------------------------------------------------------
def scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``DDPMScheduler`` config of the run's diffusion process (see the module docstring)."""
    check_exportable(config)
    d = config.diffusion
    sched = dict(
        _class_name="DDPMScheduler", _diffusers_version=DIFFUSERS_VERSION,
        num_train_timesteps=int(d.num_timesteps), beta_schedule="linear",
        beta_start=float(d.beta_start), beta_end=float(d.beta_end), trained_betas=None,
        variance_type=VARIANCE_TYPES[d.model_var_type],
        prediction_type=PREDICTION_TYPES[d.model_mean_type],
        clip_sample=bool(config.sampling.clip_denoised), clip_sample_range=1.0,
        thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
        timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
    )
    if d.beta_schedule == "quad":  # linspace of sqrt(beta), squared
        sched["beta_schedule"] = "scaled_linear"
    elif d.beta_schedule != "linear":
        sched["trained_betas"] = [float(b) for b in _betas(config)]
    return sched


def _betas(config: ml_collections.ConfigDict) -> np.ndarray:
    return np.asarray(diffusion.Diffusion.from_config(config).betas64, np.float64)


def scheduler_betas(sched: Mapping[str, Any]) -> np.ndarray | None:
    """The float64 betas a ``DDPMScheduler`` config describes (None for other schedules)."""
    s = {**DDPM_SCHEDULER_DEFAULTS, **sched}
    if s["trained_betas"] is not None:
        return np.asarray(s["trained_betas"], np.float64)
    T, start, end = int(s["num_train_timesteps"]), float(s["beta_start"]), float(s["beta_end"])
    if s["beta_schedule"] == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if s["beta_schedule"] == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    return None


def scheduler_differences(sched: Mapping[str, Any],
                          config: ml_collections.ConfigDict) -> list[str]:
    """How a ``DDPMScheduler`` config differs from ``config``'s process (empty: the same)."""
    s, d = {**DDPM_SCHEDULER_DEFAULTS, **sched}, config.diffusion
    diffs = []
    if s["num_train_timesteps"] != d.num_timesteps:
        diffs.append(f"num_train_timesteps is {s['num_train_timesteps']} there, "
                     f"diffusion.num_timesteps {d.num_timesteps} here")
    theirs, ours = scheduler_betas(s), _betas(config)
    if theirs is None:
        diffs.append(f"beta_schedule {s['beta_schedule']!r} there is not one ddpm_jax compares")
    elif theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6, atol=0):
        diffs.append(f"the betas differ ({len(theirs)} of beta_schedule "
                     f"{s['beta_schedule']!r} there, {len(ours)} of diffusion.beta_schedule "
                     f"{d.beta_schedule!r} here)")
    wanted = dict(prediction_type=PREDICTION_TYPES.get(d.model_mean_type, d.model_mean_type),
                  variance_type=VARIANCE_TYPES[d.model_var_type],
                  clip_sample=bool(config.sampling.clip_denoised))
    for key, want in wanted.items():
        if s[key] != want:
            diffs.append(f"{key} is {s[key]!r} there, {want!r} here")
    return diffs


def unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``unet/config.json`` of the run's U-Net."""
    check_exportable(config)
    return dict(_class_name="UNet2DModel", _diffusers_version=DIFFUSERS_VERSION,
                **import_weights.diffusers_config(config), dropout=float(config.model.dropout))


def pipeline_files(params, config: ml_collections.ConfigDict, *,
                   metadata: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """The files of the diffusers pipeline directory of ``params``: relative path -> bytes."""
    from safetensors.numpy import save  # noqa: PLC0415

    state_dict = import_weights.diffusers_state_dict(params, config)
    as_json = lambda obj: (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    index = dict(_class_name="DDPMPipeline", _diffusers_version=DIFFUSERS_VERSION,
                 scheduler=["diffusers", "DDPMScheduler"], unet=["diffusers", "UNet2DModel"])
    return {
        UNET_WEIGHTS: save(state_dict, metadata={"format": "pt", **(metadata or {})}),
        UNET_CONFIG: as_json(unet_config(config)),
        SCHEDULER_CONFIG: as_json(scheduler_config(config)),
        MODEL_INDEX: as_json(index),
    }


def check_out(out: str) -> epath.Path:
    """OUT as a path, refused unless it is missing or an empty directory."""
    path = checkpoints.absolute(out)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out={out} is a file; give a new or empty directory")
    if path.exists():
        names = sorted(p.name for p in path.iterdir())
        if names:
            raise ExportError(f"--out={out} is not empty (it holds {', '.join(names[:4])}"
                              f"{', ...' if len(names) > 4 else ''}); give a new or empty "
                              "directory, nothing is overwritten")
    return path


def write_pipeline(out: epath.Path, files: Mapping[str, bytes]) -> list[str]:
    """Writes ``files`` under ``out``, model_index.json last (a partial export never loads)."""
    written = []
    try:
        for name in sorted(files, key=lambda n: n == MODEL_INDEX):
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
            written.append(str(path))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.__class__.__name__}: {e}; check the path "
                          "and its permissions") from None
    return written


# -- the program ---------------------------------------------------------------------------------
def export_checkpoint(workdir: str, out: str, *, ema: bool = True,
                      step: int | None = None) -> dict[str, Any]:
    """Exports a checkpoint of ``workdir`` (the latest unless ``step``) to the directory ``out``.

    What the CLI does. Everything is checked before anything is written: OUT empty, the
    checkpoint and step present, the config exportable.

    Args:
      workdir: a workdir, its checkpoints directory or one step directory.
      out: a new or empty directory (local or ``gs://``).
      ema: export the EMA weights (default) or the raw ones.
      step: the checkpoint step (default: the latest, or the step directory given).

    Returns:
      info: ``out``, ``files``, ``step``, ``ema``, ``num_params``, ``source`` (the checkpoints
      directory), ``differences`` (see ``differences``), ``seconds``.

    Raises:
      ExportError, checkpoints.CheckpointError: one line naming the problem and the fix.
    """
    from ddpm_jax import api  # noqa: PLC0415 - keeps `--help` light

    start = time.perf_counter()
    out_path = check_out(out)
    with checkpoints.Checkpointer.open(workdir, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        config = ckpt.read_config(step)
        source = ckpt.directory
    check_exportable(config)  # before any weights are read
    params = jax.device_get(api.load(workdir, ema=ema, step=step).params)
    metadata = {"ddpm_jax_step": str(step), "ddpm_jax_weights": "ema" if ema else "raw"}
    files = write_pipeline(out_path, pipeline_files(params, config, metadata=metadata))
    return dict(out=str(out_path), files=files, step=step, ema=ema, source=source,
                num_params=unet.count_params(params), differences=differences(config),
                seconds=time.perf_counter() - start)


def _flags():
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("workdir", None, "Run to export: a workdir, its checkpoints directory or "
                        "one step directory.")
    flags.DEFINE_string("out", None, "New or empty directory for the diffusers pipeline.")
    flags.DEFINE_bool("raw", False, "Export the raw weights instead of the EMA weights.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
    flags.mark_flags_as_required(["workdir", "out"])


def main() -> None:
    """The command: flags -> ``export_checkpoint`` -> a summary (errors: one line, exit 2)."""
    from absl import flags, logging  # noqa: PLC0415

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only restore is read-only
    info = export_checkpoint(f.workdir, f.out, ema=not f.raw, step=f.step)
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

    _flags()
    cli.run(main)
