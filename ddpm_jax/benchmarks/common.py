"""What every benchmark module needs, once: a config by name or path, XLA's FLOPs and memory of a
compiled program, one interleaved timer, the machine's load, and the accelerators' peaks.

A benchmark module is a thin command over the library's own functions: its flags are defined by
its ``define_flags()``, which only ``if __name__ == "__main__":`` calls before ``main`` (importing
it registers nothing), and it prints one JSON object per measurement to stdout (``emit``) with a
readable table to stderr. Every module's ``main`` runs in the test suite on ``configs/test.py``
(``tests/test_benchmarks.py``).

The timer (``interleaved``): after ``warmup`` untimed calls of every contender, the timed calls
run in turns (ours, theirs, ours, theirs, ...) so that a machine shared with other work slows
every contender alike; medians are reported, with the load average before and after and the
share of the machine's CPU time that other processes took meanwhile. Each contender must block
until its result is ready (``jax.block_until_ready``, ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from ddpm_jax import config_lib

# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------


def config_name(name: str) -> str:
    """``cifar10``, ``cifar10.py`` or ``configs/cifar10.py`` -> ``cifar10``."""
    return os.path.splitext(os.path.basename(name))[0]


def load_config(name: str, dtype: str | None = None):
    """The validated config of ``configs/<name>.py`` (``cifar10``, ``cifar10.py``,
    ``configs/cifar10.py``) or of any file that defines ``get_config()``; ``model.dtype``
    overridden when ``dtype`` is given."""
    if os.path.isfile(name) and not name.startswith("configs"):
        spec = importlib.util.spec_from_file_location(f"_bench_config_{config_name(name)}", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(f"configs.{config_name(name)}")
    config = module.get_config()
    if dtype is not None:
        config.model.dtype = dtype
    config_lib.validate(config)
    return config


# ---------------------------------------------------------------------------------------------
# What XLA says about a compiled program.
# ---------------------------------------------------------------------------------------------


def xla_flops(compiled) -> float:
    """Total FLOPs of a compiled computation (XLA's ``cost_analysis``: 2 per multiply-add, none
    for conv taps on SAME padding, plus elementwise work). A loop's body is counted once."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(a.get("flops", 0.0) for a in analysis or []))


def memory_stats(compiled) -> dict[str, int] | None:
    """Per-device bytes of XLA's buffer assignment for ``compiled`` (``memory_analysis``), and
    their peak: arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
               alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
               generated_code_bytes=m.generated_code_size_in_bytes)
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


def device_memory() -> dict[str, int] | None:
    """The first device's allocator figures (``peak_bytes_in_use``, ``bytes_limit``, ...) where
    the backend keeps them (GPU and TPU; None on CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(stats[k]) for k in keys if k in stats}


