"""Buffers as flat byte views: the one place that checks a page is C-contiguous."""

from __future__ import annotations

from .errors import NotContiguousError

__all__ = ["byte_view"]


def byte_view(obj: object) -> memoryview:
    """A 1-D unsigned-byte memoryview of ``obj`` without copying; raises
    :class:`NotContiguousError` for non-buffers and non-C-contiguous buffers."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise NotContiguousError(f"a page must be a buffer, not {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise NotContiguousError("a page must be a C-contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view
