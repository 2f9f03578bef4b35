"""Deadlines: a timeout turned into the monotonic time it runs out, and back."""

from __future__ import annotations

import math
import time

__all__ = ["deadline_after", "remaining_until"]


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time at which ``timeout`` seconds run out (None: never)."""
    if timeout is None or math.isinf(timeout):
        return None
    return time.monotonic() + timeout


def remaining_until(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline; may be negative)."""
    return None if deadline is None else deadline - time.monotonic()
