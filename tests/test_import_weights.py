"""Importing the released weights: diffusers and original TF checkpoints give the same eps.

The diffusers tests build ``UNet2DModel`` with the google/ddpm-cifar10-32 configuration (and a
narrow 256px-structured one), randomise every tensor, save it with ``save_pretrained``, import it
and compare ``ddpm_jax.load(DIR).predict_noise`` with the PyTorch forward pass. They need the
torch extra and are skipped without it; the rest needs no torch.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ddpm_jax
from configs import celebahq, cifar10
from configs import test as test_config
from ddpm_jax import checkpoints, trees, unet
from ddpm_jax.weights import checkpoint as weights_io
from ddpm_jax.weights import diffusers as diffusers_format
from ddpm_jax.weights import layout
from ddpm_jax.weights import tf as tf_format

# The config.json of google/ddpm-cifar10-32 on the Hugging Face Hub.
DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=[128, 256, 256, 256],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-6,
    attention_head_dim=None,
    time_embedding_type="positional",
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    dropout=0.0,
)
# The 256px layout (ch_mult 1,1,2,2,4,4, attention at 16) at ch 32 and 64x64: resolutions
# 64, 32, 16, 8, 4, 2, so the attention level is 2 (level 4 at 256x256). GroupNorm(8): a
# model.num_groups other than the paper's 32 maps to norm_num_groups.
SMALL_256 = dict(
    DDPM_CIFAR10_32,
    sample_size=64,
    norm_num_groups=8,
    block_out_channels=[32, 32, 64, 64, 128, 128],
    down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"] + ["DownBlock2D"] * 3,
    up_block_types=["UpBlock2D"] * 3 + ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
)
TIMESTEPS = ([0, 999], [1, 500])


def small_256_config():
    config = celebahq.get_config()
    config.model.ch = 32
    config.model.num_groups = 8
    config.data.image_size = 64
    config.sampling.batch_size = 2
    return config


def tiny_config():
    """8x8x1, ch 32, ch_mult (1, 2), attention at 4x4: a shortcut, down- and upsampling and
    attention inside a level (the test config has one level)."""
    config = test_config.get_config()
    config.model.ch, config.model.ch_mult, config.model.attn_resolutions = 32, (1, 2), (4,)
    return config


def _print_error(name, err):
    print(f"\n{name}: max abs error {err:.3g}")


# -- numpy fixtures (no torch) -------------------------------------------------------------------
def random_params(config, seed):
    """Our parameter tree with every tensor random (kernels ~ 1/sqrt(fan_in), norms ~ 1)."""
    rng = np.random.default_rng(seed)
    abstract = layout.expected_params(config)

    def fill(path, a):
        leaf = path[-1].key
        if leaf == "kernel":
            fan_in = int(np.prod(a.shape[:-1]))
            return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(np.float32)
        base = 1.0 if leaf == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def fake_state_dict(config, seed=0):
    """A diffusers state dict (PyTorch layouts) for ``config``, from numpy alone."""
    rng = np.random.default_rng(seed)
    flat = trees.flatten(layout.expected_params(config))
    return {names[0]: rng.standard_normal(layout.source_shape(tuple(flat[path].shape)))
            .astype(np.float32)
            for path, (names, layout) in diffusers_format.diffusers_plan(config).items()}


def original_names(config) -> dict[str, str]:
    """Our leaf path -> the original TF variable name, from the hand-written variable list of
    test_unet.py (not from the importer's tables)."""
    from test_unet import _original_variable_shapes

    m, d = config.model, config.data
    args = (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), d.image_size,
            d.channels, d.channels)
    ours = _original_variable_shapes(*args)
    tf = _original_variable_shapes(*args, tf_names=True)
    assert list(ours.values()) == list(tf.values())  # the same variables, in the same order
    return {path: f"model/{name}" for path, name in zip(ours, tf, strict=True)}


