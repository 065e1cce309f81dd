"""The FID Inception's weights: pytorch-fid's tensors in a safetensors file, and their provenance.

The converted file (``python -m ddpm_jax.metrics.convert``) holds the 472 float32 tensors of
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` under their PyTorch names and in PyTorch
layout (conv ``[out, in, kh, kw]``, linear ``[out, in]``), bit for bit, with the SHA-256 of the
source ``.pth`` in the file's metadata. Only this module's loader maps them onto the Flax tree,
through the ``weights.layout`` engine: conv kernel = ``weight`` transposed to
``[kh, kw, in, out]``, BatchNorm ``scale, bias, mean, var`` = ``weight, bias, running_mean,
running_var``, dense kernel = ``fc.weight`` transposed.

Provenance: ``weights_sha256(path)`` is the SHA-256 of the **source** ``.pth`` recorded at
conversion (not of the safetensors file, whose bytes depend on the safetensors version); the
official file's starts with ``6726825d``. Reference statistics store it, so statistics computed
with other weights are refused.

The file is found from an explicit path or, when none is given, the ``DDPM_JAX_INCEPTION_WEIGHTS``
environment variable. Nothing here unpickles: safetensors only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import numpy as np

from ddpm_jax import errors, files
from ddpm_jax.metrics import network
from ddpm_jax.metrics.errors import MetricsError
from ddpm_jax.weights import layout

ENV_VAR = "DDPM_JAX_INCEPTION_WEIGHTS"
OFFICIAL_SHA256_PREFIX = "6726825d"
SOURCE_FILE = "pt_inception-2015-12-05-6726825d.pth"
SOURCE_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
              + SOURCE_FILE)
NUM_TENSORS = 472
METADATA_SHA256 = "source_sha256"
METADATA_FORMAT = "format"
FORMAT = "ddpm_jax.metrics/pytorch-fid-inception-v3"

# Our layers, by their last scope name -> {our leaf: (PyTorch leaf, layout)}.
_LAYERS = {"conv": layout.CONV, "bn": layout.BATCH_NORM, "fc": layout.LINEAR}
_NOT_THE_INCEPTION = "it is not pytorch-fid's FID Inception"


def how_to_get(path: str) -> str:
    """The commands that make the converted file ``path`` (for error messages)."""
    return (f"convert pytorch-fid's {SOURCE_FILE} with `python -m ddpm_jax.metrics.convert "
            f"--source=PTH --out={path}`, or download and convert it with `python -m "
            f"ddpm_jax.metrics.convert --download --out={path}`")


def resolve_path(weights: str | None) -> str:
    """The converted weight file: ``weights`` if given, else ``$DDPM_JAX_INCEPTION_WEIGHTS``.

    Raises:
      MetricsError: neither is set, or no file is there.
    """
    path = weights or os.environ.get(ENV_VAR)
    if not path:
        raise MetricsError(f"no Inception weights given: pass weights=FILE (--inception_weights) "
                           f"or set {ENV_VAR}=FILE; to make FILE, {how_to_get('FILE')}")
    if not os.path.isfile(path):
        raise MetricsError(f"no Inception weights at {path}: {how_to_get(path)}")
    if path.endswith((".pth", ".pt", ".bin")):
        out = os.path.splitext(path)[0] + ".safetensors"
        raise MetricsError(f"{path} is a PyTorch file, which is never unpickled here: convert it "
                           f"once with `python -m ddpm_jax.metrics.convert --source={path} "
                           f"--out={out}` and pass {out}")
    return path


def _layer(scope: str) -> tuple[tuple[str, ...], dict]:
    """Our layer (``Mixed_5b/branch1x1/bn``) -> ((its PyTorch module name,), its table)."""
    return (scope.replace("/", "."),), _LAYERS[scope.rsplit("/", 1)[-1]]


@functools.lru_cache(maxsize=1)
def _plan() -> tuple[dict, dict]:
    """(our leaf path -> (PyTorch name, layout), our abstract parameter tree)."""
    _, abstract = network.abstract_model()
    return layout.plan(abstract, _layer), abstract


@functools.lru_cache(maxsize=1)
def expected_tensors() -> dict[str, tuple[int, ...]]:
    """The 472 PyTorch tensor names of the weight file and their PyTorch shapes, in the
    order of our parameter tree (``num_batches_tracked`` counters excluded)."""
    out = layout.source_shapes(*_plan())
    assert len(out) == NUM_TENSORS, len(out)
    return out


def _fit(tensors: Mapping[str, np.ndarray], what: str) -> layout.Fit:
    """The tensors accounted for against the plan; refused (one line) unless all 472 are
    there, float32 and of the right shape, and no other."""
    plan, abstract = _plan()
    fitted = layout.fit(plan, {n: tuple(np.shape(a)) for n, a in tensors.items()}, abstract)
    if fitted.missing:
        more = f" (and {len(fitted.missing) - 1} more)" if len(fitted.missing) > 1 else ""
        raise MetricsError(f"{what} lacks tensor {fitted.missing[0][0]}{more}: "
                           f"{_NOT_THE_INCEPTION}; convert {SOURCE_FILE}")
    if fitted.unused:
        raise MetricsError(f"{what} has unexpected tensor {fitted.unused[0]} "
                           f"({len(fitted.unused)} in all): {_NOT_THE_INCEPTION}")
    if fitted.wrong:
        name, have, want, _, _ = fitted.wrong[0]
        raise MetricsError(f"tensor {name} of {what} has shape {have}, expected {want}: "
                           f"{_NOT_THE_INCEPTION}")
    for name in expected_tensors():
        if np.asarray(tensors[name]).dtype != np.float32:
            raise MetricsError(f"tensor {name} of {what} is {np.asarray(tensors[name]).dtype}, "
                               "expected float32")
    return fitted


def check_tensors(tensors: Mapping[str, np.ndarray], what: str) -> None:
    """Refuses a tensor set that lacks, adds or misshapes any of the 472 (one line).

    Raises:
      MetricsError: naming the first offending tensor of ``what`` (a file name).
    """
    _fit(tensors, what)


def params_from_tensors(tensors: Mapping[str, np.ndarray], what: str = "the tensors") -> dict:
    """PyTorch-named, PyTorch-layout tensors -> the network's parameters (a pure dict of
    float32 numpy arrays, Flax layout). Checks names, shapes and dtypes first."""
    return layout.read(_fit(tensors, what), tensors.__getitem__, _plan()[1])


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a converted file (``source_sha256``, ``format``); one line if unreadable."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file becomes one line
        raise MetricsError(f"{path} is not a safetensors file ({type(e).__name__}: "
                           f"{errors.first_line(e)}); "
                           f"{how_to_get(path)}") from None


def weights_sha256(path: str) -> str:
    """The SHA-256 of the ``.pth`` that ``path`` was converted from (its provenance)."""
    sha = read_metadata(path).get(METADATA_SHA256)
    if not sha:
        raise MetricsError(f"{path} records no {METADATA_SHA256}: it was not written by "
                           f"ddpm_jax.metrics.convert; {how_to_get(path)}")
    return sha


def is_official(sha256: str) -> bool:
    """Whether a source hash is that of pytorch-fid's released file."""
    return sha256.startswith(OFFICIAL_SHA256_PREFIX)


def load_weights(path: str | None = None) -> dict:
    """Reads a converted weight file into the network's parameters (pure dict, numpy float32).

    Args:
      path: the ``.safetensors`` file; default ``$DDPM_JAX_INCEPTION_WEIGHTS``.

    Raises:
      MetricsError: no file, not a converted file, or a missing or misshapen tensor.
    """
    from safetensors.numpy import load_file  # noqa: PLC0415

    path = resolve_path(path)
    weights_sha256(path)  # also refuses foreign files before reading 96 MB
    return params_from_tensors(load_file(path), path)


def save_tensors(tensors: Mapping[str, np.ndarray], out: str, source_sha256: str) -> None:
    """Writes the 472 checked tensors (PyTorch names and layout) as safetensors with the
    source's SHA-256 in the metadata; written to a temporary name, then renamed."""
    check_tensors(tensors, "the source")
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in expected_tensors()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from safetensors.numpy import save  # noqa: PLC0415

    files.write_bytes(out, save(arrays, metadata={METADATA_SHA256: source_sha256,
                                                  METADATA_FORMAT: FORMAT}))
