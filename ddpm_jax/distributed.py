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
hang. Before JAX's service starts, every process says hello to process 0 on the coordinator's
port (explicit addresses only), so a process that never joins is one line and exit code 2 on
every process, within ``timeout``. Past that point JAX's own service takes over: a process that
dies later makes the others stop (JAX aborts them with its own message) within
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
    if address is not None and count is not None and index is not None:
        # Everyone present before JAX's service starts: its client aborts process 0 (a C++
        # check failure) when a peer never registers, where this gives every process one line.
        if index == 0:
            _gather_peers(address, count, timeout)
        else:
            _join_process_0(address, index, count, timeout)
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


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise DistributedError(f"--coordinator_address={address!r} is not host:port")
    return host.strip("[]"), int(port)


def _connect(address: str, timeout: float) -> socket.socket:
    """A connection to process 0 at ``host:port``, retried for ``timeout`` seconds."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=2)
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"the coordinator {address} did not answer within {timeout} s ({e}); start "
                    "process 0 with the same --coordinator_address, or raise "
                    "--distributed_timeout") from None
            time.sleep(0.1)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Waits until process 0's coordinator accepts connections at ``host:port``."""
    _connect(address, timeout).close()


_HELLO = "ddpm_jax join"  # a joining process's line: "ddpm_jax join <process id> <count>"


def _readline(conn: socket.socket, limit: int = 256) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()


def _gather_peers(address: str, count: int, timeout: float) -> None:
    """Process 0: waits on the coordinator's port until processes 1 .. count - 1 have said
    hello, then frees the port (for JAX's service) and lets them go; a process that never
    comes is a one-line ``DistributedError`` here, and the others hear that process 0 gave up."""
    _, port = _host_port(address)
    deadline = time.monotonic() + timeout
    joined: dict[int, socket.socket] = {}
    dual = socket.has_dualstack_ipv6()
    try:
        server = socket.create_server(("", port), family=socket.AF_INET6 if dual else
                                      socket.AF_INET, dualstack_ipv6=dual)
    except OSError as e:
        raise DistributedError(f"process 0 could not listen on {address} ({e}); choose a free "
                               "port for --coordinator_address") from None
    try:
        with server:
            server.settimeout(0.2)
            while len(joined) < count - 1:
                if time.monotonic() > deadline:
                    missing = ", ".join(map(str, sorted(set(range(1, count)) - set(joined))))
                    raise DistributedError(
                        f"process(es) {missing} of {count} did not join within {timeout:g} s "
                        f"(coordinator {address}); start every process with the same "
                        "--coordinator_address and --num_processes, or raise "
                        "--distributed_timeout")
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.settimeout(2)
                try:
                    words = _readline(conn).split()
                except OSError:
                    words = []
                if len(words) == 4 and " ".join(words[:2]) == _HELLO and words[3] != str(count):
                    conn.sendall(f"count {count}\n".encode())  # the joiner names the mismatch
                index = int(words[2]) if len(words) == 4 and words[2].isdigit() else 0
                if " ".join(words) != f"{_HELLO} {index} {count}" or not 0 < index < count \
                        or index in joined:
                    conn.close()
                    continue
                joined[index] = conn
        for conn in joined.values():  # the port is free now
            try:
                conn.sendall(b"go\n")
            except OSError:  # gone since: JAX's service reports it
                pass
        for conn in joined.values():  # they close first: the port keeps no TIME_WAIT
            try:
                conn.settimeout(5)
                conn.recv(1)
            except OSError:
                pass
    finally:
        for conn in joined.values():
            conn.close()


def _join_process_0(address: str, index: int, count: int, timeout: float) -> None:
    """Processes other than 0: says hello to process 0 and waits until every process has."""
    with _connect(address, timeout) as conn:
        conn.sendall(f"{_HELLO} {index} {count}\n".encode())
        conn.settimeout(timeout + 5)
        try:
            reply = _readline(conn)
        except OSError:
            reply = ""
    if reply == "go":
        return
    if reply.startswith("count "):
        raise DistributedError(f"process 0 runs {reply.split()[1]} processes, this one was "
                               f"started with --num_processes={count}; start every process "
                               "with the same count")
    raise DistributedError(f"process 0 ({address}) gave up waiting for the other processes "
                           f"(its own error line names them); start every process with the same "
                           "--coordinator_address and --num_processes, or raise "
                           "--distributed_timeout")


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
