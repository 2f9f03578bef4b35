"""asyncio streams and connection helpers over :class:`ZeroCopyTransport`, shaped like
``asyncio.open_connection``, ``asyncio.start_server`` and ``loop.create_connection``."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from .._destructor import FragDestructor
from .._iov import Data
from .transport import DEFAULT_ENOBUFS_TIMEOUT, DEFAULT_LINGER, ZeroCopyTransport

__all__ = [
    "ZeroCopyStreamWriter",
    "ZeroCopyServer",
    "create_connection",
    "open_connection",
    "start_server",
]

P = TypeVar("P", bound=asyncio.BaseProtocol)
ClientConnected = Callable[[asyncio.StreamReader, "ZeroCopyStreamWriter"], Awaitable[None] | None]
_STREAM_LIMIT = 2**16
ACCEPT_RETRY_DELAY = 1.0
"""Seconds the server stops accepting after running out of descriptors or memory (as
asyncio's ``constants.ACCEPT_RETRY_DELAY``)."""
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def _connected_socket(host: str, port: int, **kwargs: Any) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, **kwargs)
    error: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}:{port}")


def _given_socket(
    sock: socket.socket, host: str | None, port: int | None, kwargs: dict[str, Any]
) -> socket.socket:
    """Check a caller's socket (``sock=``) before anything changes: a refused socket is
    left as it was, open and in its blocking mode (as asyncio's ``create_connection``)."""
    if host is not None or port is not None:
        raise ValueError("host/port and sock can not be specified at the same time")
    if kwargs:
        raise ValueError(f"{', '.join(sorted(kwargs))}: address resolution options, not for sock")
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    # The transport needs TCP (MSG_ZEROCOPY, SO_ZEROCOPY): checked here, not after it
    # has made the socket non-blocking.
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"a connected TCP stream socket was expected, got {sock!r}")
    try:
        sock.getpeername()
    except OSError as exc:
        raise ValueError(f"a connected socket was expected ({exc.strerror}): {sock!r}") from None
    return sock


async def _socket_for(
    host: str | None, port: int | None, sock: socket.socket | None, kwargs: dict[str, Any]
) -> socket.socket:
    """``sock`` checked and used as is, or a new socket connected to ``host:port``."""
    if sock is not None:
        return _given_socket(sock, host, port, kwargs)
    if host is None or port is None:
        raise ValueError("host and port must both be given when no sock is")
    return await _connected_socket(host, port, **kwargs)


async def create_connection(
    protocol_factory: Callable[[], P],
    host: str | None = None,
    port: int | None = None,
    *,
    sock: socket.socket | None = None,
    zerocopy: str = "auto",
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
    **kwargs: Any,
) -> tuple[ZeroCopyTransport, P]:
    """Connect and return ``(transport, protocol)``, as ``loop.create_connection``; the
    transport is a :class:`ZeroCopyTransport`. ``linger``: seconds ``close()`` waits for
    the kernel's completions before reporting the loss (None: no bound);
    ``enobufs_timeout``: seconds of ENOBUFS without progress before the connection fails.

    ``sock``: an already connected TCP socket, used as is instead of ``host``/``port``
    (as ``loop.create_connection(sock=...)``); the transport owns it from then on. A
    ``ValueError`` if ``host`` or ``port`` is given too, or if it is not a connected
    ``SOCK_STREAM`` IPv4/IPv6 socket; the socket is then left untouched and open.
    Other keyword arguments go to ``getaddrinfo`` and are refused with ``sock``.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    sock = await _socket_for(host, port, sock, kwargs)
    try:
        protocol = protocol_factory()
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    settings = (zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout)
    return _transport(loop, sock, protocol, *settings), protocol


def _transport(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol: asyncio.BaseProtocol,
    zerocopy: str,
    min_zerocopy_size: int | None,
    high_water: int | None,
    linger: float | None,
    enobufs_timeout: float,
) -> ZeroCopyTransport:
    """A new transport of ``sock``; the socket is closed if that fails."""
    try:
        return ZeroCopyTransport(
            loop,
            sock,
            protocol,
            zerocopy=zerocopy,
            min_zerocopy_size=min_zerocopy_size,
            high_water=high_water,
            linger=linger,
            enobufs_timeout=enobufs_timeout,
        )
    except BaseException:
        sock.close()
        raise


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


def _stream_pair(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, limit: int, *settings: Any
) -> tuple[asyncio.StreamReader, ZeroCopyStreamWriter]:
    """A reader and a writer over a new transport of ``sock`` (see :func:`_transport`)."""
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = _transport(loop, sock, protocol, *settings)
    writer = ZeroCopyStreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def open_connection(
    host: str | None = None,
    port: int | None = None,
    *,
    sock: socket.socket | None = None,
    zerocopy: str = "auto",
    limit: int = _STREAM_LIMIT,
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, ZeroCopyStreamWriter]:
    """Connect and return ``(reader, writer)``, as ``asyncio.open_connection``.
    ``sock``, ``linger`` and ``enobufs_timeout`` as for :func:`create_connection`.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    loop = asyncio.get_running_loop()
    sock = await _socket_for(host, port, sock, kwargs)
    reader, writer = _stream_pair(
        loop, sock, limit, zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout
    )
    await asyncio.sleep(0)  # let connection_made run, as asyncio's does before returning
    return reader, writer


