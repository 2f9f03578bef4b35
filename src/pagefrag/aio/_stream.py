"""The stream objects over a zero-copy transport: :class:`ZeroCopyStreamWriter` (asyncio's
``StreamWriter`` whose writes return handles) and the protocol of a server's
connections, asyncio's ``StreamReaderProtocol`` making such writers and handling the
client-connected callback as asyncio does.

Rule: nothing here takes a reference; the writer hands each write to its transport
(:class:`ZeroCopyTransport`, or :class:`CopyingTransport` under TLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from .._destructor import FragDestructor
from .._iov import Data
from ._tls import CopyingTransport, start_tls
from .transport import ZeroCopyTransport

if TYPE_CHECKING:
    from ._server import ZeroCopyServer

__all__ = ["ClientConnected", "ServerStreamProtocol", "ZeroCopyStreamWriter"]

ClientConnected = Callable[[asyncio.StreamReader, "ZeroCopyStreamWriter"], Awaitable[None] | None]


class ZeroCopyStreamWriter(asyncio.StreamWriter):
    """``asyncio.StreamWriter`` with per-write release notification.

    ``write`` returns a handle that is awaitable and completes when the kernel has
    released every page of that write; ``drain()`` waits while unsent *plus pinned* bytes
    are above the high-water mark."""

    _transport: ZeroCopyTransport

    def write(  # type: ignore[override]
        self, data: Data, *, destructor: FragDestructor | None = None
    ) -> FragDestructor:
        """Write ``data``, as asyncio's: a plain mutable buffer may be reused once this
        returns (it is copied unless it goes at once, in a copying send); ``bytes``,
        frags, pool buffers, skbs, and everything written with ``destructor``, go
        zero-copy by reference. Returns the write handle (fired when the kernel released
        every page). Kernel: ``sendmsg``.

        Refs: see :meth:`ZeroCopyTransport.write`."""
        return self._transport.write(data, destructor)

    def write_zerocopy(
        self, data: Data, *, destructor: FragDestructor | None = None
    ) -> FragDestructor:
        """Write ``data`` zero-copy by reference, mutable buffers too: ``data`` must not
        change until the returned handle fires (the kernel released every page). Kernel:
        ``sendmsg(MSG_ZEROCOPY)``.

        Refs: see :meth:`ZeroCopyTransport.write`."""
        return self._transport.write_zerocopy(data, destructor)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self._transport.write(chunk)

    async def wait_released(self) -> None:
        """Wait until every write so far has been released by the kernel."""
        await self._transport.wait_released()

    @property
    def pinned_bytes(self) -> int:
        """Bytes the kernel has not released yet (zero-copy writes in flight)."""
        return self._transport.pinned_bytes

    def abort(self) -> None:
        """Disconnect at once (RST); every write's handle still fires exactly once."""
        self._transport.abort()

    async def start_tls(
        self,
        sslcontext: SSLContext,
        *,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade the connection to TLS, as ``asyncio.StreamWriter.start_tls``, on any
        loop. From then on writes take the copying path (:mod:`._tls`): each is copied
        and encrypted before ``write()`` returns, and its handle has fired by then.

        Refs: none; the ciphertext's are the zero-copy transport's (``bytes``)."""
        protocol: asyncio.StreamReaderProtocol = self._protocol  # type: ignore[attr-defined]
        await self.drain()
        tls = await start_tls(
            self._transport,
            protocol,
            sslcontext,
            server_side=isinstance(protocol, ServerStreamProtocol),
            server_hostname=server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
        )
        self._transport = CopyingTransport(tls)  # type: ignore[assignment]
        protocol._replace_writer(self)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        # It is asyncio's StreamWriter, and says so where warnings and logs name it
        # ("unclosed <StreamWriter ...>").
        return "<StreamWriter" + super().__repr__().removeprefix("<" + type(self).__name__)


class ServerStreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's ``StreamReaderProtocol`` for a server's connection, whose writer is a
    :class:`ZeroCopyStreamWriter`. The client-connected callback is handled as asyncio
    handles it (3.11's ``streams.py``, with 3.13's handling of a cancelled task): an
    exception, raised by the callback or by the task it returned, goes to the loop's
    exception handler ("Unhandled exception in client_connected_cb", with ``exception``
    and ``transport``) and the connection is closed at once. ``server``: told of the
    connection's loss (asyncio's ``Server._detach``)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        client_connected_cb: ClientConnected,
        loop: asyncio.AbstractEventLoop,
        server: ZeroCopyServer,
        tls: bool = False,
    ) -> None:
        super().__init__(reader, loop=loop)  # no cb: asyncio's would make a StreamWriter
        self._cb = client_connected_cb
        self._strong_reader = reader  # as asyncio: kept alive until the connection is made
        self._server: ZeroCopyServer | None = server
        self._tls = tls  # the writer writes through a CopyingTransport
        server._attach()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._reject_connection:  # type: ignore[attr-defined]
            return
        reader = self._stream_reader  # type: ignore[attr-defined]
        loop = self._loop  # type: ignore[attr-defined]
        writes_to = CopyingTransport(transport) if self._tls else transport  # type: ignore[arg-type]
        writer = ZeroCopyStreamWriter(writes_to, self, reader, loop)  # type: ignore[arg-type]
        self._stream_writer = writer
        self._strong_reader = None  # type: ignore[assignment]
        try:
            res = self._cb(reader, writer)
        except Exception as exc:
            self._unhandled(exc, writes_to)
            return
        if asyncio.iscoroutine(res):

            def done(task: asyncio.Task[Any]) -> None:
                if task.cancelled():
                    writes_to.close()
                    return
                exc = task.exception()
                if exc is not None:
                    self._unhandled(exc, writes_to)

            self._task = loop.create_task(res)
            self._task.add_done_callback(done)

    def _unhandled(self, exc: BaseException, transport: asyncio.BaseTransport) -> None:
        self._loop.call_exception_handler(  # type: ignore[attr-defined]
            {
                "message": "Unhandled exception in client_connected_cb",
                "exception": exc,
                "transport": transport,
            }
        )
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.forget()

    def forget(self) -> None:
        """The connection is gone (or was never made): the server counts it no more."""
        server, self._server = self._server, None
        if server is not None:
            server._detach()
