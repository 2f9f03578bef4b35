"""pagefrag.aio off the happy path (issue 9): failed writes, unbounded closes, TCP giving
up, ENOBUFS inside the loop, descriptor limits. Every test runs on asyncio's default loop
and on uvloop, on real sockets (loopback or NetLab namespaces)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Fired, Run, VerifyingReceiver, counters

from pagefrag import FragDestructor
from pagefrag._skbuff import Frag
from pagefrag.aio import (
    ZeroCopyStreamWriter,
    ZeroCopyTransport,
    create_connection,
    open_connection,
    start_server,
)
from pagefrag.errors import (
    CompletionTimeoutError,
    DestructorError,
    NotContiguousError,
    SendBufferError,
)
from pagefrag.testing.netlab import RECEIVER_IP, NetLab


async def sink_server() -> tuple[Any, int, dict[str, bytearray]]:
    received: dict[str, bytearray] = {}

    async def handle(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
        buf = received.setdefault(str(writer.get_extra_info("peername")), bytearray())
        while chunk := await reader.read(1 << 20):
            buf += chunk
        writer.close()

    server = await start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


def receiver_listener(lab: NetLab) -> tuple[socket.socket, int]:
    """A TCP listener at the receiver's address inside its namespace, and its port."""
    listener = lab.open_socket(lab.receiver)
    listener.bind((RECEIVER_IP, 0))
    listener.listen(1)
    return listener, listener.getsockname()[1]


async def connect_to(listener: socket.socket, port: int) -> tuple[socket.socket, socket.socket]:
    """From the sender's namespace (the caller is inside it): a non-blocking socket
    connected to ``listener``, and the accepted end."""
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (RECEIVER_IP, port))
    conn, _ = listener.accept()
    return sock, conn


