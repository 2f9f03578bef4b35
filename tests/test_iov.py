"""IoVec and Pin (pagefrag._iov): bytes travelling with their lifetime — what a send hands
the kernel, and what each holder keeps alive until the kernel is done."""

from __future__ import annotations

import asyncio
import dis
import inspect
import socket
import sys
import time
from typing import Any

import numpy as np
import pytest
from helpers import Fired, Receiver, Run

from pagefrag import BufferPool, Frag, FragDestructor, IoVec, SkBuff, aio
from pagefrag._iov import Pin
from pagefrag.aio._writes import WriteQueue
from pagefrag.errors import DestructorError, NotABufferError
from pagefrag.testing.netlab import NetLab
from pagefrag.zerocopy import ZeroCopySocket
from pagefrag.zerocopy._sender import Sender


def joined(iov: IoVec) -> bytes:
    return b"".join(bytes(v) for v in iov.views)


def test_of_every_kind_of_data_keeps_each_piece_with_its_destructor() -> None:
    d1, d2 = FragDestructor(name="a"), FragDestructor(name="b")
    skb = SkBuff(b"head:")
    skb.add_frag(bytearray(b"frag1"), destructor=d1)
    pool = BufferPool(8, 1)
    buf = pool.acquire()
    buf.data[:] = b"poolbuf!"
    data: list[Any] = [
        b"bytes",
        bytearray(b"ba"),
        memoryview(b"mv"),
        np.arange(3, dtype=np.uint8),
        Frag(b"xxfragyy", 2, 4, d2),
        buf,
        skb,
    ]
    iov = IoVec.of(data)
    assert joined(iov) == b"bytesbamv\x00\x01\x02fragpoolbuf!head:frag1"
    assert iov.owners == [None, None, None, None, d2, buf.destructor, None, d1]
    assert iov.nbytes == len(joined(iov)) and len(iov) == 8
    assert [d.refcount for d in (d1, d2)] == [2, 1]  # only the skb's own reference: none taken
    skb.free()
    buf.release()
    for d in (d1, d2):
        d.unref()


def test_a_list_of_skbuffs_is_their_heads_and_frags_in_order() -> None:
    d = FragDestructor()
    skbs = []
    for k in range(3):
        skb = SkBuff(f"h{k}".encode())
        skb.add_frag(bytes([65 + k]) * 3, destructor=d)
        skbs.append(skb)
    iov = IoVec.of(skbs)
    assert joined(iov) == b"h0AAAh1BBBh2CCC"
    assert iov.owners == [None, d, None, d, None, d]
    for skb in skbs:
        skb.free()
    d.unref()
    assert d.done


def test_what_is_not_a_buffer_raises_and_changes_nothing() -> None:
    d = FragDestructor()
    with pytest.raises(NotABufferError):
        IoVec.of([Frag(b"ok", destructor=d), object()])
    assert d.refcount == 1


def test_advance_drops_whole_and_partial_pieces_with_their_owners() -> None:
    d = FragDestructor()
    iov = IoVec.of([b"abc", Frag(b"defg", destructor=d), b"hi"])
    iov.advance(4)
    assert joined(iov) == b"efghi" and iov.owners == [d, None]
    iov.advance(3)
    assert joined(iov) == b"hi" and iov.owners == [None]
    iov.advance(2)
    assert len(iov) == 0
    d.unref()


def test_pin_takes_every_reference_or_none() -> None:
    live, fired = FragDestructor(), FragDestructor()
    fired.unref()  # fired: no reference may be taken on it any more
    iov = IoVec.of([Frag(b"aa", destructor=live), Frag(b"bb", destructor=fired)])
    with pytest.raises(DestructorError):
        iov.pin("holder")
    assert live.refcount == 1  # the one taken before the failure was dropped again
    extra = FragDestructor()
    extra.unref()
    with pytest.raises(DestructorError):
        IoVec.of([Frag(b"aa", destructor=live)]).pin("holder", extra)
    assert live.refcount == 1
    with pytest.raises(TypeError):
        IoVec.of(b"x").pin("holder", "not a destructor")  # type: ignore[arg-type]
    live.unref()


