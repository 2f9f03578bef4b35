"""ZeroCopySocket between test hosts: two network namespaces joined by veth, with real
loss (nftables), a real discarding peer and real kernel limits. Each test builds its own
namespaces and deletes them, also on failure."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time

import pytest
from helpers import Fired, Receiver, drop_sent_udp, poison_run, stop_dropping

from pagefrag import FragDestructor
from pagefrag.testing.netlab import NetLab
from pagefrag.zerocopy import ZeroCopySocket


def test_poison_after_release_under_loss(lab: NetLab) -> None:
    """The seed's bug through ``sendall``: not one poison byte may reach the receiver."""
    total, buf_size = 64 << 20, 1 << 20

    def send(zs: ZeroCopySocket, items: list[tuple[bytearray, FragDestructor]]) -> None:
        for buf, d in items:
            zs.sendall(buf, destructor=d, timeout=60)

    zs = poison_run(lab, send, buf_size=buf_size, pool_size=6, total=total)
    assert zs.stats.completions == zs.stats.zerocopy_sends >= total // buf_size


def test_true_zero_copy_to_a_discarding_peer(lab: NetLab, fired: Fired) -> None:
    """UDP out of a veth towards a MAC nobody owns: transmitted, never delivered
    locally, so the kernel really sends from our pages and completions say not copied."""
    for ns, dev in ((lab.sender, lab.sender_if), (lab.receiver, lab.receiver_if)):
        lab.ns(ns, "ip", "link", "set", dev, "mtu", "64000")  # no IP fragmentation
    target = lab.blackhole_neighbour()
    tx = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
    tx.connect((target, 9))
    zs = ZeroCopySocket(tx, zerocopy="auto")
    buf = bytearray(60_000)
    for i in range(200):
        d = fired.make(i)
        assert zs.send(buf, destructor=d) == len(buf)
        d.unref()
    zs.close(timeout=10)
    st = zs.stats
    assert fired.once_each(range(200))
    assert st.zerocopy_sends == 200 == st.completions
    assert st.copied_completions == 0 and st.current_mode == "zerocopy"


def test_enobufs_from_a_tiny_optmem_loses_nothing(lab: NetLab, fired: Fired) -> None:
    lab.sysctl(lab.sender, "net.core.optmem_max", 2000)
    client, server = lab.tcp_pair()
    rx = Receiver(server)
    # Completions are read only when needed, so notifications pile up in optmem.
    zs = ZeroCopySocket(client, zerocopy="always", completion_batch=10**9, enobufs_timeout=30)
    sent = bytearray()
    for i in range(400):
        chunk = bytearray([i % 256]) * 65536
        d = fired.make(i)
        zs.sendall(chunk, destructor=d, timeout=60)
        d.unref()
        sent += chunk
    zs.close(timeout=30)
    assert rx.join() == sent
    assert zs.stats.enobufs_retries > 0, "optmem_max=2000 must force ENOBUFS"
    assert fired.once_each(range(400))


def test_abort_releases_unacknowledged_pinned_data(lab: NetLab, fired: Fired) -> None:
    client, server = lab.tcp_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = ZeroCopySocket(client, zerocopy="always")
    made: list[int] = []
    with pytest.raises(TimeoutError):  # the peer stopped reading
        for i in range(64):
            d = fired.make(i)
            made.append(i)
            try:
                zs.sendall(bytearray(1 << 20), destructor=d, timeout=1)
            finally:
                d.unref()
    time.sleep(0.3)
    zs.poll_completions()
    pending = [k for k in made if k not in fired.counts]
    not_acked = struct.unpack("i", fcntl.ioctl(client, termios.TIOCOUTQ, b"\0" * 4))[0]
    assert pending and zs.outstanding > 0 and not_acked > 0  # SIOCOUTQ: unacknowledged
    zs.abort(timeout=10)
    assert zs.closed and fired.once_each(made)
    with pytest.raises(ConnectionResetError):
        while server.recv(1 << 20):
            pass


def test_close_with_data_in_flight_flushes_first(lab: NetLab) -> None:
    lab.add_loss(2)
    client, server = lab.tcp_pair()
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    fired: list[int] = []
    data = bytearray(b"z") * (16 << 20)
    d = FragDestructor(fired.append, 1)
    zs.sendall(data, destructor=d)
    d.unref()
    in_flight = zs.outstanding
    zs.close(timeout=60)
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert in_flight > 0, "the test needs data still held by the kernel at close()"
    assert fired == [1] and zs.outstanding == 0
    assert rx.join() == data


def test_poison_after_release_through_send_under_loss(lab: NetLab) -> None:
    """The seed's bug through ``send`` (the compiled core's one-call path: a plain buffer,
    its destructor's reference, the system call and the filing in C)."""

    def send(zs: ZeroCopySocket, items: list[tuple[bytearray, FragDestructor]]) -> None:
        deadline = time.monotonic() + 60
        for buf, d in items:
            view, sent = memoryview(buf), 0
            while sent < len(buf):  # send() takes what fits: the rest goes as a view
                assert time.monotonic() < deadline, "the send did not finish"
                sent += zs.send(view[sent:], destructor=d)

    poison_run(lab, send, buf_size=1 << 18, pool_size=8, total=32 << 20)


def test_a_failed_datagram_send_that_used_an_id_keeps_accounting_right(
    lab: NetLab, fired: Fired
) -> None:
    """A netfilter OUTPUT drop makes the UDP send fail with EPERM *after* the kernel gave
    the call an id and queued its notification; the next ids must still match."""
    target = lab.blackhole_neighbour()
    tx = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
    tx.connect((target, 9))
    zs = ZeroCopySocket(tx, zerocopy="always")
    d0 = fired.make(0)
    zs.send(bytearray(1000), destructor=d0)
    d0.unref()
    drop_sent_udp(lab, "dport 9")
    d1 = fired.make(1)
    with pytest.raises(PermissionError):
        zs.send(bytearray(1000), destructor=d1)
    d1.unref()
    assert fired.counts.get(1) == 1  # nothing was pinned for the failed call
    stop_dropping(lab)
    for i in range(2, 10):
        d = fired.make(i)
        zs.send(bytearray(1000), destructor=d)
        d.unref()
    zs.close(timeout=10)
    assert fired.once_each(range(10))
    assert zs.stats.completions == zs.stats.zerocopy_sends == 9
