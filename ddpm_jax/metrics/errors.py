"""The one error class of ``ddpm_jax.metrics``."""

from __future__ import annotations

from ddpm_jax import errors


class MetricsError(errors.UserError, ValueError):
    """A weight file, statistics file or input the metrics cannot use; the message (one line)
    names the problem and the fix."""