async def writes_in_flight(
    sock: socket.socket, fired: Fired, linger: float
) -> tuple[ZeroCopyTransport, ZeroCopyStreamWriter, list[FragDestructor]]:
    """A bare transport (always zero-copy, ``linger``) on a connected ``sock`` with eight
    512 KiB writes handed over, each with destructor ``fired.make(i)``; half a second
    later, for the kernel to take what it can."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport = ZeroCopyTransport(loop, sock, protocol, zerocopy="always", linger=linger)
    writer = ZeroCopyStreamWriter(transport, protocol, reader, loop)
    await asyncio.sleep(0)
    handles = []
    for i in range(8):
        d = fired.make(i)
        handles.append(transport.write(bytearray([i]) * (512 * 1024), d))
        d.unref()
    await asyncio.sleep(0.5)
    return transport, writer, handles


# -- item 8: a failed write changes nothing ------------------------------------------------


def test_a_failed_write_registers_nothing_and_wait_released_returns(run: Run, fired: Fired) -> None:
    async def main() -> None:
        server, port, received = await sink_server()
        _, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        dead = FragDestructor(None)
        dead.unref()  # fired already
        live = fired.make(1)
        page = bytearray(b"p") * 65536

        with pytest.raises(DestructorError):
            writer.write(bytearray(1 << 20), destructor=dead)
        await asyncio.wait_for(writer.wait_released(), 5)  # nothing was registered
        with pytest.raises(NotContiguousError):  # not a buffer
            writer.write(42)
        with pytest.raises(TypeError):
            writer.write(page, destructor="not a destructor")  # type: ignore[arg-type]
        with pytest.raises(DestructorError):  # the second frag's destructor has fired
            writer.write([Frag(page, destructor=live), Frag(page, destructor=dead)])
        assert live.refcount == 1, "the refs taken before the failure were given back"
        assert writer.transport.get_write_buffer_size() == 0

        # Nothing was registered: waiting for every write so far returns at once.
        await asyncio.wait_for(writer.wait_released(), 5)
        # And the connection is unharmed.
        handle = writer.write([Frag(page, destructor=live)])
        live.unref()
        await asyncio.wait_for(writer.wait_released(), 10)
        assert handle.done and fired.counts == {1: 1}
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if received and len(next(iter(received.values()))) == len(page):
                break
            await asyncio.sleep(0.05)
        server.close()
        assert list(received.values()) == [page]

    run(main())


def test_a_protocol_raising_fails_its_connection_only(run: Run) -> None:
    """With one epoll shared by every connection of the loop, a protocol's exception
    must not escape into the poller: it fails that connection, as in asyncio's own
    transports, and the others go on."""
    contexts: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
        lost: asyncio.Future[BaseException | None] = loop.create_future()

        class Boom(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                raise ValueError("boom")

            def connection_lost(self, exc: BaseException | None) -> None:
                lost.set_result(exc)

        async def echo(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        server = await start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await create_connection(Boom, "127.0.0.1", port)
        reader, writer = await open_connection("127.0.0.1", port)
        transport.write(b"echo me")
        assert isinstance(await asyncio.wait_for(lost, 10), ValueError)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())
    assert [c["message"] for c in contexts] == [
        "Fatal error: protocol.data_received() call failed."
    ]


def flow_control_pair(
    loop: asyncio.AbstractEventLoop, raise_in: str, contexts: list[dict[str, Any]]
) -> tuple[type[asyncio.Protocol], asyncio.Future[BaseException | None]]:
    """A protocol class whose ``raise_in`` callback (pause_writing or resume_writing)
    raises, and a future set by its connection_lost."""
    lost: asyncio.Future[BaseException | None] = loop.create_future()

    class Flaky(asyncio.Protocol):
        def pause_writing(self) -> None:
            if raise_in == "pause_writing":
                raise RuntimeError("protocol bug in pause_writing")

        def resume_writing(self) -> None:
            if raise_in == "resume_writing":
                raise RuntimeError("protocol bug in resume_writing")

        def connection_lost(self, exc: BaseException | None) -> None:
            lost.set_result(exc)

    loop.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
    return Flaky, lost


async def still_echoes(port: int) -> None:
    """Another connection of the same loop still works."""
    reader, writer = await open_connection("127.0.0.1", port)
    writer.write(b"still here")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b"still here"
    writer.close()
    await writer.wait_closed()


async def echo_server() -> tuple[Any, int]:
    async def echo(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
        # The flaky clients close without reading their echo: their reset is expected.
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 20):
                writer.write(data)
        writer.close()

    server = await start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def flaky_connection(
    raise_in: str, contexts: list[dict[str, Any]]
) -> tuple[Any, asyncio.Future[BaseException | None], Any, int]:
    """A zero-copy connection (high water 64 KiB) to an echo server whose protocol raises
    in ``raise_in``: (transport, its connection_lost future, the server, its port)."""
    flaky, lost = flow_control_pair(asyncio.get_running_loop(), raise_in, contexts)
    server, port = await echo_server()
    transport, _ = await create_connection(
        flaky, "127.0.0.1", port, zerocopy="always", high_water=65536
    )
    return transport, lost, server, port


def test_a_protocol_raising_in_resume_writing_still_gets_connection_lost(run: Run) -> None:
    """As asyncio's flow control: a protocol's resume_writing() raising goes to the
    loop's exception handler and the transport goes on; close() still ends in
    connection_lost, and the loop's other connections are unaffected."""
    contexts: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    async def main() -> None:
        transport, lost, server, port = await flaky_connection("resume_writing", contexts)
        handle = transport.write_zerocopy(bytearray(1 << 20))  # pins far above high water
        transport.close()  # resume_writing() comes with the completions
        result["lost"] = await asyncio.wait_for(asyncio.shield(lost), 20)
        result["handle"] = handle.done
        result["closed"] = transport.get_extra_info("socket").fileno() == -1
        await still_echoes(port)
        server.close()

    run(main())
    assert result["lost"] is None and result["handle"] and result["closed"]
    assert [(c["message"], type(c["exception"])) for c in contexts] == [
        ("protocol.resume_writing() failed", RuntimeError)
    ]


