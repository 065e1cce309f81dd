"""The original TF checkpoints (``diffusion_cifar10_model/model.ckpt-790000`` and the LSUN and
CelebA-HQ models), read with ``tf.train.load_checkpoint`` through the ``weights.layout`` engine.

The scopes are ours already (``model/down_0/block_0/conv1/W``) and so are the layouts (conv
``[kh, kw, in, out]``, dense and NIN ``[in, out]``); the EMA weights are the
``ExponentialMovingAverage`` shadow variables. TensorFlow is imported only to read a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import datasets, trees, unet
from ddpm_jax.weights import layout
from ddpm_jax.weights.layout import SAME, Transform, WeightsError, expected_params, listing

TF_SCOPE = "model"
TF_EMA = "ExponentialMovingAverage"
# Optimizer slots saved beside the weights in a TF training checkpoint (ignored).
_TF_SLOT = re.compile(r"/(Adam(_\d+)?|Momentum|RMSProp(_\d+)?)$")
# TF leaves: nn.conv2d / nn.dense / nn.nin store W (ours already) and b; tf.contrib group_norm
# stores gamma and beta ([C]).
TF_LAYER = {"kernel": ("W", SAME), "bias": ("b", SAME)}
TF_NORM = {"scale": ("gamma", SAME), "bias": ("beta", SAME)}


def tf_plan(config: ml_collections.ConfigDict, expected=None, *, ema: bool = True,
            scope: str = TF_SCOPE) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """Our leaf path -> ((TF variable name,), layout): ``down_0/block_0/norm1/scale`` ->
    ``model/down_0/block_0/norm1/gamma[/ExponentialMovingAverage]``."""
    expected = expected_params(config) if expected is None else expected
    norms = {path.rsplit("/", 1)[0] for path in trees.flatten(expected)
             if path.endswith("/scale")}
    suffix = f"/{TF_EMA}" if ema else ""

    def layer(name: str):
        table = TF_NORM if name in norms else TF_LAYER
        return (f"{scope}/{name}",), {k: (v + suffix, t) for k, (v, t) in table.items()}

    return layout.plan(expected, layer, sep="/")


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
      WeightsError: no EMA shadows, or wrong shapes, missing or unused variables, or a config
        whose GroupNorm is not the original's.
    """
    groups = config.model.num_groups
    if groups != unet.NUM_GROUPS:
        raise WeightsError(f"the original TF models normalise with GroupNorm({unet.NUM_GROUPS}) "
                           f"but the config has model.num_groups={groups}; use {unet.NUM_GROUPS}")
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
                           f"{listing(sorted(all_shapes))})")
    expected = expected_params(config)
    return layout.convert(tf_plan(config, expected, ema=ema, scope=scope), shapes, get,
                          expected, what=what)


def tf_prefix(path: str) -> str | None:
    """The checkpoint prefix of a TF source path (prefix, .index/.data file, or directory)."""
    stripped = re.sub(r"\.(index|data-\d+-of-\d+|meta)$", "", path)
    if epath.Path(stripped + ".index").exists():
        return stripped
    if epath.Path(path).is_dir() and (epath.Path(path) / "checkpoint").exists():
        import tensorflow as tf  # noqa: PLC0415

        return tf.train.latest_checkpoint(path)
    return None


def read_tf(prefix: str, config: ml_collections.ConfigDict, *, ema: bool = True):
    """(raw params, EMA params, info) of a TF checkpoint; info: format, step, file, ema, notes.

    The EMA params are the raw ones when ``ema`` is False; the step is ``global_step``.
    """
    datasets.hide_tensorflow_from_accelerators()  # reading needs no accelerator
    import tensorflow as tf  # noqa: PLC0415

    reader = tf.train.load_checkpoint(prefix)
    what = f"TF checkpoint {prefix}"
    raw = convert_tf(reader, config, ema=False, what=what)
    avg = convert_tf(reader, config, ema=True, what=what) if ema else raw
    names = reader.get_variable_to_shape_map()
    step = int(reader.get_tensor("global_step")) if "global_step" in names else 0
    return raw, avg, dict(format="tf", step=step, file=prefix, ema=ema, notes=[])
