"""Which kernel interface carries the zero-copy sends: ``MSG_ZEROCOPY`` (completions on
the socket's error queue) or io_uring (``IORING_OP_SEND_ZC``, a notification per
request). One place decides, for every layer that offers ``backend=``."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ..errors import ZeroCopyUnsupportedError
from .socket import ZeroCopySocket

if TYPE_CHECKING:
    from ..uring.socket import UringSocket

__all__ = ["BACKENDS", "choose_backend", "zerocopy_socket"]

BACKENDS = ("auto", "msg_zerocopy", "uring")


def choose_backend(backend: str) -> str:
    """``"msg_zerocopy"`` or ``"uring"``: ``"auto"`` takes io_uring where it works here
    (Linux 6.0+, not disabled, the compiled core built) and ``MSG_ZEROCOPY`` otherwise;
    ``"uring"`` where it cannot work raises :class:`ZeroCopyUnsupportedError` saying why.
    ``ValueError`` for any other name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "msg_zerocopy":
        return backend
    from ..uring import unsupported_reason

    why = unsupported_reason()
    if why is None:
        return "uring"
    if backend == "uring":
        raise ZeroCopyUnsupportedError(why)
    return "msg_zerocopy"


def zerocopy_socket(
    sock: socket.socket, *, backend: str = "auto", **options: Any
) -> ZeroCopySocket | UringSocket:
    """``sock`` wrapped for zero-copy sends by ``backend`` (see :func:`choose_backend`);
    ``options`` are the wrapper's (``zerocopy=``, ``min_zerocopy_size=``,
    ``close_timeout=``, ...; ``ring=`` only for io_uring). Both wrappers have the same
    surface: ``send``, ``sendall``, ``send_many``, ``flush``, ``close``, ``abort``,
    ``stats``, ``outstanding``, ``pinned_bytes``.

    Refs: none (the wrapper's sends take them)."""
    if choose_backend(backend) == "uring":
        from ..uring.socket import UringSocket

        return UringSocket(sock, **options)
    if "ring" in options:
        raise TypeError("ring= is an option of the io_uring backend only")
    return ZeroCopySocket(sock, **options)
