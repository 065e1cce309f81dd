"""The one timing helper of the benchmark modules."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], num_runs: int, warmup: int = 0) -> float:
    """Median wall time of ``num_runs`` calls of ``fn()`` after ``warmup`` untimed calls;
    ``fn`` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(num_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
