"""Imports the paper's released weights into an Orbax checkpoint that ``sample.py`` restores.

  python -m ddpm_jax.import_weights --source=hf://google/ddpm-cifar10-32 \
      --config=configs/cifar10.py --workdir=runs/cifar10_official

Three kinds of source:

- ``hf://owner/name[@revision]``: a diffusers model on the Hugging Face Hub by name
  (``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``,
  ``google/ddpm-{church,bedroom,cat}-256``), fetched with ``huggingface_hub.snapshot_download``
  into its usual cache (config files and the U-Net's weights only; ``unet/`` or the top level,
  whichever the repository uses). A model already in the cache imports offline
  (``HF_HUB_OFFLINE=1``). Needs the ``hf`` extra (``pip install 'ddpm_jax[hf]'``).
- a diffusers ``UNet2DModel`` directory with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or a pipeline directory with ``unet/``, or the
  ``.safetensors`` file alone), read with the safetensors numpy API. PyTorch layout: conv
  ``[out, in, kh, kw]``, linear ``[out, in]``.
- the original TF checkpoints (``diffusion_cifar10_model/model.ckpt-790000`` and the LSUN and
  CelebA-HQ models), read with ``tf.train.load_checkpoint``. The scopes are ours already
  (``model/down_0/block_0/conv1/W``); the EMA weights are the ``ExponentialMovingAverage``
  shadow variables, used by default (``--no_ema`` for the raw ones).

Every source tensor must be used exactly once and every parameter of the config's U-Net filled;
anything else is a one-line ``WeightsError`` naming the tensors, before anything is written.
A scheduler config found beside diffusers weights is compared with the config's process and
each difference is printed as a note (ddpm_jax samples with the config's process).

The formats live in ``ddpm_jax.weights`` (``diffusers``, ``tf``, ``hub``, on the one
``layout`` engine); ``weights.checkpoint.import_checkpoint`` is what this command runs. Nothing
uses pickle; TensorFlow, torch and huggingface_hub are imported only for the sources that need
them.
"""

from __future__ import annotations

from ddpm_jax.weights import checkpoint


def define_flags():
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("source", None, "diffusers directory / .safetensors file, TF "
                        "checkpoint prefix (model.ckpt-790000), or hf://owner/name[@revision].")
    flags.DEFINE_string("workdir", None, "Empty directory for the Orbax checkpoint.")
    flags.DEFINE_bool("no_ema", False, "TF sources: import the raw variables, not the EMA "
                      "shadows.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the TF global_step, or 0).")
    flags.mark_flags_as_required(["config", "source", "workdir"])
    return flags.FLAGS


def main() -> None:
    """The command: flags -> ``weights.checkpoint.import_checkpoint`` -> a summary (errors: one
    line, exit 2)."""
    from absl import flags, logging  # noqa: PLC0415

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
    info = checkpoint.import_checkpoint(f.source, f.config, f.workdir, ema=not f.no_ema,
                                        step=f.step)
    weights = {"diffusers": "the same weights as params and ema_params",
               "tf": "raw -> params, EMA -> ema_params" if info["ema"] else "raw weights only"}
    unchecked = "" if info.get("config_checked", True) else (
        " (no config.json beside it: only the tensor shapes were checked)")
    origin = f"{info['source']} ({info['file']})" if "source" in info else info["file"]
    notes = "".join(f"\n  note:       {n}" for n in info.get("notes", ()))
    print(f"imported {info['num_params']:,} parameters ({weights[info['format']]}) from "
          f"{info['format']} {origin}{unchecked}\n  checkpoint: {info['path']} "
          f"(step {info['step']}, {info['seconds']:.1f} s)\n  sample:     python sample.py "
          f"--workdir={f.workdir} --num_samples=64{notes}", flush=True)


if __name__ == "__main__":
    from ddpm_jax import cli

    define_flags()
    cli.run(main)
