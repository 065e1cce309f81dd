"""The U-Net of Ho et al. (2020) in Flax NNX, exact to the parameter.

Submodules carry the original TF variable scopes as names (``temb/dense0``, ``down_{i}/block_{j}``,
``down_{i}/attn_{j}``, ``mid/block_1``, ``up_{i}/block_{j}``, ``norm_out``, ``conv_out``), so the
parameter tree reads like the released checkpoints' variable list. Kernels are Flax layout:
conv ``[kh, kw, in, out]``, 1x1 and dense ``[in, out]``.

The model is used functionally everywhere else (see ``split`` and ``apply``): the jitted train
and sample steps take the parameters as a plain dict pytree and rebuild the module with
``nnx.merge`` inside the trace, so they remain pure functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ddpm_jax import diffusion, rng


# The original initialiser: variance scaling, fan_avg, uniform. The layers the original calls
# "zero" (the last conv of each ResNet block, the attention output, conv_out) use scale 1e-10:
# nearly zero, as there (variance scaling cannot take a scale of exactly 0).
# (``rng.variance_scaling_uniform``: the same numbers as jax.nn.initializers', compiled faster.)
def _init(scale: float = 1.0):
    return rng.variance_scaling_uniform(scale)


NEAR_ZERO_SCALE = 1e-10
NUM_GROUPS = 32  # the paper's GroupNorm (model.num_groups' default)
GN_EPS = 1e-6


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
    """Sinusoidal embedding of integer timesteps: ``int [B] -> float32 [B, embedding_dim]``.

    freq_i = exp(-ln(10000) i / (half - 1)), i = 0..half-1; emb = [sin(t freq), cos(t freq)].
    """
    half = embedding_dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _conv(cin, cout, rngs, dtype, *, k=3, stride=1, scale=1.0):
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding="SAME",  # XLA's SAME equals TF's: for stride 2, pad 0 before and 1 after.
        kernel_init=_init(scale),
        bias_init=jax.nn.initializers.zeros,
        dtype=dtype,
        rngs=rngs,
    )


def _dense(cin, cout, rngs, dtype, *, scale=1.0):
    return nnx.Linear(
        cin, cout, kernel_init=_init(scale), bias_init=jax.nn.initializers.zeros,
        dtype=dtype, rngs=rngs,
    )


def _norm(c, groups, rngs, dtype):
    return nnx.GroupNorm(c, num_groups=groups, epsilon=GN_EPS, dtype=dtype, rngs=rngs)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op without a key (evaluation) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = rng.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class ResnetBlock(nnx.Module):
    """GN, swish, conv3x3, + Dense(swish(temb)), GN, swish, dropout, conv3x3 (~0 init); skip."""

    def __init__(self, cin, cout, temb_ch, *, dropout, groups, rngs, dtype):
        self.dropout = dropout
        self.norm1 = _norm(cin, groups, rngs, dtype)
        self.conv1 = _conv(cin, cout, rngs, dtype)
        self.temb_proj = _dense(temb_ch, cout, rngs, dtype)
        self.norm2 = _norm(cout, groups, rngs, dtype)
        self.conv2 = _conv(cout, cout, rngs, dtype, scale=NEAR_ZERO_SCALE)
        if cin != cout:
            self.nin_shortcut = _dense(cin, cout, rngs, dtype)

    def __call__(self, x, temb, dropout_key):
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = h + self.temb_proj(nnx.swish(temb))[:, None, None, :]
        h = nnx.swish(self.norm2(h))
        h = _dropout(h, self.dropout, dropout_key)
        h = self.conv2(h)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H*W positions with a residual connection."""

    def __init__(self, c, *, groups, rngs, dtype):
        self.norm = _norm(c, groups, rngs, dtype)
        self.q = _dense(c, c, rngs, dtype)
        self.k = _dense(c, c, rngs, dtype)
        self.v = _dense(c, c, rngs, dtype)
        self.proj_out = _dense(c, c, rngs, dtype, scale=NEAR_ZERO_SCALE)

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        # Logits and softmax in float32 whatever the activation dtype.
        w = jnp.einsum("bhwc,bHWc->bhwHW", q.astype(jnp.float32), k.astype(jnp.float32))
        w = jax.nn.softmax(w.reshape(B, H, W, H * W) * (C**-0.5), axis=-1)
        w = w.reshape(B, H, W, H, W).astype(v.dtype)
        h = jnp.einsum("bhwHW,bHWc->bhwc", w, v)
        return x + self.proj_out(h)


