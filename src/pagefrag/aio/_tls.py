"""TLS (``ssl=``): the copying path. TLS encrypts into its own buffers, so sending the
caller's pages by reference would bring nothing; the loop's own TLS transport (asyncio's
or uvloop's ``create_connection`` / ``create_server`` with ``ssl=``) carries the
connection, and :class:`CopyingTransport` gives it the write API of a zero-copy transport.

Rule: every byte is copied inside :meth:`CopyingTransport.write`, before it returns, so
no reference to the caller's memory outlives the call; the write handle therefore fires
before ``write()`` returns (it promises "this buffer may be reused", and it may). Nothing
here is zero-copy and nothing is pinned.

A connection that starts in the clear and upgrades (``writer.start_tls()``) keeps its
:class:`ZeroCopyTransport` underneath: :func:`start_tls` stacks asyncio's own pure-Python
``sslproto.SSLProtocol`` on it, the steps of ``loop.start_tls``, done here because
uvloop's ``start_tls`` takes only uvloop's own transports. The ciphertext is ``bytes``
and goes through the zero-copy transport like any other.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from asyncio import sslproto
from typing import TYPE_CHECKING, Any

from .._destructor import FragDestructor
from .._iov import Data, IoVec, Pin, check_destructor

if TYPE_CHECKING:
    from ._server import ZeroCopyServer
    from ._stream import ServerStreamProtocol

__all__ = ["CopyingTransport", "accept_tls", "start_tls"]


class CopyingTransport(asyncio.Transport):
    """The loop's TLS transport ``inner`` with the write API of :class:`ZeroCopyTransport`:
    ``write`` returns a write handle, ``wait_released()``, ``pinned_bytes`` (always 0).
    Everything else is the inner transport's."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self._inner = inner

    def write(  # type: ignore[override]
        self, data: Data, destructor: FragDestructor | None = None
    ) -> FragDestructor:
        """Copy ``data`` (what :meth:`ZeroCopyTransport.write` takes) and hand the copy to
        TLS; the returned handle has fired: the caller's memory is not referenced any
        more. Bad data or destructors raise as there, with nothing written. Kernel: none
        here (TLS sends the ciphertext).

        Refs: takes one on each piece's destructor and on ``destructor`` and drops them
        before it returns (so a frag whose destructor has fired is refused)."""
        iov = IoVec.of(data)
        check_destructor(destructor)
        hold = Pin(iov.views, iov.owners)
        try:  # all or nothing, as ZeroCopyTransport.write (DestructorError if one fired)
            hold.take(self, destructor)
            copy = b"".join(iov.views)  # the copy: TLS encrypts from here
        finally:
            hold.release(self)
        if copy:
            self._inner.write(copy)
        handle = FragDestructor(None, name="write")
        handle.unref()  # nothing of the caller's is held any more: it fires now
        return handle

    write_zerocopy = write
    """TLS copies whatever it is given: :meth:`write` (the buffer may be reused at once)."""

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    async def wait_released(self) -> None:
        """Every write has been copied: nothing to wait for."""

    @property
    def pinned_bytes(self) -> int:
        return 0

    # -- the inner transport's ---------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def __repr__(self) -> str:
        return f"<CopyingTransport {self._inner!r}>"


async def start_tls(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    sslcontext: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
) -> asyncio.Transport:
    """Upgrade ``transport`` to TLS and return the transport ``protocol`` uses from now
    on, as ``loop.start_tls`` (the same steps, on any loop). Kernel: none (TLS is done
    in user space; the transport sends the ciphertext). Refs: none."""
    if not isinstance(sslcontext, ssl.SSLContext):
        raise TypeError(
            f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
        )
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    tls = sslproto.SSLProtocol(
        loop,
        protocol,
        sslcontext,
        waiter,
        server_side,
        server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]  # (a float)
        ssl_shutdown_timeout=ssl_shutdown_timeout,
        call_connection_made=False,
    )
    # Paused first, so that no data reaches the TLS protocol before connection_made.
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    app: asyncio.Transport = tls._app_transport  # what loop.start_tls returns, too
    return app


def accept_tls(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    server: ZeroCopyServer,
    ssl: Any,
    ssl_handshake_timeout: float | None,
    ssl_shutdown_timeout: float | None,
    protocol: ServerStreamProtocol,
) -> None:
    """An accepted connection over TLS: the loop's own TLS transport takes it
    (``loop.connect_accepted_socket``: the handshake, then ``connection_made``)."""

    async def handshake() -> None:
        try:
            await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=ssl,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        except OSError:  # ssl.SSLError, TimeoutError too
            # A failed handshake (the loop has closed the socket): as asyncio's servers,
            # nothing for the application to hear of.
            conn.close()
            protocol.forget()
        except BaseException:
            conn.close()
            protocol.forget()
            raise

    task = loop.create_task(handshake())
    server._handshakes.add(task)
    task.add_done_callback(server._handshakes.discard)
