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

One name mapping serves both directions: ``diffusers_plan`` / ``tf_plan`` give each of our
parameters its source names and ``Transform`` (layout); ``convert`` reads through it and
``unconvert`` writes through it (``ddpm_jax.export_weights`` uses ``diffusers_state_dict``).
The library functions ``convert_diffusers``, ``diffusers_state_dict``, ``convert_tf`` and
``check_diffusers_config`` work on in-memory tensors, for tests and notebooks. Nothing here uses
pickle; TensorFlow, torch and huggingface_hub are imported only for the sources that need them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpoints, config_lib, errors, unet

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_PICKLE = "diffusion_pytorch_model.bin"
TF_SCOPE = "model"
TF_EMA = "ExponentialMovingAverage"
# Optimizer slots saved beside the weights in a TF training checkpoint (ignored).
_TF_SLOT = re.compile(r"/(Adam(_\d+)?|Momentum|RMSProp(_\d+)?)$")


class WeightsError(errors.UserError, ValueError):
    """A source checkpoint that does not fit the config; the message names what differs."""


class HubError(WeightsError):
    """An ``hf://`` source that cannot be found or downloaded; the message says what to do."""


# -- layouts -------------------------------------------------------------------------------------
class Transform(NamedTuple):
    """A source array layout: ``to_ours`` turns a source array into ours, ``from_ours`` back.

    Both are pure axis permutations or reshapes, so ``to_ours(from_ours(a))`` is ``a`` bit for
    bit; import and export use the same ``Transform`` in opposite directions.
    """

    to_ours: Callable[[np.ndarray], np.ndarray]
    from_ours: Callable[[np.ndarray], np.ndarray]

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The source shape of an array of our ``shape`` (computed on a stride-0 view)."""
        return tuple(self.from_ours(np.broadcast_to(np.float32(0), tuple(shape))).shape)


SAME = Transform(lambda a: a, lambda a: a)
# PyTorch conv [out, in, kh, kw] <-> Flax [kh, kw, in, out].
TORCH_CONV = Transform(lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# PyTorch linear [out, in] <-> [in, out].
TORCH_LINEAR = Transform(lambda a: a.T, lambda a: a.T)
# PyTorch 1x1 conv [out, in, 1, 1] <-> dense [in, out] (diffusers' conv_shortcut).
TORCH_CONV1X1 = Transform(lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None])

# A layer: our leaf -> (torch leaf, layout).
CONV = {"kernel": ("weight", TORCH_CONV), "bias": ("bias", SAME)}
LINEAR = {"kernel": ("weight", TORCH_LINEAR), "bias": ("bias", SAME)}
CONV1X1 = {"kernel": ("weight", TORCH_CONV1X1), "bias": ("bias", SAME)}
NORM = {"scale": ("weight", SAME), "bias": ("bias", SAME)}
# torch.nn.Embedding stores [num_embeddings, dim], as ours (the null class is the last row).
EMBED = {"embedding": ("weight", SAME)}

# -- the name mapping ----------------------------------------------------------------------------
# Layers of a ResNet block and of an attention block: ours -> (diffusers names, layout). Older
# diffusers checkpoints (google/ddpm-cifar10-32 as uploaded) name the attention projections
# query / key / value / proj_attn; current diffusers to_q / to_k / to_v / to_out.0.
RESNET = {
    "norm1": (("norm1",), NORM),
    "conv1": (("conv1",), CONV),
    "temb_proj": (("time_emb_proj",), LINEAR),
    "norm2": (("norm2",), NORM),
    "conv2": (("conv2",), CONV),
    "nin_shortcut": (("conv_shortcut",), CONV1X1),
}
ATTENTION = {
    "norm": (("group_norm",), NORM),
    "q": (("to_q", "query"), LINEAR),
    "k": (("to_k", "key"), LINEAR),
    "v": (("to_v", "value"), LINEAR),
    "proj_out": (("to_out.0", "proj_attn"), LINEAR),
}
# Our scopes (the original TF names) -> diffusers modules. i: level, j: block,
# k = levels - 1 - i: diffusers numbers its up_blocks from the lowest resolution.
DIFFUSERS_SCOPES = (
    ("temb/dense0", "time_embedding.linear_1", LINEAR),
    ("temb/dense1", "time_embedding.linear_2", LINEAR),
    ("conv_in", "conv_in", CONV),
    ("down_{i}/block_{j}", "down_blocks.{i}.resnets.{j}", RESNET),
    ("down_{i}/attn_{j}", "down_blocks.{i}.attentions.{j}", ATTENTION),
    ("down_{i}/downsample/conv", "down_blocks.{i}.downsamplers.0.conv", CONV),
    ("mid/block_1", "mid_block.resnets.0", RESNET),
    ("mid/attn_1", "mid_block.attentions.0", ATTENTION),
    ("mid/block_2", "mid_block.resnets.1", RESNET),
    ("up_{i}/block_{j}", "up_blocks.{k}.resnets.{j}", RESNET),
    ("up_{i}/attn_{j}", "up_blocks.{k}.attentions.{j}", ATTENTION),
    ("up_{i}/upsample/conv", "up_blocks.{k}.upsamplers.0.conv", CONV),
    ("norm_out", "conv_norm_out", NORM),
    ("conv_out", "conv_out", CONV),
    ("label_emb", "class_embedding", EMBED),
)
# TF leaves: nn.conv2d / nn.dense / nn.nin store W (ours already: conv [kh, kw, in, out],
# dense and NIN [in, out]) and b; tf.contrib group_norm stores gamma and beta ([C]).
TF_LAYER = {"kernel": "W", "bias": "b"}
TF_NORM = {"scale": "gamma", "bias": "beta"}


BLOCKS = (RESNET, ATTENTION)


def _scope_regex(pattern: str, layers) -> re.Pattern:
    regex = re.sub(r"\{(\w)\}", r"(?P<\1>\\d+)", pattern)
    return re.compile(regex + "/(?P<layer>[^/]+)" if any(layers is b for b in BLOCKS) else regex)


_DIFFUSERS_REGEXES = tuple((_scope_regex(ours, layers), torch, layers)
                           for ours, torch, layers in DIFFUSERS_SCOPES)


def diffusers_layer(scope: str, num_levels: int) -> tuple[tuple[str, ...], dict]:
    """Our layer (``up_0/block_1/conv1``) -> (its diffusers names, layout)."""
    for regex, torch_scope, layers in _DIFFUSERS_REGEXES:
        m = regex.fullmatch(scope)
        if m is None:
            continue
        idx = {key: int(v) for key, v in m.groupdict().items() if key != "layer"}
        if "i" in idx:
            idx["k"] = num_levels - 1 - idx["i"]
        module = torch_scope.format(**idx)
        if "layer" not in m.groupdict():
            return (module,), layers
        if m["layer"] in layers:
            names, layout = layers[m["layer"]]
            return tuple(f"{module}.{n}" for n in names), layout
    raise AssertionError(f"no diffusers name is known for {scope!r}")


# -- the generic converter -----------------------------------------------------------------------
def expected_params(config: ml_collections.ConfigDict):
    """The config's parameter tree as ShapeDtypeStructs (memoised: tracing takes seconds)."""
    return _expected_params(config_lib.to_json(config))


