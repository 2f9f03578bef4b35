"""The transport's lifecycle (issue 10 item 4) and its one teardown path (item 2), seen
through the public API: each transition of the table in ``pagefrag.aio._lifecycle``
(open, closing, lingering, lost), ``connection_lost`` called once, and events the table
has no transition for ignored. Every test runs on asyncio's default loop and on uvloop,
on real loopback sockets. (The LINGERING transitions need a lossy path:
``test_aio_hardening.py::test_close_under_total_loss_*`` and
``::test_pages_released_after_the_linger_bound_*`` cover them.)"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
from typing import Any

import pytest
from helpers import Run

from pagefrag import FragDestructor
from pagefrag.aio import ZeroCopyTransport, _lifecycle
from pagefrag.zerocopy._syscalls import disconnect


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (the transport's end, the peer's end); ``bufsize``
    caps the transport's send buffer and the peer's receive buffer."""
    with socket.socket() as listener:
        if bufsize is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        if bufsize is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        client.connect(listener.getsockname())
        peer, _ = listener.accept()
    return client, peer


class Recorder(asyncio.Protocol):
    """Counts connection_made and records every connection_lost."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.made = 0
        self.lost: list[BaseException | None] = []
        self.done: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        if not self.done.done():
            self.done.set_result(exc)


async def opened(
    bufsize: int | None = None, **kwargs: Any
) -> tuple[ZeroCopyTransport, Recorder, socket.socket]:
    """A transport over a fresh loopback pair, its protocol told connection_made."""
    loop = asyncio.get_running_loop()
    client, peer = tcp_pair(bufsize)
    proto = Recorder(loop)
    transport = ZeroCopyTransport(loop, client, proto, **kwargs)
    await asyncio.sleep(0)
    return transport, proto, peer


def read_all(peer: socket.socket) -> bytes:
    """The peer's bytes up to EOF (blocking, in a worker thread; bounded by a timeout)."""
    peer.settimeout(30)
    chunks = []
    while chunk := peer.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_documented_table_is_the_table() -> None:
    """The transition table in the module header is the one the code reads."""
    doc = _lifecycle.__doc__ or ""
    rows = re.findall(r"^\s+([A-Z_]+)\s+([A-Z_]+)\s+([A-Z_]+)\s{2,}\S", doc, re.M)
    documented = {(s, e, n) for s, e, n in rows if s != "state"}
    code = {
        (state.name, event.name, after.name)
        for state, events in _lifecycle.TRANSITIONS.items()
        for event, after in events.items()
    }
    assert documented == code
    assert set(_lifecycle.TRANSITIONS) == set(_lifecycle.State)
    # connection_lost is reported on leaving CLOSING, and never again.
    left_closing = set(_lifecycle.TRANSITIONS[_lifecycle.State.CLOSING].values())
    assert set(_lifecycle.REPORTED) == left_closing - {_lifecycle.State.CLOSING}
    for state in _lifecycle.REPORTED:
        assert set(_lifecycle.TRANSITIONS[state].values()) <= set(_lifecycle.REPORTED)


def test_close_open_to_closing_to_lost_reports_the_loss_once(run: Run) -> None:
    """OPEN -CLOSE-> CLOSING -RELEASED-> LOST: close() sends everything queued, the
    handle fires, connection_lost(None) comes once; close() again and abort() after the
    loss change nothing, and write() is ignored from the moment close() is called (a
    handle that has fired; issue 11: as asyncio's, where it raised ConnectionError)."""
    data = bytes(range(256)) * 1024  # 256 KiB: zero-copy
    result: dict[str, Any] = {}

    async def main() -> None:
        transport, proto, peer = await opened()
        client = transport.get_extra_info("socket")
        result["open"] = (transport.is_closing(), proto.made)
        reading = asyncio.get_running_loop().run_in_executor(None, read_all, peer)
        handle = transport.write(data)
        transport.close()
        result["closing"] = transport.is_closing()
        result["late"] = transport.write(b"late").done
        transport.close()  # CLOSING has no CLOSE transition: ignored
        result["exc"] = await asyncio.wait_for(asyncio.shield(proto.done), 30)
        await asyncio.wait_for(handle, 30)
        result["received"] = await asyncio.wait_for(reading, 30)
        transport.close()  # LOST: ignored
        transport.abort()  # LOST has no FORCE_CLOSE: ignored
        for _ in range(5):
            await asyncio.sleep(0.01)
        result["lost"] = list(proto.lost)
        result["after"] = transport.is_closing()
        result["later"] = transport.write(b"later").done
        result["fd"] = client.fileno()
        peer.close()

    run(main())
    assert result["open"] == (False, 1)
    assert result["closing"] is True and result["late"] and result["later"]
    assert result["exc"] is None and result["lost"] == [None]
    assert result["received"] == data
    assert result["after"] is True
    assert result["fd"] == -1, "LOST: the transport closed its socket"


