"""pagefrag.aio with backend="uring": writes as io_uring SEND_ZC requests on the loop's
ring, on asyncio's loop and on uvloop (the ``run`` fixture), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from typing import Any

import numpy as np
import pytest
from helpers import POISON, Fired, Run, VerifyingReceiver, counters, python_in_child

from pagefrag import SkBuff, aio
from pagefrag.aio import UringTransport, ZeroCopyStreamWriter, ZeroCopyTransport, _ring_loop
from pagefrag.errors import CompletionTimeoutError, ZeroCopyUnsupportedError
from pagefrag.testing.netlab import RECEIVER_IP, NetLab
from pagefrag.uring import unsupported_reason
from pagefrag.zerocopy import tcp_info

WHY_NOT = unsupported_reason()
needs_uring = pytest.mark.skipif(
    WHY_NOT is not None, reason=f"backend='uring' cannot run here: {WHY_NOT}"
)


async def sink() -> tuple[Any, int, dict[str, bytearray]]:
    """A server (backend="uring") that keeps what each connection sends."""
    received: dict[str, bytearray] = {}

    async def handle(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
        buf = received.setdefault(str(writer.get_extra_info("peername")), bytearray())
        while chunk := await reader.read(1 << 20):
            buf += chunk
        writer.close()

    server = await aio.start_server(handle, "127.0.0.1", 0, backend="uring")
    return server, server.sockets[0].getsockname()[1], received


Accepted = asyncio.Future[tuple[asyncio.StreamReader, ZeroCopyStreamWriter]]


async def stalled_peer(rcvbuf: int | None = 4096) -> tuple[Any, int, Accepted]:
    """A server whose connection does not read until the test does (its receive buffer
    set to ``rcvbuf``: a tiny one makes TCP crawl once it does read)."""
    accepted: Accepted = asyncio.get_running_loop().create_future()

    async def stall(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
        if rcvbuf is not None:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        accepted.set_result((reader, writer))

    server = await aio.start_server(stall, "127.0.0.1", 0, backend="uring")
    return server, server.sockets[0].getsockname()[1], accepted


async def until(cond: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@needs_uring
def test_echo_many_writes_small_and_large_arrive_in_order(run: Run, fired: Fired) -> None:
    """Both ends backend="uring" (an echo server, zerocopy="auto": on loopback it copies,
    by send() and, when the socket is full, by copying requests): 300 writes of 1 B to
    4 MiB zero-copy requests from the client come back byte for byte in order; every
    destructor fires once; every request was notified."""
    sizes = [1 + (k * 7919) % 70_000 for k in range(290)] + [1 << 20] * 6 + [4 << 20] * 4
    kinds: dict[str, type] = {}

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            kinds["server"] = type(writer.transport)
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await aio.start_server(echo, "127.0.0.1", 0, backend="uring")
        port = server.sockets[0].getsockname()[1]
        reader, writer = await aio.open_connection(
            "127.0.0.1", port, backend="uring", zerocopy="always"
        )
        kinds["client"] = type(writer.transport)
        sent = bytearray()
        handles = []
        for i, size in enumerate(sizes):
            payload = bytes([i % 251 + 1]) * size
            d = fired.make(i)
            handles.append(writer.write(payload, destructor=d))
            d.unref()
            sent += payload
            if i % 16 == 0:
                await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(len(sent)), 60)
        assert echoed == sent
        await writer.wait_released()
        assert all(h.done for h in handles)
        stats = writer.transport.zerocopy_stats
        assert stats.zerocopy_sends >= 10 and stats.completions == stats.zerocopy_sends
        assert stats.bytes_sent == len(sent)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(main())
    assert kinds == {"client": UringTransport, "server": UringTransport}
    assert fired.once_each(range(len(sizes)))


@needs_uring
def test_a_handle_fires_at_the_notification_not_at_the_result(run: Run) -> None:
    """A write_zerocopy to a peer that does not read yet: its request's result comes (the
    kernel took every byte) but the pages are still the kernel's, so the handle has not
    fired and the bytes stay pinned; once the peer reads, the notification comes and the
    handle fires."""

    async def main() -> None:
        server, port, accepted = await stalled_peer()
        _, writer = await aio.open_connection("127.0.0.1", port, backend="uring", zerocopy="always")
        peer, _ = await accepted
        buf = bytearray(b"z" * (256 << 10))
        handle = writer.write_zerocopy(buf)
        ch = writer.get_extra_info("zerocopy_socket")._ch
        await until(lambda: ch.bytes_sent == len(buf))  # the result is in
        await asyncio.sleep(0.3)
        assert not handle.done and writer.pinned_bytes == len(buf) and ch.completions == 0
        got = await asyncio.wait_for(peer.readexactly(len(buf)), 30)
        assert got == buf
        await asyncio.wait_for(handle, 30)
        assert ch.completions == 1 and writer.pinned_bytes == 0
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())


@needs_uring
def test_poison_after_release_under_loss(lab: NetLab, run: Run) -> None:
    """write_zerocopy of one reused bytearray under 2 % loss: the buffer is poisoned the
    moment its handle fires (the notification), then refilled. TCP retransmits from the
    very pages, so a handle fired early (at the result) would put poison on the wire:
    not one byte may arrive."""
    lab.add_loss(2)
    listener = lab.open_socket(lab.receiver)
    listener.bind((RECEIVER_IP, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    size, total = 1 << 20, 32 << 20
    poison = bytes([POISON]) * size
    result: dict[str, Any] = {}

    # Only the socket is made in the sender's namespace: the loop, its ring and the
    # ring's io-wq worker threads (created by the thread that first needs one, in its
    # namespace) stay in this one, so no worker keeps the lab's namespace alive.
    client = lab.open_socket(lab.sender)
    client.settimeout(10)
    client.connect((RECEIVER_IP, port))

    async def main() -> None:
        _reader, writer = await aio.open_connection(sock=client, backend="uring", zerocopy="always")
        conn, _ = listener.accept()
        rx = VerifyingReceiver(conn)
        buf = bytearray(size)
        view = np.frombuffer(buf, dtype=np.uint8)
        for offset in range(0, total, size):
            view[:] = counters(offset, size)
            handle = writer.write_zerocopy(buf)
            handle.add_done_callback(lambda _h: buf.__setitem__(slice(None), poison))
            await asyncio.wait_for(handle, 60)
        result["retransmits"] = tcp_info(writer.get_extra_info("socket")).total_retrans
        result["stats"] = writer.transport.zerocopy_stats
        writer.close()
        await writer.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, rx.join, 60)
        result["rx"] = rx

    run(main(), timeout=180)
    listener.close()
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    rx = result["rx"]
    assert rx.received == total and rx.bad_bytes == 0 and rx.poison_bytes == 0
    assert result["retransmits"] > 0, "2 % loss must cause TCP retransmits"
    stats = result["stats"]
    assert stats.zerocopy_sends >= total // size and stats.completions == stats.zerocopy_sends


@needs_uring
def test_a_plain_bytearray_may_be_reused_once_write_returns(run: Run) -> None:
    """asyncio's contract with backend="uring": one bytearray refilled for each of 2048
    records of 16 KiB and written with a plain write(), the peer starting to read late
    (the socket fills, so the rest goes by copying requests sent after write() has
    returned): every record arrives as it was when written."""
    size, count = 16 << 10, 2048

    async def main() -> bytes:
        server, port, accepted = await stalled_peer(rcvbuf=None)
        _, writer = await aio.open_connection("127.0.0.1", port, backend="uring", zerocopy="always")
        peer, _ = await accepted

        async def read_late() -> bytes:
            await asyncio.sleep(0.5)
            return await peer.readexactly(size * count)

        reading = asyncio.ensure_future(read_late())
        buf = bytearray(size)
        for i in range(count):
            buf[:] = bytes([i % 251]) * size
            writer.write(buf)
            await writer.drain()
        got = await asyncio.wait_for(reading, 60)
        stats = writer.transport.zerocopy_stats
        assert stats.bytes_sent == size * count
        writer.close()
        await writer.wait_closed()
        server.close()
        return got

    got = run(main())
    bad = [i for i in range(count) if got[i * size : (i + 1) * size] != bytes([i % 251]) * size]
    assert bad == []


@needs_uring
def test_slow_reader_drain_bounds_unsent_plus_pinned(run: Run) -> None:
    """A peer reading 64 KiB every 2 ms: drain() keeps unsent plus pinned bytes under the
    high-water mark plus one write, and the protocol really was paused."""
    high, chunk = 1 << 20, 256 << 10

    async def main() -> None:
        async def slow(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            while await reader.read(64 << 10):
                await asyncio.sleep(0.002)
            writer.close()

        server = await aio.start_server(slow, "127.0.0.1", 0, backend="uring")
        port = server.sockets[0].getsockname()[1]
        _, writer = await aio.open_connection(
            "127.0.0.1", port, backend="uring", zerocopy="always", high_water=high
        )
        transport = writer.transport
        peak = paused = 0
        for _ in range(64):
            writer.write_zerocopy(bytearray(chunk))
            peak = max(peak, transport.get_write_buffer_size())
            paused += transport._writing_paused  # type: ignore[attr-defined]
            await writer.drain()
        await writer.wait_released()
        stats = transport.zerocopy_stats
        assert peak <= high + chunk and stats.peak_pinned_bytes <= high + chunk
        assert paused > 0, "flow control never paused the writer"
        assert stats.zerocopy_sends >= 64
        assert transport.get_write_buffer_size() == 0
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())


@needs_uring
def test_close_flushes_everything_then_fires_every_handle(run: Run, fired: Fired) -> None:
    """close() right after a write of 8 MiB of frags: every byte arrives, then every
    destructor has fired once, before wait_closed() returns."""

    async def main() -> None:
        server, port, received = await sink()
        _, writer = await aio.open_connection("127.0.0.1", port, backend="uring", zerocopy="always")
        skb = SkBuff(b"header")
        pages = [bytearray([k + 1]) * (1 << 20) for k in range(8)]
        for k, page in enumerate(pages):
            d = fired.make(k)
            skb.add_frag(page, destructor=d)
            d.unref()
        handle = writer.write(skb)
        skb.free()
        assert not handle.done
        writer.close()
        await writer.wait_closed()
        assert handle.done and fired.once_each(range(8))
        await until(lambda: sum(map(len, received.values())) == 6 + (8 << 20))
        (data,) = received.values()
        assert data == b"header" + b"".join(pages)
        server.close()

    run(main())


@needs_uring
def test_abort_with_unacked_data_fires_every_handle_exactly_once(run: Run, fired: Fired) -> None:
    """A peer that never reads, 32 writes of 1 MiB: some pinned by the kernel, one
    request waiting for room, the rest queued. abort() cancels the request, disconnects
    and drops the queue; connection_lost(None) comes and every destructor has fired
    exactly once; the loop's ring is then closed (no transport, nothing in flight)."""

    async def main() -> None:
        lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

        class Proto(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        server, port, accepted = await stalled_peer()
        transport, _ = await aio.create_connection(
            Proto, "127.0.0.1", port, backend="uring", zerocopy="always"
        )
        await accepted
        handles = []
        for i in range(32):
            d = fired.make(i)
            handles.append(transport.write(bytearray([i]) * (1 << 20), d))
            d.unref()
        bridge = transport._zs
        await until(lambda: bridge.pinned_bytes > 0)
        await asyncio.sleep(0.2)
        assert bridge.request is not None and not bridge.request.done_result  # waiting for room
        assert transport._writes.unsent > 0 and not any(h.done for h in handles)
        lring = bridge._lring
        transport.abort()
        assert await asyncio.wait_for(lost, 30) is None
        assert all(h.done for h in handles) and fired.once_each(range(32))
        server.close()
        await server.wait_closed()
        await until(lambda: lring.ring.closed)

    run(main())


@needs_uring
def test_close_past_linger_keeps_the_pins_until_the_notifications_come(run: Run) -> None:
    """close() with linger=1 while the peer does not read: wait_closed() raises
    CompletionTimeoutError and no handle of what the kernel holds has fired; once the
    peer reads, the notifications come through the ring, every handle fires and the
    socket is closed."""

    async def main() -> None:
        server, port, accepted = await stalled_peer(rcvbuf=None)
        _, writer = await aio.open_connection(
            "127.0.0.1", port, backend="uring", zerocopy="always", linger=1
        )
        peer, _ = await accepted
        handles = [writer.write_zerocopy(bytearray([k]) * (4 << 20)) for k in range(4)]
        await until(lambda: writer.pinned_bytes > 0)
        writer.close()
        with pytest.raises(CompletionTimeoutError):
            await writer.wait_closed()
        held = [h for h in handles if not h.done]
        assert held and writer.pinned_bytes > 0
        sock = writer.get_extra_info("socket")
        assert sock.fileno() >= 0  # kept open: its sends are still the kernel's
        deadline = time.monotonic() + 30
        while not all(h.done for h in handles):  # the peer reads: the kernel lets go
            assert time.monotonic() < deadline, "the notifications did not come"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(peer.read(1 << 20), 0.1)
        await until(lambda: sock.fileno() == -1)
        assert writer.pinned_bytes == 0
        server.close()

    run(main())


@needs_uring
def test_peer_reset_with_a_request_in_flight_fires_every_handle_once(
    run: Run, fired: Fired
) -> None:
    """The peer resets while a request waits for room and more is queued: wait_closed()
    raises ConnectionResetError (as asyncio's) and every destructor fires exactly once."""

    async def main() -> None:
        server, port, accepted = await stalled_peer()
        _, writer = await aio.open_connection("127.0.0.1", port, backend="uring", zerocopy="always")
        _, peer = await accepted
        handles = []
        for i in range(16):
            d = fired.make(i)
            handles.append(writer.write(bytearray([i]) * (1 << 20), destructor=d))
            d.unref()
        bridge = writer.transport._zs  # type: ignore[attr-defined]
        await until(lambda: bridge.request is not None and writer.pinned_bytes > 0)
        peer.transport.abort()  # RST towards our writer
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(writer.wait_closed(), 30)
        assert all(h.done for h in handles) and fired.once_each(range(16))
        server.close()

    run(main())


@needs_uring
def test_many_connections_share_one_ring_per_loop_which_goes_with_the_last(run: Run) -> None:
    """20 connections of one loop (and the server's 20) use one ring, watched once; each
    sends its own bytes intact; once every transport is gone the ring is closed."""

    async def main() -> None:
        server, port, received = await sink()
        conns = [
            await aio.open_connection("127.0.0.1", port, backend="uring", zerocopy="always")
            for _ in range(20)
        ]
        rings = {w.transport._zs._lring for _, w in conns}  # type: ignore[attr-defined]
        (lring,) = rings
        assert _ring_loop.ring_for(asyncio.get_running_loop()) is lring
        for c, (_, writer) in enumerate(conns):
            for k in range(4):
                writer.write(bytes([c]) * ((64 << 10) * (k + 1)))
        for _, writer in conns:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns))
        per_conn = sum((64 << 10) * (k + 1) for k in range(4))
        await until(lambda: sum(map(len, received.values())) == 20 * per_conn)
        assert sorted(bytes(v) for v in received.values()) == [
            bytes([c]) * per_conn for c in range(20)
        ]
        server.close()
        await server.wait_closed()
        await until(lambda: lring.ring.closed)

    run(main())


