"""Batch sampling to files: the resumable run of a ``DDPM`` (chunk planning is
``sampling.Plan``: the images depend only on (key, N, batch size)).

``generate`` (what ``sample.py`` runs) writes each finished chunk atomically as a shard
``OUTPUT_DIR/sample_shards/shard_<i>.npz``; a killed run started again with the same settings
samples only the chunks it lacks. At the end the shards are streamed into
``OUTPUT_DIR/samples.npz`` (uint8 NHWC under the key ``images``, and the int32 ``labels`` of a
class-conditional run; loads with ``np.load`` and no pickle), so memory is bounded by one
chunk whatever N is; then a PNG grid ``samples.png`` and
``samples.json`` describing how they were made. Every setting is checked before anything in
OUTPUT_DIR is touched. With several processes every process samples its rows of every chunk and
process 0 writes the files. Paths may be local or ``gs://``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np
from etils import epath

from ddpm_jax import api, config_lib, distributed, errors, files, images, sampling

if TYPE_CHECKING:
    from ddpm_jax.api import DDPM

SHARDS = "sample_shards"


class SampleSpecError(errors.UserError, ValueError):
    """Samples already in OUTPUT_DIR that another setting would overwrite."""


Plan, plan = sampling.Plan, sampling.plan


class Interrupted(errors.UserError):
    """Ctrl-C stopped the sampling; the finished batches are kept."""

    exit_code = 130


def iter_chunks(model: DDPM, key: jax.Array, chunk_plan: Plan, spec: sampling.SamplerSpec, *,
                start: int = 0, x_T: np.ndarray | None = None, labels: np.ndarray | None = None,
                guidance: float = 0.0) -> Iterator[np.ndarray]:
    """``sampling.iter_chunks`` of ``model``'s compiled chain for ``spec`` (guided by
    ``labels`` and w = ``guidance`` for a conditional model)."""
    return sampling.iter_chunks(
        functools.partial(model.sample_batch, spec=spec, guidance=guidance), model.image_shape,
        key, chunk_plan, start=start, x_T=x_T, labels=labels)


def samples_record(model: DDPM, spec: sampling.SamplerSpec, *, num_samples: int,
                   batch_size: int, seed: int, labels: str | None = None,
                   guidance: float = 0.0) -> dict:
    """What ``samples.json`` holds: the checkpoint, step and weights, N, batch size and seed, the
    sampler (``SamplerSpec.record``) and image shape; for a class-conditional model also the
    classes, the ``labels`` asked for and the guidance w."""
    out = dict(checkpoint=model.source, checkpoint_step=model.step, ema=model.ema,
               num_samples=num_samples, batch_size=batch_size, seed=seed,
               **spec.record(model.diffusion), image_shape=list(model.image_shape))
    if model.num_classes:  # a class-conditional model: what was asked for, and how guided
        out.update(num_classes=model.num_classes, labels=labels, guidance=float(guidance))
    return out


def record_changes(old, new: dict, *, ignore: tuple[str, ...] = ()) -> str | None:
    """How the record ``old`` differs from ``new`` (``config_lib.differences``, leaving out the
    keys in ``ignore``): None without ``old``, "" when the same settings, else the fields."""
    if old is None:
        return None
    if isinstance(old, dict):
        old = {k: v for k, v in old.items() if k not in ignore}
    new = {k: v for k, v in new.items() if k not in ignore}
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in config_lib.differences(old, new))


# Samples of the same settings are reused for fewer images, whatever their N and batch size: the
# first n of N images depend only on (key, N, batch size), and are as good as any n of them.
REUSE_IGNORES = ("num_samples", "batch_size")


def find_reusable(output_dir, want: dict) -> dict | None:
    """The record of finished samples in ``output_dir`` made with the settings of ``want`` (a
    ``samples_record``) and at least its N images; None if there are none."""
    output_dir = epath.Path(output_dir)
    try:
        made = files.read_json(output_dir / "samples.json")
    except files.TornFileError:
        return None
    if made is None or not (output_dir / "samples.npz").exists():
        return None
    if record_changes(made, want, ignore=REUSE_IGNORES) != "":
        return None
    return made if made.get("num_samples", 0) >= want["num_samples"] else None


def parse_labels(text: str | None, num_samples: int, num_classes: int) -> np.ndarray | None:
    """The labels of ``--labels``: "3" (every sample a 3), "0,1,2" (the classes in turn, as
    many of each) or "all" (every class in turn, as many of each); int32 ``[num_samples]``.

    Raises ConfigError for a model without classes, or a list whose classes cannot each get
    the same number of the ``num_samples`` (``api.check_labels`` checks the classes).
    """
    if text is None:
        return None
    if not num_classes:
        raise config_lib.ConfigError(
            f"--labels={text} given, but this model is unconditional (model.num_classes = 0); "
            "drop --labels or sample a class-conditional checkpoint")
    text = text.strip()
    if text == "all":
        classes = list(range(num_classes))
    else:
        try:
            classes = [int(part) for part in text.split(",")]
        except ValueError:
            raise config_lib.ConfigError(
                f"--labels={text!r} must be a class (3), a comma list of classes (0,1,2) or "
                "'all'") from None
    if num_samples % len(classes):
        raise config_lib.ConfigError(
            f"--labels={text} asks for {len(classes)} classes in equal numbers, but "
            f"--num_samples={num_samples} is not a multiple of {len(classes)}; use e.g. "
            f"--num_samples={len(classes) * max(1, num_samples // len(classes))}")
    return np.asarray(classes, np.int32)[np.arange(num_samples) % len(classes)]


write_npz_stream = files.write_npz_stream  # the streamed .npz lives in ddpm_jax.files
iter_npz_rows = files.iter_npz_rows


def _finished_state(output_dir: epath.Path, spec: dict) -> str | None:
    """What is in OUTPUT_DIR already: None (nothing), "" (samples of ``spec``, complete), or why
    the samples there are not those of ``spec`` (they are then moved aside, never overwritten)."""
    final = output_dir / "samples.npz"
    try:
        record = files.read_json(output_dir / "samples.json")
    except files.TornFileError:
        record = "unreadable"
    if record is None:
        return "no samples.json beside them" if final.exists() else None
    if record == "unreadable":
        return "samples.json unreadable"
    if not final.exists():
        return "samples.npz missing"
    done = record_changes(record, spec)
    if done:
        return f"other settings: {done}"
    try:
        shape, rows = files.iter_npz_rows(final, "images", 1, 0)
    except (files.NpzError, OSError):
        return "samples.npz unreadable"
    if shape != (spec["num_samples"], *spec["image_shape"]):
        return f"samples.npz holds {shape}"
    return ""


def _prepare(output_dir: epath.Path, spec: dict) -> epath.Path | None:
    """Moves finished samples of other settings aside and checks unfinished ones.

    Returns None when samples of ``spec`` are already complete, else the shard folder.
    """
    done = _finished_state(output_dir, spec)
    if done == "":
        return None
    shard_dir = output_dir / SHARDS
    try:
        partial = record_changes(files.read_json(shard_dir / "spec.json"), spec)
    except files.TornFileError:
        partial = "torn"
    if partial and partial != "torn":
        raise SampleSpecError(
            f"{shard_dir} holds an unfinished run with other settings ({partial}); rerun it with "
            "its settings to finish it, or pass another --output_dir (nothing was overwritten)")
    if jax.process_index() == 0:
        if done:
            print(f"samples in {output_dir} not made with these settings ({done}) moved to "
                  f"{_move_aside(output_dir)}", flush=True)
        if partial == "torn":  # its settings are unknown: its shards are kept aside, unused
            print(f"{shard_dir / 'spec.json'} is unreadable (a write cut short); its shards "
                  f"moved to {_move_aside(output_dir, (SHARDS,))}", flush=True)
        shard_dir.mkdir(parents=True, exist_ok=True)
        if partial is None or partial == "torn":
            files.write_json(shard_dir / "spec.json", spec)
    distributed.sync("generate_prepare")
    return shard_dir


def _move_aside(output_dir: epath.Path,
                names=("samples.npz", "samples.png", "samples.json")) -> epath.Path:
    """Moves files of other settings to previous_samples/<k>/; returns the folder."""
    k = 0
    while (output_dir / "previous_samples" / str(k)).exists():
        k += 1
    dst = output_dir / "previous_samples" / str(k)
    dst.mkdir(parents=True)
    for name in names:
        if (output_dir / name).exists():
            (output_dir / name).rename(dst / name)
    return dst


def generate(model: DDPM, output_dir: str, *, num_samples: int, seed: int = 0,
             spec: sampling.SamplerSpec = sampling.ANCESTRAL,
             batch_size: int | None = None, progress: bool = True,
             labels: str | None = None, guidance: float | None = None,
             take_over_lock: bool = False) -> str:
    """Samples ``num_samples`` images into ``output_dir``; returns the path of samples.npz.

    The folder is locked while it is written (``.samples.lock``): a second run on it is refused;
    ``take_over_lock`` takes over a lock held by a run on another host that is gone.

    ``labels`` ("3", "0,1,2" or "all", see ``parse_labels``) samples those classes of a
    class-conditional model with guidance w = ``guidance`` (default
    ``config.sampling.guidance``); samples.npz then also holds ``labels`` (int32 [N]) and
    samples.json the labels asked for and w.
    """
    spec.check(model.config.diffusion.num_timesteps)
    chunk_plan = plan(num_samples, batch_size or model.config.sampling.batch_size, model.mesh)
    label_array = parse_labels(labels, num_samples, model.num_classes)
    if guidance is None:
        guidance = float(model.config.sampling.guidance) if label_array is not None else 0.0
    label_array = api.check_labels(label_array, guidance, num_samples, model.num_classes,
                                   prefix="--")
    description = samples_record(model, spec, num_samples=chunk_plan.num_samples,
                                 batch_size=chunk_plan.batch, seed=seed, labels=labels,
                                 guidance=guidance)
    out = epath.Path(output_dir)
    if jax.process_index() == 0:
        files.check_writable(out, "output folder", "choose another output folder")
    with files.FolderLock(out, "samples", what=f"output folder {out}", program="sample.py",
                          take_over=take_over_lock, leader=jax.process_index() == 0,
                          broadcast=distributed.broadcast_int):
        return _generate(model, out, chunk_plan, spec, seed, description, progress, label_array,
                         guidance)


def _generate(model, out: epath.Path, chunk_plan: Plan, spec, seed: int, description: dict,
              progress: bool, label_array: np.ndarray | None, guidance: float) -> str:
    final = out / "samples.npz"
    shard_dir = _prepare(out, description)
    if shard_dir is None:
        print(f"{final} is already complete ({chunk_plan.num_samples} images)")
        return str(final)
    shard = lambda i: shard_dir / f"shard_{i:06d}.npz"
    first = distributed.broadcast_int(next(
        (i for i in range(chunk_plan.num_chunks) if not shard(i).exists()), chunk_plan.num_chunks))
    _sample_shards(model, chunk_plan, spec, seed, first, shard, progress, label_array,
                   guidance)
    if jax.process_index() == 0:
        _finish(out, chunk_plan, model.image_shape, shard, description, label_array)
    distributed.sync("generate_finish")
    return str(final)


def _sample_shards(model, chunk_plan: Plan, spec, seed: int, first: int, shard,
                   progress: bool, labels: np.ndarray | None, guidance: float) -> None:
    from tqdm.auto import tqdm  # noqa: PLC0415

    main = jax.process_index() == 0
    done = min(first * chunk_plan.batch, chunk_plan.num_samples)
    bar = tqdm(total=chunk_plan.num_samples, initial=done, unit="img",
               disable=not (progress and main), dynamic_ncols=True)
    start, made = time.time(), 0
    chunks = iter_chunks(model, jax.random.key(seed), chunk_plan, spec, start=first,
                         labels=labels, guidance=guidance)
    try:
        for i, imgs in enumerate(chunks, start=first):
            if main:
                files.write_npz(shard(i), images=imgs)
            made += imgs.shape[0]
            bar.update(imgs.shape[0])
            bar.set_postfix(img_s=f"{made / max(time.time() - start, 1e-9):.2f}")
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted after {done + made} of {chunk_plan.num_samples} images; the finished "
            f"batches are kept in {shard(0).parent}: rerun the same command to finish") from None
    finally:
        bar.close()


def _finish(out: epath.Path, chunk_plan: Plan, image_shape, shard, description: dict,
            labels: np.ndarray | None = None) -> None:
    """Streams the shards into samples.npz, writes the grid and the description, cleans up."""
    n = chunk_plan.num_samples
    read = lambda i: files.read_npz(shard(i))["images"]
    write_npz_stream(out / "samples.npz", "images", (n, *image_shape), np.uint8,
                     (read(i) for i in range(chunk_plan.num_chunks)),
                     extra=None if labels is None else dict(labels=labels))
    grid = []
    for i in range(chunk_plan.num_chunks):
        grid.append(read(i)[:100 - sum(len(g) for g in grid)])
        if sum(len(g) for g in grid) >= 100:
            break
    images.save_grid(str(out / "samples.png"), np.concatenate(grid))
    files.write_json(out / "samples.json", description)
    (out / SHARDS).rmtree()


def write_progressive(model: DDPM, output_dir: str, *, seed: int = 0, num: int = 8,
                      spec: sampling.SamplerSpec = sampling.ANCESTRAL) -> tuple[str, str]:
    """Paper Fig. 6: rows of predicted x_0 (progressive.png) and of x_t (trajectory.png).

    One column every ``spec.record_every`` steps of the chain (default: about ten columns).
    """
    steps = spec.num_steps or model.config.diffusion.num_timesteps
    if spec.record_every is None:
        spec = dataclasses.replace(spec, record_every=sampling.default_record_every(steps))
    spec.check(model.config.diffusion.num_timesteps)
    _, xs, x0s = model.progressive(jax.random.key(seed), num, spec)
    n, k = x0s.shape[:2]
    grid = lambda a: a.reshape((n * k,) + a.shape[2:])
    out = epath.Path(output_dir)
    p1 = images.save_grid(str(out / "progressive.png"), grid(x0s), ncols=k)
    p2 = images.save_grid(str(out / "trajectory.png"), grid(xs), ncols=k)
    return p1, p2
