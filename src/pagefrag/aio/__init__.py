"""asyncio zero-copy streams and transports with awaitable release.

Works on the default (selector) event loop, on any loop with ``add_reader``, and
on uvloop: the loop only ever watches one private epoll descriptor per connection."""

from .streams import (
    ZeroCopyServer,
    ZeroCopyStreamWriter,
    create_connection,
    open_connection,
    start_server,
)
from .transport import DEFAULT_HIGH_WATER, ZeroCopyTransport

__all__ = [
    "DEFAULT_HIGH_WATER",
    "ZeroCopyServer",
    "ZeroCopyStreamWriter",
    "ZeroCopyTransport",
    "create_connection",
    "open_connection",
    "start_server",
]