class Downsample(nnx.Module):
    def __init__(self, c, *, with_conv, rngs, dtype):
        self.with_conv = with_conv
        if with_conv:
            self.conv = _conv(c, c, rngs, dtype, stride=2)

    def __call__(self, x):
        if self.with_conv:
            return self.conv(x)
        B, H, W, C = x.shape
        return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


class Upsample(nnx.Module):
    def __init__(self, c, *, with_conv, rngs, dtype):
        self.with_conv = with_conv
        if with_conv:
            self.conv = _conv(c, c, rngs, dtype)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour x2
        return self.conv(x) if self.with_conv else x


class Level(nnx.Module):
    """The blocks of one resolution: ``block_{j}``, ``attn_{j}`` and a resampler."""

    def __init__(self, blocks, attns, resample):
        for j, block in enumerate(blocks):
            setattr(self, f"block_{j}", block)
        for j, attn in attns.items():
            setattr(self, f"attn_{j}", attn)
        if resample is not None:
            setattr(self, resample[0], resample[1])


class TimeEmbedding(nnx.Module):
    def __init__(self, ch, *, rngs, dtype):
        self.dense0 = _dense(ch, 4 * ch, rngs, dtype)
        self.dense1 = _dense(4 * ch, 4 * ch, rngs, dtype)

    def __call__(self, emb):
        return self.dense1(nnx.swish(self.dense0(emb)))


class LabelEmbedding(nnx.Module):
    """A learned vector per class, added to the timestep embedding (after its two dense layers,
    where improved-diffusion's ``label_emb`` and diffusers' ``class_embedding`` add theirs).

    ``num_classes + 1`` rows: row ``num_classes`` (the last) is the learned null class, the
    "no label" of classifier-free guidance. N(0, 1) initialisation, as ``torch.nn.Embedding``.
    """

    def __init__(self, num_classes, temb_ch, *, rngs, dtype):
        self.embedding = nnx.Param(rng.normal(rngs.params(), (num_classes + 1, temb_ch)))
        self.dtype = dtype

    def __call__(self, labels):
        return jnp.take(self.embedding[...], labels, axis=0).astype(self.dtype)


class Mid(nnx.Module):
    def __init__(self, c, temb_ch, *, dropout, groups, rngs, dtype):
        kw = dict(groups=groups, rngs=rngs, dtype=dtype)
        self.block_1 = ResnetBlock(c, c, temb_ch, dropout=dropout, **kw)
        self.attn_1 = AttnBlock(c, **kw)
        self.block_2 = ResnetBlock(c, c, temb_ch, dropout=dropout, **kw)