@functools.lru_cache(maxsize=4)
def _expected_params(config_json: str):
    return unet.abstract_model(config_lib.from_json(config_json))[1]


def _flat(tree) -> dict[str, Any]:
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(like, flat: Mapping[str, np.ndarray]):
    paths = list(_flat(like))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        [flat[p] for p in paths])


def _listing(items: list[str], limit: int = 6) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def convert(
    plan: Mapping[str, tuple[tuple[str, ...], Transform]],
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], np.ndarray],
    expected,
    *,
    what: str,
) -> dict:
    """Fills the config's parameter tree from named source tensors, each used exactly once.

    Args:
      plan: our leaf path -> (source names to try, in order; layout).
      shapes: the source tensors to account for: name -> shape.
      get: name -> array (called only once every shape has been checked).
      expected: the target tree (``expected_params(config)``).
      what: the source, for messages.

    Returns:
      The parameters as the plain nested dict of float32 arrays ``unet.split`` gives.

    Raises:
      WeightsError: one line naming wrong shapes, missing and unused tensors.
    """
    chosen, seen, wrong, missing = {}, set(), [], []
    for path, want in _flat(expected).items():
        names, layout = plan[path]
        name = next((n for n in names if n in shapes), None)
        want_src = tuple(layout.source_shape(tuple(want.shape)))
        if name is None:
            missing.append(f"{names[0]} {want_src}")
            continue
        seen.add(name)
        if tuple(shapes[name]) != want_src:
            wrong.append(f"{name} has shape {tuple(shapes[name])} but the config needs "
                         f"{want_src} (our {path} {tuple(want.shape)})")
        else:
            chosen[path] = (name, layout)
    unused = [f"{n} {tuple(shapes[n])}" for n in sorted(set(shapes) - seen)]
    problems = wrong[:6] + ([f"... ({len(wrong)} wrong shapes in all)"] if len(wrong) > 6 else [])
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unused:
        problems.append(f"unused {_listing(unused)}")
    if problems:
        raise WeightsError(f"{what} does not fit the config: {'; '.join(problems)}")
    flat = {path: np.ascontiguousarray(layout.to_ours(np.asarray(get(name), np.float32)))
            for path, (name, layout) in chosen.items()}
    return _unflatten(expected, flat)


