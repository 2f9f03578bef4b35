"""asyncio streams and connection helpers over :class:`ZeroCopyTransport`, shaped like
``asyncio.open_connection``, ``asyncio.start_server`` and ``loop.create_connection`` of
CPython 3.11: the same arguments (``family``, ``flags``, ``local_addr``,
``happy_eyeballs_delay``, a list of hosts, ``start_serving``, ...; :mod:`._connect` makes
the sockets) plus pagefrag's own (``zerocopy``, ``min_zerocopy_size``, ``high_water``,
``linger``, ``enobufs_timeout``). ``ssl=`` takes the copying path of :mod:`._tls`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable
from ssl import SSLContext
from typing import Any, TypeVar

from .._destructor import FragDestructor
from .._iov import Data
from ..zerocopy.policy import ZeroCopyPolicy
from ._connect import check_ssl_socket, connected_socket, listening_sockets
from ._server import ACCEPT_RETRY_DELAY, ZeroCopyServer
from ._tls import CopyingTransport, start_tls
from .transport import DEFAULT_ENOBUFS_TIMEOUT, DEFAULT_LINGER, ZeroCopyTransport

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "ZeroCopyServer",
    "ZeroCopyStreamWriter",
    "create_connection",
    "open_connection",
    "start_server",
]

P = TypeVar("P", bound=asyncio.BaseProtocol)
ClientConnected = Callable[[asyncio.StreamReader, "ZeroCopyStreamWriter"], Awaitable[None] | None]
_STREAM_LIMIT = 2**16
_Settings = tuple[str, "int | None", "int | None", "float | None", float]
"""zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout"""


def _settings(
    zerocopy: str,
    min_zerocopy_size: int | None,
    high_water: int | None,
    linger: float | None,
    enobufs_timeout: float,
) -> _Settings:
    """pagefrag's keywords, checked before any socket is made (a server would otherwise
    only fail at its first accept)."""
    # Raises for a bad mode or size, as the transport would.
    ZeroCopyPolicy(zerocopy, *([] if min_zerocopy_size is None else [min_zerocopy_size]))
    if high_water is not None and not high_water >= 0:
        raise ValueError(f"high_water must be >= 0, not {high_water!r}")
    if linger is not None and not linger >= 0:
        raise ValueError(f"linger must be >= 0 seconds or None, not {linger!r}")
    if not enobufs_timeout >= 0:
        raise ValueError(f"enobufs_timeout must be >= 0 seconds, not {enobufs_timeout!r}")
    return zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout


def _check_tls_options(
    ssl: Any, ssl_handshake_timeout: float | None, ssl_shutdown_timeout: float | None
) -> None:
    if ssl_handshake_timeout is not None and not ssl:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if ssl_shutdown_timeout is not None and not ssl:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")


def _given_socket(sock: socket.socket, host: Any, port: Any, resolution: dict[str, Any]) -> None:
    """Check a caller's socket (``sock=``) before anything changes: a refused socket is
    left as it was, open and in its blocking mode (as asyncio's ``create_connection``)."""
    if host is not None or port is not None:
        raise ValueError("host/port and sock can not be specified at the same time")
    given = sorted(k for k, v in resolution.items() if v)
    if given:
        raise ValueError(f"{', '.join(given)}: address resolution options, not for sock")
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    check_ssl_socket(sock)
    # The transport needs TCP (MSG_ZEROCOPY, SO_ZEROCOPY): checked here, not after it
    # has made the socket non-blocking.
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"a connected TCP stream socket was expected, got {sock!r}")
    try:
        sock.getpeername()
    except OSError as exc:
        raise ValueError(f"a connected socket was expected ({exc.strerror}): {sock!r}") from None


async def _socket_for(
    host: Any,
    port: Any,
    sock: socket.socket | None,
    *,
    family: int,
    proto: int,
    flags: int,
    local_addr: Any,
    happy_eyeballs_delay: float | None,
    interleave: int | None,
) -> socket.socket:
    """``sock`` checked and used as is, or a new socket connected to ``host:port``."""
    if sock is not None:
        resolution = {"family": family, "proto": proto, "flags": flags, "local_addr": local_addr}
        _given_socket(sock, host, port, resolution)
        return sock
    if host is None or port is None:
        raise ValueError("host and port must both be given when no sock is")
    return await connected_socket(
        host,
        port,
        family=family,
        proto=proto,
        flags=flags,
        local_addr=local_addr,
        happy_eyeballs_delay=happy_eyeballs_delay,
        interleave=interleave,
    )


