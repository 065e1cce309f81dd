"""Our Orbax checkpoints to and from the formats: ``import_checkpoint`` commits any source
(diffusers, the Hub, an original TF checkpoint) as a checkpoint that ``ddpm_jax.load`` and
``sample.py`` restore; ``export_checkpoint`` writes a checkpoint's weights as a diffusers
pipeline directory, read straight from the checkpoint onto the host (no mesh, no devices).
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
from etils import epath

from ddpm_jax import checkpoints, config_lib, files, unet
from ddpm_jax.weights import diffusers, hub, tf
from ddpm_jax.weights.diffusers import DIFFUSERS_WEIGHTS, ExportError
from ddpm_jax.weights.layout import WeightsError, expected_params


# -- import --------------------------------------------------------------------------------------
def read_diffusers_source(source: str, config: ml_collections.ConfigDict):
    """(params, params, info) of a diffusers directory or weights file (see ``read_source``)."""
    state_dict, config_json, weights = diffusers.read_diffusers(source)
    if config_json is not None:
        diffusers.check_diffusers_config(config_json, config)
    params = diffusers.convert_diffusers(state_dict, config, what=weights)
    notes = diffusers.scheduler_notes(epath.Path(weights).parent, config)
    info = dict(format="diffusers", step=0, file=weights, ema=True,
                config_checked=config_json is not None, notes=notes)
    return params, params, info


def read_source(source: str, config: ml_collections.ConfigDict, *, ema: bool = True):
    """(params, ema_params, info) of a diffusers, Hub or TF source; info: format, step, file.

    ``info["notes"]`` lists how a scheduler config found beside diffusers weights differs from
    the config's process; ``info["source"]`` names the Hub snapshot (``owner/name@commit``).
    """
    if source.startswith(hub.HUB_PREFIX):
        directory, snapshot = hub.hub_snapshot(source)
        params, _, info = read_diffusers_source(directory, config)
        return params, params, dict(info, source=hub.HUB_PREFIX + snapshot)
    prefix = tf.tf_prefix(source)
    if prefix is not None:
        return tf.read_tf(prefix, config, ema=ema)
    if not (epath.Path(source).is_dir() or source.endswith((".safetensors", ".bin"))) or \
            not epath.Path(source).exists():
        raise WeightsError(
            f"no checkpoint at {source}: expected a diffusers directory (config.json and "
            f"{DIFFUSERS_WEIGHTS}), a .safetensors file, a TF checkpoint prefix such as "
            "model.ckpt-790000 (beside its .index and .data files), or hf://owner/name")
    return read_diffusers_source(source, config)


def import_checkpoint(source: str, config: ml_collections.ConfigDict, workdir: str, *,
                      ema: bool = True, step: int | None = None) -> dict[str, Any]:
    """Converts ``source`` for ``config`` and commits it as an Orbax checkpoint in ``workdir``.

    ``params`` are the raw weights and ``ema_params`` the EMA weights (the same for diffusers
    sources, and for TF sources with ``ema=False``). The step is the TF ``global_step`` (0 for
    diffusers) unless given. The config is saved in the checkpoint and as
    ``workdir/config.json``.

    Returns:
      info: ``format``, ``file``, ``step``, ``path`` (the step directory), ``num_params``,
      ``seconds``, ``notes``, and for Hub sources ``source``.
    """
    start = time.perf_counter()
    config_lib.validate(config)
    checkpoints.check_empty(workdir)
    params, ema_params, info = read_source(source, config, ema=ema)
    info["step"] = info["step"] if step is None else step
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    info["path"] = checkpoints.save_weights(workdir, config, params, ema_params=ema_params,
                                            step=info["step"])
    files.write_text(epath.Path(workdir) / "config.json", config_lib.to_json(config))
    info["num_params"] = unet.count_params(params)
    info["seconds"] = time.perf_counter() - start
    return info


# -- export --------------------------------------------------------------------------------------
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


def export_checkpoint(workdir: str, out: str, *, ema: bool = True,
                      step: int | None = None) -> dict[str, Any]:
    """Exports a checkpoint of ``workdir`` (the latest unless ``step``) to the directory ``out``.

    Everything is checked before anything is written: OUT empty, the checkpoint and step
    present, the config exportable. The one array item exported is read from the checkpoint
    as host numpy arrays, checked against the config's U-Net.

    Args:
      workdir: a workdir, its checkpoints directory or one step directory.
      out: a new or empty directory (local or ``gs://``).
      ema: export the EMA weights (default) or the raw ones.
      step: the checkpoint step (default: the latest, or the step directory given).

    Returns:
      info: ``out``, ``files``, ``step``, ``ema``, ``num_params``, ``source`` (the checkpoints
      directory), ``differences`` (``diffusers.differences``), ``seconds``.

    Raises:
      ExportError, checkpoints.CheckpointError: one line naming the problem and the fix.
    """
    start = time.perf_counter()
    out_path = check_out(out)
    with checkpoints.Checkpointer.open(workdir, read_only=True) as ckpt:
        step = ckpt.resolve_step(step)
        config = ckpt.read_config(step)
        diffusers.check_exportable(config)  # before any weights are read
        params = ckpt.read_arrays(step, "ema_params" if ema else "params",
                                  like=expected_params(config))
        source = ckpt.directory
    metadata = {"ddpm_jax_step": str(step), "ddpm_jax_weights": "ema" if ema else "raw"}
    written = diffusers.write_pipeline(out_path, diffusers.pipeline_files(params, config,
                                                                          metadata=metadata))
    return dict(out=str(out_path), files=written, step=step, ema=ema, source=source,
                num_params=unet.count_params(params), differences=diffusers.differences(config),
                seconds=time.perf_counter() - start)
