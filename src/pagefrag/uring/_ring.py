"""Where rings come from: whether io_uring zero-copy works here, the process's default
ring, and what a forked child may do with its parent's rings (nothing).

Kernel counterpart: ``io_uring_setup(2)`` and its refusals — ``ENOSYS`` (no io_uring, or
a seccomp filter), ``EPERM`` (``kernel.io_uring_disabled``), ``EOPNOTSUPP`` here for a
kernel without ``IORING_OP_SEND_ZC`` (Linux < 6.0)."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .._destructor import implementation
from ..errors import ZeroCopyUnsupportedError

__all__ = ["API", "Ring", "default_ring", "new_ring", "unsupported_reason"]

API = 1
"""The version of ``pagefrag._uring`` this source expects."""

DEFAULT_ENTRIES = 256
DEFAULT_CQ_ENTRIES = 4096  # a notification per request: room for many in flight

_why_not: str | None = None
if TYPE_CHECKING:
    Ring = Any
else:
    Ring = None
    if implementation != "compiled":
        _why_not = (
            "the io_uring backend needs the compiled core (pagefrag._uring), and the "
            "pure-Python core is in use"
        )
    else:
        try:
            from .. import _uring
        except ImportError as exc:
            _why_not = f"the compiled io_uring ring (pagefrag._uring) is not built: {exc}"
        else:
            if getattr(_uring, "API", None) != API:
                _why_not = "pagefrag._uring was built from other sources (pip install -e .)"
            else:
                Ring = _uring.Ring

_lock = threading.Lock()
_default: Any = None
_checked: str | bool | None = False  # False: not probed yet
_rings: weakref.WeakSet[Any] = weakref.WeakSet()


def _setup_error(exc: OSError) -> str:
    import errno

    if exc.errno == errno.EPERM:
        return f"io_uring is disabled (kernel.io_uring_disabled or a seccomp filter): {exc}"
    if exc.errno == errno.ENOSYS:
        return f"this kernel has no io_uring (or a seccomp filter hides it): {exc}"
    return f"io_uring zero-copy sends are not available: {exc}"


def new_ring(entries: int = DEFAULT_ENTRIES, cq_entries: int = DEFAULT_CQ_ENTRIES) -> Any:
    """A fresh ring (``entries`` submission slots, ``cq_entries`` completion slots).
    :class:`ZeroCopyUnsupportedError` where io_uring zero-copy cannot run here.
    Kernel: ``io_uring_setup``."""
    if Ring is None:
        raise ZeroCopyUnsupportedError(_why_not)
    try:
        ring = Ring(entries, cq_entries)
    except OSError as exc:
        raise ZeroCopyUnsupportedError(exc.errno, _setup_error(exc)) from exc
    _rings.add(ring)
    return ring


def unsupported_reason(refresh: bool = False) -> str | None:
    """None if io_uring zero-copy sends work in this process, else why not (probed once
    by making a small ring; ``refresh`` probes again)."""
    global _checked
    with _lock:
        if _checked is False or refresh:
            try:
                new_ring(2, 4).close()
            except ZeroCopyUnsupportedError as exc:
                _checked = str(exc)
            else:
                _checked = None
        return _checked if isinstance(_checked, str) else None


def default_ring() -> Any:
    """The process's shared ring, made on first use (a forked child makes its own).
    Every :class:`~pagefrag.uring.UringSocket` without a ``ring=`` uses it."""
    global _default
    with _lock:
        if _default is None:
            _default = new_ring()
        return _default


def _after_fork_in_child() -> None:
    global _default, _checked, _lock
    _lock = threading.Lock()  # a parent thread may have held it
    _default = None
    for ring in list(_rings):
        ring.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
