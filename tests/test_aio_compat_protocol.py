"""pagefrag.aio beside asyncio at the transport and protocol level (issue 11, items 5, 7
and their uvloop parity, 8): the exception types of writes and drains after a close, a
loss or a peer reset, ``write(str)``, and ``asyncio.BufferedProtocol`` (``get_buffer`` /
``buffer_updated``, ``set_protocol``). Each body runs against asyncio and pagefrag.aio
on asyncio's loop and on uvloop: stream tests with the ``streams`` fixture, transport
tests with ``connect`` (``loop.create_connection`` or ``pagefrag.aio.create_connection``).

The reference is asyncio's own transport (``selector_events``). Where uvloop's native
transport differs from it, that one combination is marked ``xfail(strict=True)`` with
the difference as the reason; pagefrag's transport, the same on both loops, gives
asyncio's behaviour there too."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from helpers import Run, counters

from pagefrag import aio

Connect = Callable[..., Awaitable[tuple[Any, Any]]]


def _loop_create_connection(factory: Callable[[], Any], host: str, port: int) -> Any:
    return asyncio.get_running_loop().create_connection(factory, host, port)


CONNECTS: dict[str, Connect] = {
    "asyncio": _loop_create_connection,
    "pagefrag": aio.create_connection,
}


@pytest.fixture(params=list(CONNECTS))
def connect(request: pytest.FixtureRequest) -> Connect:
    """``loop.create_connection`` (the running loop's own transport) or
    ``pagefrag.aio.create_connection``: the same signature, ``(factory, host, port)``."""
    return CONNECTS[request.param]


def uvloop_native_differs(request: pytest.FixtureRequest, reason: str) -> None:
    """Mark the run of uvloop's own transport (asyncio's API on uvloop) as a strict xfail."""
    params = request.node.callspec.params
    native = params.get("streams", params.get("connect")) == "asyncio"
    if native and params.get("run") == "uvloop":
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"uvloop: {reason}"))


PAYLOAD_SIZE = 16 << 20  # more than the kernel buffers hold: many reads, many writes


def payload() -> bytes:
    """Little-endian u64 counters: a lost, repeated or reordered chunk shows."""
    return counters(0, PAYLOAD_SIZE).tobytes()


async def listener() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    return srv, srv.getsockname()[1]


def reset(peer: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


# -- item 5: writes after close, after the loss, after a reset; write(str) ------------------


def test_write_after_close_is_ignored_and_drain_raises_connection_reset(
    streams: Any, run: Run
) -> None:
    """asyncio: write() after close() is dropped without an error (nothing more reaches
    the peer) and drain() raises ConnectionResetError. pagefrag raised ConnectionError
    from write() before issue 11."""

    async def main() -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        _, writer = await streams.open_connection("127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        writer.write(b"sent")
        writer.close()
        writer.write(b"ignored")  # no exception
        with pytest.raises(ConnectionResetError) as info:
            await writer.drain()
        await writer.wait_closed()
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), 10):
            received += chunk
        peer.close()
        srv.close()
        return bytes(received), type(info.value).__name__

    assert run(main()) == (b"sent", "ConnectionResetError")


@pytest.mark.parametrize("how", ["closed", "reset"])
def test_write_after_the_connection_was_lost_is_ignored(
    streams: Any, run: Run, how: str, request: pytest.FixtureRequest
) -> None:
    """asyncio: once connection_lost has run (after close(), or a reset by the peer),
    write() is still ignored and drain() raises ConnectionResetError."""
    uvloop_native_differs(request, "write() after connection_lost raises RuntimeError")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        reader, writer = await streams.open_connection("127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        if how == "closed":
            writer.close()
            await writer.wait_closed()
        else:
            reset(peer)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            with pytest.raises(ConnectionResetError):
                await writer.wait_closed()
        for _ in range(3):
            writer.write(b"ignored")
        with pytest.raises(ConnectionResetError):
            await writer.drain()
        if how == "closed":
            peer.close()
        srv.close()

    run(main())


def test_peer_reset_read_and_drain_raise_connection_reset(streams: Any, run: Run) -> None:
    """A reset by the peer (SO_LINGER 0, close): read(), drain() and wait_closed() raise
    ConnectionResetError (the read side: recv's ECONNRESET)."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        reader, writer = await streams.open_connection("127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        writer.write(b"hello")
        await writer.drain()
        reset(peer)
        raised = []
        for step in (
            lambda: asyncio.wait_for(reader.read(), 10),
            writer.drain,
            writer.wait_closed,
        ):
            try:
                await step()
            except Exception as exc:
                raised.append(type(exc).__name__)
        srv.close()
        return raised

    assert run(main()) == ["ConnectionResetError"] * 3


def test_peer_reset_with_a_large_write_queued_drain_raises_connection_reset(
    streams: Any, run: Run
) -> None:
    """16 MiB written to a peer that does not read (pagefrag: zero-copy, pages pinned),
    then the peer resets: the waiting drain() raises ConnectionResetError. Before issue
    11 pagefrag's resumed the protocol when it dropped the queue, so drain() returned as
    if the data had gone out (seen on asyncio's loop)."""

    async def main() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        _, writer = await streams.open_connection("127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        writer.write(payload())
        draining = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0.2)
        assert not draining.done()  # paused: far more than the high-water mark queued
        reset(peer)
        outcomes = []
        for waiting in (draining, writer.wait_closed()):
            try:
                await asyncio.wait_for(waiting, 30)
                outcomes.append("returned")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        srv.close()
        return outcomes[0], outcomes[1]

    assert run(main()) == ("ConnectionResetError", "ConnectionResetError")


def test_write_str_raises_type_error_and_the_connection_goes_on(streams: Any, run: Run) -> None:
    """write(str) raises TypeError naming what was expected and what was given, before
    anything is queued; the connection is still usable."""

    async def main() -> tuple[str, bytes]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        _, writer = await streams.open_connection("127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        with pytest.raises(TypeError) as info:
            writer.write("text")
        writer.write(b"bytes")
        writer.close()
        await writer.wait_closed()
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(peer, 1 << 16), 10):
            received += chunk
        peer.close()
        srv.close()
        return str(info.value), bytes(received)

    message, received = run(main())
    assert "bytes-like object" in message and "'str'" in message
    assert received == b"bytes"


class Lost(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def test_peer_reset_while_reading_is_paused_is_connection_reset(connect: Connect, run: Run) -> None:
    """Reading paused, the peer resets, then a write: connection_lost gets
    ConnectionResetError (asyncio learns it from send(); pagefrag from SO_ERROR when the
    socket reports the error, the write then being ignored)."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        transport, proto = await connect(Lost, "127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        transport.pause_reading()
        reset(peer)
        await asyncio.sleep(0.2)
        transport.write(b"after the reset")
        exc = await asyncio.wait_for(proto.lost, 10)
        srv.close()
        return type(exc).__name__

    assert run(main()) == "ConnectionResetError"


def test_a_reset_queued_by_the_zero_copy_layer_is_connection_reset(run: Run) -> None:
    """pagefrag only: zero-copy writes in flight, the peer resets (the kernel purges them:
    their completions arrive on the error queue), and the zero-copy layer has taken the
    reset from SO_ERROR and queued it (as it does when a wait for completions, e.g.
    ``zerocopy_socket.flush()``, sees POLLERR): the transport's next read of the error
    queue raises it as QueuedSocketError, a PageFragError. The connection must still fail
    with ConnectionResetError, as asyncio's would (before issue 11 connection_lost got
    the QueuedSocketError)."""

    async def main() -> tuple[str, str, bool]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        transport, proto = await aio.create_connection(Lost, "127.0.0.1", port, zerocopy="always")
        peer, _ = await loop.sock_accept(srv)  # never reads
        handles = [transport.write(bytes(1 << 20)) for _ in range(16)]
        zs = transport.get_extra_info("zerocopy_socket")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if zs.pinned_bytes:
                break
        assert zs.pinned_bytes
        reset(peer)
        # Until the RST has arrived (POLLERR), without running the loop: the transport
        # must not see it before the zero-copy layer has queued it.
        poller = select.poll()
        poller.register(transport.get_extra_info("socket").fileno(), 0)
        deadline = time.monotonic() + 10
        while not poller.poll(100) and time.monotonic() < deadline:
            pass
        assert zs._eq.take_socket_error()  # what ErrorQueue.wait() does on POLLERR
        exc = await asyncio.wait_for(proto.lost, 10)
        fired = all(h.done for h in handles)
        srv.close()
        return type(exc).__name__, type(exc.__cause__).__name__, fired

    assert run(main()) == ("ConnectionResetError", "QueuedSocketError", True)


# -- item 7: asyncio.BufferedProtocol ------------------------------------------------------


class Collecting(asyncio.BufferedProtocol):
    """Receives into one buffer of ``size`` bytes, collecting what arrives."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.received = bytearray()
        self.eofs = 0
        self.protocol_at_eof: Any = None
        self.transport: Any = None
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buf[:nbytes]

    def eof_received(self) -> None:
        self.eofs += 1
        self.protocol_at_eof = self.transport.get_protocol()  # (asyncio's is None after)
        # None: the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


async def send_and_shut(loop: asyncio.AbstractEventLoop, peer: socket.socket, data: bytes) -> None:
    await loop.sock_sendall(peer, data)
    peer.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("size", [4096, 1 << 20], ids=["4KiB", "1MiB"])
def test_buffered_protocol_receives_16_mib_intact_then_eof(
    connect: Connect, run: Run, size: int
) -> None:
    """get_buffer()/buffer_updated() instead of data_received(): 16 MiB arrive intact
    through a small and a large buffer, then eof_received() once and connection_lost(None).
    Before issue 11 pagefrag called data_received() and the connection failed."""
    data = payload()

    async def main() -> tuple[bool, int, Any, bool]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        _, proto = await connect(lambda: Collecting(size), "127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        sending = asyncio.ensure_future(send_and_shut(loop, peer, data))
        exc = await asyncio.wait_for(proto.lost, 60)
        await asyncio.wait_for(sending, 10)
        peer.close()
        srv.close()
        return proto.received == data, proto.eofs, exc, proto.protocol_at_eof is proto

    intact, eofs, exc, same = run(main())
    assert intact and eofs == 1 and exc is None and same


class Failing(Collecting):
    """A buffered protocol whose ``where`` callback fails: raises ``ValueError``, or, for
    "empty", returns an empty buffer from get_buffer()."""

    def __init__(self, where: str) -> None:
        super().__init__(4096)
        self.where = where
        self.raised: BaseException | None = None

    def get_buffer(self, sizehint: int) -> bytearray:
        if self.where == "empty":
            return bytearray()
        if self.where == "get_buffer":
            self.raised = ValueError("get_buffer fails")
            raise self.raised
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.where == "buffer_updated":
            self.raised = ValueError("buffer_updated fails")
            raise self.raised
        super().buffer_updated(nbytes)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("get_buffer", "Fatal error: protocol.get_buffer() call failed."),
        ("empty", "Fatal error: protocol.get_buffer() call failed."),
        ("buffer_updated", "Fatal error: protocol.buffer_updated() call failed."),
    ],
)
def test_buffered_protocol_errors_are_fatal_and_reported(
    connect: Connect, run: Run, where: str, message: str, request: pytest.FixtureRequest
) -> None:
    """As asyncio's _read_ready__get_buffer: an exception of get_buffer() or
    buffer_updated(), or an empty buffer (RuntimeError), goes to the loop's exception
    handler with asyncio's message, and connection_lost gets that same exception."""
    uvloop_native_differs(
        request,
        "reports 'Fatal error on transport TCPTransport' and wraps a get_buffer() error "
        "in RuntimeError('unhandled error (or an empty buffer) in get_buffer()')",
    )

    async def main() -> tuple[list[tuple[str, Any]], Any, Any]:
        loop = asyncio.get_running_loop()
        contexts: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
        srv, port = await listener()
        _, proto = await connect(lambda: Failing(where), "127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        await loop.sock_sendall(peer, b"x" * 1000)
        exc = await asyncio.wait_for(proto.lost, 10)
        peer.close()
        srv.close()
        return [(c["message"], c.get("exception")) for c in contexts], exc, proto.raised

    reported, exc, raised = run(main())
    if where == "empty":
        assert isinstance(exc, RuntimeError)
        assert str(exc) == "get_buffer() returned an empty buffer"
    else:
        assert exc is raised and isinstance(exc, ValueError)
    assert reported == [(message, exc)]


class Greeting(asyncio.Protocol):
    """A plain protocol that reads one line, then hands the connection to ``then`` (a
    BufferedProtocol) with ``transport.set_protocol``, passing on the bytes that came
    after the line."""

    def __init__(self, then: Collecting) -> None:
        self.then = then
        self.head = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\n" not in self.head:
            return
        _, _, rest = bytes(self.head).partition(b"\n")
        then = self.then
        self.transport.set_protocol(then)
        then.connection_made(self.transport)
        view = memoryview(rest)
        while view:  # what this protocol read past the line, fed as asyncio's sslproto does
            buf = then.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            then.buffer_updated(n)
            view = view[n:]


def test_set_protocol_switches_from_protocol_to_buffered_protocol_mid_stream(
    connect: Connect, run: Run
) -> None:
    """A line, then 16 MiB sent at once: the plain protocol reads the line and switches
    (set_protocol) to a BufferedProtocol, which gets every later byte in order, the EOF
    and the loss; get_protocol() returns it. Before issue 11 pagefrag's set_protocol()
    raised NotImplementedError."""
    data = payload()

    async def main() -> tuple[bool, int, Any, bool]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        after = Collecting(4096)
        await connect(lambda: Greeting(after), "127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        sending = asyncio.ensure_future(send_and_shut(loop, peer, b"HELLO\n" + data))
        exc = await asyncio.wait_for(after.lost, 60)
        await asyncio.wait_for(sending, 10)
        peer.close()
        srv.close()
        return after.received == data, after.eofs, exc, after.protocol_at_eof is after

    intact, eofs, exc, switched = run(main())
    assert intact and eofs == 1 and exc is None and switched


def test_writes_after_close_log_a_warning_after_a_few(
    streams: Any, run: Run, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """asyncio counts the writes it ignores and, past LOG_THRESHOLD_FOR_CONNLOST_WRITES
    (5), logs a warning for each (logger "asyncio"; pagefrag's: "pagefrag.aio"): a
    program writing to a dead connection in a loop hears of it."""
    uvloop_native_differs(request, "writes ignored after close() log nothing")

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        srv, port = await listener()
        _, writer = await streams.open_connection("127.0.0.1", port)
        peer, _ = await loop.sock_accept(srv)
        writer.close()
        counts = []
        for writes in (3, 7):
            for _ in range(writes):
                writer.write(b"ignored")
            counts.append(sum(r.levelno == logging.WARNING for r in caplog.records))
        await writer.wait_closed()
        peer.close()
        srv.close()
        return counts[0], counts[1]

    with caplog.at_level(logging.WARNING):
        first, later = run(main())
    assert first == 0 and later >= 1


# -- create_connection returns once connection_made has run ------------------------------------
def test_create_connection_returns_after_connection_made(connect: Connect, run: Run) -> None:
    """asyncio's create_connection waits for connection_made: a protocol that keeps its
    transport there can be used at once. Found in review: pagefrag returned a turn of the
    loop too early. Cancelled in that turn (the factory cancels its own task), the
    connection is closed at once, not when the garbage collector finds it."""

    class Keeps(asyncio.Protocol):
        transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

    async def main() -> tuple[bool, bytes]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)
        port = listener.getsockname()[1]
        with listener:
            transport, protocol = await connect(Keeps, "127.0.0.1", port)
            made = protocol.transport is transport
            transport.close()
            listener.accept()[0].close()

            def cancels() -> Keeps:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                return Keeps()

            with pytest.raises(asyncio.CancelledError):
                await connect(cancels, "127.0.0.1", port)
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(10)  # EOF now, not at the next collection
                eof = await asyncio.get_running_loop().run_in_executor(None, peer.recv, 1)
        return made, eof

    made, eof = run(main())
    assert made and eof == b""
