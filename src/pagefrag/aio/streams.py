"""asyncio streams and connection helpers over :class:`ZeroCopyTransport`, shaped like
``asyncio.open_connection``, ``asyncio.start_server`` and ``loop.create_connection`` of
CPython 3.11: the same arguments (``family``, ``flags``, ``local_addr``,
``happy_eyeballs_delay``, a list of hosts, ``start_serving``, ...; :mod:`._connect` makes
the sockets) plus pagefrag's own (``zerocopy``, ``min_zerocopy_size``, ``high_water``,
``linger``, ``enobufs_timeout``, ``backend``: :mod:`._backends`). ``ssl=`` takes the
copying path of :mod:`._tls`; the writer and the server's stream protocol are in
:mod:`._stream`, the server in :mod:`._server`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..zerocopy.policy import ZeroCopyPolicy
from ._backends import DEFAULT_BACKEND, transport_class
from ._connect import (
    check_ssl_socket,
    check_tls_options,
    listening_sockets,
    server_hostname_for,
    socket_for,
)
from ._server import ACCEPT_RETRY_DELAY, ZeroCopyServer
from ._stream import ClientConnected, ServerStreamProtocol, ZeroCopyStreamWriter
from ._tls import CopyingTransport, accept_tls
from .transport import DEFAULT_ENOBUFS_TIMEOUT, DEFAULT_LINGER, ZeroCopyTransport

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "ZeroCopyServer",
    "ZeroCopyStreamWriter",
    "create_connection",
    "create_server",
    "open_connection",
    "start_server",
]

P = TypeVar("P", bound=asyncio.BaseProtocol)
_STREAM_LIMIT = 2**16
_Settings = tuple[str, "int | None", "int | None", "float | None", float, type[ZeroCopyTransport]]
"""zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout, the transport class"""


def _settings(
    zerocopy: str,
    min_zerocopy_size: int | None,
    high_water: int | None,
    linger: float | None,
    enobufs_timeout: float,
    backend: str,
) -> _Settings:
    """pagefrag's keywords, checked before any socket is made (a server would otherwise
    only fail at its first accept); ``backend="uring"`` where io_uring cannot run raises
    :class:`ZeroCopyUnsupportedError` here."""
    # Raises for a bad mode or size, as the transport would.
    ZeroCopyPolicy(zerocopy, *([] if min_zerocopy_size is None else [min_zerocopy_size]))
    if high_water is not None and not high_water >= 0:
        raise ValueError(f"high_water must be >= 0, not {high_water!r}")
    if linger is not None and not linger >= 0:
        raise ValueError(f"linger must be >= 0 seconds or None, not {linger!r}")
    if not enobufs_timeout >= 0:
        raise ValueError(f"enobufs_timeout must be >= 0 seconds, not {enobufs_timeout!r}")
    cls = transport_class(backend)
    return zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout, cls


async def create_connection(
    protocol_factory: Callable[[], P],
    host: str | None = None,
    port: int | str | None = None,
    *,
    ssl: Any = None,
    family: int = 0,
    proto: int = 0,
    flags: int = 0,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    happy_eyeballs_delay: float | None = None,
    interleave: int | None = None,
    zerocopy: str = "auto",
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
    backend: str = DEFAULT_BACKEND,
) -> tuple[ZeroCopyTransport, P]:
    """Connect and return ``(transport, protocol)``, as ``loop.create_connection`` of
    asyncio 3.11, with its arguments; the transport is a :class:`ZeroCopyTransport`.
    ``linger``: seconds ``close()`` waits for the kernel's completions before reporting
    the loss (None: no bound); ``enobufs_timeout``: seconds of ENOBUFS without progress
    before the connection fails. ``backend``: ``"msg_zerocopy"`` (a
    :class:`ZeroCopyTransport`), ``"uring"`` (a :class:`UringTransport`: io_uring
    ``SEND_ZC`` requests on the loop's ring; :class:`ZeroCopyUnsupportedError` before
    connecting where io_uring cannot run) or ``"auto"`` (``"uring"`` where available).

    ``sock``: an already connected TCP socket, used as is instead of ``host``/``port``
    (as ``loop.create_connection(sock=...)``); the transport owns it from then on. A
    ``ValueError`` if ``host`` or ``port`` is given too, or ``family``, ``proto``,
    ``flags`` or ``local_addr``, or if it is not a connected ``SOCK_STREAM`` IPv4/IPv6
    socket; the socket is then left untouched and open.

    ``ssl``: the loop's own TLS transport carries the connection, wrapped in a
    :class:`~pagefrag.aio._tls.CopyingTransport` (``write`` copies; its handle fires at
    once); the protocol's ``connection_made`` is given the loop's TLS transport.
    Kernel: ``connect()`` (``bind()`` first with ``local_addr``).

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    settings = _settings(zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout, backend)
    server_hostname = server_hostname_for(ssl, host, server_hostname)
    check_tls_options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
    sock = await socket_for(
        host,
        port,
        sock,
        family=family,
        proto=proto,
        flags=flags,
        local_addr=local_addr,
        happy_eyeballs_delay=happy_eyeballs_delay,
        interleave=interleave,
    )
    loop = asyncio.get_running_loop()
    if ssl:
        try:
            tls, protocol = await loop.create_connection(
                protocol_factory,
                sock=sock,
                ssl=ssl,
                server_hostname=server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        except BaseException:
            sock.close()  # (the loop closes it too once its transport exists; twice is harmless)
            raise
        return CopyingTransport(tls), protocol  # type: ignore[return-value]
    try:
        protocol = protocol_factory()
    except BaseException:
        sock.close()
        raise
    transport = _transport(loop, sock, protocol, *settings)
    await _connection_made(transport)
    return transport, protocol


async def _connection_made(transport: asyncio.BaseTransport) -> None:
    """Return once the protocol's ``connection_made`` has run (the transport scheduled
    it first), as asyncio's ``create_connection`` does; cancelled meanwhile, the
    connection is closed, as asyncio's is, not left to the garbage collector."""
    try:
        await asyncio.sleep(0)
    except BaseException:
        transport.close()
        raise


def _transport(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol: asyncio.BaseProtocol,
    zerocopy: str,
    min_zerocopy_size: int | None,
    high_water: int | None,
    linger: float | None,
    enobufs_timeout: float,
    cls: type[ZeroCopyTransport],
) -> ZeroCopyTransport:
    """A new transport (of class ``cls``) of ``sock``; the socket is closed if that fails."""
    try:
        return cls(
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


async def open_connection(
    host: str | None = None,
    port: int | str | None = None,
    *,
    limit: int = _STREAM_LIMIT,
    ssl: Any = None,
    family: int = 0,
    proto: int = 0,
    flags: int = 0,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    happy_eyeballs_delay: float | None = None,
    interleave: int | None = None,
    zerocopy: str = "auto",
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
    backend: str = DEFAULT_BACKEND,
) -> tuple[asyncio.StreamReader, ZeroCopyStreamWriter]:
    """Connect and return ``(reader, writer)``, as ``asyncio.open_connection`` of
    asyncio 3.11, with the arguments of :func:`create_connection` (``ssl``: the copying
    path, see there). Kernel: ``connect()``.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(
        lambda: protocol,
        host,
        port,
        ssl=ssl,
        family=family,
        proto=proto,
        flags=flags,
        sock=sock,
        local_addr=local_addr,
        server_hostname=server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout,
        happy_eyeballs_delay=happy_eyeballs_delay,
        interleave=interleave,
        zerocopy=zerocopy,
        min_zerocopy_size=min_zerocopy_size,
        high_water=high_water,
        linger=linger,
        enobufs_timeout=enobufs_timeout,
        backend=backend,
    )
    return reader, ZeroCopyStreamWriter(transport, protocol, reader, loop)


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | Iterable[str] | None = None,
    port: int | str | None = None,
    *,
    limit: int = _STREAM_LIMIT,
    family: int = socket.AF_UNSPEC,
    flags: int = socket.AI_PASSIVE,
    sock: socket.socket | None = None,
    backlog: int = 100,
    ssl: Any = None,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    start_serving: bool = True,
    zerocopy: str = "auto",
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
    backend: str = DEFAULT_BACKEND,
) -> ZeroCopyServer:
    """Listen and call ``client_connected_cb(reader, writer)`` per connection (a
    coroutine function becomes a task), as ``asyncio.start_server`` of asyncio 3.11,
    with its arguments: ``host`` a string, a sequence of them or None (every interface:
    an IPv4 socket and an IPv6 one); ``sock`` a socket of yours, bound, used as is;
    ``start_serving=False``: bound, not yet listening, until ``start_serving()`` or
    ``serve_forever()``. Bad combinations raise asyncio's ValueError/TypeError before any
    socket is made. ``linger``, ``enobufs_timeout`` and ``backend`` as for
    :func:`create_connection` (``backend="uring"`` where io_uring cannot run raises
    :class:`ZeroCopyUnsupportedError` before any socket is bound).
    An exception of the callback is reported as asyncio reports it and closes that
    connection at once. Out of descriptors (EMFILE, ENFILE) or memory, the server stops
    accepting for ``ACCEPT_RETRY_DELAY`` seconds and reports it to the loop's exception
    handler; waiting connections stay queued.

    ``ssl`` (an ``SSLContext``): each accepted connection is handed to the loop's own
    TLS transport (``loop.connect_accepted_socket``) and its writer writes through a
    :class:`~pagefrag.aio._tls.CopyingTransport` (copies; its handles fire at once).
    Kernel: ``bind()``, ``listen()``, ``accept()``.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    settings = _settings(zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout, backend)
    if isinstance(ssl, bool):
        raise TypeError("ssl argument must be an SSLContext or None")
    check_tls_options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
    loop = asyncio.get_running_loop()
    sockets = await _server_sockets(host, port, sock, family, flags, reuse_address, reuse_port)

    def on_accept(conn: socket.socket, server: ZeroCopyServer) -> None:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        if ssl is not None:
            accept_tls(
                loop,
                conn,
                server,
                ssl,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
                ServerStreamProtocol(reader, client_connected_cb, loop, server, True),
            )
            return
        protocol = ServerStreamProtocol(reader, client_connected_cb, loop, server)
        try:
            _transport(loop, conn, protocol, *settings)
        except BaseException:
            protocol.forget()
            raise

    return await _serve(loop, sockets, on_accept, backlog, start_serving)


async def _server_sockets(
    host: str | Iterable[str] | None,
    port: int | str | None,
    sock: socket.socket | None,
    family: int,
    flags: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
) -> list[socket.socket]:
    """The bound (not yet listening) sockets of a server, as ``loop.create_server``
    checks and makes them: from ``host``/``port``, or ``sock`` as given."""
    if sock is not None:
        check_ssl_socket(sock)
    if host is not None or port is not None:
        if sock is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        return await listening_sockets(
            host,
            port,
            family=family,
            flags=flags,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )
    if sock is None:
        raise ValueError("Neither host/port nor sock were specified")
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"A Stream Socket was expected, got {sock!r}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"a TCP (IPv4 or IPv6) socket was expected, got {sock!r}")
    sock.setblocking(False)
    return [sock]


async def _serve(
    loop: asyncio.AbstractEventLoop,
    sockets: list[socket.socket],
    on_accept: Callable[[socket.socket, ZeroCopyServer], None],
    backlog: int,
    start_serving: bool,
) -> ZeroCopyServer:
    server = ZeroCopyServer(loop, sockets, on_accept, backlog)
    if start_serving:
        try:
            await server.start_serving()
        except BaseException:
            server.close()
            raise
    return server


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | Iterable[str] | None = None,
    port: int | str | None = None,
    *,
    family: int = socket.AF_UNSPEC,
    flags: int = socket.AI_PASSIVE,
    sock: socket.socket | None = None,
    backlog: int = 100,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    start_serving: bool = True,
    zerocopy: str = "auto",
    min_zerocopy_size: int | None = None,
    high_water: int | None = None,
    linger: float | None = DEFAULT_LINGER,
    enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
    backend: str = DEFAULT_BACKEND,
) -> ZeroCopyServer:
    """Listen and give each accepted connection a protocol from ``protocol_factory`` and
    a zero-copy transport, as ``loop.create_server`` of asyncio 3.11 (without ``ssl``:
    :func:`start_server` has the copying TLS path), with the arguments of
    :func:`start_server`. A ``BufferedProtocol`` is read into its own buffers
    (``recv_into``). The server counts each connection until its ``connection_lost``
    (``wait_closed()``). Kernel: ``bind()``, ``listen()``, ``accept()``.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    settings = _settings(zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout, backend)
    loop = asyncio.get_running_loop()
    sockets = await _server_sockets(host, port, sock, family, flags, reuse_address, reuse_port)

    def on_accept(conn: socket.socket, server: ZeroCopyServer) -> None:
        try:
            protocol = protocol_factory()
        except BaseException:
            conn.close()
            raise
        transport = _transport(loop, conn, protocol, *settings)
        transport._server = server
        server._attach()

    return await _serve(loop, sockets, on_accept, backlog, start_serving)