def test_pin_holds_views_and_references_until_released_once() -> None:
    events: list[str] = []
    d = FragDestructor(events.append, "released")
    own = FragDestructor(events.append, "call's own")
    iov = IoVec.of([Frag(b"aaaa", destructor=d), b"bb"])
    pin = iov.pin("h", own)
    d.unref()
    own.unref()
    assert events == [] and d.refcount == 1 and own.refcount == 1
    assert pin.views is not None and b"".join(map(bytes, pin.views)) == b"aaaabb"
    pin.release("h")
    assert sorted(events) == ["call's own", "released"] and pin.released
    pin.release("h")  # a second release drops nothing
    assert d.refcount == 0 and own.refcount == 0


def test_trim_keeps_what_the_kernel_took_and_hands_back_the_rest() -> None:
    ds = [FragDestructor(name=str(k)) for k in range(3)]
    own = FragDestructor(name="own")
    iov = IoVec.of(
        [
            Frag(b"0000", destructor=ds[0]),
            Frag(b"1111", destructor=ds[1]),
            b"plain",
            Frag(b"2222", destructor=ds[2]),
        ]
    )
    pin = iov.pin("h", own)
    dropped = pin.trim(6)  # the kernel took "0000" and "11"
    assert dropped == [ds[2]]
    assert pin.views is not None and b"".join(map(bytes, pin.views)) == b"000011"
    assert pin.refs == [ds[0], ds[1], own]  # the call's own reference stays
    for d in dropped:
        d.unref(holder="h")
    pin.release("h")
    assert [d.refcount for d in (*ds, own)] == [1, 1, 1, 1]
    assert Pin([memoryview(b"x")], [None]).refs == [] and pin.trim(1) == []  # released: nothing


def test_sendall_of_a_list_of_skbuffs_arrives_intact_and_fires_after_completion(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp_pair
    rx = Receiver(server)
    fired: list[int] = []
    d = FragDestructor(fired.append, 1)
    skbs = []
    expect = b""
    for k in range(4):
        page = bytearray([k + 1]) * 40_000
        skb = SkBuff(f"record {k}|".encode())
        skb.add_frag(page, destructor=d)
        skbs.append(skb)
        expect += f"record {k}|".encode() + bytes(page)
    with ZeroCopySocket(client, zerocopy="always") as zs:
        zs.sendall(skbs)
        for skb in skbs:
            skb.free()
        d.unref()
        zs.flush(timeout=30)
        assert fired == [1]
        client.shutdown(socket.SHUT_WR)
        assert rx.join() == expect


def test_aio_write_of_a_list_of_skbuffs_arrives_intact(run: Run) -> None:
    async def main() -> tuple[bytes, bytes, bool]:
        got = bytearray()
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: Any) -> None:
            got.extend(await reader.read())
            done.set()
            writer.close()

        server = await aio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await aio.open_connection("127.0.0.1", port, zerocopy="always")
        skbs, expect = [], b""
        for k in range(3):
            skb = SkBuff(b"<%d>" % k)
            skb.add_frag(bytes([k + 7]) * 50_000)
            skbs.append(skb)
            expect += b"<%d>" % k + bytes([k + 7]) * 50_000
        handle_ = writer.write(skbs)
        for skb in skbs:
            skb.free()
        await asyncio.wait_for(handle_, 30)
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(done.wait(), 30)
        server.close()
        await server.wait_closed()
        return bytes(got), expect, handle_.done

    got, expect, released = run(main())
    assert got == expect and released


