"""The CPU benchmarks' one timer: the best of ``repeats`` wall-clock runs."""

from __future__ import annotations

import time


def timed(fn, repeats: int):
    """``(best seconds, fn's last result)`` over ``repeats`` calls of ``fn()``."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