@needs_uring
def test_a_loop_closed_with_requests_in_flight_keeps_their_pins(run: Run, fired: Fired) -> None:
    """The loop ends while the kernel still holds a write's pages (the peer does not
    read): nothing is released early. The ring, with its requests, outlives the loop;
    once the peer reads and the ring is reaped, the destructor fires exactly once."""
    listener = socket.create_server(("127.0.0.1", 0))
    state: dict[str, Any] = {}

    async def main() -> None:
        _, writer = await aio.open_connection(
            *listener.getsockname(), backend="uring", zerocopy="always"
        )
        d = fired.make(0)
        writer.write_zerocopy(bytearray(b"k" * (256 << 10)), destructor=d)
        d.unref()
        state["lring"] = writer.transport._zs._lring  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)

    run(main())
    gc.collect()
    peer, _ = listener.accept()
    listener.close()
    ring = state.pop("lring").ring
    assert ring.in_flight > 0 and not ring.closed and fired.counts == {}
    got = bytearray()
    deadline = time.monotonic() + 30
    while len(got) < 256 << 10 and time.monotonic() < deadline:
        got += peer.recv(1 << 20)
    assert got == b"k" * (256 << 10)
    while ring.in_flight and time.monotonic() < deadline:
        ring.wait(0.1)
    assert fired.counts == {0: 1}
    peer.close()


