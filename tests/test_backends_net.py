"""The zero-copy guarantees of the ``MSG_ZEROCOPY`` bridge, run for both backends
(issue 13): :class:`~pagefrag.zerocopy.ZeroCopySocket` and the io_uring
:class:`~pagefrag.uring.UringSocket`, built with the same keyword arguments by the
``backend`` fixture, on the real kernel (loopback, and namespaces joined by veth with
real loss, a real rate limit and a real discarding neighbour). The io_uring backend is
skipped, with the reason, where it cannot run (the pure-Python core, no io_uring).

Each io_uring test gets a ring of its own, and the fixture checks at the end that the
ring holds no request any more: every pin was released by a notification."""

from __future__ import annotations

import fcntl
import queue
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from helpers import (
    POISON,
    Fired,
    Receiver,
    VerifyingReceiver,
    counters,
    drop_sent_udp,
    stop_dropping,
)

from pagefrag import FragDestructor
from pagefrag.errors import CompletionTimeoutError
from pagefrag.testing.netlab import NetLab
from pagefrag.uring import UringSocket, new_ring, unsupported_reason
from pagefrag.zerocopy import ZeroCopySocket, tcp_info
from pagefrag.zerocopy import destinations as dest

BACKENDS = ["msg_zerocopy", "uring"]
_SO_SNDBUFFORCE = 32  # asm-generic/socket.h; not in the socket module
_SO_RCVBUFFORCE = 33

Zsock = ZeroCopySocket | UringSocket
Items = list[tuple[bytearray, FragDestructor]]


