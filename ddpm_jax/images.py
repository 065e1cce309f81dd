"""Images: the map between uint8 pixels and model space, and pictures for people.

Model space is float32 in [-1, 1]: ``x = u / 127.5 - 1`` for uint8 ``u`` (the original's data
map), and back ``u = clip(round((x + 1) * 127.5), 0, 255)``. Both run on the devices, inside the
jitted steps. The rest writes sample grids, progressive strips, and loss and quality curves
(matplotlib) as PNG files.
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

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


def _figure(width: int, height: int):
    import matplotlib  # noqa: PLC0415 - only the plots need it

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt  # noqa: PLC0415

    return plt, plt.figure(figsize=(width / 100, height / 100), dpi=100)


def _save_figure(plt, fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    _write_png(path, Image.open(buffer).convert("RGB"))
    return path


def smooth(values, weight: float = 0.9) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(np.asarray(values, np.float64)):
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight ** (i + 1)))
    return np.asarray(out)


def save_loss_curve(path: str, steps, losses, *, width: int = 640, height: int = 360) -> str:
    """Training loss against step (log scale): the logged points and their smoothed line."""
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(losses) & (losses > 0)
    steps, losses = steps[ok], losses[ok]
    plt, fig = _figure(width, height)
    ax = fig.add_subplot()
    ax.plot(steps, losses, "o", markersize=3, alpha=0.35, color="tab:blue", label="logged")
    if len(losses) >= 2:
        ax.plot(steps, smooth(losses), "-", color="tab:blue", linewidth=2,
                label="smoothed (EMA 0.9)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (L_simple, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return _save_figure(plt, fig, path)


QUALITY_KEYS = ("digits_fd_ratio", "fid", "precision", "recall", "digits_confidence", "is_mean")


def save_quality_curve(path: str, rows: list[dict], seconds: dict, *, width: int = 900,
                       height: int = 360) -> str:
    """Evaluation metrics against training step (left) and training seconds (right)."""
    plt, fig = _figure(width, height)
    by_step, by_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in rows]
    times = [seconds.get(s, np.nan) for s in steps]
    keys = [k for k in QUALITY_KEYS if all(k in r for r in rows)]
    for k in keys:
        values = [r[k] for r in rows]
        (line,) = by_step.plot(steps, values, "o-", label=k)
        by_time.plot(times, values, "o-", label=k)
        floor = f"{k}_real_n"  # what as many real training digits score
        if all(floor in r for r in rows):
            for ax, x in ((by_step, steps), (by_time, times)):
                ax.plot(x, [r[floor] for r in rows], "--", color=line.get_color(),
                        label=f"{k} of as many real digits" if ax is by_step else None)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("training seconds (evaluations left out)")
    for ax in (by_step, by_time):
        ax.set_ylabel("metric")
        ax.grid(True, alpha=0.3)
    by_step.legend(loc="best", fontsize="small")
    fig.suptitle("sample quality during training (EMA weights)")
    fig.tight_layout()
    return _save_figure(plt, fig, path)