def test_a_protocol_raising_in_pause_writing_does_not_fail_the_write(run: Run) -> None:
    """The protocol's exception is not write()'s caller's: the write is queued and sent,
    its handle returned; the exception goes to the loop's exception handler."""
    contexts: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    async def main() -> None:
        transport, lost, server, port = await flaky_connection("pause_writing", contexts)
        handle = transport.write_zerocopy(bytearray(1 << 20))  # pinned: above high water
        await asyncio.wait_for(handle, 20)
        transport.close()
        result["lost"] = await asyncio.wait_for(asyncio.shield(lost), 20)
        await still_echoes(port)
        server.close()

    run(main())
    assert result["lost"] is None
    assert [(c["message"], type(c["exception"])) for c in contexts] == [
        ("protocol.pause_writing() failed", RuntimeError)
    ]


def test_abort_whose_reset_fails_still_reports_the_loss(run: Run) -> None:
    """abort() always reaches connection_lost: a reset that fails for an unexpected
    reason (here EBADF: the socket was closed behind the transport's back) becomes the
    connection's exception instead of leaving the transport closing forever."""
    result: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[BaseException | None] = loop.create_future()

        class Watch(asyncio.Protocol):
            def connection_lost(self, exc: BaseException | None) -> None:
                lost.set_result(exc)

        server, port = await echo_server()
        transport, _ = await create_connection(Watch, "127.0.0.1", port, linger=2.0)
        await asyncio.sleep(0)
        transport.get_extra_info("socket").close()
        transport.abort()
        result["lost"] = await asyncio.wait_for(asyncio.shield(lost), 10)
        result["closing"] = transport.is_closing()
        await still_echoes(port)
        server.close()

    run(main())
    assert isinstance(result["lost"], OSError) and result["lost"].errno == errno.EBADF
    assert result["closing"]


# -- item 10: close() is bounded -----------------------------------------------------------


def test_close_under_total_loss_reports_the_loss_after_linger_and_keeps_the_pins(
    lab: NetLab, run: Run, fired: Fired
) -> None:
    listener, port = receiver_listener(lab)
    lost: dict[str, Any] = {}

    async def main() -> None:
        sock, conn = await connect_to(listener, port)
        lab.add_loss(100)
        transport, writer, handles = await writes_in_flight(sock, fired, linger=2.0)
        assert transport.pinned_bytes > 0, "the kernel must hold some of the writes"
        started = time.monotonic()
        transport.close()
        with pytest.raises(CompletionTimeoutError) as info:
            await asyncio.wait_for(writer.wait_closed(), 20)
        lost["after"] = time.monotonic() - started
        lost["exc"] = info.value
        await asyncio.sleep(0.5)
        # The pages the kernel held stay pinned: their destructors have not fired.
        lost["pending"] = [i for i, h in enumerate(handles) if not h.done]
        lost["pinned"] = transport.pinned_bytes
        lost["dropped"] = lab.dropped()
        conn.close()
        # The test's own cleanup: the descriptor would otherwise stay open for the life
        # of the process (the pins stay kept either way).
        sock.close()

    with lab.inside(lab.sender):
        run(main())
    assert lost["dropped"] > 0, "the drop rule must have dropped frames"
    assert 1.5 <= lost["after"] < 10
    assert lost["exc"].outstanding > 0 and lost["exc"].pinned_bytes > 0
    assert lost["pending"] and lost["pinned"] > 0
    assert all(fired.counts.get(i) is None for i in lost["pending"])
    assert all(fired.counts.get(i) == 1 for i in set(range(8)) - set(lost["pending"]))


