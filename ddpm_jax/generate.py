"""Batch sampling: how N images are cut into compiled chunks, and the resumable run to files.

Chunk planning (``Plan``): N images are made in chunks of ``min(batch_size, N)`` rows; chunk i
starts from ``fold_in(key, i)``. A chunk whose rows do not divide over the devices is padded to a
multiple of the device count for the compiled chain and the padding is dropped (the first rows of
a padded draw equal the unpadded draw), so the images depend only on (key, N, batch size): the
same for any number of devices and processes.

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
import io
import json
import time
import zipfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np
from etils import epath

from ddpm_jax import config_lib, distributed, errors, images, sampling, sharding

if TYPE_CHECKING:
    from ddpm_jax.api import DDPM

SHARDS = "sample_shards"


class SampleSpecError(errors.UserError, ValueError):
    """Samples already in OUTPUT_DIR that another setting would overwrite."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How ``num_samples`` images are cut into compiled chunks.

    Attributes:
      num_samples: images wanted (N).
      batch: rows per chunk, ``min(batch_size, N)``; the last chunk may hold fewer.
      padded: rows of the compiled chain: ``batch`` rounded up to a multiple of the devices.
    """

    num_samples: int
    batch: int
    padded: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.batch)

    def rows(self, i: int) -> int:
        """Images kept from chunk i."""
        return min(self.batch, self.num_samples - i * self.batch)


def plan(num_samples: int, batch_size: int, mesh: jax.sharding.Mesh) -> Plan:
    """The chunks of ``num_samples`` images at ``batch_size`` rows per compiled chain."""
    if num_samples < 1 or batch_size < 1:
        raise config_lib.ConfigError(
            f"--num_samples and --batch_size must be positive, got {num_samples} and "
            f"{batch_size}")
    batch = min(batch_size, num_samples)
    return Plan(num_samples, batch, sharding.padded_size(batch, mesh))


def iter_chunks(model: DDPM, key: jax.Array, chunk_plan: Plan, spec: sampling.SamplerSpec, *,
                start: int = 0, x_T: np.ndarray | None = None, labels: np.ndarray | None = None,
                guidance: float = 0.0) -> Iterator[np.ndarray]:
    """uint8 ``[rows(i), H, W, C]`` host arrays of chunks ``start``, ``start + 1``, ...

    ``labels`` (int32 ``[N]``, checked) condition the rows of each chunk; padding rows take
    the first label of their chunk (and are dropped).
    """
    for i in range(start, chunk_plan.num_chunks):
        chunk_key = jax.random.fold_in(key, i)
        rows = slice(i * chunk_plan.batch, (i + 1) * chunk_plan.batch)
        x0 = None
        if x_T is not None:
            x0 = np.asarray(x_T[rows], np.float32)
            fill = sampling.initial_noise(chunk_key, (chunk_plan.padded,) + model.image_shape)
            x0 = np.concatenate([x0, np.asarray(fill)[x0.shape[0]:]])
        y = None
        if labels is not None:
            y = labels[rows]
            y = np.concatenate([y, np.full(chunk_plan.padded - len(y), y[0], np.int32)])
        out = model.sample_batch(chunk_key, chunk_plan.padded, spec, x_T=x0, labels=y,
                                 guidance=guidance)
        yield sharding.to_host(out)[:chunk_plan.rows(i)]


def _spec(model: DDPM, chunk_plan: Plan, seed: int, spec: sampling.SamplerSpec,
          labels: str | None = None, guidance: float = 0.0) -> dict:
    out = dict(checkpoint=model.source, checkpoint_step=model.step, ema=model.ema,
               num_samples=chunk_plan.num_samples, batch_size=chunk_plan.batch, seed=seed,
               **spec.record(model.diffusion), image_shape=list(model.image_shape))
    if model.num_classes:  # a class-conditional model: what was asked for, and how guided
        out.update(num_classes=model.num_classes, labels=labels, guidance=float(guidance))
    return out


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


def _read_json(path: epath.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _changes(old: dict | None, new: dict) -> str | None:
    """None without ``old``; "" when it equals ``new``; else the differing fields."""
    if old is None:
        return None
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in config_lib.differences(old, new))


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_npz_stream(path: epath.Path, name: str, shape: tuple[int, ...], dtype,
                     chunks: Iterable[np.ndarray],
                     extra: dict[str, np.ndarray] | None = None) -> None:
    """Writes one array ``name`` of ``shape`` as ``.npz`` from its row chunks, one at a time.

    The file is what ``np.savez`` writes (an uncompressed zip holding ``name.npy``, then the
    small ``extra`` arrays whole), so ``np.load(path)[name]`` reads it without pickle; it is
    renamed into place when complete.
    """
    tmp = path.parent / (path.name + ".tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    written = 0
    with tmp.open("wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                out.write(chunk.tobytes())
                written += chunk.shape[0]
        for key, array in (extra or {}).items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    if written != shape[0]:
        tmp.unlink()
        raise ValueError(f"wrote {written} rows of {name}, expected {shape[0]}")
    tmp.replace(path)


def iter_npz_rows(path: epath.Path, name: str, batch: int,
                  count: int | None = None) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """The shape of array ``name`` in an uncompressed ``.npz`` and an iterator over its first
    ``count`` rows (default all), ``batch`` rows at a time: memory is bounded by one batch.

    Raises:
      SampleSpecError: the file does not hold ``name``, is compressed, or holds objects.
    """
    zf = zipfile.ZipFile(path.open("rb"))
    member = f"{name}.npy"
    if member not in zf.namelist() or zf.getinfo(member).compress_type != zipfile.ZIP_STORED:
        zf.close()
        raise SampleSpecError(f"{path} holds no uncompressed array {name!r} (as sample.py "
                              "writes it)")
    f = zf.open(member)
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject or fortran:
        zf.close()
        raise SampleSpecError(f"{path}: {name} is not a plain C-order array (objects are never "
                              "unpickled here)")
    total = shape[0] if count is None else min(count, shape[0])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def rows() -> Iterator[np.ndarray]:
        with zf, f:
            for start in range(0, total, batch):
                n = min(batch, total - start)
                yield np.frombuffer(f.read(n * row_bytes), dtype).reshape(n, *shape[1:])

    return tuple(shape), rows()


def _prepare(output_dir: epath.Path, spec: dict) -> epath.Path | None:
    """Moves finished samples of other settings aside and checks unfinished ones.

    Returns None when samples of ``spec`` are already complete, else the shard folder.
    """
    final = output_dir / "samples.npz"
    done = _changes(_read_json(output_dir / "samples.json"), spec)
    if done == "" and final.exists():
        return None
    shard_dir = output_dir / SHARDS
    partial = _changes(_read_json(shard_dir / "spec.json"), spec)
    if partial:
        raise SampleSpecError(
            f"{shard_dir} holds an unfinished run with other settings ({partial}); rerun it with "
            "its settings to finish it, or pass another --output_dir (nothing was overwritten)")
    if jax.process_index() == 0:
        if done:
            print(f"samples of other settings ({done}) moved to {_move_aside(output_dir)}")
        shard_dir.mkdir(parents=True, exist_ok=True)
        if partial is None:
            (shard_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    distributed.sync("generate_prepare")
    return shard_dir


def _move_aside(output_dir: epath.Path) -> epath.Path:
    """Moves finished samples of other settings to previous_samples/<k>/; returns the folder."""
    k = 0
    while (output_dir / "previous_samples" / str(k)).exists():
        k += 1
    dst = output_dir / "previous_samples" / str(k)
    dst.mkdir(parents=True)
    for name in ("samples.npz", "samples.png", "samples.json"):
        if (output_dir / name).exists():
            (output_dir / name).replace(dst / name)
    return dst


def generate(model: DDPM, output_dir: str, *, num_samples: int, seed: int = 0,
             spec: sampling.SamplerSpec = sampling.ANCESTRAL,
             batch_size: int | None = None, progress: bool = True,
             labels: str | None = None, guidance: float | None = None) -> str:
    """Samples ``num_samples`` images into ``output_dir``; returns the path of samples.npz.

    ``labels`` ("3", "0,1,2" or "all", see ``parse_labels``) samples those classes of a
    class-conditional model with guidance w = ``guidance`` (default
    ``config.sampling.guidance``); samples.npz then also holds ``labels`` (int32 [N]) and
    samples.json the labels asked for and w.
    """
    from ddpm_jax import api  # noqa: PLC0415 - api imports this module

    spec.check(model.config.diffusion.num_timesteps)
    chunk_plan = plan(num_samples, batch_size or model.config.sampling.batch_size, model.mesh)
    label_array = parse_labels(labels, num_samples, model.num_classes)
    if guidance is None:
        guidance = float(model.config.sampling.guidance) if label_array is not None else 0.0
    label_array = api.check_labels(label_array, guidance, num_samples, model.num_classes,
                                   prefix="--")
    description = _spec(model, chunk_plan, seed, spec, labels, guidance)
    out = epath.Path(output_dir)
    final = out / "samples.npz"
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    shard_dir = _prepare(out, description)
    if shard_dir is None:
        print(f"{final} is already complete ({num_samples} images)")
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
    for i, imgs in enumerate(chunks, start=first):
        if main:
            _write_atomic(shard(i), _npz_bytes(images=imgs))
        made += imgs.shape[0]
        bar.update(imgs.shape[0])
        bar.set_postfix(img_s=f"{made / max(time.time() - start, 1e-9):.2f}")
    bar.close()


def _finish(out: epath.Path, chunk_plan: Plan, image_shape, shard, description: dict,
            labels: np.ndarray | None = None) -> None:
    """Streams the shards into samples.npz, writes the grid and the description, cleans up."""
    n = chunk_plan.num_samples
    read = lambda i: np.load(io.BytesIO(shard(i).read_bytes()), allow_pickle=False)["images"]
    write_npz_stream(out / "samples.npz", "images", (n, *image_shape), np.uint8,
                     (read(i) for i in range(chunk_plan.num_chunks)),
                     extra=None if labels is None else dict(labels=labels))
    grid = []
    for i in range(chunk_plan.num_chunks):
        grid.append(read(i)[:100 - sum(len(g) for g in grid)])
        if sum(len(g) for g in grid) >= 100:
            break
    images.save_grid(str(out / "samples.png"), np.concatenate(grid))
    (out / "samples.json").write_text(json.dumps(description, indent=2))
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
