"""The U-Net against the paper's parameter counts, the original variable list and its math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import initial_params, perturbed

from configs import celebahq, cifar10, lsun_bedroom, lsun_cat, lsun_church
from configs import test as test_config
from ddpm_jax import rng, unet


def _count(config) -> int:
    # shapes only: nothing is allocated
    _, params = unet.abstract_model(unet.ModelSpec.from_config(config))
    return unet.count_params(params)


def _flat_shapes(params) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(k.key) for k in path): tuple(v.shape) for path, v in flat}


# Counts from the paper's released models (two independent counts agree on them).
@pytest.mark.parametrize(
    "module, var_type, expected",
    [
        (cifar10, "fixedlarge", 35_746_307),
        (cifar10, "learned", 35_749_766),  # conv_out gets 2C = 6 outputs: + 128*9*3 + 3
        (celebahq, "fixedsmall", 113_673_219),
        (lsun_church, "fixedsmall", 113_673_219),
        (lsun_bedroom, "fixedsmall", 113_673_219),
        (lsun_cat, "fixedsmall", 113_673_219),
    ],
)
def test_parameter_counts_match_the_paper(module, var_type, expected):
    config = module.get_config()
    config.diffusion.model_var_type = var_type
    assert _count(config) == expected


def test_learned_variance_adds_exactly_one_output_conv_worth_of_channels():
    config = cifar10.get_config()
    base = _count(config)
    config.diffusion.model_var_type = "learned_range"
    # conv_out [3, 3, 128, 3] -> [3, 3, 128, 6]: 3 * 3 * 128 * 3 weights + 3 biases more.
    assert _count(config) - base == 3 * 3 * 128 * 3 + 3


def _original_variable_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
                              in_ch, out_ch, *, tf_names: bool = False):
    """The original TF variable list (the released checkpoints' names), derived by hand from the
    paper's architecture description, with Flax leaf names (W -> kernel, b -> bias, gamma ->
    scale, beta -> bias), or with the TF leaf names themselves (``tf_names``; the scope
    ``model/`` left out). Both lists come in the same order."""
    shapes = {}
    leaf = (lambda _, tf: tf) if tf_names else (lambda flax, _: flax)

    def dense(name, cin, cout):
        shapes[f"{name}/{leaf('kernel', 'W')}"] = (cin, cout)
        shapes[f"{name}/{leaf('bias', 'b')}"] = (cout,)

    def conv(name, cin, cout):
        shapes[f"{name}/{leaf('kernel', 'W')}"] = (3, 3, cin, cout)
        shapes[f"{name}/{leaf('bias', 'b')}"] = (cout,)

    def norm(name, c):
        shapes[f"{name}/{leaf('scale', 'gamma')}"] = (c,)
        shapes[f"{name}/{leaf('bias', 'beta')}"] = (c,)

    def block(name, cin, cout):
        norm(f"{name}/norm1", cin)
        conv(f"{name}/conv1", cin, cout)
        dense(f"{name}/temb_proj", 4 * ch, cout)
        norm(f"{name}/norm2", cout)
        conv(f"{name}/conv2", cout, cout)
        if cin != cout:
            dense(f"{name}/nin_shortcut", cin, cout)

    def attn(name, c):
        norm(f"{name}/norm", c)
        for p in ("q", "k", "v", "proj_out"):
            dense(f"{name}/{p}", c, c)

    dense("temb/dense0", ch, 4 * ch)
    dense("temb/dense1", 4 * ch, 4 * ch)
    conv("conv_in", in_ch, ch)
    hs, c, res = [ch], ch, resolution
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            block(f"down_{i}/block_{j}", c, ch * m)
            c = ch * m
            if res in attn_resolutions:
                attn(f"down_{i}/attn_{j}", c)
            hs.append(c)
        if i != len(ch_mult) - 1:
            conv(f"down_{i}/downsample/conv", c, c)
            hs.append(c)
            res //= 2
    block("mid/block_1", c, c)
    attn("mid/attn_1", c)
    block("mid/block_2", c, c)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            block(f"up_{i}/block_{j}", c + hs.pop(), ch * ch_mult[i])
            c = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f"up_{i}/attn_{j}", c)
        if i != 0:
            conv(f"up_{i}/upsample/conv", c, c)
            res *= 2
    norm("norm_out", c)
    conv("conv_out", c, out_ch)
    return shapes


def test_validate_gives_each_module_its_own_typed_section():
    import dataclasses

    from ddpm_jax import config_lib, datasets

    config = cifar10.get_config()
    config.diffusion.model_var_type, config.diffusion.loss_type = "learned_range", "hybrid"
    config.model.num_classes, config.model.cond_drop_prob = 10, 0.2
    config.data.num_threads = 3
    sections = config_lib.validate(config)
    m = sections.model
    assert (m.ch, m.ch_mult, m.attn_resolutions, m.image_size, m.in_ch, m.out_ch) == (
        128, (1, 2, 2, 2), (16,), 32, 3, 6)  # 2C outputs for the learned variance
    assert (m.num_classes, m.cond_drop_prob, m.dtype) == (10, 0.2, "float32")
    assert m.levels() == [32, 16, 8, 4]
    d = sections.data
    assert (d.dataset, d.image_size, d.channels, d.split, d.num_threads, d.num_classes) == (
        "cifar10", 32, 3, "train", 3, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.ch = 64
    # The network is built from its section alone, and the section is a cache key.
    assert hash(m) == hash(unet.ModelSpec.from_config(config))
    labels = 11 * 512  # [K + 1, 4 ch]
    assert unet.count_params(unet.abstract_model(m)[1]) == 35_749_766 + labels
    # A config saved before conditioning, read back as a run's config.json is: unconditional,
    # the default drop rate.
    saved = config_lib.to_dict(cifar10.get_config())
    del saved["model"]["num_classes"], saved["model"]["cond_drop_prob"]
    del saved["model"]["num_groups"]
    old = config_lib.from_dict(saved)
    spec = unet.ModelSpec.from_config(old)
    assert (spec.num_classes, spec.cond_drop_prob, spec.num_groups,
            datasets.DataSpec.from_config(old).num_classes) == (0, 0.1, 32, 0)
    # Each call of abstract_model gets its own dicts (the traced network is cached per spec).
    a, b = unet.abstract_model(m)[1], unet.abstract_model(m)[1]
    a.pop("conv_in")
    assert "conv_in" in b and "conv_in" in unet.abstract_model(m)[1]


def test_one_channel_per_group_removes_the_time_shift_and_fewer_groups_keep_it():
    """GroupNorm after the time-embedding shift: with one channel per group it subtracts each
    channel's spatial mean, the shift included, so the block cannot see t (configs/digits.py's
    32 channels under the paper's 32 groups); 8 groups keep the shift's differences."""
    from flax import nnx

    from ddpm_jax import config_lib

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 32)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
    change = {}
    for groups in (32, 8):
        block = unet.ResnetBlock(32, 32, 128, dropout=0.0, groups=groups,
                                 rngs=nnx.Rngs(params=0), dtype=jnp.float32)
        block.conv2.kernel.value = block.conv2.kernel.value * 1e10  # undo the ~0 init
        out = [np.asarray(block(x, e, None)) for e in (temb, 3.0 * temb[::-1])]
        change[groups] = float(np.abs(out[0] - out[1]).max() / np.abs(out[0]).max())
    assert change[32] < 1e-5 < 0.01 < change[8]
    # validate and the warnings say so, naming the key.
    config = test_config.get_config()
    config.model.ch, config.model.ch_mult = 32, (1, 2)
    assert any("one channel in each group at 32 channels" in w
               for w in config_lib.warnings(config))
    config.model.num_groups = 8
    assert not any("num_groups" in w for w in config_lib.warnings(config))
    config.model.num_groups = 48
    with pytest.raises(config_lib.ConfigError, match="multiples of model.num_groups=48"):
        config_lib.validate(config)
    config.model.num_groups = True  # a bool is not a group count (ml_collections takes it)
    with pytest.raises(config_lib.ConfigError, match="num_groups must be a positive integer"):
        config_lib.validate(config)


def test_parameter_tree_matches_the_original_variable_list():
    _, params = unet.abstract_model(unet.ModelSpec.from_config(cifar10.get_config()))
    ours = _flat_shapes(params)
    expected = _original_variable_shapes(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3)
    assert set(ours) == set(expected)
    assert ours == expected
    # Spot checks written out by hand from the paper's CIFAR10 model.
    assert ours["up_0/block_0/conv1/kernel"] == (3, 3, 384, 128)  # 256 (h) + 128 (skip)
    assert ours["up_0/block_0/nin_shortcut/kernel"] == (384, 128)
    assert ours["down_1/attn_1/q/kernel"] == (256, 256)  # 16x16 is level 1
    assert "up_1/attn_2/proj_out/kernel" in ours  # attention after every up block at 16x16
    assert not any(k.startswith(("down_0/attn", "up_0/attn", "down_2/attn")) for k in ours)
    n_attn = len({k.split("/q/")[0] for k in ours if "/q/" in k})
    assert n_attn == 2 + 1 + 3  # down_1 x2, mid, up_1 x3 (score_sde's variant has 4)


def test_256px_tree_matches_the_original_variable_list():
    _, params = unet.abstract_model(unet.ModelSpec.from_config(celebahq.get_config()))
    expected = _original_variable_shapes(128, (1, 1, 2, 2, 4, 4), 2, (16,), 256, 3, 3)
    assert _flat_shapes(params) == expected


def test_timestep_embedding_matches_float64_closed_form():
    t = np.array([0, 1, 17, 500, 999])
    dim = 128
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - 1))
    args = t[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)  # sin first
    got = np.asarray(unet.get_timestep_embedding(jnp.asarray(t), dim))
    # float32 arguments up to 999 rad: absolute error ~ 999 * 2^-24.
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    assert got.shape == (5, dim) and got.dtype == np.float32


@pytest.fixture(scope="module")
def small_model():
    config = test_config.get_config()
    return config, unet.split(unet.create_model(unet.ModelSpec.from_config(config), seed=0))


def test_output_shape_equals_input_shape(small_model):
    config, (graphdef, params) = small_model
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    out = unet.apply(graphdef, params, x, jnp.array([0, 5, 49]))
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_learned_variance_outputs_two_c_channels():
    config = test_config.get_config()
    config.diffusion.model_var_type = "learned_range"
    graphdef, params = unet.split(unet.create_model(unet.ModelSpec.from_config(config)))
    out = unet.apply(graphdef, params, jnp.zeros((2, 8, 8, 1)), jnp.array([1, 2]))
    assert out.shape == (2, 8, 8, 2)


def test_initialisation_follows_the_original(small_model):
    config, (_, params) = small_model
    # fan_avg uniform, scale 1: |w| <= sqrt(3 / fan_avg), fan_avg = 9 * (in + out) / 2.
    w = np.asarray(params["down_0"]["block_0"]["conv1"]["kernel"])
    ch = config.model.ch
    limit = math.sqrt(3.0 / (9 * (ch + ch) / 2))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit
    assert np.all(np.asarray(params["down_0"]["block_0"]["conv1"]["bias"]) == 0)
    # The "zero" layers (scale 1e-10): conv2, attention proj_out, conv_out.
    for leaf in (params["down_0"]["block_0"]["conv2"]["kernel"],
                 params["mid"]["attn_1"]["proj_out"]["kernel"], params["conv_out"]["kernel"]):
        assert 0 < np.abs(np.asarray(leaf)).max() < 1e-4


def test_dropout_only_with_a_key_and_deterministic_given_the_key(small_model):
    config, (graphdef, params) = small_model
    params = perturbed(params, jax.random.key(1))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 30])
    f = jax.jit(lambda p, x, t, k: unet.apply(graphdef, p, x, t, dropout_key=k))
    g = jax.jit(lambda p, x, t: unet.apply(graphdef, p, x, t))
    eval1, eval2 = g(params, x, t), g(params, x, t)
    np.testing.assert_array_equal(eval1, eval2)
    train1 = f(params, x, t, jax.random.key(7))
    train2 = f(params, x, t, jax.random.key(7))
    train3 = f(params, x, t, jax.random.key(8))
    np.testing.assert_array_equal(train1, train2)
    assert np.abs(np.asarray(train1 - eval1)).max() > 1e-3
    assert np.abs(np.asarray(train1 - train3)).max() > 1e-3


def test_flat_draws_are_jax_randoms_draws_bit_for_bit(monkeypatch):
    # ddpm_jax.rng draws a flat vector and reshapes it (it compiles faster on CPU): the numbers
    # must be jax.random's own, so that parameters and dropout masks do not change.
    key = jax.random.key(11)
    for shape in [(3, 3, 4, 6), (7,)]:
        np.testing.assert_array_equal(rng.normal(key, shape), jax.random.normal(key, shape))
        np.testing.assert_array_equal(rng.uniform(key, shape, jnp.float32, -1),
                                      jax.random.uniform(key, shape, jnp.float32, -1))
        np.testing.assert_array_equal(rng.bernoulli(key, 0.9, shape),
                                      jax.random.bernoulli(key, 0.9, shape))
        for scale in (1.0, unet.NEAR_ZERO_SCALE) if len(shape) > 1 else ():  # kernels
            np.testing.assert_array_equal(
                rng.variance_scaling_uniform(scale)(key, shape),
                jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform")(key, shape))
    # The whole U-Net (a label embedding included) is the one that
    # jax.nn.initializers and jax.random.normal build.
    config = test_config.get_config()
    config.model.num_classes = 3
    ours = initial_params(config, 5)
    monkeypatch.setattr(unet, "_init", lambda scale=1.0: jax.nn.initializers.variance_scaling(
        scale, mode="fan_avg", distribution="uniform"))
    monkeypatch.setattr(unet.rng, "normal", jax.random.normal)
    theirs = initial_params(config, 5)
    assert "label_emb" in ours and len(jax.tree.leaves(ours)) > 50
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_initialisation_is_deterministic_given_the_seed():
    config = test_config.get_config()
    a = initial_params(config, 3)
    b = initial_params(config, 3)
    c = initial_params(config, 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["conv_in"]["kernel"], c["conv_in"]["kernel"])


def test_bfloat16_activations_keep_float32_params_and_track_float32(small_model):
    config, (_, params32) = small_model
    config = test_config.get_config()
    config.model.dtype = "bfloat16"
    graphdef16, params16 = unet.split(unet.create_model(unet.ModelSpec.from_config(config), seed=0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    graphdef32, _ = small_model[1]
    params = perturbed(params16, jax.random.key(2))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([1, 40])
    out16 = jax.jit(lambda p: unet.apply(graphdef16, p, x, t))(params)
    out32 = jax.jit(lambda p: unet.apply(graphdef32, p, x, t))(params)
    assert out16.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out16)))
    err = np.abs(np.asarray(out16 - out32)).max() / np.abs(np.asarray(out32)).max()
    assert 0 < err < 0.05


def test_space_to_depth_block_size():
    config = test_config.get_config()
    config.model.block_size = 2
    config.model.attn_resolutions = (4,)  # the 4x4 of the 8x8 input after space-to-depth
    graphdef, params = unet.split(unet.create_model(unet.ModelSpec.from_config(config)))
    assert params["conv_in"]["kernel"].shape == (3, 3, 4, 64)  # 1 channel * 2 * 2
    assert params["conv_out"]["kernel"].shape == (3, 3, 64, 4)
    assert "attn_0" in params["down_0"]  # attention at the level's resolution, 4x4
    out = unet.apply(graphdef, params, jnp.ones((1, 8, 8, 1)), jnp.array([0]))
    assert out.shape == (1, 8, 8, 1)


def test_space_to_depth_is_tf_order_and_the_unet_wraps_itself_in_it(monkeypatch):
    # tf.nn.space_to_depth written out pixel by pixel: out[b, i, j, (dy * bs + dx) * C + c]
    # = in[b, bs * i + dy, bs * j + dx, c].
    bs, (B, H, W, C) = 2, (2, 4, 6, 3)
    x = np.arange(B * H * W * C, dtype=np.float32).reshape(B, H, W, C)
    want = np.zeros((B, H // bs, W // bs, bs * bs * C), np.float32)
    for b, i, j, dy, dx, c in np.ndindex(B, H // bs, W // bs, bs, bs, C):
        want[b, i, j, (dy * bs + dx) * C + c] = x[b, bs * i + dy, bs * j + dx, c]
    np.testing.assert_array_equal(unet.space_to_depth(jnp.asarray(x), bs), want)
    np.testing.assert_array_equal(unet.depth_to_space(jnp.asarray(want), bs), x)
    # The network applies it to its input and its inverse to its output.
    seen = []
    for name in ("space_to_depth", "depth_to_space"):
        real = getattr(unet, name)
        monkeypatch.setattr(unet, name, lambda v, k, real=real, name=name: seen.append(
            (name, v.shape, k)) or real(v, k))
    config = test_config.get_config()
    config.model.block_size, config.model.attn_resolutions = 2, (4,)
    graphdef, params = unet.split(unet.create_model(unet.ModelSpec.from_config(config)))
    unet.apply(graphdef, params, jnp.ones((1, 8, 8, 1)), jnp.array([0]))
    assert seen == [("space_to_depth", (1, 8, 8, 1), 2), ("depth_to_space", (1, 4, 4, 4), 2)]
