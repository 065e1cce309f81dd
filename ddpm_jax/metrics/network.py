"""The FID Inception-v3 in Flax NNX, and the two input preprocessings.

The network is pytorch-fid's "FID Inception", the TF "2015-12-05" graph as ported to PyTorch:
every convolution is ``BasicConv2d`` = conv (no bias) -> BatchNorm (eps 1e-3, running statistics)
-> ReLU; the average-pool branches of the A, C and first E blocks leave the padding out of the
mean (as TF does); the last E block (``Mixed_7c``) max-pools its pool branch (as the TF graph
does). Submodules carry the PyTorch names (``Conv2d_1a_3x3``, ``Mixed_5b/branch5x5_1``, ...) so
the parameter tree reads like the weight file. Layout NHWC; kernels ``[kh, kw, in, out]``.

Convolutions and the dense layer run at ``Precision.HIGHEST``: accelerators would otherwise
multiply float32 in TF32 or bfloat16, and the features would no longer be comparable with
other implementations'.

Preprocessing (uint8 RGB ``[N, H, W, 3]`` -> float32 ``[N, 299, 299, 3]`` in [-1, 1]):

* ``tf1`` (TF-GAN, TTUR, the paper's numbers): TF 1.x ``resize_bilinear(align_corners=False)``
  on 0..255 floats, which samples ``src = dst * in / out`` (no half-pixel offset), then
  ``(x - 128) / 128``.
* ``pytorch_fid`` (pytorch-fid, clean-fid ``legacy_pytorch``, jax-fid): ``x / 255``, half-pixel
  bilinear (``F.interpolate(..., align_corners=False)``), then ``2 x - 1``.

One-channel images are repeated over the three colour channels first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
# sFID's spatial features (Nash et al. 2021, as guided-diffusion's evaluator takes them): the TF
# graph's ``mixed_6/conv`` = Mixed_6d's 1x1 branch after its ReLU, its first 7 channels, 17x17.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3
MODES = ("tf1", "pytorch_fid")
HIGHEST = jax.lax.Precision.HIGHEST


# -- preprocessing -------------------------------------------------------------------------------
def tf1_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source taps of TF 1.x ``resize_bilinear(align_corners=False)`` along one axis.

    TF computes in float32: ``scale = in / out``, ``src = dst * scale``, ``lo = floor(src)``,
    ``hi = min(ceil(src), in - 1)``, ``frac = src - floor(src)``.

    Returns:
      lo, hi: int32 ``[out_size]``; frac: float32 ``[out_size]``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    floor = np.floor(src)
    lo = np.maximum(floor, 0).astype(np.int32)
    hi = np.minimum(np.ceil(src), in_size - 1).astype(np.int32)
    return lo, hi, (src - floor).astype(np.float32)


def tf1_resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """TF 1.x bilinear resize, no half-pixel offset: float32 ``[N, H, W, C] -> [N, size, size,
    C]``. Interpolates along W, then H, in TF's order: ``top + (bottom - top) * y_frac``."""
    _, h, w, _ = x.shape
    ylo, yhi, yf = tf1_taps(h, size)
    xlo, xhi, xf = tf1_taps(w, size)
    top, bottom = x[:, ylo], x[:, yhi]  # [N, size, W, C]
    xf = jnp.asarray(xf)[None, None, :, None]

    def along_w(rows):  # [N, size, W, C] -> [N, size, size, C]
        left, right = rows[:, :, xlo], rows[:, :, xhi]
        return left + (right - left) * xf

    top, bottom = along_w(top), along_w(bottom)
    return top + (bottom - top) * jnp.asarray(yf)[None, :, None, None]


def half_pixel_resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """Half-pixel bilinear resize (``src = (dst + 0.5) * in / out - 0.5``, edges clamped), as
    PyTorch's ``interpolate(mode="bilinear", align_corners=False)`` upsamples: float32
    ``[N, H, W, C] -> [N, size, size, C]``."""
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, size, size, c), "bilinear", antialias=False)


def preprocess(images: jax.Array, mode: str) -> jax.Array:
    """uint8 ``[N, H, W, 1 or 3]`` -> the network's input, float32 ``[N, 299, 299, 3]``."""
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if mode == "tf1":
        return (tf1_resize_bilinear(x, INPUT_SIZE) - 128.0) / 128.0
    if mode == "pytorch_fid":
        return 2.0 * half_pixel_resize_bilinear(x / 255.0, INPUT_SIZE) - 1.0
    raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