def compile_timed(lowered, options: dict | None = None) -> tuple[Any, float]:
    """(``lowered.compile(options)``, seconds it took)."""
    start = time.perf_counter()
    compiled = lowered.compile(options)
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Accelerators: one table of vendors' figures, as data.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s and memory (GiB) of one JAX device, and where the figures come from.

    ``match``: substrings that must all be in ``jax.Device.device_kind`` (``exclude``: none of
    them); ``family``: ``tpu`` or ``gpu``; tf32 / fp32 are None where the vendor publishes
    none (TPUs: float32 dots at JAX's default precision run as bf16 passes on the MXU).
    """

    name: str
    match: tuple[str, ...]
    family: str
    bf16: float
    tf32: float | None
    fp32: float | None
    memory_gib: float
    source: str
    exclude: tuple[str, ...] = ()
    exact: bool = False  # match[0] must equal the device kind (TPU names are prefixes)


# The first row that matches wins.
PEAKS: tuple[Peak, ...] = (
    Peak("TPU v3", ("TPU v3",), "tpu", 61.5, None, None, 16, "cloud.google.com/tpu/docs/v3: "
         "123 TFLOPS bf16 and 32 GiB per chip, 2 TensorCores per chip, each one JAX device",
         exact=True),
    Peak("TPU v4", ("TPU v4",), "tpu", 275, None, None, 32,
         "cloud.google.com/tpu/docs/v4 (megacore: one device per chip)", exact=True),
    Peak("TPU v5e", ("TPU v5 lite",), "tpu", 197, None, None, 16,
         "cloud.google.com/tpu/docs/v5e", exact=True),
    Peak("TPU v5e", ("TPU v5e",), "tpu", 197, None, None, 16,
         "cloud.google.com/tpu/docs/v5e", exact=True),
    Peak("TPU v5p", ("TPU v5",), "tpu", 459, None, None, 95, "cloud.google.com/tpu/docs/v5p",
         exact=True),
    Peak("TPU v5p", ("TPU v5p",), "tpu", 459, None, None, 95, "cloud.google.com/tpu/docs/v5p",
         exact=True),
    Peak("TPU v6e", ("TPU v6 lite",), "tpu", 918, None, None, 32,
         "cloud.google.com/tpu/docs/v6e (Trillium)", exact=True),
    Peak("TPU v6e", ("TPU v6e",), "tpu", 918, None, None, 32,
         "cloud.google.com/tpu/docs/v6e (Trillium)", exact=True),
    Peak("A100 80GB", ("A100", "80GB"), "gpu", 312, 156, 19.5, 80,
         "NVIDIA A100 datasheet (dense)"),
    Peak("A100 40GB", ("A100",), "gpu", 312, 156, 19.5, 40, "NVIDIA A100 datasheet (dense)"),
    Peak("H100 PCIe", ("H100", "PCIe"), "gpu", 756, 378, 51, 80,
         "NVIDIA H100 datasheet (sparsity figures / 2)"),
    Peak("H100", ("H100",), "gpu", 989.5, 494.5, 67, 80,
         "NVIDIA H100 SXM datasheet (sparsity figures / 2)", exclude=("NVL",)),
    Peak("H200", ("H200",), "gpu", 989.5, 494.5, 67, 141,
         "NVIDIA H200 SXM datasheet (sparsity figures / 2)", exclude=("NVL",)),
)


def device_peak(device_kind: str) -> Peak | None:
    """The table's row for a ``jax.Device.device_kind``, or None (CPUs, unknown kinds)."""
    for p in PEAKS:
        if p.exact:
            found = device_kind == p.match[0]
        else:
            found = all(m in device_kind for m in p.match) and not any(
                e in device_kind for e in p.exclude)
        if found:
            return p
    return None


def peak_tflops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s of one device for a model of ``dtype``, which peak) or None.

    TPUs: always bf16. GPUs: bf16 for a bfloat16 model; for float32, TF32 at JAX's default
    matmul precision, fp32 under ``jax_default_matmul_precision=highest``.
    """
    p = device_peak(device_kind)
    if p is None:
        return None
    if p.family == "tpu" or dtype != "float32":
        return p.bf16, "bf16"
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if precision in ("highest", "float32"):
        return p.fp32, "fp32"
    return p.tf32, "tf32"


def fits_on(peak_bytes: int) -> list[str]:
    """The table's accelerators whose memory per device holds ``peak_bytes``."""
    names = dict.fromkeys(p.name for p in PEAKS)
    memory = {p.name: p.memory_gib for p in PEAKS}
    return [n for n in names if peak_bytes <= memory[n] * 2**30]


def device_fields(dtype: str | None = None) -> dict[str, Any]:
    """The devices a record was measured on, and their peak for a model of ``dtype``."""
    dev = jax.devices()[0]
    out = dict(platform=dev.platform, device_kind=dev.device_kind, devices=jax.device_count(),
               jax=jax.__version__)
    if dtype is not None:
        peak = peak_tflops(dev.device_kind, dtype)
        out.update(peak_tflops_per_device=None if peak is None else peak[0],
                   peak_kind=None if peak is None else peak[1])
    return out


def mfu(tflops_per_s: float, record: Mapping[str, Any]) -> float | None:
    """Achieved / peak FLOP/s over all devices of ``record`` (``device_fields``), or None."""
    peak = record.get("peak_tflops_per_device")
    return None if not peak else tflops_per_s / (peak * record["devices"])


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclasses.dataclass
class Timing:
    """Seconds of every timed call per contender, and the machine's load meanwhile."""

    times: dict[str, list[float]]
    loadavg_before: float | None
    loadavg_after: float | None
    foreign_cpu_fraction: float | None  # share of all cores other processes used

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def load(self) -> dict[str, Any]:
        """The load fields of a JSON record."""
        return dict(loadavg_before=self.loadavg_before, loadavg_after=self.loadavg_after,
                    foreign_cpu_fraction=self.foreign_cpu_fraction)


def interleaved(runners: Mapping[str, Callable[[], object]], num_runs: int,
                warmup: int = 1) -> Timing:
    """Times ``runners`` in turns, ``num_runs`` calls each, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    load_before, busy0, own0, wall0 = _loadavg(), _cpu_busy_s(), _own_cpu_s(), time.time()
    for _ in range(num_runs):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    wall, busy1 = max(time.time() - wall0, 1e-9), _cpu_busy_s()
    foreign = None
    if busy0 is not None and busy1 is not None:
        foreign = max(0.0, (busy1 - busy0) - (_own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))
    return Timing(times, load_before, _loadavg(), foreign)


def median_seconds(fn: Callable[[], object], num_runs: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()``: ``interleaved`` with one contender."""
    return interleaved({"fn": fn}, num_runs, warmup).median("fn")


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def emit(record: Mapping[str, Any], file=None) -> None:
    """One measurement as one JSON line (stdout by default)."""
    print(json.dumps(record), file=file or sys.stdout, flush=True)


def positive(name: str, value: int) -> int:
    """``value`` if it is >= 1, else a ``UsageError`` naming the flag."""
    if value is None or value < 1:
        from absl import app  # noqa: PLC0415

        raise app.UsageError(f"--{name} must be a positive integer, got {value}")
    return value
