"""asyncio zero-copy streams and transports with awaitable release.

Works on the default (selector) event loop, on any loop with ``add_reader``, and
on uvloop: the loop only ever watches one epoll descriptor, shared by all the zero-copy
connections of that loop; a connection costs its socket alone. With ``backend="uring"``
the writes are io_uring ``SEND_ZC`` requests and the loop watches one ring per loop too
(:class:`UringTransport`)."""

from ._uring_transport import UringTransport
from .streams import (
    ZeroCopyServer,
    ZeroCopyStreamWriter,
    create_connection,
    create_server,
    open_connection,
    start_server,
)
from .transport import (
    DEFAULT_ENOBUFS_TIMEOUT,
    DEFAULT_HIGH_WATER,
    DEFAULT_LINGER,
    ZeroCopyTransport,
)

__all__ = [
    "DEFAULT_ENOBUFS_TIMEOUT",
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LINGER",
    "ZeroCopyServer",
    "ZeroCopyStreamWriter",
    "UringTransport",
    "ZeroCopyTransport",
    "create_connection",
    "create_server",
    "open_connection",
    "start_server",
]
