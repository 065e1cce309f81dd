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

One name mapping serves both directions: ``diffusers_plan`` (``ddpm_jax.weights.diffusers``) /
``tf_plan`` give each of our parameters its source names and ``Transform`` (layout);
``convert`` reads through it and ``unconvert`` writes through it (``ddpm_jax.weights.layout``;
``ddpm_jax.export_weights`` uses ``diffusers_state_dict``).
The library functions ``convert_diffusers``, ``diffusers_state_dict``, ``convert_tf`` and
``check_diffusers_config`` work on in-memory tensors, for tests and notebooks. Nothing here uses
pickle; TensorFlow, torch and huggingface_hub are imported only for the sources that need them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpoints, config_lib, errors, files, unet

# The diffusers format and the layout engine, re-exported under their former names here.
from ddpm_jax.weights.diffusers import (  # noqa: F401
    ATTENTION,
    DIFFUSERS_PICKLE,
    DIFFUSERS_SCOPES,
    DIFFUSERS_WEIGHTS,
    RESNET,
    UNET2D_DEFAULTS,
    attention_levels,
    check_diffusers_config,
    convert_diffusers,
    diffusers_config,
    diffusers_layer,
    diffusers_plan,
    diffusers_state_dict,
    read_diffusers,
    scheduler_differences,
    unet2d_cannot_express,
)
from ddpm_jax.weights.layout import (  # noqa: F401
    CONV,
    CONV1X1,
    LINEAR,
    NORM,
    SAME,
    TORCH_CONV,
    TORCH_CONV1X1,
    TORCH_LINEAR,
    Transform,
    WeightsError,
    convert,
    expected_params,
    unconvert,
)
from ddpm_jax.weights.layout import flatten as _flat
from ddpm_jax.weights.layout import listing as _listing

TF_SCOPE = "model"
TF_EMA = "ExponentialMovingAverage"
# Optimizer slots saved beside the weights in a TF training checkpoint (ignored).
_TF_SLOT = re.compile(r"/(Adam(_\d+)?|Momentum|RMSProp(_\d+)?)$")


class HubError(WeightsError):
    """An ``hf://`` source that cannot be found or downloaded; the message says what to do."""


# TF leaves: nn.conv2d / nn.dense / nn.nin store W (ours already: conv [kh, kw, in, out],
# dense and NIN [in, out]) and b; tf.contrib group_norm stores gamma and beta ([C]).
TF_LAYER = {"kernel": "W", "bias": "b"}
TF_NORM = {"scale": "gamma", "bias": "beta"}


# -- TF ------------------------------------------------------------------------------------------
def tf_plan(config: ml_collections.ConfigDict, expected=None, *, ema: bool = True,
            scope: str = TF_SCOPE) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """Our leaf path -> ((TF variable name,), layout): ``down_0/block_0/norm1/scale`` ->
    ``model/down_0/block_0/norm1/gamma[/ExponentialMovingAverage]``."""
    expected = expected_params(config) if expected is None else expected
    flat, plan = _flat(expected), {}
    for path in flat:
        layer, leaf = path.rsplit("/", 1)
        leaves = TF_NORM if f"{layer}/scale" in flat else TF_LAYER
        name = f"{scope}/{layer}/{leaves[leaf]}"
        plan[path] = ((f"{name}/{TF_EMA}" if ema else name,), SAME)
    return plan


def _tf_weights(shapes: Mapping[str, tuple], *, ema: bool, scope: str) -> dict[str, tuple]:
    """The model's weights among a TF checkpoint's variables (EMA shadows or raw ones)."""
    out = {}
    for name, shape in shapes.items():
        if not name.startswith(scope + "/") or _TF_SLOT.search(name):
            continue
        if name.endswith("/" + TF_EMA) == ema:
            out[name] = tuple(shape)
    return out


def convert_tf(reader_or_dict, config: ml_collections.ConfigDict, *, ema: bool = True,
               scope: str = TF_SCOPE, what: str = "the TF checkpoint") -> dict:
    """Original TF checkpoint variables -> our parameter tree.

    Args:
      reader_or_dict: ``tf.train.load_checkpoint(prefix)`` or a dict name -> numpy array.
      config: the run config.
      ema: the ``ExponentialMovingAverage`` shadows (default) or the raw variables.
      scope: the model's variable scope (``model`` in the original scripts).
      what: the source, for messages.

    Raises:
      WeightsError: no EMA shadows, or wrong shapes, missing or unused variables.
    """
    if isinstance(reader_or_dict, Mapping):
        all_shapes = {k: tuple(np.shape(v)) for k, v in reader_or_dict.items()}
        get = reader_or_dict.__getitem__
    else:
        all_shapes = reader_or_dict.get_variable_to_shape_map()
        get = reader_or_dict.get_tensor
    shapes = _tf_weights(all_shapes, ema=ema, scope=scope)
    if ema and not shapes and _tf_weights(all_shapes, ema=False, scope=scope):
        raise WeightsError(f"{what} holds no {TF_EMA} shadow variables under {scope}/ (raw "
                           "weights only); import the raw weights with --no_ema")
    if not shapes:
        raise WeightsError(f"{what} holds no variables under {scope}/ (it holds "
                           f"{_listing(sorted(all_shapes))})")
    expected = expected_params(config)
    return convert(tf_plan(config, expected, ema=ema, scope=scope), shapes, get, expected,
                   what=what)


