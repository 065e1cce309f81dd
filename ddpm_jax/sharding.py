"""How arrays are laid out over the devices of all processes: the one module that decides it.

* The mesh is 1-D, axis ``data``, over every device of every process.
* Batches are split over ``data`` (``data_sharding``); parameters, optimizer state and the EMA
  are replicated (``train_state_shardings``: the single place where a later FSDP rule, sharding
  large kernels over an ``fsdp`` axis, would go).
* Each process reads exactly the rows of the global batch that its devices own
  (``process_rows``), whatever the order of the devices in the mesh, and ``make_global_batch``
  puts every row on the devices that own it.
* ``to_host`` brings a (possibly multi-process) array to every process as one numpy array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import errors

DATA = "data"


class ShardingError(errors.UserError, ValueError):
    """A batch that cannot be split over the devices; the message gives a size that can."""


def create_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: all devices of all processes).

    Axis type ``Auto``: the compiler propagates shardings from the inputs (batch on ``data``,
    parameters replicated), which is all data parallelism needs; ``Explicit`` axes (the default
    of ``jax.make_mesh`` since JAX 0.9) would make sharding part of every array's type.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def put(tree: Any, target: NamedSharding) -> Any:
    """Places a pytree that every process holds in full (host or device arrays) as ``target``
    says, across processes too (``jax.device_put`` only reaches this process's devices)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, target)
    return jax.jit(lambda t: t, out_shardings=target)(tree)


def train_state_shardings(mesh: jax.sharding.Mesh, state: Any) -> Any:
    """The sharding of every leaf of the train state (a pytree like ``state``): replicated."""
    return jax.tree.map(lambda _: replicated(mesh), state)


def check_batch(batch: int, num_devices: int, what: str = "training.batch_size") -> None:
    """Refuses a batch that does not split evenly over ``num_devices`` (of all processes)."""
    n = num_devices
    if batch < 1:
        raise ShardingError(f"{what} must be positive, got {batch}")
    if batch % n:
        fix = max(n, batch // n * n)
        flag = f"--config.{what}" if what.count(".") else f"--{what}"
        raise ShardingError(
            f"{what}={batch} is not divisible by the {n} devices ({jax.process_count()} "
            f"process(es)); use a multiple of {n}, e.g. {flag}={fix}")


def padded_size(batch: int, mesh: jax.sharding.Mesh) -> int:
    """The smallest multiple of the device count that holds ``batch`` rows."""
    return -(-batch // mesh.size) * mesh.size


def process_rows(mesh: jax.sharding.Mesh, global_batch: int) -> np.ndarray:
    """The sorted rows of a ``[global_batch, ...]`` batch that this process's devices own."""
    check_batch(global_batch, mesh.size)
    index_map = data_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = set()
    for (index,) in index_map.values():
        rows.update(range(*index.indices(global_batch)))
    return np.asarray(sorted(rows), np.int64)


def make_global_batch(local: np.ndarray, mesh: jax.sharding.Mesh, rows: np.ndarray,
                      global_batch: int) -> jax.Array:
    """One ``[global_batch, ...]`` array sharded over ``data`` from this process's rows.

    Args:
      local: this process's rows, in the order of ``rows``: ``[len(rows), ...]``.
      mesh: the device mesh.
      rows: the global row of each local row (``process_rows(mesh, global_batch)``).
      global_batch: rows of the global batch.
    """
    if local.shape[0] != len(rows):
        raise ValueError(f"{local.shape[0]} local rows for {len(rows)} row indices")
    position = {int(r): i for i, r in enumerate(rows)}

    def shard(index):
        start, stop, _ = index[0].indices(global_batch)
        return local[position[start]:position[start] + stop - start]

    return jax.make_array_from_callback((global_batch, *local.shape[1:]), data_sharding(mesh),
                                        shard)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
