"""Reference statistics files: ours (with provenance) and foreign ones (TTUR, pytorch-fid,
clean-fid).

Ours are ``.npz`` files with ``mu`` float64 ``[2048]``, ``sigma`` float64 ``[2048, 2048]``,
``n`` (images), ``mode`` (``tf1`` or ``pytorch_fid``) and ``weights_sha256`` (the Inception
weights' provenance, ``weights.weights_sha256``). Foreign files need only ``mu`` and ``sigma``;
their mode and weights are unknown (TTUR's and clean-fid's ``legacy_tensorflow`` files are the
``tf1`` kind, pytorch-fid's and clean-fid's ``legacy_pytorch`` the ``pytorch_fid`` kind).
Everything is read with ``allow_pickle=False``; paths may be local or ``gs://``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from etils import epath

from ddpm_jax import errors, files
from ddpm_jax.metrics import network
from ddpm_jax.metrics.errors import MetricsError


class ReferenceStats(NamedTuple):
    """Gaussian statistics of a feature set and what they were computed with.

    ``n``, ``mode`` and ``weights_sha256`` are None for foreign files that do not record them.
    """

    mu: np.ndarray  # float64 [d]
    sigma: np.ndarray  # float64 [d, d]
    n: int | None
    mode: str | None
    weights_sha256: str | None


def save_reference_stats(path: str, mu, sigma, n: int, *, mode: str,
                         weights_sha256: str) -> None:
    """Writes statistics with their provenance (uncompressed ``.npz``, no pickled objects)."""
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise MetricsError(f"mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_npz(target, mu=mu, sigma=sigma, n=np.int64(n), mode=np.str_(mode),
                    weights_sha256=np.str_(weights_sha256))  # never a half-written file


def _read_npz(path: str) -> dict[str, np.ndarray]:
    p = epath.Path(path)
    if not p.exists():
        raise MetricsError(f"no statistics file at {path}")
    try:
        with p.open("rb") as f, np.load(f, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise MetricsError(f"{path} holds a single array, not FID statistics (an .npz "
                                   "with mu and sigma)")
            return {k: data[k] for k in data.files}
    except MetricsError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or pickled file becomes one line
        reason = errors.first_line(e)
        raise MetricsError(f"cannot read {path} as an .npz of arrays ({reason})") from None


def load_reference_stats(path: str, *, dim: int = network.POOL3_DIM, mode: str | None = None,
                         weights_sha256: str | None = None) -> ReferenceStats:
    """Reads our statistics or a foreign file with ``mu`` and ``sigma``.

    Args:
      path: the ``.npz`` file (local or ``gs://``).
      dim: the feature dimension expected (2048 for pool3).
      mode, weights_sha256: if given and the file records its own, they must agree.

    Raises:
      MetricsError: unreadable, no ``mu``/``sigma``, another dimension, non-finite values, or
        another mode or weights than asked for.
    """
    data = _read_npz(path)
    if "mu" not in data or "sigma" not in data:
        raise MetricsError(f"{path} has no 'mu' and 'sigma' arrays (it has "
                           f"{', '.join(sorted(data)) or 'none'}): not FID statistics")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise MetricsError(f"{path} holds statistics of shape mu {mu.shape}, sigma "
                           f"{sigma.shape}; expected mu ({dim},), sigma ({dim}, {dim}) (pool3)")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise MetricsError(f"{path} holds NaN or infinite statistics")
    stats = ReferenceStats(mu, sigma, int(data["n"]) if "n" in data else None,
                           str(data["mode"]) if "mode" in data else None,
                           str(data["weights_sha256"]) if "weights_sha256" in data else None)
    if mode is not None and stats.mode is not None and stats.mode != mode:
        raise MetricsError(f"{path} was computed with --mode={stats.mode}, not {mode}: use "
                           f"--mode={stats.mode} or recompute the statistics")
    if weights_sha256 is not None and stats.weights_sha256 not in (None, weights_sha256):
        raise MetricsError(f"{path} was computed with other Inception weights (sha256 "
                           f"{stats.weights_sha256[:16]}..., these are {weights_sha256[:16]}...): "
                           "recompute the statistics with these weights")
    return stats


def cached_reference_stats(path: str, compute: Callable[[], tuple[np.ndarray, np.ndarray, int]],
                           *, mode: str, weights_sha256: str, dim: int = network.POOL3_DIM,
                           write: bool = True) -> ReferenceStats:
    """Our statistics at ``path``, computed once with ``compute() -> (mu, sigma, n)``.

    A file at ``path`` is used if it records the same mode and weights (and holds ``dim``
    features); one with other provenance is an error (delete it to recompute), never silently
    replaced. ``write=False`` computes a missing file's statistics without writing them (every
    process but the first of several).
    """
    if epath.Path(path).exists():
        stats = load_reference_stats(path, dim=dim, mode=mode, weights_sha256=weights_sha256)
        if stats.mode is not None and stats.weights_sha256 is not None:
            return stats
        raise MetricsError(f"{path} records no mode and weights: pass it as foreign statistics "
                           "(--ref_stats) or delete it to recompute")
    mu, sigma, n = compute()
    if write:
        save_reference_stats(path, mu, sigma, n, mode=mode, weights_sha256=weights_sha256)
    return ReferenceStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), int(n),
                          mode, weights_sha256)