def unconvert(
    plan: Mapping[str, tuple[tuple[str, ...], Transform]],
    params,
    expected,
    *,
    what: str,
) -> dict[str, np.ndarray]:
    """The inverse of ``convert``: our parameter tree -> named source tensors (float32 numpy).

    Each parameter goes, in the source layout, to the first (current) name of its plan entry;
    the same plan and ``Transform`` that import read it, so ``convert(unconvert(p))`` is ``p``
    bit for bit.

    Args:
      plan: our leaf path -> (source names, layout), as for ``convert``.
      params: our parameter tree.
      expected: the config's tree (``expected_params(config)``) that ``params`` must match.
      what: the parameters, for messages.

    Raises:
      WeightsError: a parameter missing from ``params``, an extra one, or a wrong shape.
    """
    flat, want = _flat(params), _flat(expected)
    problems = [f"{path} has shape {tuple(np.shape(flat[path]))} but the config needs "
                f"{tuple(want[path].shape)}" for path in sorted(flat.keys() & want.keys())
                if tuple(np.shape(flat[path])) != tuple(want[path].shape)]
    if want.keys() - flat.keys():
        problems.append(f"missing {_listing(sorted(want.keys() - flat.keys()))}")
    if flat.keys() - want.keys():
        problems.append(f"unexpected {_listing(sorted(flat.keys() - want.keys()))}")
    if problems:
        raise WeightsError(f"{what} do not fit the config: {'; '.join(problems)}")
    out: dict[str, np.ndarray] = {}
    for path in want:
        names, layout = plan[path]
        if names[0] in out:  # the mapping must be one to one
            raise AssertionError(f"two parameters map to the source tensor {names[0]}")
        out[names[0]] = np.ascontiguousarray(layout.from_ours(np.asarray(flat[path], np.float32)))
    return out


