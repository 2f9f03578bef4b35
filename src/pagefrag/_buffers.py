"""Arguments at the API boundary: the one place that checks a page is a C-contiguous
buffer, that an offset, size or count is an integer, and that a timeout is a number."""

from __future__ import annotations

import math
import numbers
import operator

from .errors import NotABufferError, NotContiguousError

__all__ = ["as_index", "as_timeout", "byte_view"]


def byte_view(obj: object) -> memoryview:
    """A 1-D unsigned-byte memoryview of ``obj`` without copying; raises
    :class:`NotABufferError` (a ``TypeError``) for non-buffers and
    :class:`NotContiguousError` for non-C-contiguous buffers."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise NotABufferError(
            f"a bytes-like object is required, not {type(obj).__name__!r}"
        ) from None
    if not view.c_contiguous:
        raise NotContiguousError("a page must be a C-contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def as_index(value: object, what: str) -> int:
    """``value`` as an ``int``: an int, or an integer type with ``__index__`` (NumPy
    integers). ``TypeError`` for anything else, ``bool`` included (``True`` is no size).
    Callers test ``type(x) is int`` first and call this only when it fails."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


def as_timeout(value: object, what: str = "timeout") -> float | None:
    """``None`` (wait for ever; so is ``inf``) or a number of seconds ``>= 0``, as
    ``socket.settimeout`` takes: ``TypeError`` for a non-number (or a bool),
    ``ValueError`` for a negative or NaN."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds or None, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, not {value!r}")
    return None if math.isinf(seconds) else seconds  # threading refuses inf