def test_pages_released_after_the_linger_bound_still_fire_and_close_the_socket(
    lab: NetLab, run: Run, fired: Fired
) -> None:
    """Past the linger bound the loss is reported, but the socket stays watched: when the
    kernel releases the pages later (here: the loss is lifted), the handles fire once
    and the descriptor is closed."""
    listener, port = receiver_listener(lab)
    result: dict[str, Any] = {}

    async def main() -> None:
        sock, conn = await connect_to(listener, port)

        def drain() -> None:  # until the sender's FIN: reading keeps the window open
            with contextlib.suppress(OSError):
                while conn.recv(1 << 20):
                    pass

        reader_thread = threading.Thread(target=drain, daemon=True)
        reader_thread.start()
        lab.add_loss(100)
        transport, writer, handles = await writes_in_flight(sock, fired, linger=1.0)
        transport.close()
        with pytest.raises(CompletionTimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 20)
        await asyncio.sleep(1.0)
        result["pending"] = pending = [i for i, h in enumerate(handles) if not h.done]
        result["fired_before"] = {i: fired.counts.get(i) for i in pending}
        result["open_before"] = sock.fileno() != -1
        result["dropped"] = lab.dropped()
        lab.add_loss(0)
        # Bounded: TCP's backed-off retransmit timer (seconds) decides when.
        await asyncio.wait_for(transport.wait_released(), 60)
        for _ in range(400):
            if sock.fileno() == -1:
                break
            await asyncio.sleep(0.05)
        result["closed_after"] = sock.fileno() == -1
        await asyncio.get_running_loop().run_in_executor(None, reader_thread.join, 30)
        result["peer_saw_eof"] = not reader_thread.is_alive()
        conn.close()
        sock.close()  # no-op when the transport closed it (the old code did not)

    with lab.inside(lab.sender):
        run(main())
    assert result["dropped"] > 0, "the drop rule must have dropped frames"
    assert result["pending"], "the kernel must have held some writes past the linger bound"
    assert result["fired_before"] == {i: None for i in result["pending"]}
    assert result["open_before"], "the socket stays open while the kernel holds pages"
    assert fired.once_each(range(8)), fired.counts
    assert result["closed_after"] and result["peer_saw_eof"]