def tf_variables(config, raw, ema=None):
    """Original TF variable names -> arrays, as the released checkpoints store them (the EMA
    copy under ``<name>/ExponentialMovingAverage``); names from ``original_names``."""
    names = original_names(config)
    out = {}
    for suffix, tree in (("", raw), ("/ExponentialMovingAverage", ema)):
        if tree is not None:
            flat = trees.flatten(tree)
            assert flat.keys() == names.keys()
            out.update({names[p] + suffix: np.asarray(v) for p, v in flat.items()})
    return out


def write_tf_checkpoint(prefix, variables):
    """Writes a TF1 ``Saver`` checkpoint: the format and names of the paper's release."""
    tf = pytest.importorskip("tensorflow")
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        var_list = {name: tf.compat.v1.Variable(value, name=name.replace("/", "_"))
                    for name, value in variables.items()}
        sess.run(tf.compat.v1.global_variables_initializer())
        return tf.compat.v1.train.Saver(var_list=var_list).save(sess, prefix)


# -- diffusers parity (torch) --------------------------------------------------------------------
def _randomise(model, torch):
    """Every tensor random, so that the zero-initialised layers take part in the comparison."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
            else:
                base = 1.0 if name.endswith("weight") else 0.0  # GroupNorm scale ~ 1
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))


def _torch_eps(model, torch, x, t):
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(t)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "name, make_config, kwargs, num_params",
    [
        ("ddpm-cifar10-32", cifar10.get_config, DDPM_CIFAR10_32, 35_746_307),
        ("256px layout at ch 32, 64x64", small_256_config, SMALL_256, None),
    ],
)
def test_diffusers_checkpoint_imports_to_the_same_eps(tmp_path, name, make_config, kwargs,
                                                      num_params):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**kwargs).eval()
    if num_params is not None:
        assert sum(p.numel() for p in model.parameters()) == num_params
    _randomise(model, torch)
    model.save_pretrained(tmp_path / "hub")
    assert os.path.exists(tmp_path / "hub" / diffusers_format.DIFFUSERS_WEIGHTS)

    config = make_config()
    # Attention sits on the same level in both (level 1 of 4 at 32px, level 2 of 6 at 64px).
    attn_levels = [i for i, a in enumerate(diffusers_format.attention_levels(config)) if a]
    assert attn_levels == [i for i, b in enumerate(kwargs["down_block_types"]) if "Attn" in b]
    info = weights_io.import_checkpoint(str(tmp_path / "hub"), config, str(tmp_path / "run"))
    assert info["num_params"] == sum(p.numel() for p in model.parameters())

    ddpm = ddpm_jax.load(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    size = kwargs["sample_size"]
    errors = []
    for t in TIMESTEPS:
        x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
        theirs = _torch_eps(model, torch, x, t)
        assert theirs.std() > 0.1  # a meaningful comparison, not zeros against zeros
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
            ours = np.asarray(ddpm.predict_noise(x, np.asarray(t, np.int32)))
        errors.append(float(np.abs(ours - theirs).max()))
    _print_error(name, max(errors))
    assert max(errors) < 1e-4


def test_diffusers_time_embedding_equals_ours():
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = np.arange(0, 1000, 7, dtype=np.int32)
    theirs = embeddings.get_timestep_embedding(
        torch.from_numpy(t), 128, flip_sin_to_cos=False, downscale_freq_shift=1).numpy()
    ours = np.asarray(unet.get_timestep_embedding(jax.numpy.asarray(t), 128))
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert diffusers_format.diffusers_config(cifar10.get_config())["freq_shift"] == 1


# -- diffusers without torch ---------------------------------------------------------------------
def test_old_attention_names_import_the_same():
    config = tiny_config()
    new = fake_state_dict(config)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for name, value in new.items():
        for a, b in renames.items():
            name = name.replace(f".{a}.", f".{b}.")
        old[name] = value
    assert any(".proj_attn." in n for n in old)
    a = diffusers_format.convert_diffusers(new, config)
    b = diffusers_format.convert_diffusers(old, config)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_layouts_follow_reference():
    """conv [out, in, kh, kw] -> [kh, kw, in, out]; linear and 1x1 conv -> [in, out]."""
    config = tiny_config()
    sd = fake_state_dict(config)
    p = diffusers_format.convert_diffusers(sd, config)
    np.testing.assert_array_equal(p["conv_in"]["kernel"],
                                  sd["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["temb"]["dense1"]["kernel"],
                                  sd["time_embedding.linear_2.weight"].T)
    np.testing.assert_array_equal(p["down_1"]["block_0"]["nin_shortcut"]["kernel"],
                                  sd["down_blocks.1.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(p["up_1"]["block_0"]["conv1"]["bias"],  # up order reversed
                                  sd["up_blocks.0.resnets.0.conv1.bias"])
    np.testing.assert_array_equal(p["mid"]["block_2"]["norm1"]["scale"],
                                  sd["mid_block.resnets.1.norm1.weight"])


def test_wrong_shape_names_the_tensor_and_both_shapes():
    config = tiny_config()
    sd = fake_state_dict(config)
    sd["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(layout.WeightsError) as e:
        diffusers_format.convert_diffusers(sd, config)
    msg = str(e.value)
    assert "\n" not in msg
    assert ("down_blocks.0.resnets.0.conv1.weight has shape (32, 32, 1, 1) but the config "
            "needs (32, 32, 3, 3)") in msg
    assert "unused" not in msg and "missing" not in msg


def test_missing_and_extra_tensors_are_listed():
    config = tiny_config()
    sd = fake_state_dict(config)
    del sd["mid_block.attentions.0.to_k.bias"]
    sd["down_blocks.0.resnets.0.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(layout.WeightsError,
                       match=r"missing mid_block\.attentions\.0\.to_k\.bias \(64,\); "
                             r"unused down_blocks\.0\.resnets\.0\.extra\.weight \(3,\)"):
        diffusers_format.convert_diffusers(sd, config)


def test_a_checkpoint_of_another_shape_lists_every_difference():
    sd = fake_state_dict(tiny_config())
    config = tiny_config()
    config.model.ch = 64  # 64 / 128 channels instead of 32 / 64
    with pytest.raises(layout.WeightsError, match=r"conv_in\.weight has shape "
                       r"\(32, 1, 3, 3\) but the config needs \(64, 1, 3, 3\)"):
        diffusers_format.convert_diffusers(sd, config)


def test_mismatched_config_json_lists_the_differing_fields():
    config = cifar10.get_config()
    diffusers_format.check_diffusers_config(DDPM_CIFAR10_32, config)  # the hub config fits
    wrong = dict(DDPM_CIFAR10_32, block_out_channels=[128, 256, 256, 512], layers_per_block=3,
                 sample_size=64, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=["AttnDownBlock2D"] + ["DownBlock2D"] * 3)
    del wrong["downsample_padding"]  # the default (1) then applies, as in diffusers
    with pytest.raises(layout.WeightsError) as e:
        diffusers_format.check_diffusers_config(wrong, config)
    msg = str(e.value)
    assert msg.startswith("config.json does not match the config: ") and "\n" not in msg
    for field in ("block_out_channels is [128, 256, 256, 512] in config.json but the config "
                  "needs [128, 256, 256, 256]", "layers_per_block is 3", "sample_size is 64",
                  "norm_eps is 1e-05", "flip_sin_to_cos is True", "freq_shift is 0",
                  "down_block_types is ['AttnDownBlock2D', 'DownBlock2D'",
                  "downsample_padding is 1"):
        assert field in msg
    assert "up_block_types" not in msg and "in_channels" not in msg


def test_learned_variance_config_needs_six_output_channels():
    config = cifar10.get_config()
    config.diffusion.model_var_type = "learned"
    with pytest.raises(layout.WeightsError, match="out_channels is 3 in config.json "
                       "but the config needs 6"):
        diffusers_format.check_diffusers_config(DDPM_CIFAR10_32, config)


def test_equivalent_config_spellings_are_accepted():
    config = cifar10.get_config()
    diffusers_format.check_diffusers_config(
        dict(DDPM_CIFAR10_32, sample_size=[32, 32], attention_head_dim=256,
             _class_name="UNet2DModel"), config)
    with pytest.raises(layout.WeightsError, match="attention_head_dim is 8"):
        diffusers_format.check_diffusers_config(dict(DDPM_CIFAR10_32, attention_head_dim=8), config)


def test_cli_imports_a_safetensors_directory(tmp_path):
    from safetensors.numpy import save_file

    config = test_config.get_config()  # what --config=configs/test.py gives
    src = tmp_path / "hub"
    src.mkdir()
    sd = fake_state_dict(config)
    save_file(sd, str(src / diffusers_format.DIFFUSERS_WEIGHTS))
    (src / "config.json").write_text(json.dumps(diffusers_format.diffusers_config(config)))
    cmd = [sys.executable, "-m", "ddpm_jax.import_weights", f"--source={src}",
           "--config=configs/test.py", f"--workdir={tmp_path / 'run'}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported" in out.stdout and "checkpoints/0" in out.stdout
    assert os.path.exists(tmp_path / "run" / "config.json")
    restored = ddpm_jax.load(str(tmp_path / "run"))
    expected = diffusers_format.convert_diffusers(sd, config)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), expected)
    # Importing again into the same workdir is refused, before anything is read.
    with pytest.raises(checkpoints.CheckpointError, match="already holds checkpoints"):
        weights_io.import_checkpoint(str(src), config, str(tmp_path / "run"))


def test_a_missing_source_is_one_clear_line(tmp_path):
    with pytest.raises(layout.WeightsError, match=r"no checkpoint at .*nothing: "
                       "expected a diffusers directory"):
        weights_io.import_checkpoint(str(tmp_path / "nothing"), tiny_config(),
                                         str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(layout.WeightsError, match="holds no diffusion_pytorch_model"):
        weights_io.import_checkpoint(str(tmp_path / "empty"), tiny_config(),
                                         str(tmp_path / "run"))


def test_a_pytorch_pickle_is_read_by_the_one_reader(tmp_path, monkeypatch):
    """diffusion_pytorch_model.bin imports as the .safetensors does (bfloat16 read exactly);
    without torch, one line names the extra, as for every PyTorch file."""
    config = tiny_config()
    sd = fake_state_dict(config)
    src = tmp_path / "bin"
    src.mkdir()
    if importlib.util.find_spec("torch") is not None:
        import torch

        state = {k: torch.from_numpy(v) for k, v in sd.items()}
        state["conv_in.bias"] = state["conv_in.bias"].bfloat16()
        torch.save(state, str(src / diffusers_format.DIFFUSERS_PICKLE))
        got, _, weights = diffusers_format.read_diffusers(str(src))
        assert weights.endswith(diffusers_format.DIFFUSERS_PICKLE)
        assert got["conv_in.bias"].dtype == np.float32
        np.testing.assert_array_equal(got["conv_in.bias"],
                                      state["conv_in.bias"].float().numpy())
        sd["conv_in.bias"] = got["conv_in.bias"]
        jax.tree.map(np.testing.assert_array_equal, diffusers_format.convert_diffusers(got, config),
                     diffusers_format.convert_diffusers(sd, config))
    else:
        (src / diffusers_format.DIFFUSERS_PICKLE).write_bytes(b"a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # import fails as if absent
    with pytest.raises(layout.WeightsError) as e:
        diffusers_format.read_diffusers(str(src))
    assert "pip install 'ddpm_jax[torch]'" in str(e.value) and "\n" not in str(e.value)
    assert "torch.load(weights_only=True)" in str(e.value)


# -- original TF checkpoints ---------------------------------------------------------------------
def test_tf_checkpoint_imports_ema_by_default_and_raw_with_no_ema(tmp_path):
    config = tiny_config()
    raw = random_params(config, seed=0)
    ema = jax.tree.map(lambda a, b: 0.5 * (a + b), raw, random_params(config, seed=1))
    variables = tf_variables(config, raw, ema)
    variables["global_step"] = np.int64(790_000)
    variables["beta1_power"] = np.float32(0.9)
    for slot in ("Adam", "Adam_1"):  # optimizer slots are saved beside the weights
        variables[f"model/conv_in/W/{slot}"] = np.zeros_like(raw["conv_in"]["kernel"])
    prefix = write_tf_checkpoint(str(tmp_path / "release" / "model.ckpt-790000"), variables)

    info = weights_io.import_checkpoint(prefix, config, str(tmp_path / "ema"))
    assert info["step"] == 790_000 and info["format"] == "tf"
    weights_io.import_checkpoint(prefix + ".index", config, str(tmp_path / "raw"), ema=False)

    graphdef, _ = unet.abstract_model(unet.ModelSpec.from_config(config))
    apply = jax.jit(lambda params, x, t: unet.apply(graphdef, params, x, t))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.asarray([0, 49], np.int32)
    direct = {name: np.asarray(apply(tree, x, t)) for name, tree in (("raw", raw), ("ema", ema))}
    assert np.abs(direct["ema"] - direct["raw"]).max() > 0.1  # the two really differ
    cases = {
        ("ema", True): "ema",  # default: params = raw, ema_params = EMA
        ("ema", False): "raw",
        ("raw", True): "raw",  # --no_ema: raw in both
    }
    errors = []
    for (run, use_ema), want in cases.items():
        eps = np.asarray(ddpm_jax.load(str(tmp_path / run), ema=use_ema).predict_noise(x, t))
        errors.append(float(np.abs(eps - direct[want]).max()))
        assert errors[-1] < 1e-5, (run, use_ema)
    _print_error("TF checkpoint", max(errors))


def test_tf_names_and_layouts_are_the_originals():
    config = tiny_config()
    plan = tf_format.tf_plan(config)
    # Every name of the importer's table is the hand-written original's, for both kinds of
    # network: a misnamed variable would be missing from the checkpoint it reads.
    for c in (config, cifar10.get_config()):
        want = original_names(c)
        got = {path: names[0] for path, (names, _) in tf_format.tf_plan(c, ema=False).items()}
        assert got == want
    assert plan["down_1/block_0/nin_shortcut/kernel"][0] == (
        "model/down_1/block_0/nin_shortcut/W/ExponentialMovingAverage",)
    assert plan["mid/attn_1/norm/scale"][0] == ("model/mid/attn_1/norm/gamma/"
                                                "ExponentialMovingAverage",)
    assert tf_format.tf_plan(config, ema=False)["norm_out/bias"][0] == (
        "model/norm_out/beta",)
    variables = tf_variables(config, random_params(config, seed=0))
    assert variables["model/down_1/attn_0/q/W"].shape == (64, 64)  # NIN: [in, out]
    assert variables["model/down_1/block_0/nin_shortcut/W"].shape == (32, 64)
    assert variables["model/conv_in/W"].shape == (3, 3, 1, 32)  # [kh, kw, in, out]


def test_tf_errors_are_one_clear_line():
    config = tiny_config()
    raw = random_params(config, seed=0)
    variables = tf_variables(config, raw)
    with pytest.raises(layout.WeightsError, match="no ExponentialMovingAverage shadow "
                       "variables under model/.*--no_ema"):
        tf_format.convert_tf(variables, config)
    bad = dict(variables)
    bad["model/down_0/block_0/conv1/W"] = np.zeros((3, 3, 32, 31), np.float32)
    del bad["model/up_1/attn_0/k/b"]
    bad["model/up_0/attn_0/extra/W"] = np.zeros((2, 2), np.float32)
    with pytest.raises(layout.WeightsError) as e:
        tf_format.convert_tf(bad, config, ema=False)
    msg = str(e.value)
    assert ("model/down_0/block_0/conv1/W has shape (3, 3, 32, 31) but the config needs "
            "(3, 3, 32, 32)") in msg
    assert "missing model/up_1/attn_0/k/b (64,)" in msg
    assert "unused model/up_0/attn_0/extra/W (2, 2)" in msg
    with pytest.raises(layout.WeightsError, match="holds no variables under model/"):
        tf_format.convert_tf({"net/conv_in/W": np.zeros(3)}, config, ema=False)
    config.model.num_groups = 8
    with pytest.raises(layout.WeightsError, match=r"GroupNorm\(32\) but the config has "
                       "model.num_groups=8; use 32"):
        tf_format.convert_tf(variables, config, ema=False)
