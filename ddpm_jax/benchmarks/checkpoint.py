"""Time to save and restore a training checkpoint with the project's own path.

  python -m ddpm_jax.benchmarks.checkpoint --config=cifar10 [--repeats=3 --dir=/fast/disk]

The state is ``training.create_train_state`` of the config (params, EMA and Adam's two moments:
about 4 x 35.7M float32 for cifar10), laid out on the mesh of all devices as training lays it
out. Each repeat saves one step through ``checkpoints.Checkpointer`` (async) and
``training.save_state``, as the training loop does, and reports:

* blocked: until ``save_state`` returns (what the training loop waits for);
* commit: until ``Checkpointer.wait`` returns (the step is committed);
* the bytes of the committed step directory. Orbax compresses arrays (zstd), so the default
  ``--fill=random`` replaces the state's values with random ones: a fresh state (zero Adam
  moments, EMA = params) would write and compress far less than a trained one;
* restore: ``training.restore_start`` (the saved config checked, the arrays placed on the mesh,
  the base key) with a fresh read-only ``Checkpointer``, until the arrays are ready; building
  the abstract state (``training.abstract_state``) before it is timed separately. The files
  were just written, so they are read from the page cache: a restore after a reboot reads the
  disk.

Steps go to a temporary directory (under ``--dir`` if given), removed at the end. A short table
(one row per repeat, then the median) goes to stderr, then one JSON line with every figure.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ddpm_jax import checkpoints, config_lib, sharding, training, unet
from ddpm_jax.benchmarks import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when this module is the program)."""
    flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
    flags.DEFINE_integer("repeats", 3, "Checkpoints saved and restored (median reported).")
    flags.DEFINE_enum(
        "fill", "random", ["random", "init"],
        "random: every float array of the state drawn from N(0, 0.01^2), as incompressible as "
        "a trained state's; init: the fresh state (Adam's zero moments compress to almost "
        "nothing).")
    flags.DEFINE_string("dir", None, "Parent of the temporary checkpoint directory (default: "
                        "the system's temp dir); choose the disk of your workdirs.")


def randomize(tree, seed: int):
    """Every floating-point array of ``tree`` replaced by N(0, 0.01^2) values (drawn on the host
    with numpy: one compiled program per leaf shape would cost more than the benchmark)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return (0.01 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)

    return jax.tree.map(fill, tree)


def train_state(config, mesh, fill: str):
    """(state, optimizer): the initial train state as training creates it, maybe randomized."""
    tx = training.create_optimizer(config_lib.OptimizerSpec.from_config(config))
    state = training.create_train_state(unet.ModelSpec.from_config(config), config.seed, tx,
                                        mesh)
    if fill == "random":
        state = jax.tree.map(sharding.put, randomize(state, config.seed + 1),
                             sharding.train_state_shardings(mesh, state))
    return jax.block_until_ready(state), tx


def directory_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def save_once(ckpt: checkpoints.Checkpointer, state, config, base_key) -> tuple[float, float]:
    """(blocked s, commit s) of one asynchronous save of ``state``."""
    start = time.perf_counter()
    training.save_state(ckpt, state, data_position=0, base_key=base_key, config=config)
    blocked = time.perf_counter() - start
    ckpt.wait()
    return blocked, time.perf_counter() - start


def restore_once(directory: str, step: int, config, tx, mesh) -> tuple[float, float]:
    """(abstract s, restore s) of restoring ``step`` as a resumed run does."""
    with checkpoints.Checkpointer(directory, read_only=True) as ckpt:
        start = time.perf_counter()
        abstract = training.abstract_state(
            unet.abstract_model(unet.ModelSpec.from_config(config))[1], tx)
        abstract_s = time.perf_counter() - start
        start = time.perf_counter()
        restored = training.restore_start(config, ckpt, step, abstract, mesh)
        jax.block_until_ready((restored.state, restored.base_key))
        seconds = time.perf_counter() - start
    if restored.step != step or int(restored.state.step) != step:
        raise RuntimeError(f"restored step {int(restored.state.step)}, expected {step}")
    return abstract_s, seconds


def measure(config, repeats: int, parent: str | None, fill: str) -> list[dict]:
    """One row of figures per repeat: saves step i + 1 and restores it."""
    mesh = sharding.create_mesh()
    replicated = sharding.replicated(mesh)
    state, tx = train_state(config, mesh, fill)
    base_key = sharding.put(jax.random.key(config.seed), replicated)
    rows = []
    with tempfile.TemporaryDirectory(dir=parent, prefix="ddpm_ckpt_bench_") as tmp:
        directory = os.path.join(tmp, checkpoints.CHECKPOINT_SUBDIR)
        with checkpoints.Checkpointer(directory) as ckpt:
            for i in range(repeats):
                step = i + 1
                state = state.replace(step=sharding.put(np.int32(step), replicated))
                blocked, commit = save_once(ckpt, state, config, base_key)
                size = directory_bytes(ckpt.step_dir(step))
                abstract, restore = restore_once(directory, step, config, tx, mesh)
                rows.append(dict(blocked_s=blocked, commit_s=commit, bytes=size,
                                 restore_s=restore, abstract_s=abstract))
    return rows


def report(name: str, num_params: int, fill: str, rows: list[dict], file=sys.stderr) -> dict:
    """Prints the table and returns the JSON record (medians plus every repeat)."""
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out = functools.partial(print, file=file)
    out(f"Checkpoint (params + EMA + Adam, async save): config {name}, {num_params:,} "
          f"parameters, --fill={fill}, {jax.devices()[0].platform} x{jax.device_count()}")
    out(f"  {'':<8} {'blocked s':>10} {'commit s':>10} {'MB':>10} {'MB/s':>10} "
          f"{'restore s':>10} {'abstract s':>10}")
    labelled = [(f"#{i + 1}", r) for i, r in enumerate(rows)] + [("median", median)]
    for label, r in labelled:
        mb = r["bytes"] / 1e6
        out(f"  {label:<8} {r['blocked_s']:>10.3f} {r['commit_s']:>10.3f} {mb:>10.1f} "
              f"{mb / r['commit_s']:>10.1f} {r['restore_s']:>10.3f} {r['abstract_s']:>10.3f}")
    out("  (restore reads files just written, from the page cache)")
    return dict(benchmark="checkpoint", config=name, params=num_params, fill=fill,
                **common.device_fields(), repeats=len(rows), **median, runs=rows)


def main(argv: Sequence[str]) -> None:
    """Saves and restores --repeats checkpoints of --config; prints the table and a JSON line."""
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
    common.positive("repeats", FLAGS.repeats)
    config = common.load_config(FLAGS.config)
    rows = measure(config, FLAGS.repeats, FLAGS.dir, FLAGS.fill)
    num_params = unet.count_params(unet.abstract_model(unet.ModelSpec.from_config(config))[1])
    common.emit(report(common.config_name(FLAGS.config), num_params, FLAGS.fill, rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
