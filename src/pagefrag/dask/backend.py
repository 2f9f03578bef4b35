"""The ``pagefrag://`` comm backend of dask.distributed: ``PagefragBackend`` (registered
under the entry-point group ``distributed.comm.backends``), its ``Connector`` and
``Listener`` (the counterparts of distributed's ``TCPConnector``/``TCPListener``), and
the address handling, which is TCP's (``pagefrag://host:port``, IPv6 as
``pagefrag://[::1]:8786``).

The handshake is the base classes' (``distributed.comm.core.connect`` and
``BaseListener.on_connection``). Settings come from ``distributed.comm.pagefrag.*``
(:mod:`._config`), read when a connector connects or a listener starts."""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import dask.config
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import BaseListener, CommClosedError, Connector
from distributed.comm.registry import Backend
from distributed.comm.utils import ensure_concrete_host
from distributed.protocol.utils import host_array
from distributed.utils import ensure_ip, get_ip

from .. import aio
from ..aio import ZeroCopyServer
from ._config import Settings, settings
from ._framing import MessageReader
from ._protocol import CommProtocol
from .comm import PagefragComm

__all__ = ["PREFIX", "PagefragBackend", "PagefragConnector", "PagefragListener"]

PREFIX = "pagefrag://"
logger = logging.getLogger("pagefrag.dask")


def _protocol(s: Settings, on_made: Callable[[CommProtocol], None] | None = None) -> CommProtocol:
    reader = MessageReader(s.max_frames, s.max_message_size, host_array)
    return CommProtocol(reader, s.read_high_water, on_made)


def _transport_args(s: Settings) -> dict[str, Any]:
    return {
        "zerocopy": s.zerocopy,
        "min_zerocopy_size": s.min_zerocopy_size,
        "high_water": s.high_water,
        "linger": s.linger,
        "backend": s.backend,
    }


def _address(sockaddr: Any) -> str:
    return PREFIX + unparse_host_port(*sockaddr[:2])


def _check_encryption(address: str, connection_args: dict[str, Any]) -> None:
    # As distributed's RequireEncryptionMixin: pagefrag:// is not encrypted.
    if connection_args.get("require_encryption"):
        raise RuntimeError(
            "encryption required by Dask configuration, "
            f"refusing communication from/to {PREFIX + address!r}"
        )


class PagefragConnector(Connector):
    """Connects to ``pagefrag://`` listeners. Kernel: ``connect()``. Refs: none."""

    async def connect(
        self, address: str, deserialize: bool = True, **connection_args: Any
    ) -> PagefragComm:
        """A comm connected to ``address`` (scheme-less ``host:port``). ``OSError`` if
        the peer cannot be reached (``distributed.comm.connect`` retries those),
        ``ValueError`` for a malformed address or a bad setting."""
        _check_encryption(address, connection_args)
        s = settings()
        ip, port = parse_host_port(address)
        transport, protocol = await aio.create_connection(
            lambda: _protocol(s), ip, port, **_transport_args(s)
        )
        try:  # (create_connection returned after connection_made ran)
            local = _address(transport.get_extra_info("sockname"))
            return PagefragComm(protocol, local, PREFIX + address, s, deserialize)
        except BaseException:
            transport.abort()
            raise