class Backend:
    """Makes a test's zero-copy socket: ``wrap(sock, **kwargs)`` is
    ``ZeroCopySocket(sock, **kwargs)`` or ``UringSocket(sock, **kwargs)`` on the test's
    own ring."""

    def __init__(self, name: str, ring: Any = None) -> None:
        self.name = name
        self.ring = ring

    def wrap(self, sock: socket.socket, **kwargs: Any) -> Zsock:
        if self.ring is None:
            return ZeroCopySocket(sock, **kwargs)
        return UringSocket(sock, ring=self.ring, **kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "msg_zerocopy":
        yield Backend("msg_zerocopy")
        return
    why = unsupported_reason()
    if why is not None:
        pytest.skip(f"io_uring zero-copy sends are unavailable: {why}")
    ring = new_ring()
    yield Backend("uring", ring)
    ring.reap()
    left = ring.in_flight
    if left == 0:
        ring.close()
    assert left == 0, f"the test left {left} requests in its ring"


def unacked(sock: socket.socket) -> int:
    """Bytes of the stream the peer has not acknowledged (``SIOCOUTQ``)."""
    out: int = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
    return out


def _rate_limit(lab: NetLab, rate: str) -> None:
    """Frames leave the sender at ``rate`` (tbf on its veth): sent data stays unacked
    for seconds while the send buffer holds it."""
    lab.ns(
        lab.sender, "tc", "qdisc", "replace", "dev", lab.sender_if, "root",
        "tbf", "rate", rate, "burst", "64kb", "latency", "2s",
    )  # fmt: skip


class PoisonPool:
    """Send buffers whose destructor poisons them and hands them back for reuse at
    once, as an owner does when told the kernel is done: any page released early and
    read again by the kernel (a retransmit, a queued frame) carries poison or another
    offset's counters to the receiver."""

    def __init__(self, buf_size: int, size: int) -> None:
        self.buf_size = buf_size
        self.bufs = [bytearray(buf_size) for _ in range(size)]
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(size):
            self.free.put(i)
        self.fired = Fired()
        self.made = 0

    def _release(self, idx: int) -> None:
        self.bufs[idx][:] = bytes([POISON]) * self.buf_size
        self.free.put(idx)

    def take(self, zs: Zsock, offset: int, deadline: float) -> tuple[bytearray, FragDestructor]:
        """A free buffer filled with the stream's counters at ``offset`` and its
        destructor (the caller drops its reference after sending)."""
        while self.free.empty():
            assert time.monotonic() < deadline, "no buffer came back"
            zs.poll_completions(timeout=0.2)
        idx = self.free.get()
        np.frombuffer(self.bufs[idx], dtype=np.uint8)[:] = counters(offset, self.buf_size)
        d = self.fired.make(self.made, then=lambda: self._release(idx))
        self.made += 1
        return self.bufs[idx], d


class ResetReceiver(VerifyingReceiver):
    """A :class:`VerifyingReceiver` for which a reset by the sender ends the stream."""

    reset = False

    def run(self) -> None:
        try:
            super().run()
        except ConnectionResetError:
            self.reset = True


# -- 1. poison after release, under loss --------------------------------------------------


@pytest.mark.parametrize("how", ["sendall", "send"])
def test_poison_after_release_under_loss(lab: NetLab, backend: Backend, how: str) -> None:
    """The seed's bug through ``sendall`` (1 MiB buffers) and ``send`` (256 KiB, what
    the kernel takes at a time): 2 % of the frames dropped, so TCP retransmits from the
    very pages whose destructors poison them and give them back for reuse. Not one byte
    the receiver reads may differ; the io_uring backend passes only if it releases at
    the notification (``IORING_CQE_F_NOTIF``), never at the result (tests/mutate.py
    holds that mutant)."""
    total, buf_size = (48 << 20, 1 << 20) if how == "sendall" else (24 << 20, 1 << 18)
    lab.add_loss(2)
    client, server = lab.tcp_pair()
    rx = VerifyingReceiver(server)
    zs = backend.wrap(client, zerocopy="always")
    pool = PoisonPool(buf_size, 6)
    deadline = time.monotonic() + 120
    for offset in range(0, total, buf_size):
        buf, d = pool.take(zs, offset, deadline)
        if how == "sendall":
            zs.sendall(buf, destructor=d, timeout=60)
        else:
            view, sent = memoryview(buf), 0
            while sent < len(buf):  # send() takes what fits: the rest goes as a view
                assert time.monotonic() < deadline, "the send did not finish"
                sent += zs.send(view[sent:], destructor=d)
        d.unref()
    retransmits = tcp_info(client).total_retrans
    zs.close(timeout=60)
    rx.join(60)
    assert not rx.is_alive()
    assert rx.poison_bytes == 0 and rx.bad_bytes == 0
    assert rx.received == total
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert retransmits > 0, "2 % loss must cause TCP retransmits"
    assert pool.fired.once_each(range(pool.made))
    st = zs.stats
    assert st.completions == st.zerocopy_sends >= total // buf_size


# -- 2. true zero-copy to the discarding neighbour ----------------------------------------


def _towards_the_discarding_neighbour(lab: NetLab) -> socket.socket:
    for ns, dev in ((lab.sender, lab.sender_if), (lab.receiver, lab.receiver_if)):
        lab.ns(ns, "ip", "link", "set", dev, "mtu", "64000")  # no IP fragmentation
    target = lab.blackhole_neighbour()
    tx = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
    tx.connect((target, 9))
    return tx


@pytest.mark.parametrize("how", ["send", "send_many"])
def test_true_zero_copy_to_a_discarding_neighbour(
    lab: NetLab, backend: Backend, fired: Fired, how: str
) -> None:
    """UDP out of a veth towards a MAC nobody owns: transmitted from our pages, never
    delivered locally, so every notification says the kernel did not copy."""
    zs = backend.wrap(_towards_the_discarding_neighbour(lab), zerocopy="auto")
    big = bytearray(200 * 1000) * 60
    views = [memoryview(big)[i * 60_000 : (i + 1) * 60_000] for i in range(200)]
    ds = [fired.make(i) for i in range(200)]
    if how == "send":
        for v, d in zip(views, ds, strict=True):
            assert zs.send(v, destructor=d) == 60_000
    else:
        for start in range(0, 200, 50):
            assert zs.send_many(views[start : start + 50], destructors=ds[start : start + 50]) == 50
    for d in ds:
        d.unref()
    zs.close(timeout=30)
    st = zs.stats
    assert fired.once_each(range(200))
    assert st.sends == st.zerocopy_sends == st.completions == 200
    assert st.copied_completions == 0 and st.current_mode == "zerocopy"
    assert st.bytes_sent == 200 * 60_000


def test_a_datagram_dropped_in_a_batch_is_reported_and_nothing_is_lost(
    lab: NetLab, backend: Backend, fired: Fired
) -> None:
    """A netfilter OUTPUT drop of the third datagram of a batch (``EPERM`` after the
    kernel took the call): the two before it are sent, the error carries
    ``items_sent``, every destructor fires once and the socket goes on sending."""
    zs = backend.wrap(_towards_the_discarding_neighbour(lab), zerocopy="always")
    drop_sent_udp(lab, "length 1007")
    sizes = [1000, 1000, 999, 1000, 1000]
    ds = [fired.make(i) for i in range(len(sizes))]
    with pytest.raises(PermissionError) as caught:
        zs.send_many([bytearray(n) for n in sizes], destructors=ds)
    assert caught.value.items_sent == 2  # type: ignore[attr-defined]
    del caught
    for d in ds:
        d.unref()
    stop_dropping(lab)
    later = [fired.make(i) for i in range(10, 20)]
    assert zs.send_many([bytearray(1000)] * 10, destructors=later) == 10
    for d in later:
        d.unref()
    zs.close(timeout=30)
    assert fired.once_each([*range(5), *range(10, 20)])
    st = zs.stats
    assert st.completions == st.zerocopy_sends >= 12
    assert st.bytes_sent == 12 * 1000


# -- 3. copied notifications on loopback --------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_always_on_loopback_reports_every_notification_copied(
    backend: Backend, fired: Fired, kind: str
) -> None:
    """Local delivery copies: with ``always`` every send still goes zero-copy, and
    every notification says the kernel copied."""
    if kind == "tcp":
        srv = socket.create_server(("127.0.0.1", 0))
        tx = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
        srv.close()
        rx = Receiver(peer)
    else:
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.connect(peer.getsockname())
    zs = backend.wrap(tx, zerocopy="always")
    sent = []
    for i in range(40):
        buf = bytearray([i]) * 32_000
        d = fired.make(i)
        zs.sendall(buf, destructor=d, timeout=30)
        d.unref()
        sent.append(bytes(buf))
    zs.close(timeout=30)
    if kind == "tcp":
        assert rx.join() == b"".join(sent)
    else:
        peer.settimeout(10)
        assert [peer.recv(1 << 16) for _ in sent] == sent
    peer.close()
    st = zs.stats
    assert fired.once_each(range(40))
    assert st.zerocopy_sends == st.completions == 40
    assert st.copied_completions == 40


