"""pagefrag.aio.create_server side by side with asyncio's loop.create_server: the same
test body against both, on both event loops (the pagefrag:// Dask listener is built on
it, with a BufferedProtocol)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from helpers import Run

from pagefrag import aio
from pagefrag.aio import ZeroCopyTransport


async def _asyncio_server(factory: Callable[[], asyncio.BaseProtocol], *a: Any, **kw: Any) -> Any:
    return await asyncio.get_running_loop().create_server(factory, *a, **kw)


SERVERS = {"asyncio": _asyncio_server, "pagefrag": aio.create_server}


@pytest.fixture(params=list(SERVERS))
def create_server(request: pytest.FixtureRequest) -> Any:
    return SERVERS[request.param]


class Echo(asyncio.BufferedProtocol):
    """Echoes what it receives, received into its own buffer (recv_into)."""

    made: ClassVar[list[Echo]] = []

    def __init__(self) -> None:
        self.buf = bytearray(1000)
        self.lost = asyncio.get_running_loop().create_future()
        Echo.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.buf[:nbytes]))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def _echo_through(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return got


def test_a_buffered_protocol_is_served_and_counted_until_lost(run: Run, create_server: Any) -> None:
    async def main() -> None:
        Echo.made.clear()
        server = await create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        payload = bytes(range(256)) * 40  # several receives into the 1000-byte buffer
        assert await _echo_through(port, payload) == payload
        (proto,) = Echo.made
        await asyncio.wait_for(proto.lost, 10)
        if create_server is aio.create_server:
            assert isinstance(proto.transport, ZeroCopyTransport)
        # A connection still open keeps wait_closed() (awaited before close(): asyncio
        # 3.11's returns at once on a closed server) waiting after close().
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        waiting = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0)
        server.close()
        assert not server.sockets
        await asyncio.sleep(0.2)
        assert not waiting.done()
        writer.close()
        await asyncio.wait_for(waiting, 10)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_start_serving_false_binds_without_accepting(run: Run, create_server: Any) -> None:
    async def main() -> None:
        server = await create_server(Echo, "127.0.0.1", 0, start_serving=False)
        port = server.sockets[0].getsockname()[1]
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)  # bound, not listening
        await server.start_serving()
        assert await _echo_through(port, b"late") == b"late"
        server.close()
        await server.wait_closed()

    run(main())


def test_bad_arguments_are_refused_before_any_socket(run: Run, create_server: Any) -> None:
    async def main() -> None:
        with socket.socket() as s:
            with pytest.raises(ValueError):
                await create_server(Echo, "127.0.0.1", 0, sock=s)
            assert s.fileno() >= 0
        with pytest.raises(ValueError):
            await create_server(Echo)
        with socket.socket(type=socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            with pytest.raises(ValueError):
                await create_server(Echo, sock=s)

    run(main())


def test_pagefrag_keywords_are_checked_first(run: Run) -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await aio.create_server(Echo, "127.0.0.1", 0, zerocopy="sometimes")
        with pytest.raises(ValueError):
            await aio.create_server(Echo, "127.0.0.1", 0, high_water=-1)
        with pytest.raises(ValueError):
            await aio.create_server(Echo, "127.0.0.1", 0, backend="rdma")

    run(main())


def test_a_failing_protocol_factory_closes_that_connection_only(run: Run) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        calls = 0

        def factory() -> asyncio.BaseProtocol:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("no protocol for you")
            return Echo()

        server = await aio.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        writer.close()
        assert isinstance(reported[0]["exception"], RuntimeError)
        assert await _echo_through(port, b"next") == b"next"
        server.close()
        await server.wait_closed()

    run(main())