# -- diffusers -----------------------------------------------------------------------------------
def diffusers_plan(config: ml_collections.ConfigDict, expected=None,
                   ) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """Our leaf path -> (diffusers tensor names, layout) for the config's U-Net."""
    expected = expected_params(config) if expected is None else expected
    num_levels = len(config.model.ch_mult)
    plan = {}
    for path in _flat(expected):
        scope, leaf = path.rsplit("/", 1)
        modules, layout = diffusers_layer(scope, num_levels)
        torch_leaf, transform = layout[leaf]
        plan[path] = (tuple(f"{m}.{torch_leaf}" for m in modules), transform)
    return plan


def convert_diffusers(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                      *, what: str = "the diffusers checkpoint") -> dict:
    """A diffusers ``UNet2DModel`` state dict (numpy arrays) -> our parameter tree.

    Raises:
      WeightsError: a tensor with the wrong shape, a missing or an unused tensor.
    """
    expected = expected_params(config)
    shapes = {name: tuple(np.shape(a)) for name, a in state_dict.items()}
    return convert(diffusers_plan(config, expected), shapes, state_dict.__getitem__, expected,
                   what=what)


def diffusers_state_dict(params, config: ml_collections.ConfigDict, *,
                         what: str = "the parameters") -> dict[str, np.ndarray]:
    """Our parameter tree -> a diffusers ``UNet2DModel`` state dict (numpy, PyTorch layouts).

    The inverse of ``convert_diffusers``, through the same name mapping and layouts; tensors
    carry the current diffusers names (``to_q``, ``to_out.0``, ...).

    Raises:
      WeightsError: ``params`` is not the parameter tree of ``config``'s U-Net.
    """
    expected = expected_params(config)
    return unconvert(diffusers_plan(config, expected), params, expected, what=what)


# UNet2DModel's defaults: what a config.json that omits a field means (diffusers 0.30-0.42).
UNET2D_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None,
)


def attention_levels(config: ml_collections.ConfigDict) -> list[bool]:
    """Whether each level of the config's U-Net has attention blocks."""
    res = config.data.image_size // config.model.block_size
    return [res // 2**i in tuple(config.model.attn_resolutions)
            for i in range(len(config.model.ch_mult))]