def test_abort_while_closing_drops_the_queue_resets_and_reports_once(run: Run) -> None:
    """CLOSING -FORCE_CLOSE-> CLOSING: a close() waiting on a peer that does not read is
    cut short by abort(): every handle fires, the peer sees a reset, and connection_lost
    comes once (None: an abort is no failure)."""
    result: dict[str, Any] = {}

    async def main() -> None:
        transport, proto, peer = await opened(64 * 1024, high_water=64 << 20)
        handles = [transport.write(bytearray([i]) * (256 * 1024)) for i in range(32)]
        transport.close()
        await asyncio.sleep(0.3)
        # The peer does not read, so 8 MiB cannot all have been sent: still closing.
        result["before"] = (transport.get_write_buffer_size(), list(proto.lost))
        transport.abort()
        result["exc"] = await asyncio.wait_for(asyncio.shield(proto.done), 30)
        await asyncio.wait_for(asyncio.gather(*handles), 30)
        transport.abort()  # LOST: ignored
        for _ in range(5):
            await asyncio.sleep(0.01)
        result["lost"] = list(proto.lost)
        result["fired"] = all(h.done for h in handles)
        peer.settimeout(10)
        got = 0
        try:
            for _ in range(10_000):  # bounded: 8 MiB in chunks of at least one byte each
                chunk = peer.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
        except ConnectionResetError:
            result["reset"] = True
        result["got"] = got
        peer.close()

    run(main())
    pending, lost_before = result["before"]
    assert pending > 0 and lost_before == []
    assert result["exc"] is None and result["lost"] == [None]
    assert result["fired"]
    assert result.get("reset") is True, "abort() must reset the connection"
    assert result["got"] < 32 * 256 * 1024


def test_a_failure_reports_once_and_later_close_or_abort_are_ignored(run: Run) -> None:
    """OPEN -FORCE_CLOSE-> CLOSING -RELEASED-> LOST through _fatal_error: a protocol
    raising in data_received is reported to the loop's exception handler once,
    connection_lost gets its exception once, and close()/abort() afterwards do nothing."""
    result: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        contexts: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))

        class Raises(Recorder):
            def data_received(self, data: bytes) -> None:
                raise RuntimeError("protocol bug")

        client, peer = tcp_pair()
        proto = Raises(loop)
        transport = ZeroCopyTransport(loop, client, proto)
        await asyncio.sleep(0)
        peer.sendall(b"boom")
        result["exc"] = await asyncio.wait_for(asyncio.shield(proto.done), 30)
        result["closing"] = transport.is_closing()
        transport.close()
        transport.abort()
        for _ in range(5):
            await asyncio.sleep(0.01)
        result["lost"] = len(proto.lost)
        result["contexts"] = [(c["message"], type(c["exception"])) for c in contexts]
        peer.close()

    run(main())
    assert isinstance(result["exc"], RuntimeError)
    assert result["closing"] is True and result["lost"] == 1
    assert result["contexts"] == [
        ("Fatal error: protocol.data_received() call failed.", RuntimeError)
    ]


def test_a_write_ignored_on_a_closing_transport_takes_no_reference(run: Run) -> None:
    """write() in CLOSING is ignored (issue 11: as asyncio's; it raised ConnectionError
    before): it returns a handle that has fired, and the destructor given keeps its one
    reference and is not fired."""
    result: dict[str, Any] = {}

    async def main() -> None:
        transport, proto, peer = await opened()
        transport.close()
        d = FragDestructor(None)
        result["fired"] = transport.write(bytearray(65536), d).done
        result["refcount"] = d.refcount
        d.unref()
        await asyncio.wait_for(asyncio.shield(proto.done), 30)
        peer.close()

    run(main())
    assert result["fired"] and result["refcount"] == 1


def test_disconnect_ignores_nothing_to_disconnect_and_raises_the_rest() -> None:
    """``_syscalls.disconnect`` holds the errno filter once: a socket with nothing to
    disconnect (EINVAL: here an AF_UNIX stream) is no error; EBADF is raised; a connected
    TCP socket is reset, its descriptor kept open."""
    a, b = socket.socketpair()
    with a, b:
        disconnect(a)  # EINVAL from the kernel: nothing to disconnect
    closed = socket.socket()
    closed.close()
    with pytest.raises(OSError) as info:
        disconnect(closed)
    assert info.value.errno == errno.EBADF
    client, peer = tcp_pair()
    with client, peer:
        disconnect(client)
        assert client.fileno() != -1
        peer.settimeout(10)
        with pytest.raises(ConnectionResetError):
            peer.recv(1)
        disconnect(client)  # twice: still no error


def test_a_lingering_hand_over_never_takes_a_reused_descriptor_from_its_new_owner() -> None:
    """A transport's socket closed behind its back, its number reused by another
    connection: the lost transport's hand-over to the linger registry must not take the
    number's events from the new owner (review of issue 10: it did, by re-registering)."""
    from pagefrag.aio._poller import poller_for

    async def main() -> tuple[bool, list[int]]:
        poller = poller_for(asyncio.get_running_loop())
        keep = socket.socket()  # keeps the poller alive while the pairs come and go
        keep_handler: list[int] = []
        poller.register(keep.fileno(), keep_handler.append)
        a, b = socket.socketpair()
        fd = a.fileno()
        old: list[int] = []
        poller.register(fd, old.append)
        a.close()  # behind its transport's back
        c, d = socket.socketpair()
        mine, peer = (c, d) if c.fileno() == fd else (d, c)
        assert mine.fileno() == fd, "the kernel did not reuse the number"
        new: list[int] = []
        poller.register(fd, new.append)
        handed = poller.replace(fd, old.append, lambda _: None)
        peer.send(b"x")
        for _ in range(100):
            if new:
                break
            await asyncio.sleep(0.01)
        poller.unregister(fd, new.append)
        poller.unregister(keep.fileno(), keep_handler.append)
        for s in (b, c, d, keep):
            s.close()
        return handed, new

    handed, events = asyncio.run(main())
    assert not handed and events, "the new owner lost its descriptor's events"