def test_auto_on_loopback_does_not_ask_for_zero_copy(
    backend: Backend, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """``auto`` towards loopback sends copied (at most a rare probe asks for zero-copy)
    and every byte arrives."""
    client, server = tcp_pair
    rx = Receiver(server)
    zs = backend.wrap(client, zerocopy="auto")
    buf = bytearray(b"L") * 65536
    for _ in range(300):
        zs.sendall(buf, timeout=30)
    st = zs.stats
    zs.close(timeout=30)
    assert len(rx.join()) == 300 * len(buf)
    assert st.current_mode == "copy"
    assert st.sends >= 300 and st.zerocopy_sends < 10
    assert zs.stats.completions == zs.stats.zerocopy_sends


def test_auto_learns_from_copied_notifications_to_stop_asking(
    lab: NetLab, backend: Backend
) -> None:
    """Into another namespace (delivery copies there too, which ``auto`` cannot know
    beforehand): the copied notifications make it stop asking for zero-copy."""
    dest.DESTINATIONS.clear()  # nothing learned by an earlier test's namespaces
    client, server = lab.tcp_pair()
    rx = Receiver(server)
    zs = backend.wrap(client, zerocopy="auto")
    buf = bytearray(b"A") * 65536
    for _ in range(200):
        zs.sendall(buf, timeout=30)
    asked = zs.stats.zerocopy_sends
    for _ in range(100):
        zs.sendall(buf, timeout=30)
    st = zs.stats
    zs.close(timeout=30)
    assert len(rx.join()) == 300 * len(buf)
    assert st.current_mode == "copy"
    assert 0 < st.zerocopy_sends < 100 and st.copied_completions > 0
    assert st.zerocopy_sends - asked < 5, "the last 100 sends went on asking for zero-copy"


# -- 4. abort with unacknowledged data ----------------------------------------------------


def test_abort_with_unacked_data_releases_each_buffer_once_and_never_early(
    lab: NetLab, backend: Backend
) -> None:
    """A rate-limited link (tbf: frames wait in the qdisc, the data stays unacked) and
    a receiver checking every byte; buffers are poisoned and reused the moment their
    destructor fires. abort() resets the connection, returns, and every destructor has
    fired once; the frames still queued when it was called go out after it (before the
    RST, on the same queue), so a pin released at the abort instead of at its
    notification would show the receiver poison."""
    _rate_limit(lab, "20mbit")
    client, server = lab.tcp_pair()
    rx = ResetReceiver(server)
    zs = backend.wrap(client, zerocopy="always")
    pool = PoisonPool(64 * 1024, 8)
    start = time.monotonic()
    deadline = start + 60
    offset = 0
    while time.monotonic() < start + 1.0 or pool.made < 16:
        assert time.monotonic() < deadline, "the sends did not get going"
        buf, d = pool.take(zs, offset, deadline)
        zs.sendall(buf, destructor=d, timeout=30)
        d.unref()
        offset += len(buf)
    pending = [k for k in range(pool.made) if k not in pool.fired.counts]
    assert pending and zs.outstanding > 0 and unacked(client) > 0
    zs.abort(timeout=30)
    assert zs.closed and zs.outstanding == 0 and zs.pinned_bytes == 0
    assert pool.fired.once_each(range(pool.made))
    rx.join(60)
    assert not rx.is_alive()
    assert rx.poison_bytes == 0 and rx.bad_bytes == 0
    assert 0 < rx.received <= offset
    assert rx.reset, "the receiver must see the reset"
    server.close()


def test_abort_wakes_a_sender_blocked_on_a_peer_that_does_not_read(
    lab: NetLab, backend: Backend, fired: Fired
) -> None:
    """A thread blocked in ``sendall`` (the peer stopped reading: its window is shut,
    the data unacked); abort() from another thread resets the connection, the blocked
    call fails, and every destructor fires once, after the kernel let go."""
    client, server = lab.tcp_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = backend.wrap(client, zerocopy="always")
    outcome: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    made: list[int] = []

    def sender() -> None:
        try:
            for i in range(8):
                d = fired.make(i)
                made.append(i)
                try:
                    zs.sendall(bytearray(4 << 20), destructor=d, timeout=120)
                finally:
                    d.unref()
            outcome.put(None)
        except BaseException as exc:  # reported to the test thread
            outcome.put(exc)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while unacked(client) == 0 or zs.outstanding == 0:
        assert time.monotonic() < deadline, "the stalled peer must leave data unacked"
        time.sleep(0.05)
    time.sleep(0.3)  # let the sender block in the kernel (or the ring) again
    assert t.is_alive(), "the sender must still be blocked"
    assert not fired.counts, "nothing the peer has not read may be released"
    zs.abort(timeout=30)
    t.join(30)
    assert not t.is_alive()
    err = outcome.get(timeout=1)
    assert isinstance(err, OSError) and not isinstance(err, TimeoutError), repr(err)
    assert zs.closed and zs.outstanding == 0
    assert made and fired.once_each(made)
    with pytest.raises(ConnectionResetError):
        server.settimeout(10)
        for _ in range(1000):
            if not server.recv(1 << 20):
                break
    server.close()


# -- 5. close flushes ---------------------------------------------------------------------


def test_close_returns_only_after_every_destructor_fired(lab: NetLab, backend: Backend) -> None:
    """4 MiB in a big send buffer behind a 16 Mbit/s link with 2 % loss: sendall returns
    seconds before the data is acknowledged, and close() must wait for all of it."""
    lab.add_loss(2)
    _rate_limit(lab, "16mbit")
    client, server = lab.tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 8 << 20)
    rx = Receiver(server)
    zs = backend.wrap(client, zerocopy="always")
    fired: list[int] = []
    chunks = [bytearray([i]) * (1 << 20) for i in range(4)]
    for i, chunk in enumerate(chunks):
        d = FragDestructor(fired.append, i)
        zs.sendall(chunk, destructor=d, timeout=60)
        d.unref()
    in_flight, before = zs.outstanding, sorted(fired)
    zs.close(timeout=60)
    done = sorted(fired)  # at once: close() may not return before the last one fires
    assert in_flight > 0, "the test needs data still held by the kernel at close()"
    assert 3 not in before, "the last chunk is unacknowledged: it may not fire yet"
    assert done == [0, 1, 2, 3] and zs.outstanding == 0 and zs.closed
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert rx.join() == b"".join(chunks)