# -- pooling -------------------------------------------------------------------------------------
def max_pool(x: jax.Array, *, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max pool of ``[N, H, W, C]`` (padding, if any, never wins: it is -inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, each mean over the in-image taps only (TF's
    ``avg_pool`` SAME; PyTorch ``count_include_pad=False``): ``[N, H, W, C]`` -> same shape."""
    _, h, w, _ = x.shape
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    # Taps inside the image: 3 in the interior, 2 on a border row or column (static).
    rows = np.full(h, 3.0, np.float32)
    cols = np.full(w, 3.0, np.float32)
    rows[[0, -1]] -= 1 if h > 1 else 2
    cols[[0, -1]] -= 1 if w > 1 else 2
    return total / jnp.asarray(np.outer(rows, cols))[None, :, :, None]


# -- blocks --------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0,
                 rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nnx.Module):
    """35x35 block: [1x1 64 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg -> 1x1 P]."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(avg_pool_exclude_pad(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """35 -> 17 reduction: [3x3 384 s2 | 1x1 64 -> 3x3 96 -> 3x3 96 s2 | max 3x3 s2]."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            max_pool(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convolutions (c7 channels inside) and an avg-pool
    branch: [1x1 192 | 1x1 -> 1x7 -> 7x1 192 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 192 |
    avg -> 1x1 192]."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5),
            self.branch_pool(avg_pool_exclude_pad(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """17 -> 8 reduction: [1x1 192 -> 3x3 320 s2 | 1x1 192 -> 1x7 -> 7x1 -> 3x3 192 s2 |
    max 3x3 s2]."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                   self.branch7x7x3_4),
            max_pool(x, stride=2),
        ], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 heads: [1x1 320 | 1x1 384 -> (1x3 | 3x1) 384 |
    1x1 448 -> 3x3 384 -> (1x3 | 3x1) 384 | pool -> 1x1 192]; ``pool`` is ``avg`` (average
    without the padding, Mixed_7b) or ``max`` (Mixed_7c, as in the TF graph)."""

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        self.pool = pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, **row, rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, **col, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row, rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, stride=1, pad=1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """The FID Inception-v3: float32 ``[N, 299, 299, 3]`` in [-1, 1] -> pool3 and logits."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(POOL3_DIM, NUM_LOGITS, precision=HIGHEST, rngs=rngs)

    def __call__(self, x) -> dict[str, jax.Array]:
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # 147x147x64
        x = max_pool(x, stride=2)  # 73x73x64
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # 71x71x192
        x = max_pool(x, stride=2)  # 35x35x192
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # 35x35x288
        x = _chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c)  # 17x17x768
        # [N, 17 * 17 * 7] (row-major over H, W, C as TF's reshape); XLA reuses the branch.
        spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = _chain(x, self.Mixed_6d, self.Mixed_6e)  # 17x17x768
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # 8x8x2048
        pool3 = jnp.mean(x, axis=(1, 2))  # [N, 2048]
        # Inception Score logits without the bias, as improved-GAN / TTUR take them; [N, 1008].
        unbiased = jnp.dot(pool3, self.fc.kernel[...], precision=HIGHEST)
        return dict(pool3=pool3, logits_unbiased=unbiased, logits=unbiased + self.fc.bias[...],
                    spatial=spatial)


def abstract_model():
    """(graphdef, parameters as a pure dict of ShapeDtypeStructs), nothing allocated; traced
    once per process, each call gets its own dicts."""
    graphdef, params = _abstract_model()
    return graphdef, jax.tree.map(lambda leaf: leaf, params)


@functools.cache
def _abstract_model():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, images_uint8: jax.Array, mode: str) -> dict[str, jax.Array]:
    """The pure forward pass (jittable): uint8 ``[N, H, W, 1 or 3]`` -> ``pool3`` float32
    ``[N, 2048]``, ``logits`` and ``logits_unbiased`` float32 ``[N, 1008]``, ``spatial``
    float32 ``[N, 2023]`` (sFID's)."""
    return nnx.merge(graphdef, params)(preprocess(images_uint8, mode))
