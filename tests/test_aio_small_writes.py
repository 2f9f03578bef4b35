"""Issue 12, the aio write path for small writes: a write copied whole at once returns
one shared handle that has already fired (no per-write objects), and queued small
writes go to the kernel coalesced, several in one copying ``sendmsg``, each credited in
order. Real sockets on loopback, both loops (the ``run`` fixture)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from helpers import POISON, Receiver, Run, VerifyingReceiver, counters

from pagefrag import Frag, FragDestructor, aio, leaks
from pagefrag.aio.transport import SENT


def _pair(sndbuf: int = 16384, rcvbuf: int = 16384) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair with small buffers, so small writes queue at once."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    client.connect(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    return client, server


class LateReceiver(VerifyingReceiver):
    """A VerifyingReceiver that starts reading only when ``go`` is set (bounded: 60 s)."""

    def __init__(self, sock: socket.socket) -> None:
        self.go = threading.Event()
        super().__init__(sock)

    def run(self) -> None:
        self.go.wait(60)
        super().run()


class SlowReader(threading.Thread):
    """Reads 4 KiB every millisecond until EOF or an error (a reset): a slow peer."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.received = 0
        self.start()

    def run(self) -> None:
        self.sock.settimeout(60)
        try:
            while chunk := self.sock.recv(4096):
                self.received += len(chunk)
                time.sleep(0.001)
        except OSError:
            pass


async def _until(cond: Any, seconds: float = 30) -> bool:
    for _ in range(int(seconds * 100)):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return bool(cond())


@pytest.mark.parametrize(("size", "count"), [(512, 100_000), (4096, 20_000)])
def test_small_writes_arrive_intact_in_order_and_coalesce(
    run: Run, streams: Any, size: int, count: int
) -> None:
    """``count`` plain ``write(bytes)`` calls, ``drain()`` every 64, to a peer that starts
    reading late through small socket buffers (so writes queue): every byte arrives in
    order, side by side with asyncio. pagefrag: every handle fires exactly once, no call
    is zero-copy, and the queued writes went out coalesced (fewer send calls than
    writes; before issue 12 one call per write at least)."""
    blob = counters(0, size * count).tobytes()
    result: dict[str, Any] = {}

    async def main() -> None:
        client, server = _pair()
        rx = LateReceiver(server)
        _, writer = await streams.open_connection(sock=client)
        asyncio.get_running_loop().call_later(0.3, rx.go.set)
        fires = [0] * count
        shared = 0
        for i in range(count):
            h = writer.write(blob[i * size : (i + 1) * size])
            if streams is aio:
                shared += h is SENT
                h.add_done_callback(lambda _h, i=i: fires.__setitem__(i, fires[i] + 1))
            if i % 64 == 63:
                await writer.drain()
        await writer.drain()
        if streams is aio:
            await writer.wait_released()
            result["stats"] = writer.transport.zerocopy_stats
            result["fires"] = fires
            result["shared"] = shared
        writer.close()
        await writer.wait_closed()
        rx.go.set()
        rx.join(60)
        result["received"], result["bad"] = rx.received, rx.bad_bytes

    run(main(), timeout=240)
    assert result["received"] == size * count
    assert result["bad"] == 0
    if streams is aio:
        stats = result["stats"]
        assert all(f == 1 for f in result["fires"]), "every handle fires exactly once"
        assert stats.zerocopy_sends == 0  # small: every call copied
        assert stats.sends < count // 2, f"{stats.sends} send calls for {count} writes"
        assert result["shared"] < count  # some writes were queued: their own handles


def test_mixed_queued_writes_keep_the_lent_rule_and_fire_destructors_after_handles(
    run: Run,
) -> None:
    """Writes queued behind a full socket, mixing ``bytes``, a ``bytearray`` and a
    memoryview of one (poisoned as soon as ``write()`` returns: the caller may reuse them
    then), a ``Frag`` whose page is poisoned when its destructor fires, and ``bytes`` with
    ``destructor=``: they go out coalesced, not one poisoned byte arrives, every handle
    fires once and every ``destructor=`` fires once, after its handle."""
    size, count = 512, 8192
    blob = counters(0, size * count).tobytes()
    result: dict[str, Any] = {}

    async def main() -> None:
        client, server = _pair()
        rx = LateReceiver(server)
        _, writer = await aio.open_connection(sock=client)
        handles: list[FragDestructor] = []
        fires = [0] * count
        after_handle: dict[int, bool] = {}

        def destroyed(key: int) -> None:
            # Fired inside write() (sent at once): its handle is not returned yet, and
            # is checked as write() returns.
            done = handles[key].done if key < len(handles) else None
            after_handle[key] = done is not False and key not in after_handle

        def poison(page: bytearray) -> None:
            page[:] = bytes([POISON]) * size  # the page is the caller's again

        for i in range(count):
            chunk = blob[i * size : (i + 1) * size]
            kind = i % 5
            if kind == 0:
                h = writer.write(chunk)
            elif kind in (1, 2):
                buf = bytearray(chunk)
                h = writer.write(buf if kind == 1 else memoryview(buf))
                buf[:] = bytes([POISON]) * size  # reused at once: allowed
            elif kind == 3:
                page = bytearray(chunk)
                d = FragDestructor(poison, page)
                h = writer.write(Frag(page, 0, size, d))
                d.unref()
            else:
                d = FragDestructor(destroyed, i)
                h = writer.write(chunk, destructor=d)
                d.unref()
                assert h is not SENT and (h.done or not d.done)
            handles.append(h)
            h.add_done_callback(lambda _h, i=i: fires.__setitem__(i, fires[i] + 1))
            if i == 256:
                result["queued"] = writer.transport.get_write_buffer_size()
            if i % 64 == 63:
                if i == 1023:
                    rx.go.set()  # the peer starts reading only now
                await writer.drain()
        await writer.drain()
        await writer.wait_released()
        result["stats"] = writer.transport.zerocopy_stats
        writer.close()
        await writer.wait_closed()
        rx.go.set()
        rx.join(60)
        result.update(fires=fires, after=after_handle, rx=rx)

    run(main(), timeout=120)
    rx = result["rx"]
    assert result["queued"] > 0, "the writes must have queued"
    assert rx.received == size * count
    assert rx.poison_bytes == 0 and rx.bad_bytes == 0
    assert all(f == 1 for f in result["fires"])
    keys = [i for i in range(count) if i % 5 == 4]
    assert sorted(result["after"]) == keys
    assert all(result["after"].values()), "destructor= fires after its handle"
    assert result["stats"].sends < count // 2