@needs_uring
def test_backend_auto_picks_uring_here_and_the_default_stays_msg_zerocopy(run: Run) -> None:
    async def main() -> dict[str, type]:
        server, port, _ = await sink()
        kinds = {}
        for backend in ("auto", "uring", "msg_zerocopy", None):
            kwargs = {} if backend is None else {"backend": backend}
            _, writer = await aio.open_connection("127.0.0.1", port, **kwargs)
            kinds[str(backend)] = type(writer.transport)
            writer.close()
            await writer.wait_closed()
        server.close()
        return kinds

    assert run(main()) == {
        "auto": UringTransport,
        "uring": UringTransport,
        "msg_zerocopy": ZeroCopyTransport,
        "None": ZeroCopyTransport,
    }


def test_a_bad_backend_is_refused_before_any_socket_is_made() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="backend must be one of"):
            await aio.open_connection("127.0.0.1", 9, backend="io_uring")
        with pytest.raises(TypeError, match="backend must be a str"):
            await aio.start_server(lambda r, w: None, "127.0.0.1", 0, backend=1)  # type: ignore[arg-type]

    asyncio.run(main())


def test_backend_uring_in_pure_python_mode_raises_before_connecting_or_serving() -> None:
    """PAGEFRAG_PURE_PYTHON=1: no compiled ring. backend="uring" raises
    ZeroCopyUnsupportedError (naming the compiled core) before a connection is made or a
    port bound; "auto" falls back to MSG_ZEROCOPY."""
    code = """
import asyncio, socket
from pagefrag import aio
from pagefrag.errors import CompletionTimeoutError, ZeroCopyUnsupportedError
listener = socket.create_server(("127.0.0.1", 0))
listener.setblocking(False)
port = listener.getsockname()[1]
async def main():
    try:
        await aio.open_connection("127.0.0.1", port, backend="uring")
    except ZeroCopyUnsupportedError as exc:
        print("connect:", exc)
    try:
        listener.accept()
    except BlockingIOError:
        print("no connection made")
    try:
        await aio.start_server(lambda r, w: None, "127.0.0.1", port, backend="uring")
    except ZeroCopyUnsupportedError as exc:
        print("serve:", exc)
    _, w = await aio.open_connection("127.0.0.1", port, backend="auto")
    print("auto:", type(w.transport).__name__)
    w.close()
asyncio.run(main())
"""
    out = python_in_child(code, pure=True).stdout
    assert "connect: the io_uring backend needs the compiled core" in out
    assert "no connection made" in out
    # Refused before binding: the port is still the listener's, and no EADDRINUSE came.
    assert "serve: the io_uring backend needs the compiled core" in out
    assert "auto: ZeroCopyTransport" in out


