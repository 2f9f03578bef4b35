"""asyncio zero-copy streams and transports with awaitable release.

Works on the default (selector) event loop, on any loop with ``add_reader``, and
on uvloop: the loop only ever watches one epoll descriptor, shared by all the zero-copy
connections of that loop; a connection costs its socket alone."""

from .streams import (
    ZeroCopyServer,
    ZeroCopyStreamWriter,
    create_connection,
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
    "ZeroCopyTransport",
    "create_connection",
    "open_connection",
    "start_server",
]
