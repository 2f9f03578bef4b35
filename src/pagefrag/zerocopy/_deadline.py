"""Deadlines: a timeout turned into the monotonic time it runs out, and back."""

from __future__ import annotations

import math
import threading
import time

__all__ = ["acquire_within", "deadline_after", "remaining_until"]


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time at which ``timeout`` seconds run out (None: never)."""
    if timeout is None or math.isinf(timeout):
        return None
    return time.monotonic() + timeout


def remaining_until(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline; may be negative)."""
    return None if deadline is None else deadline - time.monotonic()


def acquire_within(
    lock: threading.Lock | threading.RLock, deadline: float | None, held: list[bool]
) -> bool:
    """Acquire ``lock`` before ``deadline`` and record the outcome in ``held`` in the same
    C-level step (``list.extend(map(...))``): the caller's ``finally`` (``if held and
    held[0]: lock.release()``) then releases it even when an interrupt lands right after
    the acquisition. Returns whether it was acquired."""
    wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
    held.extend(map(lock.acquire, (True,), (wait,)))
    return held[0]