def test_close_that_times_out_keeps_the_pins_and_the_socket(
    lab: NetLab, backend: Backend, fired: Fired
) -> None:
    """The peer does not read: what the send buffer took stays unacked. close() with a
    tiny timeout raises CompletionTimeoutError, fires nothing and leaves the socket
    open and usable; once the peer reads, a later close() flushes everything."""
    client, server = lab.tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 8 << 20)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = backend.wrap(client, zerocopy="always")
    first = bytearray(b"1") * (1 << 20)  # fits the send buffer: sendall returns
    d0 = fired.make(0)
    zs.sendall(first, destructor=d0, timeout=30)
    d0.unref()
    with pytest.raises(CompletionTimeoutError) as info:
        zs.close(timeout=0.2)
    assert info.value.outstanding > 0 and info.value.pinned_bytes > 0
    assert not zs.closed and zs.outstanding > 0 and unacked(client) > 0
    assert not fired.counts, "a close that timed out may release nothing"
    second = bytearray(b"2") * 65536  # the socket is still usable
    d1 = fired.make(1)
    zs.sendall(second, destructor=d1, timeout=30)
    d1.unref()
    with pytest.raises(CompletionTimeoutError):
        zs.flush(timeout=0.1)
    assert not fired.counts
    rx = Receiver(server)
    zs.close(timeout=60)
    assert zs.closed and zs.outstanding == 0
    assert fired.once_each(range(2))
    assert rx.join() == bytes(first + second)