def _server_hostname(ssl: Any, host: Any, server_hostname: str | None) -> str | None:
    """As asyncio's create_connection: checked before anything is made."""
    if server_hostname is not None and not ssl:
        raise ValueError("server_hostname is only meaningful with ssl")
    if server_hostname is None and ssl:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        return str(host)
    return server_hostname


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
) -> tuple[ZeroCopyTransport, P]:
    """Connect and return ``(transport, protocol)``, as ``loop.create_connection`` of
    asyncio 3.11, with its arguments; the transport is a :class:`ZeroCopyTransport`.
    ``linger``: seconds ``close()`` waits for the kernel's completions before reporting
    the loss (None: no bound); ``enobufs_timeout``: seconds of ENOBUFS without progress
    before the connection fails.

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
    settings = _settings(zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout)
    server_hostname = _server_hostname(ssl, host, server_hostname)
    _check_tls_options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
    sock = await _socket_for(
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
            server_side=isinstance(protocol, _ServerStreamProtocol),
            server_hostname=server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
        )
        self._transport = CopyingTransport(tls)  # type: ignore[assignment]
        protocol._replace_writer(self)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        # It is asyncio's StreamWriter, and says so where warnings and logs name it
        # ("unclosed <StreamWriter ...>").
        return "<StreamWriter" + super().__repr__().removeprefix("<" + type(self).__name__)


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
) -> tuple[asyncio.StreamReader, ZeroCopyStreamWriter]:
    """Connect and return ``(reader, writer)``, as ``asyncio.open_connection`` of
    asyncio 3.11, with the arguments of :func:`create_connection` (``ssl``: the copying
    path, see there). Kernel: ``connect()``.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    loop = asyncio.get_running_loop()
    if ssl:
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
        )
        return reader, ZeroCopyStreamWriter(transport, protocol, reader, loop)
    settings = _settings(zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout)
    _server_hostname(ssl, host, server_hostname)
    _check_tls_options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
    sock = await _socket_for(
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
    reader, writer = _stream_pair(loop, sock, limit, *settings)
    await _connection_made(writer.transport)
    return reader, writer


class _ServerStreamProtocol(asyncio.StreamReaderProtocol):
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


def _accept_tls(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    server: ZeroCopyServer,
    ssl: Any,
    ssl_handshake_timeout: float | None,
    ssl_shutdown_timeout: float | None,
    protocol: _ServerStreamProtocol,
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
) -> ZeroCopyServer:
    """Listen and call ``client_connected_cb(reader, writer)`` per connection (a
    coroutine function becomes a task), as ``asyncio.start_server`` of asyncio 3.11,
    with its arguments: ``host`` a string, a sequence of them or None (every interface:
    an IPv4 socket and an IPv6 one); ``sock`` a socket of yours, bound, used as is;
    ``start_serving=False``: bound, not yet listening, until ``start_serving()`` or
    ``serve_forever()``. Bad combinations raise asyncio's ValueError/TypeError before any
    socket is made. ``linger`` and ``enobufs_timeout`` as for :func:`create_connection`.
    An exception of the callback is reported as asyncio reports it and closes that
    connection at once. Out of descriptors (EMFILE, ENFILE) or memory, the server stops
    accepting for ``ACCEPT_RETRY_DELAY`` seconds and reports it to the loop's exception
    handler; waiting connections stay queued.

    ``ssl`` (an ``SSLContext``): each accepted connection is handed to the loop's own
    TLS transport (``loop.connect_accepted_socket``) and its writer writes through a
    :class:`~pagefrag.aio._tls.CopyingTransport` (copies; its handles fire at once).
    Kernel: ``bind()``, ``listen()``, ``accept()``.

    Refs: none taken; each write's are described at :meth:`ZeroCopyTransport.write`."""
    settings = _settings(zerocopy, min_zerocopy_size, high_water, linger, enobufs_timeout)
    if isinstance(ssl, bool):
        raise TypeError("ssl argument must be an SSLContext or None")
    _check_tls_options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
    loop = asyncio.get_running_loop()
    if sock is not None:
        check_ssl_socket(sock)
    if host is not None or port is not None:
        if sock is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        sockets = await listening_sockets(
            host,
            port,
            family=family,
            flags=flags,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )
    else:
        if sock is None:
            raise ValueError("Neither host/port nor sock were specified")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"a TCP (IPv4 or IPv6) socket was expected, got {sock!r}")
        sock.setblocking(False)
        sockets = [sock]

    def on_accept(conn: socket.socket, server: ZeroCopyServer) -> None:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        if ssl is not None:
            _accept_tls(
                loop,
                conn,
                server,
                ssl,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
                _ServerStreamProtocol(reader, client_connected_cb, loop, server, True),
            )
            return
        protocol = _ServerStreamProtocol(reader, client_connected_cb, loop, server)
        try:
            _transport(loop, conn, protocol, *settings)
        except BaseException:
            protocol.forget()
            raise

    server = ZeroCopyServer(loop, sockets, on_accept, backlog)
    if start_serving:
        await server.start_serving()
    return server