def _tf_prefix(path: str) -> str | None:
    """The checkpoint prefix of a TF source path (prefix, .index/.data file, or directory)."""
    stripped = re.sub(r"\.(index|data-\d+-of-\d+|meta)$", "", path)
    if epath.Path(stripped + ".index").exists():
        return stripped
    if epath.Path(path).is_dir() and (epath.Path(path) / "checkpoint").exists():
        import tensorflow as tf  # noqa: PLC0415

        return tf.train.latest_checkpoint(path)
    return None


def _load_tf(prefix: str):
    import tensorflow as tf  # noqa: PLC0415

    try:  # reading needs no accelerator; keep TF off the GPUs JAX uses
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    return tf.train.load_checkpoint(prefix)


# -- the Hugging Face Hub ------------------------------------------------------------------------
HUB_PREFIX = "hf://"
HUB_EXTRA = "pip install 'ddpm_jax[hf]'"
# The small files of a diffusers repository, in both layouts: pipeline folders (unet/,
# scheduler/) and the older one with the model's files at the top level.
HUB_CONFIGS = ("model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
               "scheduler/scheduler_config.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``hf://owner/name[@revision]`` -> (repo id, revision or None for the default branch)."""
    name, at, revision = source[len(HUB_PREFIX):].partition("@")
    if not _HUB_NAME.fullmatch(name) or (at and not revision):
        raise HubError(f"{source} is not a Hub model name: use hf://owner/name or "
                       "hf://owner/name@revision (a branch, tag or commit)")
    return name, revision or None


def _hub():
    try:
        import huggingface_hub  # noqa: PLC0415
    except ImportError:
        raise HubError(f"hf:// sources need huggingface_hub: {HUB_EXTRA}") from None
    return huggingface_hub


def _hub_error(e: Exception, hub, name: str) -> Exception:
    """The one-line HubError for a failure of ``huggingface_hub`` (``e`` itself if a bug)."""
    errs = importlib.import_module("huggingface_hub.errors")
    constants = hub.constants
    cache = constants.HF_HUB_CACHE
    not_cached = tuple(c for c in (getattr(errs, "LocalEntryNotFoundError", None),
                                   getattr(errs, "IncompleteSnapshotError", None)) if c)
    if isinstance(e, not_cached) and constants.HF_HUB_OFFLINE:
        return HubError(f"{name} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                        "is set: go online and unset HF_HUB_OFFLINE to download it once (or set "
                        "HF_HUB_CACHE to a cache that holds it)")
    if isinstance(e, not_cached):
        return HubError(f"cannot download {name}: the Hugging Face Hub is out of reach and the "
                        f"cache ({cache}) does not hold it; check the network (or HF_ENDPOINT)")
    if isinstance(e, errs.RevisionNotFoundError):
        return HubError(f"{name}: the repository has no such revision; use one of its branches, "
                        "tags or commits")
    if isinstance(e, errs.RepositoryNotFoundError):
        return HubError(f"{name} is not a model on the Hugging Face Hub that this account can "
                        "read: check the name (private and gated models need `hf auth login`)")
    if isinstance(e, errs.HfHubHTTPError):
        return HubError(f"the Hugging Face Hub refused {name}: {errors.first_line(e)}")
    if isinstance(e, ValueError):  # HFValidationError: a name the Hub cannot hold
        return HubError(f"{name} is not a valid Hub model name ({errors.first_line(e)})")
    if isinstance(e, OSError):
        return HubError(f"cannot write {name} into the Hugging Face cache ({cache}): {e}; set "
                        "HF_HUB_CACHE to a writable directory")
    return e


def hub_snapshot(source: str) -> tuple[str, str]:
    """Finds ``hf://owner/name[@revision]`` in the Hugging Face cache, downloading it if needed.

    Only the config files (``HUB_CONFIGS``) and the U-Net's weights are fetched, through
    ``huggingface_hub.snapshot_download`` into its usual cache (``HF_HUB_CACHE`` or
    ``HF_HOME``), so later imports, with ``HF_HUB_OFFLINE=1`` too, read the cache alone. The
    U-Net is ``unet/`` when the repository has that folder, else its top level (the older
    layout). ``diffusion_pytorch_model.bin`` is fetched only when there is no ``.safetensors``.

    Returns:
      (the local directory holding the U-Net's config.json and weights, ``owner/name@commit``).

    Raises:
      HubError: no huggingface_hub, a bad name, not cached while offline, no such repository or
        revision, or no UNet2DModel files in it.
    """
    repo_id, revision = parse_hub_source(source)
    hub = _hub()
    name = repo_id + (f"@{revision}" if revision else "")

    def fetch(patterns) -> str:
        try:
            return hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))
        except Exception as e:  # noqa: BLE001 - Hub failures become one line, bugs propagate
            raise _hub_error(e, hub, name) from None

    root = fetch(HUB_CONFIGS)
    folder = "unet" if os.path.exists(os.path.join(root, "unet", "config.json")) else ""
    if not os.path.exists(os.path.join(root, folder, "config.json")):
        raise HubError(f"{name} holds neither unet/config.json nor config.json: it is not a "
                       "diffusers UNet2DModel or DDPMPipeline repository")
    for weights in (DIFFUSERS_WEIGHTS, DIFFUSERS_PICKLE):
        path = f"{folder}/{weights}" if folder else weights
        if weights == DIFFUSERS_PICKLE and importlib.util.find_spec("torch") is None:
            break  # a pickle could be read only with torch; do not download it
        root = fetch([path])
        if os.path.exists(os.path.join(root, path)):
            directory = os.path.join(root, folder) if folder else root
            return directory, f"{repo_id}@{os.path.basename(root)}"
    path = f"{folder}/{DIFFUSERS_WEIGHTS}" if folder else DIFFUSERS_WEIGHTS
    if hub.constants.HF_HUB_OFFLINE:
        raise HubError(f"the cached copy of {name} lacks {path}: go online and unset "
                       "HF_HUB_OFFLINE to complete it")
    raise HubError(f"{name} holds no {path} (a {DIFFUSERS_PICKLE} needs the torch extra: pip "
                   "install 'ddpm_jax[torch]')")


