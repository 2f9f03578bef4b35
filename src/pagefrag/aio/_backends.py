"""Which kernel bridge a connection's zero-copy writes take: ``backend="msg_zerocopy"``
(``sendmsg(MSG_ZEROCOPY)``, completions on the socket's error queue:
:class:`ZeroCopyTransport`), ``"uring"`` (io_uring ``SEND_ZC`` requests on the loop's
ring: :class:`~._uring_transport.UringTransport`) or ``"auto"`` (``"uring"`` where
:func:`pagefrag.uring.available`, else ``"msg_zerocopy"``).

Rule: decided once per call of ``open_connection``/``create_connection``/
``start_server``, before any socket is made; nothing here touches a socket."""

from __future__ import annotations

from ..errors import ZeroCopyUnsupportedError
from .transport import ZeroCopyTransport

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "transport_class"]

BACKENDS = ("msg_zerocopy", "uring", "auto")
DEFAULT_BACKEND = "msg_zerocopy"


def transport_class(backend: str) -> type[ZeroCopyTransport]:
    """The transport class of ``backend``. ``TypeError``/``ValueError`` for what is not
    one of :data:`BACKENDS`; :class:`ZeroCopyUnsupportedError` (saying why) for
    ``"uring"`` where io_uring zero-copy sends cannot run. Kernel: ``io_uring_setup``
    (probed once, by :func:`pagefrag.uring.unsupported_reason`). Refs: none."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, not {type(backend).__name__}")
    if backend == "msg_zerocopy":
        return ZeroCopyTransport
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {backend!r}"
        )
    from ..uring import unsupported_reason

    why = unsupported_reason()
    if why is not None:
        if backend == "auto":
            return ZeroCopyTransport
        raise ZeroCopyUnsupportedError(why)
    from ._uring_transport import UringTransport

    return UringTransport
