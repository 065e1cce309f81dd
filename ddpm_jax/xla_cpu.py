"""Per-jit XLA:CPU compiler options that make the U-Net's steps fast on CPU.

    train_step = jax.jit(train_step, compiler_options=xla_cpu.compiler_options("train"))
    sample_step = jax.jit(sample_step, compiler_options=xla_cpu.compiler_options("forward"))

jaxlib 0.10.2 hands three kinds of op to the YNNPACK library by default
(``xla_cpu_experimental_ynn_fusion_type`` = individual dots, individual convolutions and
reductions). Two of them are slow for this U-Net:

* YNNPACK convolutions, above all the gradient of a 3x3 conv with respect to its kernel, which
  YNNPACK computes from an im2col of the 32x32 output gradient (several times slower than XLA's
  own Eigen/oneDNN-sgemm convolution). Every U-Net conv takes that path by default, so a training
  step spends most of its time there.
* YNNPACK reductions make the GroupNorm statistics of the forward pass about 2x slower than XLA's
  own reduction emitter; but XLA's emitter is far slower at the column sums of the backward pass
  (the bias and GroupNorm-scale gradients, sums over batch and space).

So the options below keep YNNPACK for dots everywhere, for reductions only in graphs that
differentiate (``"train"``), and send every convolution to XLA's Eigen path. They change which
library computes each op, not the math: outputs and gradients agree with the default to float32
rounding (relative ~1e-6), and a compiled step stays bit-identical from run to run, so resuming
a run stays bit-exact. ``ddpm_jax.benchmarks.train`` and ``ddpm_jax.benchmarks.sampling``
measure both settings (``--xla_options=default,project``).

The options apply only where they were measured: on the CPU backend, and only when the user has
not chosen the fusion types already. If ``XLA_FLAGS`` sets
``--xla_cpu_experimental_ynn_fusion_type``, the user's choice wins and ``compiler_options``
returns None (per-jit options would otherwise override it). A jaxlib that does not accept the
option names gets None too (checked once per process with a tiny compile), so an upgrade can
lose the speed-up but never break a compile. ``compiler_options`` needs the full enum names,
comma-separated; the ``-x``/``+x`` short forms work only in ``XLA_FLAGS``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

FUSION_TYPE_OPTION = "xla_cpu_experimental_ynn_fusion_type"

# What YNNPACK keeps, per kind of step (every other op goes to XLA's own emitters and Eigen).
FUSION_TYPES = {
    # forward + backward: YNNPACK dots and reductions (the backward's column sums), Eigen convs.
    "train": ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE"),
    # forward only (sampling, evaluation): YNNPACK dots; XLA's reductions, Eigen convs.
    "forward": ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",),
}
KINDS = tuple(FUSION_TYPES)
# XLA's own choice in jaxlib 0.10.2 (what no option means), for comparisons: passing it
# explicitly compiles to the same program as passing nothing, and overrides a jit's options.
JAXLIB_DEFAULT_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                               "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                               "LIBRARY_FUSION_TYPE_REDUCE")


def user_sets_fusion_types(xla_flags: str | None = None) -> bool:
    """Whether ``XLA_FLAGS`` (or ``xla_flags``) already chooses the YNNPACK fusion types."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    return FUSION_TYPE_OPTION in flags


def project_options(kind: str) -> dict[str, str]:
    """The options of ``kind`` (``"train"`` or ``"forward"``), whatever the backend."""
    if kind not in FUSION_TYPES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {FUSION_TYPE_OPTION: ",".join(FUSION_TYPES[kind])}


def compiler_options(kind: str, *, platform: str | None = None) -> dict[str, str] | None:
    """The ``jax.jit(..., compiler_options=...)`` of a step of ``kind`` on ``platform``.

    Args:
      kind: ``"train"`` for a forward + backward step, ``"forward"`` for sampling and
        evaluation (no gradient).
      platform: the backend the step runs on; ``jax.default_backend()`` when None.

    Returns:
      A dict of XLA:CPU options, or None (XLA's defaults): on any backend but CPU, when
      ``XLA_FLAGS`` sets ``--xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins),
      or when this jaxlib does not accept the options.
    """
    options = project_options(kind)  # validates kind on every backend
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu" or user_sets_fusion_types():
        return None
    return options if _accepted(kind) else None


@functools.cache
def _accepted(kind: str) -> bool:
    """Whether this jaxlib compiles with the options of ``kind`` (a tiny probe, once)."""
    try:
        jax.jit(lambda x: x + 1, backend="cpu").lower(jnp.zeros((2,), jnp.float32)).compile(
            project_options(kind))
    except Exception:  # noqa: BLE001 - an unknown option or enum name: fall back to defaults
        return False
    return True


# Programs that run once (the parameter initialisation): XLA:CPU's LLVM back end at its lowest
# optimisation level compiles them about 2.7x faster (6.0 s -> 2.3 s for the digits U-Net's
# initial train state) and, for these integer-RNG and scaling programs, gives the same bits
# (tests/test_benchmarks.py checks the test config's state; the digits and CIFAR10 states were
# checked the same way).
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once_options(*, platform: str | None = None) -> dict | None:
    """``compiler_options`` for a program that runs once on CPU (None on other backends)."""
    platform = jax.default_backend() if platform is None else platform
    return dict(RUN_ONCE_OPTIONS) if platform == "cpu" else None