def test_a_partial_send_keeps_its_own_destructor_until_the_kernel_releases_what_it_took(
    lab: NetLab, fired: Fired
) -> None:
    """Pin.trim after a partial stream send drops the references of the pieces not taken,
    never the call's own ``destructor=``: the kernel still holds the bytes it took."""
    client, server = lab.tcp_pair()
    lab.add_loss(100)  # nothing is acknowledged: the kernel keeps every page it took
    client.setblocking(False)
    zs = ZeroCopySocket(client, zerocopy="always")
    data = bytearray(b"p") * (16 << 20)  # far beyond the send buffer: a partial send
    d = fired.make(0)
    n = zs.send(data, destructor=d)
    d.unref()
    assert 0 < n < len(data)
    deadline = time.monotonic() + 30
    while lab.dropped() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.dropped() > 0
    zs.poll_completions(0.5)
    assert fired.counts == {}, "fired while the kernel still held the bytes it took"
    lab.add_loss(0)
    rx = Receiver(server)
    zs.flush(timeout=60)
    assert fired.once_each([0])
    client.shutdown(socket.SHUT_WR)
    assert rx.join() == bytes(data[:n])
    zs.close()


def interrupting_each_line(func: Any, first: str, last: str, call: Any, check: Any) -> int:
    """Run ``call()`` once per line of ``func`` from the one containing ``first`` to the
    one containing ``last``, with a KeyboardInterrupt raised when that line is reached
    (as a Ctrl-C handler would), then ``check(line)``. Lines made only of NOPs (a bare
    ``try:``) are skipped: CPython never runs a signal handler there. Returns how many
    runs were interrupted."""
    code = func.__code__
    source, start = inspect.getsourcelines(func)
    lo = start + next(i for i, text in enumerate(source) if first in text)
    hi = start + next(i for i, text in enumerate(source) if last in text)
    lines = sorted(
        {i.positions.lineno for i in dis.get_instructions(code) if i.opname != "NOP"}
        & set(range(lo, hi + 1))
    )
    interrupted = 0
    for target in lines:
        armed = [True]

        def local(
            frame: Any, event: str, arg: Any, target: int = target, armed: list[bool] = armed
        ) -> Any:
            if event == "line" and frame.f_lineno == target and armed[0]:
                armed[0] = False
                raise KeyboardInterrupt
            return local

        sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
        try:
            call()
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        check(target)
    return interrupted


def test_an_interrupt_at_any_line_of_a_send_call_loses_no_reference(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Sender.call binds the pin before it holds anything and takes the references in
    the try that releases an unfiled pin: wherever a Ctrl-C lands, the destructor ends
    with exactly its creator's reference (nothing leaked, nothing dropped early)."""
    client, server = tcp_pair
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    current: list[FragDestructor] = []

    def call() -> None:
        current[:] = [FragDestructor()]
        zs.send(Frag(bytearray(100_000), destructor=current[0]), destructor=current[0])

    def check(line: int) -> None:
        zs.flush(timeout=30)
        d = current[0]
        assert d.refcount == 1 and not d.done, f"line {line}: refcount {d.refcount}"
        d.unref()
        assert d.done

    # From the pin's creation to its filing.
    first, last = "pin = Pin(", "n = self.file(pin"
    assert interrupting_each_line(Sender.call, first, last, call, check) >= 4
    zs.close(timeout=30)
    rx.join()


def test_an_interrupt_at_any_line_of_a_queued_write_loses_no_reference() -> None:
    """The write queue's two pins (the pieces', the write's own destructor's) are bound
    before they hold anything and taken in the try that releases them."""
    q = WriteQueue("transport")
    current: list[FragDestructor] = []

    def call() -> None:
        current[:] = [FragDestructor(), FragDestructor()]
        q.push([Frag(b"abc", destructor=current[0]), b"de"], current[1])

    def check(line: int) -> None:
        q.drop()  # what was queued is abandoned: its references go, the handle fires
        for d in current:
            assert d.refcount == 1 and not d.done, f"line {line}: refcount {d.refcount}"
            d.unref()
            assert d.done

    # From the pins' creation to the end of the try that takes their references.
    first, last = "hold = Pin(", "keep.release(holder)"
    assert interrupting_each_line(WriteQueue.push, first, last, call, check) >= 4
