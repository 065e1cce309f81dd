"""Time to save and restore a training checkpoint with the project's own path.

  python -m ddpm_jax.benchmarks.checkpoint --config=cifar10 [--repeats=3 --dir=/fast/disk]

The state is ``training.init_train_state`` of the config's U-Net (params, EMA and Adam's two
moments: about 4 x 35.7M float32 for cifar10), replicated on the default mesh as in training.
Each repeat saves one step through ``checkpoints.create_manager`` (async) and
``training.save_state``, as ``Run.save`` does, and reports:

* blocked: until ``save_state`` returns (what the training loop waits for);
* commit: until ``manager.wait_until_finished()`` returns (the step is committed);
* the bytes of the committed step directory. Orbax compresses arrays (zstd), so the default
  ``--fill=random`` replaces the state's values with random ones: a fresh state (zero Adam
  moments, EMA = params) would write and compress far less than a trained one;
* restore: ``training.restore_state`` + the base key, as in ``Run._restore_or_init``, with a
  fresh manager, until the arrays are ready; building the abstract state
  (``training.abstract_state``) before it is timed separately. The files were
  just written, so they are read from the page cache: a restore after a reboot reads the disk.

Steps go to a temporary directory (under ``--dir`` if given), removed at the end. A short table
(one row per repeat, then the median) goes to stdout, then one JSON line with every figure.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import api, checkpoints, training, unet

_CONFIG = flags.DEFINE_string("config", "cifar10", "Config name in configs/ (or its .py path).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Checkpoints saved and restored (median reported).")
_FILL = flags.DEFINE_enum(
    "fill", "random", ["random", "init"],
    "random: every float array of the state drawn from N(0, 0.01^2), as incompressible as a "
    "trained state's; init: the fresh state (Adam's zero moments compress to almost nothing).")
_DIR = flags.DEFINE_string("dir", None, "Parent of the temporary checkpoint directory "
                           "(default: the system's temp dir); choose the disk of your workdirs.")


def load_config(name: str):
    """The locked config of ``configs/<name>.py``."""
    return importlib.import_module(f"configs.{name}").get_config()


def randomize(tree, seed: int):
    """Every floating-point array of ``tree`` replaced by N(0, 0.01^2) values."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.01 * jax.random.normal(k, x.shape, x.dtype)
              if jnp.issubdtype(x.dtype, jnp.floating) else x
              for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def train_state(config, replicated, fill: str):
    """(state, optimizer, graphdef): a train state placed as ``Run`` places it."""
    tx = training.create_optimizer(config)
    graphdef, params = unet.split(unet.create_model(config, seed=config.seed))
    state = training.init_train_state(params, tx)
    if fill == "random":
        state = randomize(state, config.seed + 1)
    return jax.block_until_ready(jax.device_put(state, replicated)), tx, graphdef


def directory_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def save_once(manager, state, config, base_key) -> tuple[float, float]:
    """(blocked s, commit s) of one async save of ``state``."""
    start = time.perf_counter()
    training.save_state(manager, state, data_position=0, base_key=base_key, config=config)
    blocked = time.perf_counter() - start
    manager.wait_until_finished()
    return blocked, time.perf_counter() - start


def restore_once(directory: str, step: int, config, graphdef, tx,
                 replicated) -> tuple[float, float]:
    """(abstract s, restore s) of restoring ``step`` as ``Run._restore_or_init`` does."""
    manager = checkpoints.create_manager(directory)
    start = time.perf_counter()
    abstract = training.abstract_state(config, tx, replicated)
    abstract_s = time.perf_counter() - start
    start = time.perf_counter()
    state, meta = training.restore_state(manager, step, abstract)
    key = jax.device_put(jax.random.wrap_key_data(np.asarray(meta["base_key"], np.uint32)),
                         replicated)
    jax.block_until_ready((state, key))
    seconds = time.perf_counter() - start
    manager.close()
    if int(state.step) != step:
        raise RuntimeError(f"restored step {int(state.step)}, expected {step}")
    return abstract_s, seconds


def measure(config, repeats: int, parent: str | None, fill: str) -> list[dict]:
    """One row of figures per repeat: saves step i + 1 and restores it."""
    replicated = NamedSharding(api.create_mesh(), P())
    state, tx, graphdef = train_state(config, replicated, fill)
    base_key = jax.device_put(jax.random.key(config.seed), replicated)
    rows = []
    with tempfile.TemporaryDirectory(dir=parent, prefix="ddpm_ckpt_bench_") as tmp:
        directory = os.path.join(tmp, checkpoints.CHECKPOINT_SUBDIR)
        manager = checkpoints.create_manager(directory, async_save=True)
        for i in range(repeats):
            step = i + 1
            state = state.replace(step=jax.device_put(jnp.int32(step), replicated))
            blocked, commit = save_once(manager, state, config, base_key)
            size = directory_bytes(checkpoints.step_dir(manager, step))
            abstract, restore = restore_once(directory, step, config, graphdef, tx, replicated)
            rows.append(dict(blocked_s=blocked, commit_s=commit, bytes=size, restore_s=restore,
                             abstract_s=abstract))
        manager.close()
    return rows


def report(name: str, num_params: int, fill: str, rows: list[dict]) -> dict:
    """Prints the table and returns the JSON record (medians plus every repeat)."""
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"Checkpoint (params + EMA + Adam, async save): config {name}, {num_params:,} "
          f"parameters, --fill={fill}, {jax.devices()[0].platform} x{jax.device_count()}")
    print(f"  {'':<8} {'blocked s':>10} {'commit s':>10} {'MB':>10} {'MB/s':>10} "
          f"{'restore s':>10} {'abstract s':>10}")
    labelled = [(f"#{i + 1}", r) for i, r in enumerate(rows)] + [("median", median)]
    for label, r in labelled:
        mb = r["bytes"] / 1e6
        print(f"  {label:<8} {r['blocked_s']:>10.3f} {r['commit_s']:>10.3f} {mb:>10.1f} "
              f"{mb / r['commit_s']:>10.1f} {r['restore_s']:>10.3f} {r['abstract_s']:>10.3f}")
    print("  (restore reads files just written, from the page cache)")
    return dict(benchmark="checkpoint", config=name, params=num_params, fill=fill,
                platform=jax.devices()[0].platform, devices=jax.device_count(),
                repeats=len(rows), **median, runs=rows)


def main(argv: Sequence[str]) -> None:
    """Saves and restores --repeats checkpoints of --config; prints the table and a JSON line."""
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
    if _REPEATS.value < 1:
        raise app.UsageError(f"--repeats must be positive, got {_REPEATS.value}")
    name = os.path.splitext(os.path.basename(_CONFIG.value))[0]
    config = load_config(name)
    rows = measure(config, _REPEATS.value, _DIR.value, _FILL.value)
    num_params = unet.count_params(unet.abstract_model(config)[1])
    print(json.dumps(report(name, num_params, _FILL.value, rows)))


if __name__ == "__main__":
    app.run(main)