class ZeroCopyServer:
    """What :func:`start_server` returns: listening sockets accepting zero-copy streams."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        on_accept: Callable[[socket.socket], None],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._on_accept = on_accept
        self._closed = asyncio.Event()
        self._retries: dict[socket.socket, asyncio.TimerHandle] = {}
        for s in sockets:
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._accept, s)

    def _accept(self, listener: socket.socket) -> None:
        loop = self._loop
        for _ in range(64):  # bounded: other callbacks get their turn
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # The listener stays readable while the connection waits in the
                    # backlog: stop watching it and try again later (as asyncio does).
                    loop.call_exception_handler(
                        {
                            "message": "socket.accept() out of system resource",
                            "exception": exc,
                            "socket": listener,
                        }
                    )
                    loop.remove_reader(listener.fileno())
                    self._retries[listener] = loop.call_later(
                        ACCEPT_RETRY_DELAY, self._resume, listener
                    )
                else:
                    loop.call_exception_handler(
                        {"message": "socket.accept() failed", "exception": exc, "socket": listener}
                    )
                return
            try:
                self._on_accept(conn)  # closes or aborts the connection when it fails
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                loop.call_exception_handler(
                    {"message": "setting up an accepted connection failed", "exception": exc}
                )

    def _resume(self, listener: socket.socket) -> None:
        self._retries.pop(listener, None)
        if self.is_serving() and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        for timer in self._retries.values():
            timer.cancel()
        self._retries.clear()
        for s in self.sockets:
            if s.fileno() >= 0:
                self._loop.remove_reader(s.fileno())
                s.close()
        self._closed.set()

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> ZeroCopyServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    client_connected_cb: ClientConnected,
    host: str,
    port: int,
    *,
    zerocopy: str = "auto",
    limit: int = _STREAM_LIMIT,
    backlog: int = 128,
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
) -> ZeroCopyServer:
    """Listen and call ``client_connected_cb(reader, writer)`` per connection (a
    coroutine function becomes a task), as ``asyncio.start_server``. ``linger`` and
    ``enobufs_timeout`` as for :func:`create_connection`. Out of descriptors (EMFILE,
    ENFILE) or memory, the server stops accepting for ``ACCEPT_RETRY_DELAY`` seconds
    and reports it to the loop's exception handler; waiting connections stay queued."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets = []
    for family, _, _, _, addr in infos[:1]:
        sockets.append(socket.create_server(addr[:2], family=family, backlog=backlog))
    tasks: set[asyncio.Task[None]] = set()

    def on_accept(conn: socket.socket) -> None:
        reader, writer = _stream_pair(
            loop, conn, limit, zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout
        )
        try:
            result = client_connected_cb(reader, writer)
        except BaseException:
            writer.transport.abort()
            raise
        if asyncio.iscoroutine(result):
            task = loop.create_task(result)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return ZeroCopyServer(loop, sockets, on_accept)
