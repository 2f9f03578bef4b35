"""pagefrag.aio beside asyncio streams: the same test body run against both, on asyncio's
loop and on uvloop (issue 11: a drop-in for asyncio streams)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from helpers import Run


def test_tcp_nodelay_on_both_ends(streams: Any, run: Run) -> None:
    """asyncio sets TCP_NODELAY on every TCP transport: without it a write-write-read
    round trip waits ~40 ms for a delayed ACK (Nagle)."""

    async def main() -> tuple[int, int]:
        server_side: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: Any) -> None:
            sock = writer.get_extra_info("socket")
            server_side.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            await reader.read()
            writer.close()

        server = await streams.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await streams.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        client_side = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        served = await asyncio.wait_for(server_side, 10)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return client_side, served

    client_side, served = run(main())
    assert client_side and served


def test_write_eof_with_data_queued_sends_it_all_then_the_fin(streams: Any, run: Run) -> None:
    """asyncio: write_eof() with writes still queued sends the FIN once they are out;
    write() after write_eof() raises RuntimeError."""
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the kernel takes at once

    async def main() -> tuple[bool, str]:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: Any) -> None:
            got.set_result(await reader.read())  # to the FIN
            writer.close()

        server = await streams.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await streams.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        with pytest.raises(RuntimeError) as info:
            writer.write(b"late")
        data = await asyncio.wait_for(got, 30)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return data == payload, str(info.value)

    intact, message = run(main())
    assert intact and "write_eof" in message
