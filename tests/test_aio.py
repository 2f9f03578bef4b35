"""pagefrag.aio: zero-copy streams over real sockets, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from helpers import POISON, Fired, VerifyingReceiver, counters

from pagefrag import BufferPool, FragDestructor, SkBuff, leaks
from pagefrag.aio import ZeroCopyStreamWriter, create_connection, open_connection, start_server
from pagefrag.testing.netlab import RECEIVER_IP, NetLab
from pagefrag.zerocopy import tcp_info


async def sink_server() -> tuple[Any, int, dict[str, bytearray]]:
    received: dict[str, bytearray] = {}

    async def handle(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
        key = str(writer.get_extra_info("peername"))
        buf = received.setdefault(key, bytearray())
        while chunk := await reader.read(1 << 20):
            buf += chunk
        writer.close()

    server = await start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


def test_echo_over_loopback(run: Callable[[Awaitable[Any]], Any], fired: Fired) -> None:
    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await start_server(echo, "127.0.0.1", 0, zerocopy="always")
        port = server.sockets[0].getsockname()[1]
        reader, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        sent = bytearray()
        for i, size in enumerate([1, 1000, 70_000, 300_000]):
            payload = bytearray([i + 1]) * size
            d = fired.make(i)
            handle = writer.write(payload, destructor=d)
            d.unref()
            sent += payload
            await handle  # completes from the error-queue event alone
            assert handle.done and fired.counts[i] == 1
        echoed = await reader.readexactly(len(sent))
        assert echoed == sent
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())


def test_bulk_transfer_from_a_pool_returns_every_buffer(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def main() -> None:
        server, port, received = await sink_server()
        _reader, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        pool = BufferPool(256 * 1024, 4)
        expected = bytearray()
        for i in range(128):
            buf = await pool.acquire_async()
            buf.data[:] = bytes([i % 251]) * len(buf)
            expected += buf.data
            writer.write(buf)
            buf.release()
            await writer.drain()
        await writer.wait_released()
        assert pool.free == pool.count and writer.pinned_bytes == 0
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        server.close()
        (data,) = received.values()
        assert data == expected

    run(main())


def test_slow_reader_pins_at_most_high_water_plus_one_write(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    high, chunk = 1 << 20, 256 * 1024

    async def main() -> None:
        async def slow(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            while await reader.read(64 * 1024):
                await asyncio.sleep(0.002)
            writer.close()

        server = await start_server(slow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await open_connection("127.0.0.1", port, zerocopy="always", high_water=high)
        peak = 0
        for _ in range(64):
            writer.write(bytearray(chunk))
            peak = max(peak, writer.pinned_bytes, writer.transport.get_write_buffer_size())
            await writer.drain()
        await writer.wait_released()
        stats = writer.transport.zerocopy_stats
        assert peak <= high + chunk and stats.peak_pinned_bytes <= high + chunk
        assert stats.zerocopy_sends > 0
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())


def test_two_hundred_connections_ten_thousand_writes_in_flight(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    before = leaks.get_level()
    leaks.set_level("simple")
    fired: list[int] = []

    async def main() -> None:
        server, port, received = await sink_server()
        conns = [await open_connection("127.0.0.1", port, zerocopy="always") for _ in range(200)]
        handles = []
        for c, (_, writer) in enumerate(conns):
            for k in range(50):
                d = FragDestructor(fired.append, c * 50 + k)
                handles.append(writer.write(bytearray([k]) * 2048 * (1 + k % 8), destructor=d))
                d.unref()
        assert sum(not h.done for h in handles) > 0
        await asyncio.gather(*(asyncio.ensure_future(h) for h in handles))
        for _, writer in conns:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns))
        await asyncio.sleep(0.2)
        server.close()
        per_conn = sum(2048 * (1 + k % 8) for k in range(50))
        assert len(received) == 200 and all(len(v) == per_conn for v in received.values())

    try:
        run(main())
        assert sorted(fired) == list(range(10_000))
        assert [r for r in leaks.report() if "write" in r.destructor] == []
    finally:
        leaks.set_level(before)


def test_cancelling_a_waiter_neither_loses_nor_double_fires(
    run: Callable[[Awaitable[Any]], Any], fired: Fired
) -> None:
    async def main() -> None:
        server, port, _ = await sink_server()
        _, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        d = fired.make(0)
        handle = writer.write(bytearray(4 << 20), destructor=d)
        d.unref()
        waiter = asyncio.ensure_future(_await(handle))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await writer.wait_released()
        assert handle.done and fired.counts == {0: 1}
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())


async def _await(d: FragDestructor) -> None:
    await d


def test_peer_reset_fires_every_handle_once_and_reports_the_loss(
    run: Callable[[Awaitable[Any]], Any], fired: Fired
) -> None:
    async def main() -> None:
        accepted: asyncio.Future[ZeroCopyStreamWriter] = asyncio.get_running_loop().create_future()

        async def stall(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            accepted.set_result(writer)  # never reads

        server = await start_server(stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        peer = await accepted
        peer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        handles = []
        for i in range(16):
            d = fired.make(i)
            handles.append(writer.write(bytearray(1 << 20), destructor=d))
            d.unref()
        await asyncio.sleep(0.2)
        assert writer.pinned_bytes > 0 and not all(h.done for h in handles)
        peer.abort()  # RST towards our writer
        with pytest.raises(ConnectionResetError):  # as asyncio's wait_closed reports it
            await writer.wait_closed()
        assert all(h.done for h in handles) and fired.once_each(range(16))
        # Issue 11: ignored, as asyncio's (it raised ConnectionError before); the handle
        # returned has fired (the kernel never saw those bytes) and drain() raises.
        assert writer.write(b"after the reset").done
        with pytest.raises(ConnectionResetError):
            await writer.drain()
        server.close()

    run(main())


def test_close_with_data_in_flight_delivers_everything(
    run: Callable[[Awaitable[Any]], Any], fired: Fired
) -> None:
    async def main() -> None:
        server, port, received = await sink_server()
        _, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        skb = SkBuff(b"header")
        pages = [bytearray([k]) * (1 << 20) for k in range(8)]
        ds = [fired.make(k) for k in range(8)]
        for page, d in zip(pages, ds, strict=True):
            skb.add_frag(page, destructor=d)
            d.unref()
        handle = writer.write(skb)
        skb.free()
        assert not handle.done
        writer.close()
        await writer.wait_closed()
        assert handle.done and fired.once_each(range(8))
        await asyncio.sleep(0.2)
        server.close()
        (data,) = received.values()
        assert data == b"header" + b"".join(pages)

    run(main())


def test_abort_fires_every_handle_and_protocol_transport_works(
    run: Callable[[Awaitable[Any]], Any], fired: Fired
) -> None:
    async def main() -> None:
        lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

        class Proto(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        async def stall(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            await asyncio.sleep(5)

        server = await start_server(stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await create_connection(Proto, "127.0.0.1", port, zerocopy="always")
        for i in range(32):
            d = fired.make(i)
            transport.write(bytearray(1 << 20), d)
            d.unref()
        await asyncio.sleep(0.1)
        transport.abort()
        assert await lost is None
        assert fired.once_each(range(32))
        server.close()

    run(main())


def test_pool_exhaustion_waits_async_and_raises_sync() -> None:
    from pagefrag import PoolExhaustedError

    pool = BufferPool(1024, 2)
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(PoolExhaustedError):
        pool.acquire(timeout=0.05)

    async def main() -> int:
        waiter = asyncio.ensure_future(pool.acquire_async())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        hold = a.destructor
        hold.ref()  # a write still pins buffer a
        a.release()
        await asyncio.sleep(0.01)
        assert not waiter.done(), "a pinned buffer must not be reused"
        hold.unref()  # the kernel released it
        c = await asyncio.wait_for(waiter, 5)
        c.release()
        return pool.free

    assert asyncio.run(main()) == 1
    b.release()
    assert pool.free == 2


def test_poison_after_release_through_aio_and_a_pool_under_loss(lab: NetLab) -> None:
    """The kernel-bridge poison test, through pagefrag.aio and a BufferPool: a buffer is
    poisoned the moment it is released and handed out again at once."""
    lab.add_loss(2)
    listener = lab.open_socket(lab.receiver)
    listener.bind((RECEIVER_IP, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    buf_size, total = 1 << 20, 64 << 20
    poison = bytes([POISON]) * buf_size
    result: dict[str, Any] = {}

    async def main() -> None:
        _reader, writer = await open_connection(RECEIVER_IP, port, zerocopy="always")
        conn, _ = listener.accept()
        rx = VerifyingReceiver(conn)
        pool = BufferPool(buf_size, 6)
        for offset in range(0, total, buf_size):
            buf = await pool.acquire_async()
            np.frombuffer(buf.data, dtype=np.uint8)[:] = counters(offset, buf_size)
            view = buf.data
            buf.destructor.add_done_callback(lambda _d, v=view: v.__setitem__(slice(None), poison))
            writer.write(buf)
            buf.release()
            await writer.drain()
        result["retransmits"] = tcp_info(writer.get_extra_info("socket")).total_retrans
        writer.close()
        await writer.wait_closed()
        result["stats"] = writer.transport.zerocopy_stats
        await asyncio.get_running_loop().run_in_executor(None, rx.join, 60)
        result["rx"] = rx
        result["pool_free"] = pool.free

    with lab.inside(lab.sender):  # the loop's sockets are created in the sender namespace
        asyncio.run(asyncio.wait_for(main(), 120))
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    rx = result["rx"]
    assert rx.received == total and rx.bad_bytes == 0 and rx.poison_bytes == 0
    assert result["retransmits"] > 0, "2 % loss must cause TCP retransmits"
    assert result["pool_free"] == 6
    assert result["stats"].completions == result["stats"].zerocopy_sends > 0
