"""The diffusers format, both ways: ``UNet2DModel`` (its config and state dict, through the
``weights.layout`` engine) and ``DDPMScheduler`` (its config from our process and how a given
one differs from it, the betas through ``schedules``), the files of a ``DDPMPipeline`` directory
and writing them, and reading a diffusers directory (safetensors; a PyTorch pickle only through
``weights.pytorch``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import config_lib, errors, files, schedules, unet
from ddpm_jax.weights import layout, pytorch
from ddpm_jax.weights.layout import (
    CONV,
    CONV1X1,
    EMBED,
    LINEAR,
    NORM,
    Transform,
    WeightsError,
    convert,
    expected_params,
    unconvert,
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_PICKLE = "diffusion_pytorch_model.bin"

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


# -- diffusers -----------------------------------------------------------------------------------
def diffusers_plan(config: ml_collections.ConfigDict, expected=None,
                   ) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """Our leaf path -> (diffusers tensor names, layout) for the config's U-Net."""
    expected = expected_params(config) if expected is None else expected
    num_levels = len(config.model.ch_mult)
    return layout.plan(expected, lambda scope: diffusers_layer(scope, num_levels))


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
    model = unet.ModelSpec.from_config(config)
    return [res in model.attn_resolutions for res in model.levels()]


def diffusers_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of the U-Net that ``config`` builds."""
    m, attn = config.model, attention_levels(config)
    return dict(
        sample_size=config.data.image_size,
        in_channels=config.data.channels,
        out_channels=unet.ModelSpec.from_config(config).out_ch,
        block_out_channels=[m.ch * c for c in m.ch_mult],
        layers_per_block=m.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2D",
        add_attention=True,
        act_fn="silu",
        norm_num_groups=m.num_groups,
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
    if config.model.ch_mult[0] != 1:
        problems.append(
            f"model.ch_mult starts at {config.model.ch_mult[0]} (UNet2DModel's conv_in and time "
            "embedding are as wide as its first level: use ch * ch_mult[0] as ch and divide "
            "ch_mult by ch_mult[0])")
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
        return have == config.model.num_groups
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
    when torch is installed (``weights.pytorch.read_state_dict``).
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
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.numpy import load  # noqa: PLC0415

        try:
            return load(weights.read_bytes())
        except (SafetensorError, ValueError) as e:  # junk, empty or truncated
            raise WeightsError(f"{weights} is not a readable .safetensors file ("
                               f"{errors.first_line(e, 120)}): a truncated download or "
                               "another format; download it again") from None
    return pytorch.read_state_dict(weights)


# -- DDPMScheduler and the pipeline ----------------------------------------------------------------
# The diffusers version whose file format the exported configs follow (and were tested with).
DIFFUSERS_VERSION = "0.42.1"
MODEL_INDEX = "model_index.json"
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = f"unet/{DIFFUSERS_WEIGHTS}"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"

PREDICTION_TYPES = {"eps": "epsilon", "xstart": "sample"}
# Our schedules that DDPMScheduler computes by name (quad: linspace of sqrt(beta), squared).
SCHEDULES = {"linear": "linear", "quad": "scaled_linear"}
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
    problems = unet2d_cannot_express(config)
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
    if d.beta_schedule in SCHEDULES:
        sched["beta_schedule"] = SCHEDULES[d.beta_schedule]
    else:
        sched["trained_betas"] = [float(b) for b in _betas(config)]
    return sched


def _betas(config: ml_collections.ConfigDict) -> np.ndarray:
    return schedules.config_betas(config.diffusion)


def scheduler_betas(sched: Mapping[str, Any]) -> np.ndarray | None:
    """The float64 betas a ``DDPMScheduler`` config describes (None for other schedules).

    Raises:
      schedules.ScheduleError: betas that are not a diffusion process.
    """
    s = {**DDPM_SCHEDULER_DEFAULTS, **sched}
    if s["trained_betas"] is not None:
        return np.asarray(s["trained_betas"], np.float64)
    ours = {theirs: name for name, theirs in SCHEDULES.items()}.get(s["beta_schedule"])
    if ours is None:
        return None
    return schedules.get_beta_schedule(ours, beta_start=float(s["beta_start"]),
                                       beta_end=float(s["beta_end"]),
                                       num_timesteps=int(s["num_train_timesteps"]))


def _betas_difference(s: Mapping[str, Any], config: ml_collections.ConfigDict) -> str | None:
    """How the betas of a scheduler config (defaults filled in) differ from ours, if they do."""
    ours = _betas(config)
    try:
        theirs = scheduler_betas(s)
    except schedules.ScheduleError as e:
        return f"the betas there are not a diffusion process ({e})"
    if theirs is None:
        return f"beta_schedule {s['beta_schedule']!r} there is not one ddpm_jax compares"
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6, atol=0):
        return (f"the betas differ ({len(theirs)} of beta_schedule {s['beta_schedule']!r} "
                f"there, {len(ours)} of diffusion.beta_schedule "
                f"{config.diffusion.beta_schedule!r} here)")
    return None


def scheduler_differences(sched: Mapping[str, Any],
                          config: ml_collections.ConfigDict) -> list[str]:
    """How a ``DDPMScheduler`` config differs from ``config``'s process (empty: the same)."""
    s, d = {**DDPM_SCHEDULER_DEFAULTS, **sched}, config.diffusion
    diffs = []
    if s["num_train_timesteps"] != d.num_timesteps:
        diffs.append(f"num_train_timesteps is {s['num_train_timesteps']} there, "
                     f"diffusion.num_timesteps {d.num_timesteps} here")
    betas = _betas_difference(s, config)
    diffs += [betas] if betas else []
    wanted = dict(prediction_type=PREDICTION_TYPES.get(d.model_mean_type, d.model_mean_type),
                  variance_type=VARIANCE_TYPES[d.model_var_type],
                  clip_sample=bool(config.sampling.clip_denoised))
    for key, want in wanted.items():
        if s[key] != want:
            diffs.append(f"{key} is {s[key]!r} there, {want!r} here")
    return diffs


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


def unet_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``unet/config.json`` of the run's U-Net."""
    check_exportable(config)
    return dict(_class_name="UNet2DModel", _diffusers_version=DIFFUSERS_VERSION,
                **diffusers_config(config), dropout=float(config.model.dropout))


def pipeline_files(params, config: ml_collections.ConfigDict, *,
                   metadata: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """The files of the diffusers pipeline directory of ``params``: relative path -> bytes."""
    from safetensors.numpy import save  # noqa: PLC0415

    state_dict = diffusers_state_dict(params, config)
    as_json = lambda obj: (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    index = dict(_class_name="DDPMPipeline", _diffusers_version=DIFFUSERS_VERSION,
                 scheduler=["diffusers", "DDPMScheduler"], unet=["diffusers", "UNet2DModel"])
    return {
        UNET_WEIGHTS: save(state_dict, metadata={"format": "pt", **(metadata or {})}),
        UNET_CONFIG: as_json(unet_config(config)),
        SCHEDULER_CONFIG: as_json(scheduler_config(config)),
        MODEL_INDEX: as_json(index),
    }


def write_pipeline(out: epath.Path, pipeline: Mapping[str, bytes]) -> list[str]:
    """Writes the files of ``pipeline_files`` under ``out``, model_index.json last (a partial
    export never loads); returns their paths."""
    written = []
    try:
        for name in sorted(pipeline, key=lambda n: n == MODEL_INDEX):
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            files.write_bytes(path, pipeline[name])
            written.append(str(path))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.__class__.__name__}: {e}; check the path "
                          "and its permissions") from None
    return written