class PagefragListener(BaseListener):
    """Accepts ``pagefrag://`` connections and hands each comm, handshake done, to
    ``comm_handler`` (a function or a coroutine function). Kernel: ``bind()``,
    ``listen()``, ``accept()``. Refs: none."""

    prefix = PREFIX  # read by distributed's Worker to spell its address

    def __init__(
        self,
        address: str,
        comm_handler: Callable[[PagefragComm], Awaitable[None] | None],
        deserialize: bool = True,
        allow_offload: bool = True,
        default_host: str | None = None,
        default_port: int = 0,
        **connection_args: Any,
    ) -> None:
        super().__init__()
        _check_encryption(address, connection_args)
        self.ip, self.port = parse_host_port(address, default_port)
        self.default_host = default_host
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self._servers: list[ZeroCopyServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.bound_address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Bind and listen (``distributed.comm.socket-backlog``); an ephemeral port is
        retried on ``EADDRINUSE``, as distributed's TCP listener retries it."""
        s = self._settings = settings()
        backlog = int(dask.config.get("distributed.comm.socket-backlog"))
        exc: OSError | None = None
        for _ in range(5):
            try:
                self._servers = await self._bind(s, backlog)
            except OSError as e:
                if self.port != 0 or e.errno != errno.EADDRINUSE:
                    raise
                exc = e
            else:
                break
        else:
            assert exc is not None
            raise exc
        sockname = self._servers[0].sockets[0].getsockname()
        self.bound_address = (sockname[0], sockname[1])

    async def _bind(self, s: Settings, backlog: int) -> list[ZeroCopyServer]:
        def factory() -> CommProtocol:
            return _protocol(s, self._accepted)

        kwargs = {"backlog": backlog, **_transport_args(s)}
        if self.ip:
            return [await aio.create_server(factory, self.ip, self.port, **kwargs)]
        # Every interface: IPv4 first, then IPv6 on the same port (an ephemeral port
        # would otherwise differ between the two sockets).
        servers = [await aio.create_server(factory, "0.0.0.0", self.port, **kwargs)]
        port = servers[0].sockets[0].getsockname()[1]
        if socket.has_ipv6:
            try:
                servers.append(await aio.create_server(factory, "::", port, **kwargs))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    servers[0].close()
                    raise
                logger.debug("pagefrag listener: no IPv6 socket: %s", e)
            except BaseException:  # cancelled meanwhile: not left listening
                servers[0].close()
                raise
        return servers

    def stop(self) -> None:
        """Stop accepting; established comms go on."""
        self._stopped = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()

    def _accepted(self, protocol: CommProtocol) -> None:
        transport = protocol.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        if self._stopped or peer is None:
            # stop() ran after the accept (nobody would handshake or abort this comm), or
            # the peer reset the connection before its accept was processed.
            transport.abort()
            return
        try:
            comm = PagefragComm(
                protocol,
                _address(transport.get_extra_info("sockname")),
                _address(peer),
                self._settings,
                self.deserialize,
            )
        except BaseException:
            transport.abort()  # not left open with nobody to read it
            raise
        comm.allow_offload = self.allow_offload
        task = asyncio.get_running_loop().create_task(self._handle(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, comm: PagefragComm) -> None:
        if self._stopped:
            # stop() (and abort_handshaking_comms()) ran before this task did: the comm
            # was not yet among the handshaking ones, so it is aborted here.
            comm.abort()
            return
        logger.debug("Incoming connection from %r to %r", comm.peer_address, self.contact_address)
        try:
            await self.on_connection(comm)
        except CommClosedError:
            logger.info("Connection from %s closed before handshake completed", comm.peer_address)
            return
        result = self.comm_handler(comm)
        if inspect.isawaitable(result):
            await result

    def get_host_port(self) -> tuple[str, int]:
        """The listening address as ``(host, port)``."""
        if self.bound_address is None:
            raise ValueError("invalid operation on non-started PagefragListener")
        return self.bound_address

    @property
    def listen_address(self) -> str:
        return PREFIX + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self) -> str:
        host, port = self.get_host_port()
        host = ensure_concrete_host(host, default_host=self.default_host)  # type: ignore[no-untyped-call]
        return PREFIX + unparse_host_port(host, port)


class PagefragBackend(Backend):
    """The ``pagefrag`` scheme: zero-copy TCP with pinned frames. Refs: none."""

    def get_connector(self) -> PagefragConnector:
        return PagefragConnector()

    def get_listener(
        self, loc: str, handle_comm: Any, deserialize: bool, **connection_args: Any
    ) -> PagefragListener:
        return PagefragListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc: str) -> str:
        return str(parse_host_port(loc)[0])

    def get_address_host_port(self, loc: str) -> tuple[str, int]:
        host, port = parse_host_port(loc)
        return host, port

    def resolve_address(self, loc: str) -> str:
        host, port = parse_host_port(loc)
        return str(unparse_host_port(ensure_ip(host), port))

    def get_local_address_for(self, loc: str) -> str:
        host, _ = parse_host_port(loc)
        return str(unparse_host_port(get_ip(ensure_ip(host)), None))  # type: ignore[no-untyped-call]
