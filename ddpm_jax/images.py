"""Images: the map between uint8 pixels and model space, and pictures for people.

Model space is float32 in [-1, 1]: ``x = u / 127.5 - 1`` for uint8 ``u`` (the original's data
map), and back ``u = clip(round((x + 1) * 127.5), 0, 255)``. Both run on the devices, inside the
jitted steps. The rest writes sample grids, progressive strips and loss curves as PNG files.
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from ddpm_jax import files


def to_model_space(images: jax.Array) -> jax.Array:
    """uint8 ``[..., C]`` -> float32 ``u / 127.5 - 1`` in [-1, 1]."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] float -> uint8 ``round((x + 1) * 127.5)``, clipped to 0..255."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 1,
              scale: int = 1) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> one uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` grid."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"make_grid needs uint8 [N, H, W, C] images, got {images.dtype} "
                         f"{images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = img
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def auto_scale(image_size: int) -> int:
    """Upscaling so that small images (8x8 digits) are visible in a grid."""
    return max(1, 64 // image_size)


def save_png(path: str, image: np.ndarray) -> str:
    """Writes uint8 ``[H, W, C]`` (C = 1 or 3) as PNG, atomically; returns the path."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    _write_png(path, Image.fromarray(image))
    return path


def _write_png(path: str, image: Image.Image) -> None:
    """Writes ``image`` as PNG to a local path or a bucket (whole or not at all)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(target, buffer.getvalue())


def read_png(path: str) -> np.ndarray:
    """A PNG (local or in a bucket) as uint8 ``[H, W]`` or ``[H, W, C]``."""
    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
        return np.asarray(image)


def save_grid(path: str, images: np.ndarray, *, ncols: int | None = None) -> str:
    images = np.asarray(images)
    return save_png(path, make_grid(images, ncols=ncols, scale=auto_scale(images.shape[1])))


def save_loss_curve(path: str, steps, losses, *, width: int = 640, height: int = 360) -> str:
    """A plain line plot of loss against step (log-scale y) as PNG."""
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(losses) & (losses > 0)
    steps, losses = steps[ok], losses[ok]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(steps) >= 2:
        y = np.log10(losses)
        x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
        y0, y1 = y.min(), max(y.max(), y.min() + 1e-6)
        px = left + (steps - x0) / (x1 - x0) * (right - left)
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        draw.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=(31, 119, 180), width=2)
        draw.text((left, bottom + 8), f"step {int(x0)}", fill="black")
        draw.text((right - 90, bottom + 8), f"step {int(x1)}", fill="black")
        draw.text((4, top), f"{10 ** y1:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{10 ** y0:.3g}", fill="black")
    draw.text((left + 8, top + 4), "training loss (log scale)", fill="black")
    _write_png(path, img)
    return path