def test_abort_with_coalesced_writes_queued_fires_every_handle_once(run: Run) -> None:
    """A slow peer, small writes queued and going out coalesced, then ``abort()``: every
    handle fires exactly once and every ``destructor=`` once, after its handle."""
    size, count = 512, 20_000
    result: dict[str, Any] = {}

    async def main() -> None:
        client, server = _pair()
        reader = SlowReader(server)
        _, writer = await aio.open_connection(sock=client, high_water=64 << 20)
        handles: list[FragDestructor] = []
        fires = [0] * count
        destructor_fires: dict[int, int] = {}
        after_handle: dict[int, bool] = {}

        def destroyed(key: int) -> None:
            destructor_fires[key] = destructor_fires.get(key, 0) + 1
            # Fired inside write() (sent at once): checked as write() returns.
            after_handle[key] = handles[key].done if key < len(handles) else True

        data = bytes(size)
        for i in range(count):
            if i % 7 == 0:
                d = FragDestructor(destroyed, i)
                h = writer.write(data, destructor=d)
                d.unref()
                assert h.done or not d.done
            else:
                h = writer.write(data)
            handles.append(h)
            h.add_done_callback(lambda _h, i=i: fires.__setitem__(i, fires[i] + 1))
        transport = writer.transport
        # Let some go out coalesced, then abort with the rest still queued.
        await _until(lambda: transport.zerocopy_stats.sends >= 20)
        result["sends"] = transport.zerocopy_stats.sends
        result["queued"] = transport.get_write_buffer_size()
        writer.abort()
        await _until(lambda: all(f == 1 for f in fires) and transport.is_closing())
        await asyncio.sleep(0.05)  # a second fire would show here
        result.update(fires=fires, dfires=destructor_fires, after=after_handle)
        server.close()
        reader.join(30)

    run(main(), timeout=120)
    assert result["queued"] > 0, "writes must still be queued at the abort"
    assert result["sends"] < count
    assert all(f == 1 for f in result["fires"])
    keys = list(range(0, count, 7))
    assert sorted(result["dfires"]) == keys
    assert all(v == 1 for v in result["dfires"].values())
    assert all(result["after"].values())


def test_a_write_copied_whole_returns_the_shared_fired_handle(run: Run) -> None:
    """On an idle connection a small ``bytes`` or ``bytearray`` write is copied whole at
    once and returns :data:`SENT` (fired, awaitable); a write with ``destructor=``, a
    ``write_zerocopy``, an empty write and a write above the copy threshold get their own
    handle. Leak tracking reports nothing either way."""
    result: dict[str, Any] = {}
    old = leaks.get_level()

    async def main() -> None:
        leaks.set_level("simple")
        srv = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
        srv.close()
        rx = Receiver(server)
        _, writer = await aio.open_connection(sock=client)
        small = writer.write(b"x" * 100)
        buf = bytearray(b"y" * 100)
        mutable = writer.write(buf)
        buf[:] = b"z" * 100
        await small  # fired: returns at once
        order: list[str] = []
        d = FragDestructor(lambda _: order.append(f"destructor after {h.done}"))
        h = writer.write(b"w" * 100, destructor=d)
        d.unref()
        zc = writer.write_zerocopy(b"v" * 100)
        big = writer.write(b"u" * (1 << 20))
        await asyncio.wait_for(asyncio.gather(h, zc, big), 30)
        await writer.wait_released()
        result.update(
            small=small,
            mutable=mutable,
            h=h,
            zc=zc,
            big=big,
            order=order,
            leaks=leaks.report(),
        )
        writer.close()
        await writer.wait_closed()
        result["got"] = rx.join(30)
        server.close()

    try:
        run(main())
    finally:
        leaks.set_level(old)
    assert result["small"] is SENT and result["mutable"] is SENT
    assert SENT.done and SENT.refcount == 0
    for key in ("h", "zc", "big"):
        assert result[key] is not SENT and result[key].done
    assert result["order"] == ["destructor after True"]
    assert result["leaks"] == []
    assert result["got"] == b"x" * 100 + b"y" * 100 + b"w" * 100 + b"v" * 100 + b"u" * (1 << 20)