def scheduler_notes(directory: str, config: ml_collections.ConfigDict) -> list[str]:
    """How the scheduler config beside a diffusers U-Net differs from the config's process.

    Looks for ``scheduler/scheduler_config.json`` (pipeline layout) or ``scheduler_config.json``
    (older layout); the config's process is the one ddpm_jax samples with either way.
    """
    directory = epath.Path(directory)
    candidates = (directory / "scheduler_config.json",
                  directory / "scheduler" / "scheduler_config.json",
                  directory.parent / "scheduler" / "scheduler_config.json")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return []
    diffs = scheduler_differences(json.loads(found.read_text()), config)
    if not diffs:
        return []
    return [f"{found} differs from the config's process, which ddpm_jax samples with: "
            + "; ".join(diffs)]


# -- the program ---------------------------------------------------------------------------------
def read_source(source: str, config: ml_collections.ConfigDict, *, ema: bool = True):
    """(params, ema_params, info) of a diffusers, Hub or TF source; info: format, step, file.

    ``info["notes"]`` lists how a scheduler config found beside diffusers weights differs from
    the config's process; ``info["source"]`` names the Hub snapshot (``owner/name@commit``).
    """
    if source.startswith(HUB_PREFIX):
        directory, snapshot = hub_snapshot(source)
        params, _, info = read_source(directory, config)
        return params, params, dict(info, source=HUB_PREFIX + snapshot)
    prefix = _tf_prefix(source)
    if prefix is not None:
        reader = _load_tf(prefix)
        what = f"TF checkpoint {prefix}"
        raw = convert_tf(reader, config, ema=False, what=what)
        avg = convert_tf(reader, config, ema=True, what=what) if ema else raw
        names = reader.get_variable_to_shape_map()
        step = int(reader.get_tensor("global_step")) if "global_step" in names else 0
        return raw, avg, dict(format="tf", step=step, file=prefix, ema=ema, notes=[])
    if not (epath.Path(source).is_dir() or source.endswith((".safetensors", ".bin"))) or \
            not epath.Path(source).exists():
        raise WeightsError(
            f"no checkpoint at {source}: expected a diffusers directory (config.json and "
            f"{DIFFUSERS_WEIGHTS}), a .safetensors file, a TF checkpoint prefix such as "
            "model.ckpt-790000 (beside its .index and .data files), or hf://owner/name")
    state_dict, config_json, weights = read_diffusers(source)
    if config_json is not None:
        check_diffusers_config(config_json, config)
    params = convert_diffusers(state_dict, config, what=weights)
    notes = scheduler_notes(epath.Path(weights).parent, config)
    info = dict(format="diffusers", step=0, file=weights, ema=True,
                config_checked=config_json is not None, notes=notes)
    return params, params, info


def import_checkpoint(source: str, config: ml_collections.ConfigDict, workdir: str, *,
                      ema: bool = True, step: int | None = None) -> dict[str, Any]:
    """Converts ``source`` for ``config`` and commits it as an Orbax checkpoint in ``workdir``.

    What the CLI does. ``params`` are the raw weights and ``ema_params`` the EMA weights (the
    same for diffusers sources, and for TF sources with ``ema=False``). The step is the TF
    ``global_step`` (0 for diffusers) unless given. The config is saved in the checkpoint and as
    ``workdir/config.json``.

    Returns:
      info: ``format``, ``file``, ``step``, ``path`` (the step directory), ``num_params``,
      ``seconds``.
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


def _flags():
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
    """The command: flags -> ``import_checkpoint`` -> a summary (errors: one line, exit 2)."""
    from absl import flags, logging  # noqa: PLC0415

    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
    info = import_checkpoint(f.source, f.config, f.workdir, ema=not f.no_ema, step=f.step)
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

    _flags()
    cli.run(main)
