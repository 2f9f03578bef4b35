"""``pagefrag.aio.open_connection(sock=...)`` and ``create_connection(sock=...)``: a caller's
connected TCP socket used as is (as asyncio's), on asyncio's loop and on uvloop; the refused
sockets are left open and untouched."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from helpers import Fired

from pagefrag.aio import ZeroCopyTransport, create_connection, open_connection


class Echo(threading.Thread):
    """Echoes a blocking socket's bytes back until EOF, then closes it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.sock.settimeout(30)
            while chunk := self.sock.recv(1 << 16):
                self.sock.sendall(chunk)
        except OSError as exc:
            self.error = exc
        finally:
            self.sock.close()

    def finish(self) -> None:
        self.join(30)
        assert not self.is_alive(), "the echo peer did not see EOF"
        assert self.error is None, self.error


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


PAYLOADS = [1, 1000, 70_000, 300_000]


def test_open_connection_uses_a_connected_socket_as_is(
    run: Callable[[Awaitable[Any]], Any],
    tcp_pair: tuple[socket.socket, socket.socket],
    fired: Fired,
) -> None:
    client, server = tcp_pair
    echo = Echo(server)
    fd = client.fileno()

    async def main() -> None:
        reader, writer = await open_connection(sock=client, zerocopy="always")
        assert writer.get_extra_info("socket") is client
        assert writer.get_extra_info("peername") == server.getsockname()
        sent = bytearray()
        for i, size in enumerate(PAYLOADS):
            payload = bytearray([i + 1]) * size
            d = fired.make(i)
            handle = writer.write(payload, destructor=d)
            d.unref()
            sent += payload
            await handle  # the kernel's release, read from this socket's error queue
            assert handle.done and fired.counts[i] == 1
        assert await reader.readexactly(len(sent)) == sent
        writer.close()
        await writer.wait_closed()

    run(main())
    echo.finish()
    assert fired.once_each(range(len(PAYLOADS)))
    assert client.fileno() == -1 and fd not in open_fds()  # the transport owned it


def test_create_connection_uses_a_connected_socket_as_is(
    run: Callable[[Awaitable[Any]], Any],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp_pair
    echo = Echo(server)
    payload = bytes(range(256)) * 1024

    class Collect(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = bytearray()
            self.enough = asyncio.Event()
            self.lost = asyncio.Event()

        def data_received(self, data: bytes) -> None:
            self.data += data
            if len(self.data) >= len(payload):
                self.enough.set()

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set()

    async def main() -> None:
        transport, protocol = await create_connection(Collect, sock=client, zerocopy="always")
        assert isinstance(transport, ZeroCopyTransport)
        assert transport.get_extra_info("socket") is client
        handle = transport.write(payload)
        await handle
        await protocol.enough.wait()
        assert protocol.data == payload
        transport.close()
        await protocol.lost.wait()

    run(main())
    echo.finish()
    assert client.fileno() == -1


def _unconnected() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def _listening() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def _udp_connected() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", 9))  # connected, but a datagram socket
    return s


def _unix_stream() -> socket.socket:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    return a  # a stream, connected, but not TCP: MSG_ZEROCOPY needs IPv4/IPv6


REFUSED = {
    "unconnected": (_unconnected, "connected socket was expected"),
    "listening": (_listening, "connected socket was expected"),
    "udp": (_udp_connected, "TCP stream socket was expected"),
    "unix": (_unix_stream, "TCP stream socket was expected"),
}


@pytest.mark.parametrize("connect", ["open_connection", "create_connection"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_socket_that_is_not_a_connected_tcp_stream_is_refused_and_left_open(
    run: Callable[[Awaitable[Any]], Any], kind: str, connect: str
) -> None:
    make, message = REFUSED[kind]
    sock = make()
    try:
        fd, blocking = sock.fileno(), sock.getblocking()

        async def main() -> None:
            before = open_fds()
            with pytest.raises(ValueError, match=message):
                if connect == "open_connection":
                    await open_connection(sock=sock)
                else:
                    await create_connection(asyncio.Protocol, sock=sock)
            assert open_fds() <= before  # nothing opened (or kept) by the refused call

        run(main())
        # As asyncio: a refused socket is the caller's still, as it was.
        assert sock.fileno() == fd and fd in open_fds()
        assert sock.getblocking() == blocking
    finally:
        sock.close()


@pytest.mark.parametrize(
    "address",
    [{"host": "127.0.0.1"}, {"port": 9}, {"host": "127.0.0.1", "port": 9}],
    ids=["host", "port", "both"],
)
def test_host_or_port_with_sock_is_refused_and_the_socket_still_works(
    run: Callable[[Awaitable[Any]], Any],
    tcp_pair: tuple[socket.socket, socket.socket],
    address: dict[str, Any],
) -> None:
    client, server = tcp_pair

    async def main() -> None:
        with pytest.raises(ValueError, match="host/port and sock can not be specified"):
            await open_connection(sock=client, **address)
        with pytest.raises(ValueError, match="host/port and sock can not be specified"):
            await create_connection(asyncio.Protocol, sock=client, **address)

    run(main())
    assert client.getblocking()
    client.sendall(b"still mine")  # untouched: the connection works as before
    server.settimeout(30)
    assert server.recv(64) == b"still mine"


def test_resolution_options_with_sock_and_neither_address_nor_sock_are_refused(
    run: Callable[[Awaitable[Any]], Any],
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = tcp_pair

    async def main() -> None:
        with pytest.raises(ValueError, match="family: address resolution options"):
            await open_connection(sock=client, family=socket.AF_INET)
        with pytest.raises(ValueError, match="host and port must both be given"):
            await open_connection()
        with pytest.raises(ValueError, match="host and port must both be given"):
            await create_connection(asyncio.Protocol, "127.0.0.1")
        with pytest.raises(TypeError, match=r"sock must be a socket\.socket"):
            await open_connection(sock=client.fileno())  # type: ignore[arg-type]

    run(main())
    assert client.fileno() >= 0 and client.getblocking()