def test_linger_and_enobufs_timeout_reach_the_transport_through_the_helpers(run: Run) -> None:
    async def main() -> None:
        seen: list[ZeroCopyStreamWriter] = []

        async def keep(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            seen.append(writer)
            await reader.read()
            writer.close()

        server = await start_server(keep, "127.0.0.1", 0, linger=3.0, enobufs_timeout=4.0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await open_connection("127.0.0.1", port, linger=None, enobufs_timeout=5.0)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert (seen[0].transport._linger, seen[0].transport._enobufs_timeout) == (3.0, 4.0)
        assert (writer.transport._linger, writer.transport._enobufs_timeout) == (None, 5.0)
        with pytest.raises(ValueError):
            await open_connection("127.0.0.1", port, linger=-1)
        writer.close()
        await writer.wait_closed()
        server.close()

    run(main())


# -- item 11: TCP giving up surfaces in wait_closed ----------------------------------------


def test_tcp_giving_up_makes_wait_closed_raise(lab: NetLab, run: Run, fired: Fired) -> None:
    listener, port = receiver_listener(lab)
    result: dict[str, Any] = {}

    async def main() -> None:
        _, writer = await open_connection(RECEIVER_IP, port, zerocopy="always")
        conn, _ = listener.accept()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)  # ms
        lab.add_loss(100)
        handles = []
        for i in range(4):  # small enough for the kernel to take all of it at once
            d = fired.make(i)
            handles.append(writer.write(bytearray([i]) * 2048, destructor=d))
            d.unref()
        await asyncio.sleep(0.1)
        transport = writer.transport
        assert transport.get_write_buffer_size() == transport.pinned_bytes > 0, (
            "everything must be in the kernel's hands, nothing left in our queue"
        )
        writer.close()
        with pytest.raises(OSError) as info:
            await asyncio.wait_for(writer.wait_closed(), 30)
        result["exc"] = info.value
        result["handles_done"] = all(h.done for h in handles)
        result["dropped"] = lab.dropped()
        conn.close()

    with lab.inside(lab.sender):
        run(main())
    assert result["dropped"] > 0, "the drop rule must have dropped frames"
    assert result["exc"].errno == errno.ETIMEDOUT
    assert result["handles_done"] and fired.once_each(range(4))


# -- item 12: ENOBUFS waits in the loop, not inside write() --------------------------------


def test_enobufs_waits_in_the_loop_and_loses_nothing(lab: NetLab, run: Run, fired: Fired) -> None:
    lab.sysctl(lab.sender, "net.core.optmem_max", 2000)
    listener, port = receiver_listener(lab)
    chunk, count = 256 * 1024, 96
    result: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gaps = [0.0]
        last = [loop.time()]
        running = [True]

        def tick() -> None:
            now = loop.time()
            gaps.append(now - last[0])
            last[0] = now
            if running[0]:
                loop.call_later(0.02, tick)

        _, writer = await open_connection(RECEIVER_IP, port, zerocopy="always")
        # Room for megabytes of unsent data in the kernel: more zero-copy sends (one
        # optmem charge per 512 KiB at most) than optmem_max allows.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        conn, _ = listener.accept()
        rx = VerifyingReceiver(conn)
        # Nothing is acknowledged for 5 s: no completion comes, optmem stays full.
        lab.add_loss(100)

        def stop() -> None:  # in a thread: the loop may be blocked (it was, before)
            result["dropped"] = lab.dropped()
            lab.add_loss(0)

        timer.append(threading.Timer(5.0, stop))
        timer[0].start()
        last[0] = loop.time()
        tick()
        handles = []
        for i in range(count):
            data = bytearray(counters(i * chunk, chunk).tobytes())
            d = fired.make(i)
            handles.append(writer.write(data, destructor=d))
            d.unref()
            await writer.drain()
        await asyncio.wait_for(writer.wait_released(), 60)
        result["stats"] = writer.transport.zerocopy_stats
        running[0] = False
        writer.close()
        await writer.wait_closed()
        await loop.run_in_executor(None, rx.join, 60)
        result["rx"] = rx
        result["max_gap"] = max(gaps)
        result["handles"] = sum(h.done for h in handles)

    timer: list[threading.Timer] = []
    try:
        with lab.inside(lab.sender):
            run(main(), 120)
    finally:
        if timer:  # never outlives the lab
            timer[0].cancel()
            timer[0].join(30)
    assert result["dropped"] > 0, "the drop rule must have dropped frames"
    assert result["stats"].enobufs_retries > 0, "optmem_max=2000 must force ENOBUFS"
    assert result["max_gap"] < 2.0, f"the loop was blocked for {result['max_gap']:.2f}s"
    rx = result["rx"]
    assert rx.received == chunk * count and rx.bad_bytes == 0
    assert result["handles"] == count and fired.once_each(range(count))


def test_enobufs_past_its_bound_fails_the_connection_and_every_handle_fires(
    lab: NetLab, run: Run, fired: Fired
) -> None:
    lab.sysctl(lab.sender, "net.core.optmem_max", 2000)
    listener, port = receiver_listener(lab)
    result: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _, writer = await open_connection(
            RECEIVER_IP, port, zerocopy="always", enobufs_timeout=1.0, high_water=64 << 20
        )
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        conn, _ = listener.accept()
        lab.add_loss(100)  # for good: ENOBUFS never ends
        handles = []
        for i in range(32):
            d = fired.make(i)
            handles.append(writer.write(bytearray([i]) * (256 * 1024), destructor=d))
            d.unref()
        started = loop.time()
        with pytest.raises(SendBufferError):
            await asyncio.wait_for(writer.wait_closed(), 20)
        result["after"] = loop.time() - started
        await asyncio.wait_for(writer.wait_released(), 20)
        result["handles"] = sum(h.done for h in handles)
        result["stats"] = writer.transport.zerocopy_stats
        result["dropped"] = lab.dropped()
        conn.close()

    with lab.inside(lab.sender):
        run(main())
    assert result["dropped"] > 0, "the drop rule must have dropped frames"
    assert result["stats"].enobufs_retries > 0
    assert 0.9 <= result["after"] < 10
    assert result["handles"] == 32 and fired.once_each(range(32))


# -- item 14: one descriptor per connection, and accept survives EMFILE --------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> set[tuple[str, str]]:
    """Each open descriptor with what it points at (a socket's inode, an epoll...)."""
    table = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own one)
            table.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return table


