"""Several processes (hosts) as one program: start-up, and helpers that every process calls.

Every entry point (``train.py``, ``sample.py``, ``python -m ddpm_jax.evaluate``) calls
``initialize`` first. Where the processes come from, in order:

1. explicit values (the ``--coordinator_address``, ``--num_processes``, ``--process_id`` flags),
   else the variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
2. JAX's own detection, tried when the environment looks like a cluster job: Cloud TPU VMs
   (``libtpu`` installed), SLURM (``SLURM_JOB_ID`` with more than one task), Open MPI
   (``OMPI_COMM_WORLD_SIZE`` > 1) and Kubernetes indexed jobs (``JOB_COMPLETION_INDEX``);
3. otherwise one process, and nothing is initialised.

On CPU, collectives between processes use gloo, so several processes on one machine (each with
its own simulated devices) work; that is how the tests run. Joining is bounded by ``timeout``
seconds: a process other than 0 first waits for the coordinator's port to accept connections,
and a coordinator that never answers is a one-line ``DistributedError`` (exit code 2), not a
hang. Past that point JAX's own service takes over: processes that never join, or a process that
dies later, make the others stop (JAX aborts them with its own message) within ``timeout`` or
``min(timeout, 100)`` seconds (its heartbeat).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time

import jax
import numpy as np

from ddpm_jax import errors


class DistributedError(errors.UserError):
    """The processes could not be joined; the message says what to set."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _cluster_detected() -> bool:
    env = os.environ
    return (
        ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "JOB_COMPLETION_INDEX" in env
        or importlib.util.find_spec("libtpu") is not None
    )


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> None:
    """Joins the other processes of this run (see the module docstring); idempotent."""
    if jax.distributed.is_initialized():
        return
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = (address, count, index) != (None, None, None)
    if not explicit and not _cluster_detected():
        return
    if explicit and count == 1:
        return
    if explicit and None in (address, count, index) and not _cluster_detected():
        missing = [flag for flag, v in (("--coordinator_address", address),
                                        ("--num_processes", count), ("--process_id", index))
                   if v is None]
        raise DistributedError(
            f"several processes need all three of --coordinator_address, --num_processes and "
            f"--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); "
            f"missing {', '.join(missing)}")
    if index is not None and count is not None and not 0 <= index < count:
        raise DistributedError(f"--process_id={index} is not in [0, {count})")
    if address is not None and index not in (None, 0):
        _wait_for_coordinator(address, timeout)
    try:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=count, process_id=index,
            initialization_timeout=timeout, heartbeat_timeout_seconds=min(timeout, 100))
    except (RuntimeError, ValueError) as e:  # XlaRuntimeError derives from RuntimeError
        first = " ".join(str(e).split())[:300]
        raise DistributedError(
            f"could not join the other processes within {timeout} s (coordinator "
            f"{address or 'detected'}, process {index}, {count} processes): {first}; check "
            "that every process was started with the same coordinator address and count"
        ) from None
    _symmetric_compiles()


def _symmetric_compiles() -> None:
    """Turns JAX's persistent compilation cache off for several processes on CPU (one line).

    Only process 0 writes the cache, and the others' entries have other keys, so with a warm
    cache process 0 reads every program in a moment while the others compile it; gloo waits 30 s
    (not configurable) for a peer to join a collective, and a compile that takes longer than that
    (a train step on a small machine) aborts the run. Without the cache every process compiles,
    and they reach each collective together."""
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return
    if not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_enable_compilation_cache", False)
    if jax.process_index() == 0:
        print("warning: the persistent compilation cache is off for this run: with several "
              "processes on CPU, gloo cannot wait for peers that compile what process 0 reads "
              "from the cache", file=sys.stderr, flush=True)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Waits until process 0's coordinator accepts connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise DistributedError(f"--coordinator_address={address!r} is not host:port")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"the coordinator {address} did not answer within {timeout} s ({e}); start "
                    "process 0 with the same --coordinator_address, or raise "
                    "--distributed_timeout") from None
            time.sleep(0.5)


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` on every process (identity with one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)
