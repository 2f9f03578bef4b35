"""Which kernel bridge a connection's zero-copy writes take: ``backend="msg_zerocopy"``
(``sendmsg(MSG_ZEROCOPY)``, completions on the socket's error queue:
:class:`ZeroCopyTransport`), ``"uring"`` (io_uring ``SEND_ZC`` requests on the loop's
ring: :class:`~._uring_transport.UringTransport`) or ``"auto"`` (``"uring"`` where
:func:`pagefrag.uring.available`, else ``"msg_zerocopy"``).

Rule: decided once per call of ``open_connection``/``create_connection``/
``start_server``, before any socket is made; nothing here touches a socket."""

from __future__ import annotations

from ..zerocopy.backend import BACKENDS, choose_backend
from .transport import ZeroCopyTransport

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "transport_class"]

DEFAULT_BACKEND = "msg_zerocopy"


def transport_class(backend: str) -> type[ZeroCopyTransport]:
    """The transport class of ``backend`` (chosen by
    :func:`pagefrag.zerocopy.backend.choose_backend`: ``TypeError``/``ValueError`` for
    what is not one of :data:`BACKENDS`, :class:`ZeroCopyUnsupportedError` for
    ``"uring"`` where io_uring zero-copy sends cannot run). Refs: none."""
    if choose_backend(backend) == "msg_zerocopy":
        return ZeroCopyTransport
    from ._uring_transport import UringTransport

    return UringTransport
