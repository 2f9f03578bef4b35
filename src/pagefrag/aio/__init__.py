"""asyncio zero-copy streams and transports with awaitable release.

Works on the default (selector) event loop and on any loop implementing ``add_reader``
and ``add_writer`` for arbitrary descriptors; see docs/asyncio.md for uvloop."""

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