def new_fds(base: set[tuple[str, str]]) -> int:
    """Descriptors opened since ``base`` and still open (what a collection of an
    earlier test's garbage closes meanwhile does not count)."""
    return len(fd_table() - base)


@pytest.fixture
def low_fd_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(256, open_fds() + 160)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_one_descriptor_per_connection_and_accept_survives_emfile(
    run: Run, low_fd_limit: int
) -> None:
    contexts: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
        served: list[ZeroCopyStreamWriter] = []

        async def echo(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            served.append(writer)
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        async def wait_served(n: int) -> None:
            for _ in range(400):
                if len(served) >= n:
                    return
                await asyncio.sleep(0.025)
            raise AssertionError(f"the server accepted {len(served)} of {n}")

        server = await start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        gc.collect()
        base = fd_table()
        conns = [await open_connection("127.0.0.1", port) for _ in range(20)]
        await wait_served(20)
        # One descriptor per side per connection, plus the loop's one shared epoll.
        result["per_20"] = new_fds(base)
        spare = os.open("/dev/null", os.O_RDONLY)
        try:
            for _ in range(low_fd_limit):
                conns.append(await open_connection("127.0.0.1", port))
        except OSError as exc:
            result["client_error"] = exc.errno
        # Exactly one descriptor free: the client takes it, so the server's accept of
        # that connection meets EMFILE.
        os.close(spare)
        conns.append(await open_connection("127.0.0.1", port))
        result["opened"] = len(conns)
        for _ in range(200):
            if contexts:
                break
            await asyncio.sleep(0.025)
        result["contexts_at_limit"] = len(contexts)
        # Free descriptors: the server accepts what waited and serves new connections.
        for _, writer in conns[:20]:
            writer.close()
            await writer.wait_closed()
        del conns[:20]
        await wait_served(result["opened"])
        for _ in range(10):
            reader, writer = await open_connection("127.0.0.1", port)
            writer.write(b"still serving")
            assert await asyncio.wait_for(reader.readexactly(13), 10) == b"still serving"
            conns.append((reader, writer))
        for _, writer in conns:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns))
        for _ in range(200):  # the server's side closes after our EOF
            if not new_fds(base):
                break
            await asyncio.sleep(0.025)
        result["left"] = new_fds(base)
        server.close()

    run(main(), 120)
    assert result["per_20"] == 2 * 20 + 1
    assert result["client_error"] == errno.EMFILE
    assert result["opened"] > 50
    assert result["left"] == 0, "the shared epoll goes with the last transport"
    assert not [c for c in contexts if "Exception in callback" in c.get("message", "")]
    assert result["contexts_at_limit"] > 0, "the server's accept must have met EMFILE"
    assert {c["message"] for c in contexts} == {"socket.accept() out of system resource"}
    assert {c["exception"].errno for c in contexts} == {errno.EMFILE}


def test_the_shared_epoll_goes_with_the_last_transport_and_comes_back(run: Run) -> None:
    async def main() -> list[int]:
        async def echo(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        server = await start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        gc.collect()
        base = fd_table()
        extra = []
        for round_ in range(3):
            conns = [await open_connection("127.0.0.1", port) for _ in range(3)]
            extra.append(new_fds(base))  # 3 x 2 sockets + the shared epoll
            for k, (reader, writer) in enumerate(conns):
                msg = bytes([round_, k]) * 1000
                writer.write(msg)
                assert await asyncio.wait_for(reader.readexactly(len(msg)), 10) == msg
            for _, writer in conns:
                writer.close()
                await writer.wait_closed()
            for _ in range(200):
                if not new_fds(base):
                    break
                await asyncio.sleep(0.025)
            extra.append(new_fds(base))
        server.close()
        return extra

    assert run(main()) == [7, 0] * 3