# -- 6. send_many on UDP and TCP ----------------------------------------------------------


def test_send_many_datagrams_in_order_each_destructor_once(backend: Backend, fired: Fired) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 32 << 20)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    zs = backend.wrap(tx, zerocopy="always")
    sizes = [(i * 7919) % 60000 + 1 for i in range(600)]
    items = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    ds = [fired.make(i) for i in range(len(items))]
    got: list[bytes] = []
    rx.settimeout(10)
    for start in range(0, len(items), 100):  # 100 datagrams fit the receive buffer
        sent = zs.send_many(items[start : start + 100], destructors=ds[start : start + 100])
        assert sent == 100
        got += [rx.recv(1 << 16) for _ in range(sent)]
    for d in ds:
        d.unref()
    zs.close(timeout=30)
    rx.close()
    assert got == items
    assert fired.once_each(range(len(items)))
    st = zs.stats
    assert st.sends == st.zerocopy_sends == st.completions == len(items)
    assert st.bytes_sent == sum(sizes)


def test_send_many_on_a_stream_under_loss_in_order_each_destructor_once(
    lab: NetLab, backend: Backend
) -> None:
    """Many items per call on TCP, 2 % loss, pooled buffers poisoned on release: the
    receiver reads every byte in order and none is poison."""
    lab.add_loss(2)
    client, server = lab.tcp_pair()
    rx = VerifyingReceiver(server)
    zs = backend.wrap(client, zerocopy="always")
    buf_size, batch, total = 1 << 17, 8, 24 << 20
    pool = PoisonPool(buf_size, 2 * batch)
    deadline = time.monotonic() + 120
    for offset in range(0, total, buf_size * batch):
        items: Items = [pool.take(zs, offset + k * buf_size, deadline) for k in range(batch)]
        bufs = [b for b, _ in items]
        ds = [d for _, d in items]
        assert zs.send_many(bufs, destructors=ds, timeout=60) == batch
        for d in ds:
            d.unref()
    zs.close(timeout=60)
    rx.join(60)
    assert not rx.is_alive()
    assert rx.poison_bytes == 0 and rx.bad_bytes == 0 and rx.received == total
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert pool.fired.once_each(range(pool.made))