@pytest.mark.skipif(WHY_NOT is None, reason="io_uring works here: the refusal is not reachable")
def test_backend_uring_raises_where_io_uring_is_unavailable() -> None:
    async def main() -> None:
        with pytest.raises(ZeroCopyUnsupportedError):
            await aio.open_connection("127.0.0.1", 9, backend="uring")

    asyncio.run(main())


class _InterruptAfterFiling:
    """A channel whose submit_iov raises KeyboardInterrupt once, right after the real
    call returned: where CPython raises a SIGINT that arrived during the call."""

    def __init__(self, ch: Any) -> None:
        self.__dict__["_real"] = ch
        self.__dict__["armed"] = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def submit_iov(self, *args: Any, **kwargs: Any) -> Any:
        req = self._real.submit_iov(*args, **kwargs)
        if self.armed:
            self.__dict__["armed"] = False
            raise KeyboardInterrupt
        return req


@needs_uring
def test_an_interrupt_as_a_request_is_filed_neither_stalls_nor_duplicates(run: Run) -> None:
    """The request is filed (and handed to the kernel) when the interrupt is raised: the
    transport still knows it as the one in flight, so the stream neither stalls nor
    sends the head again. Failed before: 0 bytes and CompletionTimeoutError, or (with
    another connection submitting the ring) the first write arrived twice."""

    async def main() -> None:
        server, port, received = await sink()
        _, writer = await aio.open_connection("127.0.0.1", port, backend="uring", zerocopy="always")
        zs = writer.transport._zs  # type: ignore[attr-defined]
        real = zs._ch
        zs._ch = _InterruptAfterFiling(real)
        with pytest.raises(KeyboardInterrupt):
            writer.write(b"A" * (1 << 20))
        zs._ch = real
        writer.write(b"B" * (1 << 20))
        await asyncio.wait_for(writer.drain(), 30)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 30)
        await until(lambda: sum(map(len, received.values())) >= 2 << 20)
        await asyncio.sleep(0.1)
        (got,) = received.values()
        assert got == b"A" * (1 << 20) + b"B" * (1 << 20)
        server.close()

    run(main())