def diffusers_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of the U-Net that ``config`` builds."""
    m, attn = config.model, attention_levels(config)
    return dict(
        sample_size=config.data.image_size,
        in_channels=config.data.channels,
        out_channels=unet.output_channels(config),
        block_out_channels=[m.ch * c for c in m.ch_mult],
        layers_per_block=m.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2D",
        add_attention=True,
        act_fn="silu",
        norm_num_groups=unet.NUM_GROUPS,
        norm_eps=unet.GN_EPS,
        attention_head_dim=None,  # one head over all channels
        time_embedding_type="positional",
        flip_sin_to_cos=False,  # [sin, cos]
        freq_shift=1,  # freq_i = exp(-ln(10000) i / (half - 1))
        downsample_padding=0,  # pad 0 before, 1 after: TF 'SAME' at stride 2
        downsample_type="conv",
        upsample_type="conv",
        resnet_time_scale_shift="default",
        center_input_sample=False,
        mid_block_scale_factor=1,
        time_embedding_dim=None,
        attn_norm_num_groups=None,
        class_embed_type=None,
        # A class-conditional U-Net: its K classes and the null class (the last row).
        num_class_embeds=config_lib.num_classes(config) + 1 if config_lib.num_classes(config)
        else None,
    )


def unet2d_cannot_express(config: ml_collections.ConfigDict) -> list[str]:
    """The settings of ``config``'s U-Net that diffusers' ``UNet2DModel`` has no equivalent for."""
    problems = []
    if config.model.block_size != 1:
        problems.append(f"model.block_size is {config.model.block_size} (diffusers has no "
                        "space-to-depth: use 1)")
    if not config.model.resamp_with_conv:
        problems.append("model.resamp_with_conv is False (diffusers resamples with convs)")
    return problems


def _equivalent(field: str, have, want, config) -> bool:
    """Whether a config.json value means the same network as ours."""
    norm = (lambda v: list(v) if isinstance(v, list | tuple) else v)
    if norm(have) == norm(want):
        return True
    if field == "norm_eps":
        return isinstance(have, int | float) and abs(have - want) <= 1e-12
    if field == "sample_size":  # [H, W]
        return norm(have) == [want, want]
    if field == "time_embedding_dim":
        return have == 4 * config.model.ch
    if field == "attn_norm_num_groups":
        return have == unet.NUM_GROUPS
    if field == "attention_head_dim":  # one head when the head dim is every attention's width
        m, attn = config.model, attention_levels(config)
        widths = {m.ch * c for c, a in zip(m.ch_mult, attn, strict=True) if a}
        return widths | {m.ch * m.ch_mult[-1]} == {have}
    return False


def check_diffusers_config(config_json: Mapping[str, Any],
                           config: ml_collections.ConfigDict) -> None:
    """Raises WeightsError listing every ``config.json`` field that differs from ``config``.

    Fields the file omits take UNet2DModel's defaults, as diffusers does.
    """
    diffs = []
    cls = config_json.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        diffs.append(f"_class_name is {cls!r}, not 'UNet2DModel'")
    diffs += unet2d_cannot_express(config)
    for field, want in diffusers_config(config).items():
        have = config_json.get(field, UNET2D_DEFAULTS[field])
        if not _equivalent(field, have, want, config):
            diffs.append(f"{field} is {have!r} in config.json but the config needs {want!r}")
    if diffs:
        raise WeightsError("config.json does not match the config: " + "; ".join(diffs))


def read_diffusers(path: str) -> tuple[dict[str, np.ndarray], dict | None, str]:
    """(state dict, config.json or None, weights file) of a diffusers directory or file.

    A directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (a pipeline
    directory with a ``unet/`` folder works too). ``diffusion_pytorch_model.bin`` is read only
    when torch is installed, with ``torch.load(weights_only=True)``.
    """
    p = epath.Path(path)
    if p.is_dir():
        if not (p / "config.json").exists() and (p / "unet").is_dir():
            p = p / "unet"
        found = [n for n in (DIFFUSERS_WEIGHTS, DIFFUSERS_PICKLE) if (p / n).exists()]
        if not found:
            held = sorted(c.name for c in p.iterdir())
            raise WeightsError(f"{p} holds no {DIFFUSERS_WEIGHTS} (it holds {held})")
        directory, weights = p, p / found[0]
    else:
        directory, weights = p.parent, p
    config_file = directory / "config.json"
    config_json = json.loads(config_file.read_text()) if config_file.exists() else None
    return _read_tensors(weights), config_json, str(weights)


def _read_tensors(weights: epath.Path) -> dict[str, np.ndarray]:
    if weights.name.endswith(".safetensors"):
        from safetensors.numpy import load  # noqa: PLC0415

        return load(weights.read_bytes())
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise WeightsError(
            f"{weights} is a PyTorch pickle; install the torch extra (pip install "
            "'ddpm_jax[torch]') to read it safely, or download the .safetensors file"
        ) from None
    with weights.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


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
        return HubError(f"the Hugging Face Hub refused {name}: {str(e).splitlines()[0]}")
    if isinstance(e, ValueError):  # HFValidationError: a name the Hub cannot hold
        return HubError(f"{name} is not a valid Hub model name ({str(e).splitlines()[0]})")
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
    from ddpm_jax import export_weights  # noqa: PLC0415 - it imports this module

    directory = epath.Path(directory)
    candidates = (directory / "scheduler_config.json",
                  directory / "scheduler" / "scheduler_config.json",
                  directory.parent / "scheduler" / "scheduler_config.json")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return []
    diffs = export_weights.scheduler_differences(json.loads(found.read_text()), config)
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
    (epath.Path(workdir) / "config.json").write_text(config_lib.to_json(config))
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
