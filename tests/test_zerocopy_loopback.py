"""ZeroCopySocket over loopback: real kernel, real sockets, every destructor once."""

from __future__ import annotations

import errno
import gc
import socket
import warnings

import pytest
from helpers import Fired, Receiver

from pagefrag import FragDestructor, SkBuff
from pagefrag.errors import CompletionTimeoutError
from pagefrag.testing.netlab import NetLab
from pagefrag.zerocopy import ZeroCopySocket
from pagefrag.zerocopy import socket as zsocket

SIZES = [1, 100, 4096, 16 * 1024, 64 * 1024, 1 << 20, 5 << 20]


def pattern(i: int, size: int) -> bytearray:
    return bytearray((i + k) % 251 for k in range(min(size, 251))) * (size // 251 + 1)


@pytest.mark.parametrize("mode", ["always", "never", "auto"])
def test_tcp_many_sizes_every_destructor_once_and_stats_add_up(
    tcp_pair: tuple[socket.socket, socket.socket], fired: Fired, mode: str
) -> None:
    client, server = tcp_pair
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy=mode)
    sent = bytearray()
    for i, size in enumerate(SIZES):
        buf = pattern(i, size)[:size]
        d = fired.make(i)
        zs.sendall(buf, destructor=d)
        d.unref()
        sent += buf
    zs.close()
    assert rx.join() == sent
    assert fired.once_each(range(len(SIZES)))
    st = zs.stats
    assert st.bytes_sent == len(sent) and st.completions == st.zerocopy_sends
    assert zs.outstanding == 0 and zs.pinned_bytes == 0
    if mode == "always":
        assert st.zerocopy_sends >= len(SIZES)
        # Loopback delivers locally, and local delivery copies: every completion says so.
        assert st.copied_completions == st.completions
    if mode == "never":
        assert st.zerocopy_sends == 0 and st.peak_pinned_bytes == 0


