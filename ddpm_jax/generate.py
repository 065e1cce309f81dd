"""Batch sampling to files, resumable: what ``sample.py`` runs.

Samples are written in shards (one ``.npz`` per batch, atomically) under
``OUTPUT_DIR/sample_shards/``; a killed run started again with the same settings skips the
shards it already has. At the end the shards are joined into ``OUTPUT_DIR/samples.npz``
(uint8 NHWC under the key ``images``; loads with ``np.load`` and no pickle), a PNG grid
``samples.png``, and ``samples.json`` describing how they were made.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np

from ddpm_jax import images, sampling
from ddpm_jax.api import DDPM

SHARDS = "sample_shards"


class SampleSpecError(ValueError):
    pass


def _spec(model: DDPM, *, num_samples, batch, seed, sampler, num_steps, eta) -> dict:
    return dict(checkpoint=model.source, checkpoint_step=model.step, ema=model.ema,
                num_samples=num_samples, batch_size=batch, seed=seed, sampler=sampler,
                num_steps=num_steps, eta=eta, image_shape=list(model.image_shape))


def _write_npz(path: str, **arrays) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _diffs(path: str, spec: dict) -> str | None:
    """None if ``path`` is absent; "" if it holds ``spec``; else the differing fields."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    return ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in spec.items() if old.get(k) != v)


def _move_aside(output_dir: str) -> str:
    """Moves finished samples of other settings to previous_samples/<k>/; returns the folder."""
    k = 0
    while os.path.exists(os.path.join(output_dir, "previous_samples", str(k))):
        k += 1
    dst = os.path.join(output_dir, "previous_samples", str(k))
    os.makedirs(dst)
    for name in ("samples.npz", "samples.png", "samples.json"):
        if os.path.exists(os.path.join(output_dir, name)):
            os.replace(os.path.join(output_dir, name), os.path.join(dst, name))
    return dst


def generate(model: DDPM, output_dir: str, *, num_samples: int, seed: int = 0,
             sampler: str = "ancestral", num_steps: int | None = None, eta: float = 0.0,
             batch_size: int | None = None, progress: bool = True) -> str:
    """Samples ``num_samples`` images into ``output_dir``; returns the path of samples.npz."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    batch = model.chunk_size(num_samples, batch_size)
    spec = _spec(model, num_samples=num_samples, batch=batch, seed=seed, sampler=sampler,
                 num_steps=num_steps, eta=eta)
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, "samples.npz")
    done = _diffs(os.path.join(output_dir, "samples.json"), spec)
    if done == "" and os.path.exists(final):
        print(f"{final} is already complete ({num_samples} images)")
        return final
    if done:
        print(f"samples of other settings ({done}) moved to {_move_aside(output_dir)}")
    shard_dir = os.path.join(output_dir, SHARDS)
    os.makedirs(shard_dir, exist_ok=True)
    partial = _diffs(os.path.join(shard_dir, "spec.json"), spec)
    if partial:
        raise SampleSpecError(
            f"{shard_dir} holds an unfinished run with other settings ({partial}); rerun it with "
            "its settings to finish it, or pass another --output_dir (nothing was overwritten)")
    if partial is None:
        with open(os.path.join(shard_dir, "spec.json"), "w") as f:
            json.dump(spec, f, indent=2)
    key = jax.random.key(seed)
    n_chunks = model.num_chunks(num_samples, batch_size)
    shard = lambda i: os.path.join(shard_dir, f"shard_{i:06d}.npz")
    todo = [i for i in range(n_chunks) if not os.path.exists(shard(i))]
    bar = tqdm(total=num_samples, initial=min((n_chunks - len(todo)) * batch, num_samples),
               unit="img", disable=not progress, dynamic_ncols=True)
    start = time.time()
    for i in todo:
        x = model.sample_chunk(key, i, num_samples, batch_size=batch_size, sampler=sampler,
                               num_steps=num_steps, eta=eta)
        imgs = np.asarray(sampling.to_uint8(x))[: num_samples - i * batch]
        _write_npz(shard(i), images=imgs)
        bar.update(imgs.shape[0])
        bar.set_postfix(img_s=f"{bar.n / max(time.time() - start, 1e-9):.2f}")
    bar.close()
    out = np.concatenate([np.load(shard(i))["images"] for i in range(n_chunks)])
    _write_npz(final, images=out)
    images.save_grid(os.path.join(output_dir, "samples.png"), out[:100])
    with open(os.path.join(output_dir, "samples.json"), "w") as f:
        json.dump(spec, f, indent=2)
    shutil.rmtree(shard_dir)
    return final


def write_progressive(model: DDPM, output_dir: str, *, seed: int = 0, num: int = 8,
                      every: int | None = None, **kwargs) -> tuple[str, str]:
    """Paper Fig. 6: rows of predicted x_0 (progressive.png) and of x_t (trajectory.png).

    One column every ``every`` steps of the chain (default: ten columns).
    """
    if every is None:
        steps = kwargs.get("num_steps") or model.config.diffusion.num_timesteps
        every = max(1, steps // 10)
    x0, xs, x0s = model.progressive(jax.random.key(seed), num, every=every, **kwargs)
    del x0
    n, k = x0s.shape[:2]
    grid = lambda a: a.reshape((n * k,) + a.shape[2:])
    p1 = images.save_grid(os.path.join(output_dir, "progressive.png"), grid(x0s), ncols=k)
    p2 = images.save_grid(os.path.join(output_dir, "trajectory.png"), grid(xs), ncols=k)
    return p1, p2