class UNet(nnx.Module):
    """eps_theta(x_t, t): ``[B, H, W, C] float, int [B] -> [B, H, W, out_ch] float32``."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        image_size: int = 32,
        in_ch: int = 3,
        out_ch: int = 3,
        block_size: int = 1,
        num_classes: int = 0,
        num_groups: int = NUM_GROUPS,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.ch, self.ch_mult, self.num_res_blocks = ch, tuple(ch_mult), num_res_blocks
        self.num_classes = num_classes
        self.attn_resolutions = tuple(attn_resolutions)
        self.block_size, self.out_ch, self.dtype = block_size, out_ch, dtype
        kw = dict(rngs=rngs, dtype=dtype)
        nkw = dict(groups=num_groups, **kw)  # the blocks that normalise
        temb_ch = 4 * ch
        self.temb = TimeEmbedding(ch, **kw)
        self.conv_in = _conv(in_ch * block_size**2, ch, **kw)
        # Down path: record the channel count of every skip connection.
        res = image_size // block_size
        skip_chs, cur = [ch], ch
        nlev = len(ch_mult)
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], {}
            for j in range(num_res_blocks):
                blocks.append(ResnetBlock(cur, ch * mult, temb_ch, dropout=dropout, **nkw))
                cur = ch * mult
                if res in self.attn_resolutions:
                    attns[j] = AttnBlock(cur, **nkw)
                skip_chs.append(cur)
            down = None
            if i != nlev - 1:
                down = ("downsample", Downsample(cur, with_conv=resamp_with_conv, **kw))
                skip_chs.append(cur)
                res //= 2
            setattr(self, f"down_{i}", Level(blocks, attns, down))
        self.mid = Mid(cur, temb_ch, dropout=dropout, **nkw)
        # Up path: num_res_blocks + 1 blocks per level on concat(h, skip).
        for i in reversed(range(nlev)):
            blocks, attns = [], {}
            for j in range(num_res_blocks + 1):
                cin = cur + skip_chs.pop()
                blocks.append(ResnetBlock(cin, ch * ch_mult[i], temb_ch, dropout=dropout, **nkw))
                cur = ch * ch_mult[i]
                if res in self.attn_resolutions:
                    attns[j] = AttnBlock(cur, **nkw)
            up = None
            if i != 0:
                up = ("upsample", Upsample(cur, with_conv=resamp_with_conv, **kw))
                res *= 2
            setattr(self, f"up_{i}", Level(blocks, attns, up))
        self.norm_out = _norm(cur, **nkw)
        self.conv_out = _conv(cur, out_ch * block_size**2, **kw, scale=NEAR_ZERO_SCALE)
        if num_classes:
            # Created last, so every other parameter draws what the unconditional model draws.
            self.label_emb = LabelEmbedding(num_classes, temb_ch, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, *, labels: jax.Array | None = None,
                 dropout_key: jax.Array | None = None):
        """Args: x ``[B, H, W, C]``, t ``int [B]`` (0-based), labels ``int [B]`` in
        [0, num_classes] (a class-conditional model only; ``num_classes`` is the null class,
        and None means the null class for every row), dropout_key (None = eval)."""
        B = x.shape[0]
        nlev = len(self.ch_mult)
        keys = iter(
            jax.random.split(dropout_key, 2 * (nlev * (2 * self.num_res_blocks + 1) + 2))
            if dropout_key is not None
            else []
        )
        nk = lambda: next(keys, None)
        bs = self.block_size
        if bs > 1:
            x = space_to_depth(x, bs)
        temb = self.temb(get_timestep_embedding(t, self.ch).astype(self.dtype))
        if self.num_classes:
            if labels is None:
                labels = jnp.full((B,), self.num_classes, jnp.int32)
            temb = temb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional U-Net (model.num_classes = 0)")
        hs = [self.conv_in(x.astype(self.dtype))]
        for i in range(nlev):
            level = getattr(self, f"down_{i}")
            for j in range(self.num_res_blocks):
                h = getattr(level, f"block_{j}")(hs[-1], temb, nk())
                if hasattr(level, f"attn_{j}"):
                    h = getattr(level, f"attn_{j}")(h)
                hs.append(h)
            if i != nlev - 1:
                hs.append(level.downsample(hs[-1]))
        h = hs[-1]
        h = self.mid.block_1(h, temb, nk())
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb, nk())
        for i in reversed(range(nlev)):
            level = getattr(self, f"up_{i}")
            for j in range(self.num_res_blocks + 1):
                h = getattr(level, f"block_{j}")(jnp.concatenate([h, hs.pop()], axis=-1),
                                                 temb, nk())
                if hasattr(level, f"attn_{j}"):
                    h = getattr(level, f"attn_{j}")(h)
            if i != 0:
                h = level.upsample(h)
        assert not hs, "every skip connection is used exactly once"
        h = self.conv_out(nnx.swish(self.norm_out(h))).astype(jnp.float32)
        if bs > 1:
            h = depth_to_space(h, bs)
        return h


def space_to_depth(x: jax.Array, bs: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H / bs, W / bs, bs * bs * C]`` in ``tf.nn.space_to_depth``'s order:
    output channel ``(dy * bs + dx) * C + c`` holds input pixel ``(bs * i + dy, bs * j + dx)``,
    channel ``c``."""
    B, H, W, _ = x.shape
    x = x.reshape(B, H // bs, bs, W // bs, bs, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H // bs, W // bs, -1)


def depth_to_space(x: jax.Array, bs: int) -> jax.Array:
    """The inverse of ``space_to_depth`` (``tf.nn.depth_to_space``)."""
    B, h, w, _ = x.shape
    x = x.reshape(B, h, w, bs, bs, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * bs, w * bs, -1)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The network of a config: its ``model`` section with the image it maps (``data``) and the
    output channels the process asks for (``diffusion.model_var_type``). ``config_lib.validate``
    builds it and checks how the fields fit.

    Attributes:
      ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv: the paper's.
      image_size, in_ch: ``data.image_size`` and ``data.channels``.
      out_ch: C, or 2C for a learned variance.
      block_size: the space-to-depth factor.
      num_classes: 0 (unconditional) or K labels plus a null class.
      cond_drop_prob: how often training drops a label to the null class.
      dtype: the activation dtype's name; parameters are always float32.
      num_groups: the GroupNorm groups of every norm (the paper's 32).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    image_size: int = 32
    in_ch: int = 3
    out_ch: int = 3
    block_size: int = 1
    num_classes: int = 0
    cond_drop_prob: float = 0.1
    dtype: str = "float32"
    num_groups: int = NUM_GROUPS

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """The section of ``config`` (``config_lib.from_dict`` gives the keys added since a
        saved config was written their defaults)."""
        m, data = config.model, config.data
        learned = diffusion.is_learned_variance(config.diffusion.model_var_type)
        return cls(m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions),
                   m.dropout, m.resamp_with_conv, data.image_size, data.channels,
                   data.channels * (2 if learned else 1), m.block_size,
                   int(m.num_classes), float(m.cond_drop_prob), m.dtype,
                   num_groups=m.num_groups)

    def levels(self) -> list[int]:
        """The resolution of each level, from the input's (after space-to-depth) down."""
        res = self.image_size // self.block_size
        return [res // 2**i for i in range(len(self.ch_mult))]


def create_model(spec: ModelSpec, *, seed: int = 0) -> UNet:
    """The U-Net of ``spec`` (``ModelSpec.from_config(config)``), initialised from ``seed``."""
    fields = dataclasses.asdict(spec)
    del fields["cond_drop_prob"]  # the loss's, not the network's
    fields["dtype"] = jnp.dtype(spec.dtype)
    return UNet(**fields, rngs=nnx.Rngs(params=seed))


def split(model: UNet):
    """(graphdef, params): the static structure and a plain dict of float32 arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, x, t, *, labels=None, dropout_key=None) -> jax.Array:
    """The pure forward pass ``eps_theta(x, t[, labels])`` of split parameters (jittable)."""
    return nnx.merge(graphdef, params)(x, t, labels=labels, dropout_key=dropout_key)


def conditioning(graphdef, params) -> tuple[int, int | None]:
    """(num_classes, the eps channels of a learned-variance output, else None) of a split
    U-Net: what classifier-free guidance needs to know about it."""
    model = nnx.merge(graphdef, params)
    out_ch, in_ch = model.out_ch, model.conv_in.in_features // model.block_size**2
    return model.num_classes, (in_ch if out_ch == 2 * in_ch else None)


def abstract_model(spec: ModelSpec):
    """(graphdef, params as ShapeDtypeStructs) without allocating or initialising weights.

    Traced once per spec (the 256x256 network takes seconds); each call gets its own dicts."""
    graphdef, params = _abstract_model(spec)
    return graphdef, jax.tree.map(lambda leaf: leaf, params)


@functools.lru_cache(maxsize=8)
def _abstract_model(spec: ModelSpec):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(spec)))
    return graphdef, nnx.to_pure_dict(state)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