def test_udp_datagrams_every_destructor_once(fired: Fired) -> None:
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.bind(("127.0.0.1", 0))
    rx_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx_sock.getsockname())
    zs = ZeroCopySocket(tx, zerocopy="always")
    sizes = [1, 1000, 8000, 30000, 50000]  # two pieces of >60 KB can need > 17 pages
    for i, size in enumerate(sizes):
        d = fired.make(i)
        assert (
            zs.send([bytes([i]) * (size // 2), bytes([i]) * (size - size // 2)], destructor=d)
            == size
        )
        d.unref()
    zs.close(timeout=10)
    got = [rx_sock.recv(65535) for _ in sizes]
    rx_sock.close()
    assert got == [bytes([i]) * s for i, s in enumerate(sizes)]  # one datagram per call
    assert fired.once_each(range(len(sizes)))
    assert zs.stats.completions == zs.stats.zerocopy_sends == len(sizes)
    assert zs.stats.copied_completions == len(sizes)


def test_auto_stops_asking_for_zerocopy_where_delivery_copies(lab: NetLab) -> None:
    # Issue 12: loopback is now known to copy and starts copying, so the learning is
    # shown where auto cannot know beforehand: TCP over veth into another namespace,
    # where delivery copies too (every completion says COPIED).
    client, server = lab.tcp_pair()
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="auto", completion_batch=1)
    buf = bytearray(64 * 1024)
    for _ in range(300):
        zs.sendall(buf)
    assert zs.stats.current_mode == "copy"
    assert 0 < zs.stats.zerocopy_sends < 100
    zs.close()
    assert len(rx.join()) == 300 * len(buf)


def test_skbuff_partial_send_pins_exactly_the_frags_it_covers(
    tcp_pair: tuple[socket.socket, socket.socket], fired: Fired
) -> None:
    client, server = tcp_pair
    client.setblocking(False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    zs = ZeroCopySocket(client, zerocopy="always")
    pages = [bytearray(bytes([k]) * (1 << 20)) for k in range(4)]
    ds = [fired.make(k) for k in range(4)]
    skb = SkBuff(b"HDR")
    for page, d in zip(pages, ds, strict=True):
        skb.add_frag(page, destructor=d)
    n = zs.send(skb)  # the peer is not reading: the kernel takes only part
    assert 0 < n < len(skb)
    covered = (n - 3 + (1 << 20) - 1) // (1 << 20)
    # Pinned: each destructor the call covered holds one more reference than the skb's.
    assert [d.refcount for d in ds] == [3] * covered + [2] * (4 - covered)
    skb.trim_head(n)
    rx = Receiver(server)
    client.setblocking(True)
    zs.sendall(skb)
    skb.free()
    for d in ds:
        d.unref()
    zs.close()
    assert rx.join() == b"HDR" + b"".join(pages)
    assert fired.once_each(range(4))


def test_flush_times_out_while_the_peer_stalls_and_nothing_fires_early(
    tcp_pair: tuple[socket.socket, socket.socket], fired: Fired
) -> None:
    client, server = tcp_pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = ZeroCopySocket(client, zerocopy="always")
    bufs = [bytearray(1 << 20) for _ in range(32)]
    made: list[int] = []
    with pytest.raises(TimeoutError):
        for i, b in enumerate(bufs):
            d = fired.make(i)
            made.append(i)
            try:
                zs.sendall(b, destructor=d, timeout=0.5)
            finally:
                d.unref()
    assert zs.outstanding > 0
    with pytest.raises(CompletionTimeoutError) as info:
        zs.flush(timeout=0.2)
    assert info.value.outstanding == zs.outstanding and info.value.pinned_bytes > 0
    with pytest.raises(CompletionTimeoutError):
        zs.close(timeout=0.2)
    assert not zs.closed  # a close that could not flush leaves the socket open
    pending = [k for k in made if k not in fired.counts]
    assert pending, "the kernel still holds data: some destructors must be pending"
    server.setblocking(False)
    rx = Receiver(server)
    zs.abort()
    rx.join()
    assert fired.once_each(made)


def test_icmp_error_on_udp_surfaces_and_accounting_survives(fired: Fired) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()
    probe.close()  # nobody listens there: the kernel answers with ICMP port unreachable
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(closed_port)
    zs = ZeroCopySocket(tx, zerocopy="always")
    d = fired.make(0)
    zs.send(b"x" * 20000, destructor=d)
    d.unref()
    with pytest.raises(OSError) as info:
        for _ in range(50):
            zs.poll_completions(timeout=0.1)
            zs.send(b"y" * 20000)
    assert info.value.errno == errno.ECONNREFUSED
    zs.close(timeout=5)
    assert fired.once_each([0])
    assert zs.stats.completions == zs.stats.zerocopy_sends


def test_ipv6_tcp(fired: Fired) -> None:
    if not socket.has_ipv6:
        pytest.skip("this kernel has no IPv6")
    srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    client = socket.create_connection(srv.getsockname()[:2])
    server, _ = srv.accept()
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    d = fired.make(0)
    zs.sendall(bytearray(b"6") * 100_000, destructor=d)
    d.unref()
    zs.close()
    assert rx.join() == b"6" * 100_000 and fired.once_each([0])
    srv.close()
    server.close()


def test_bad_sockets_and_closed_use_are_refused(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    with pytest.raises(OSError):
        ZeroCopySocket(socket.socket())  # not connected
    unix_a, unix_b = socket.socketpair()
    with pytest.raises(ValueError):
        ZeroCopySocket(unix_a)
    unix_a.close()
    unix_b.close()
    zs = ZeroCopySocket(tcp_pair[0])
    zs.close()
    with pytest.raises(OSError):
        zs.send(b"x")


def test_a_destroyed_destructor_is_refused_before_any_byte_is_sent(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    zs = ZeroCopySocket(tcp_pair[0], zerocopy="always")
    d = FragDestructor(None)
    d.unref()
    with pytest.raises(Exception, match="destroyed"):
        zs.send(bytearray(100_000), destructor=d)
    assert zs.stats.bytes_sent == 0
    zs.close()


def test_collected_socket_with_pinned_sends_keeps_their_buffers_alive(
    tcp_pair: tuple[socket.socket, socket.socket], fired: Fired
) -> None:
    client, server = tcp_pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = ZeroCopySocket(client, zerocopy="always")
    d = fired.make(0)
    with pytest.raises(TimeoutError):
        zs.sendall(bytearray(8 << 20), destructor=d, timeout=0.3)
    d.unref()
    before = len(zsocket._IMMORTAL_PINS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del zs
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert len(zsocket._IMMORTAL_PINS) > before
    assert fired.counts == {}, "never fired early: the kernel may still read the pages"


def test_python_cannot_resize_or_free_a_buffer_the_kernel_still_holds(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp_pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    zs = ZeroCopySocket(client, zerocopy="always")
    bufs = [bytearray(b"%d" % i) * (1 << 19) for i in range(40)]
    timed_out = False
    try:  # not pytest.raises: its traceback would keep sendall's views alive
        for b in bufs:
            zs.sendall(b, timeout=0.5)
    except TimeoutError:
        timed_out = True
    assert timed_out
    assert zs.pinned_bytes > 2 * len(bufs[0]), "the stalled peer leaves buffers pinned"
    # Every byte the kernel may still read belongs to a buffer Python cannot resize.
    assert sum(len(b) for b in bufs if _exported(b)) >= zs.pinned_bytes
    server.setblocking(False)
    rx = Receiver(server)
    zs.abort()
    rx.join()
    assert not any(_exported(b) for b in bufs)  # released: resizable (and freeable) again


def _exported(b: bytearray) -> bool:
    try:
        b.append(0)
    except BufferError:
        return True
    b.pop()
    return False


def test_a_socket_with_a_timeout_reads_completions_without_waiting_for_data(
    tcp_pair: tuple[socket.socket, socket.socket], fired: Fired
) -> None:
    import time

    client, server = tcp_pair
    client.settimeout(5.0)  # Python would wait for *data* before an error-queue read
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    d = fired.make(0)
    zs.sendall(bytearray(1 << 20), destructor=d)
    d.unref()
    t0 = time.monotonic()
    zs.flush(timeout=5)
    assert time.monotonic() - t0 < 2 and fired.once_each([0])
    assert client.gettimeout() == 5.0  # restored
    zs.close()
    assert len(rx.join()) == 1 << 20
