"""The io_uring backend at the ring level (issue 13): a full CQ ring, many sockets on one
ring, pinned-memory refusals (``ENOMEM`` from ``RLIMIT_MEMLOCK``), io_uring disabled or
missing, lifetime (garbage collection, ``fork()``), bad input, interrupts and timeouts,
linked datagram batches, fixed buffers. Real kernel, real sockets (loopback, or a NetLab
namespace pair), real signals and processes; every loop bounded in count and time.

Without the compiled ring (``PAGEFRAG_PURE_PYTHON=1``, or ``pagefrag._uring`` not built,
or io_uring unavailable here) every test skips naming what is missing, except the one
asserting that the pure core refuses the backend with ``ZeroCopyUnsupportedError``."""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (a child that dropped root cannot import it lazily)
import errno
import gc
import json
import mmap
import os
import platform
import resource
import select
import signal
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Fired, Receiver, VerifyingReceiver, counters, python_in_child

from pagefrag import FragDestructor
from pagefrag.errors import ForkedSocketError, SendBufferError, ZeroCopyUnsupportedError
from pagefrag.testing.netlab import NetLab
from pagefrag.uring import UringSocket, default_ring, new_ring, unsupported_reason
from pagefrag.zerocopy._syscalls import IOV_MAX
from pagefrag.zerocopy.destinations import DESTINATIONS

REASON = unsupported_reason()
needs_uring = pytest.mark.skipif(
    REASON is not None, reason=f"the io_uring backend is unavailable: {REASON}"
)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NOBODY = 65534  # the uid/gid an unprivileged child drops to


# -- helpers --------------------------------------------------------------------------------
class CountingPin:
    """A pin for the raw Channel API: counts its releases (the ring calls release(holder))."""

    def __init__(self, log: list[int], key: int) -> None:
        self.log = log
        self.key = key

    def release(self, holder: object) -> None:
        self.log.append(self.key)


def udp_pair(rcvbuf: int = 8 << 20) -> tuple[socket.socket, socket.socket]:
    """A connected (sender, receiver) UDP pair on loopback; the receiver's buffer is
    forced large so nothing is dropped while the test reads afterwards."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return tx, rx


def tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    if rcvbuf is not None:  # before accept: the window is advertised from the start
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    return client, server


def read_datagrams(rx: socket.socket, count: int, timeout: float = 10) -> list[bytes]:
    rx.settimeout(timeout)
    return [rx.recv(1 << 17) for _ in range(count)]


def wait_until(cond: Callable[[], bool], timeout: float = 30, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def datagram(i: int, size: int) -> bytes:
    """Datagram ``i``: its index in the first 4 bytes, then a fill byte from it."""
    return i.to_bytes(4, "little") + bytes([i % 251]) * (size - 4)


@contextlib.contextmanager
def closing_all(*socks: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for s in socks:
            with contextlib.suppress(Exception):
                s.close()


def run_in_child(body: Callable[[], dict[str, Any]], timeout: float = 90) -> dict[str, Any]:
    """Run ``body`` in a forked child and return the dict it returned (as JSON through a
    pipe); an exception in the child is re-raised here as AssertionError with its repr.
    The child never returns into pytest (``os._exit``); it is killed after ``timeout``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            try:
                out: dict[str, Any] = body()
            except BaseException as exc:
                out = {"error": repr(exc)}
                code = 1
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    reaped = False
    try:
        while True:  # the pipe's EOF: the child has exited (or closed it)
            left = deadline - time.monotonic()
            assert left > 0, "the child did not finish"
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        os.waitpid(pid, 0)
        reaped = True
    finally:
        os.close(r)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b"{}")
    assert "error" not in out, f"the child failed: {out['error']}"
    return out


def drop_root(memlock: int) -> None:
    """Become ``nobody`` (no CAP_IPC_LOCK: zero-copy pages are charged against
    RLIMIT_MEMLOCK, which is set to ``memlock`` bytes)."""
    os.setgroups([])
    os.setgid(NOBODY)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (memlock, memlock))
    os.setuid(NOBODY)


# -- 1. a full CQ ring ------------------------------------------------------------------------
@needs_uring
def test_full_cq_ring_loses_no_notification_send_many(fired: Fired) -> None:
    """200 zero-copy datagrams through a ring of 8 completion slots: each linked batch of
    8 posts 16 completions at once, so the kernel keeps the rest aside (overflow) and the
    ring flushes them in; every destructor still fires exactly once, every notification
    is counted, and every datagram arrives intact."""
    ring = new_ring(8, 8)
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=ring)
    with closing_all(us, rx):
        n = 200
        items = [datagram(i, 16384) for i in range(n)]
        ds = [fired.make(i) for i in range(n)]
        assert us.send_many(items, destructors=ds) == n
        for d in ds:
            d.unref()
        us.flush(timeout=30)
        assert ring.overflow_flushes > 0 or ring.cq_overflow > 0, "the CQ ring never overflowed"
        assert fired.once_each(range(n))
        st = us.stats
        assert st.zerocopy_sends == n and st.completions == n
        assert us.outstanding == 0 and us.pinned_bytes == 0 and ring.in_flight == 0
        got = read_datagrams(rx, n)
        assert sorted(got) == sorted(items)


@needs_uring
def test_full_cq_ring_raw_channel_many_unreaped_requests() -> None:
    """The ring itself: 64 zero-copy requests prepared on a ring of 4 SQ / 8 CQ slots
    with no reap in between (a full SQ is handed over without reaping), so up to 128
    completions pile up against 8 slots. Every pin is released exactly once, only after
    its notification, and the channel's counters add up."""
    ring = new_ring(4, 8)
    from pagefrag import _uring

    tx, rx = udp_pair()
    with closing_all(tx, rx):
        ch = _uring.Channel(ring, tx.fileno(), False)
        log: list[int] = []
        payload = bytes(range(256)) * 64  # 16 KiB
        reqs = [
            ch.submit_one(CountingPin(log, i), [memoryview(payload)], True, 0) for i in range(64)
        ]
        assert ring.in_flight > 0
        ring.submit()
        assert ch.wait_all(time.monotonic() + 30)
        assert ring.overflow_flushes > 0 or ring.cq_overflow > 0
        assert sorted(log) == list(range(64))
        assert all(r.done_result and r.result == len(payload) and r.more for r in reqs)
        assert ch.zerocopy_sends == ch.completions == 64 and ch.outstanding == 0
        assert ch.bytes_sent == 64 * len(payload) and ch.pinned_bytes == 0
        assert ring.in_flight == 0
        ring.close()
        assert ring.closed


# -- 2. many sockets on one ring ----------------------------------------------------------------
@needs_uring
def test_many_sockets_on_one_ring_from_several_threads(fired: Fired) -> None:
    """50 UDP and 3 TCP UringSockets share one ring; 4 threads send to all of them in
    different orders (so sends on one socket interleave between threads). Every
    destructor fires once, every counter is the socket's own, closing one socket midway
    disturbs none of the others, and every byte arrives."""
    ring = new_ring(32, 256)
    udp = [udp_pair(1 << 20) for _ in range(50)]
    tcp = [tcp_pair() for _ in range(3)]
    uss = [UringSocket(tx, zerocopy="always", ring=ring) for tx, _ in udp]
    uts = [UringSocket(c, zerocopy="always", ring=ring) for c, _ in tcp]
    rxs = [Receiver(s) for _, s in tcp]
    threads_n, rounds, size, chunk = 4, 3, 20000, 65536
    keys = iter(range(10**6))
    key_lock = threading.Lock()
    errors: list[BaseException] = []
    closed_early = uss[7]
    start = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        try:
            start.wait(30)
            everyone = list(range(len(uss) + len(uts)))
            shift = t * 13 % len(everyone)
            order = everyone[shift:] + everyone[:shift]  # each thread its own order
            if t % 2:
                order.reverse()
            for r in range(rounds):
                for k in order:
                    with key_lock:
                        key = next(keys)
                    d = fired.make(key)
                    try:
                        if k < len(uss):
                            us = uss[k]
                            if us is closed_early and (r > 0 or t > 0):
                                continue
                            us.send(datagram(k, size), destructor=d)
                        else:
                            fill = (k * 16 + t * 4 + r) % 251
                            uts[k - len(uss)].sendall(bytes([fill]) * chunk, destructor=d)
                    finally:
                        d.unref()
                if t == 0 and r == 0:
                    closed_early.close(timeout=30)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    with closing_all(*uss, *uts, *(rx for _, rx in udp)):
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads), "a sender thread hung"
        assert not errors, errors
        assert closed_early.closed
        for us in uss + uts:
            if not us.closed:
                us.flush(timeout=30)
        sent_keys = next(keys)
        assert fired.once_each(range(sent_keys))
        for k, (us, (_, rx)) in enumerate(zip(uss, udp, strict=True)):
            st = us.stats
            want = 1 if us is closed_early else threads_n * rounds
            assert st.sends == st.zerocopy_sends == st.completions == want, (k, st)
            assert st.bytes_sent == want * size
            assert read_datagrams(rx, want) == [datagram(k, size)] * want
        for j, ut in enumerate(uts):
            st = ut.stats
            assert st.bytes_sent == threads_n * rounds * chunk
            assert st.completions == st.zerocopy_sends
            ut.close(timeout=30)
            data = rxs[j].join(30)
            assert len(data) == threads_n * rounds * chunk
            # each sendall's bytes arrive whole, none interleaved with another's
            got = sorted(data[i * chunk : (i + 1) * chunk] for i in range(threads_n * rounds))
            k = len(uss) + j
            want = sorted(
                bytes([(k * 16 + t * 4 + r) % 251]) * chunk
                for t in range(threads_n)
                for r in range(rounds)
            )
            assert got == want
        assert ring.in_flight == 0


# -- 6. bad input changes nothing ---------------------------------------------------------------
@needs_uring
def test_bad_input_is_refused_before_anything_is_submitted() -> None:
    ring = new_ring(8, 32)
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=ring)
    c, s = tcp_pair()
    ut = UringSocket(c, zerocopy="always", ring=ring)
    d = FragDestructor(lambda _: None)
    with closing_all(us, ut, rx, s):
        before = (ring.in_flight, us.stats, ut.stats, d.refcount)

        def unchanged() -> bool:
            return (ring.in_flight, us.stats, ut.stats, d.refcount) == before

        bad: list[tuple[type[BaseException], Callable[[], object]]] = [
            (TypeError, lambda: us.send("text")),  # type: ignore[arg-type]
            (TypeError, lambda: us.send(12345)),  # type: ignore[arg-type]
            (TypeError, lambda: us.send(b"x" * 20000, destructor=object())),  # type: ignore[arg-type]
            (TypeError, lambda: ut.sendall(b"x", destructor="d")),  # type: ignore[arg-type]
            (TypeError, lambda: us.send_many(b"abc")),
            (TypeError, lambda: us.send_many([b"ok", None], destructors=[d, d])),  # type: ignore[list-item]
            (ValueError, lambda: us.send_many([b"a", b"b"], destructors=[d])),
            (ValueError, lambda: ut.send_many([b"a"], destructors=[d, None])),
            (TypeError, lambda: us.send_many([b"a"], destructors=[d, 1][1:])),  # type: ignore[list-item]
            (ValueError, lambda: us.send([b"x"] * (IOV_MAX + 1))),
            (ValueError, lambda: us.sendall([b"x"] * (IOV_MAX + 1))),
            (ValueError, lambda: us.send_many([b"ok", [b"x"] * (IOV_MAX + 1)], destructors=[d, d])),
            (TypeError, lambda: ut.sendall(b"x", timeout="1")),  # type: ignore[arg-type]
        ]
        for kind, call in bad:
            with pytest.raises(kind):
                call()
            assert unchanged(), call
        for kwargs in (
            {"zerocopy": "sometimes"},
            {"min_zerocopy_size": -1},
            {"enobufs_timeout": None},
            {"close_timeout": -1},
            {"ring": "not a ring"},
        ):
            with pytest.raises((TypeError, ValueError)):
                UringSocket(tx, **kwargs)
        with pytest.raises(TypeError):
            UringSocket(object())  # type: ignore[arg-type]
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unconnected,
            pytest.raises(OSError),
        ):
            UringSocket(unconnected, ring=ring)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix, pytest.raises(ValueError):
            UringSocket(unix, ring=ring)
        with pytest.raises(ValueError):
            new_ring(0)
        assert unchanged()
        # a good send still works afterwards, and a closed socket says EBADF
        assert us.send(b"y" * 20000, destructor=d) == 20000
        us.flush(timeout=10)
        assert d.refcount == 1
        us.close()
        for call in (
            lambda: us.send(b"z"),
            lambda: us.sendall(b"z"),
            lambda: us.send_many([b"z"]),
            lambda: us.send_copied(b"z"),
            lambda: us.flush(),
            lambda: us.poll_completions(),
        ):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EBADF
        assert d.refcount == 1 and ring.in_flight == 0


@needs_uring
def test_raw_channel_refuses_bad_views_and_closed_rings() -> None:
    from pagefrag import _uring

    ring = new_ring(4, 8)
    tx, rx = udp_pair()
    with closing_all(tx, rx):
        ch = _uring.Channel(ring, tx.fileno(), False)
        log: list[int] = []
        # A pin handed to submit_one is the request's from the call on: a refused call
        # releases it itself, exactly once (its caller never does: an interrupt raised
        # as the call returns would not mean it failed).
        with pytest.raises(ValueError):
            ch.submit_one(CountingPin(log, 0), [], True, 0)
        with pytest.raises(TypeError):
            ch.submit_one(CountingPin(log, 1), [object()], True, 0)
        assert ring.in_flight == 0 and ch.sends == 0 and log == [0, 1]
        log.clear()
        with pytest.raises(TypeError):
            ring.cancel()
        ring.close()
        with pytest.raises(OSError) as info:
            ch.submit_one(CountingPin(log, 2), [memoryview(b"x")], True, 0)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            _uring.Channel(ring, tx.fileno(), False)
        assert log == [2]


# -- 8. send_many: a failing datagram mid-batch ----------------------------------------------
@needs_uring
def test_send_many_stops_at_the_failing_datagram(fired: Fired) -> None:
    """Item 5 of 10 is too big for UDP over IPv4 (EMSGSIZE): the error carries
    items_sent == 5, the 5 before it arrive, none after it is sent (the link cancels
    them), and every destructor fires once."""
    ring = new_ring(16, 64)
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=ring)
    with closing_all(us, rx):
        items = [datagram(i, 20000) for i in range(10)]
        items[5] = bytes(65508)
        ds = [fired.make(i) for i in range(10)]
        with pytest.raises(OSError) as info:
            us.send_many(items, destructors=ds)
        for d in ds:
            d.unref()
        assert info.value.errno == errno.EMSGSIZE
        assert getattr(info.value, "items_sent", None) == 5
        us.flush(timeout=10)
        assert fired.once_each(range(10))
        assert read_datagrams(rx, 5) == items[:5]
        rx.settimeout(0.5)
        with pytest.raises(TimeoutError):
            rx.recv(1 << 17)
        assert us.stats.bytes_sent == 5 * 20000 and ring.in_flight == 0
        # the socket is still fine
        assert us.send_many(items[6:]) == 4
        assert read_datagrams(rx, 4) == items[6:]


# -- 9. fixed buffers -------------------------------------------------------------------------
@needs_uring
def test_fixed_buffers_register_lookup_unregister_and_send(fired: Fired) -> None:
    ring = new_ring(8, 32)
    a = mmap.mmap(-1, 1 << 16)
    b = bytearray(1 << 15)
    with pytest.raises(ValueError):
        ring.register_buffer(b"read-only bytes")
    with pytest.raises(ValueError):
        ring.register_buffer(bytearray())
    assert ring.fixed_buffers == 0
    sa = ring.register_buffer(a)
    sb = ring.register_buffer(b)
    assert sa != sb and ring.fixed_buffers == 2
    ma, mb = memoryview(a), memoryview(b)
    assert ring.fixed_index(ma) == sa
    assert ring.fixed_index(ma[4096:8192]) == sa
    assert ring.fixed_index(mb[100:]) == sb
    mb.release()
    with pytest.raises(BufferError):  # the ring keeps registered memory exported
        b.extend(b"no")
    assert ring.fixed_index(bytearray(10)) == -1
    assert ring.fixed_index(b"elsewhere") == -1
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=ring)
    with closing_all(us, rx):
        want = []
        for i in range(8):
            piece = ma[i * 8192 : i * 8192 + 8000]
            piece[:] = datagram(i, 8000)
            d = fired.make(i)
            assert us.send(piece, destructor=d) == 8000
            d.unref()
            want.append(bytes(piece))
        us.flush(timeout=10)
        assert fired.once_each(range(8))
        assert read_datagrams(rx, 8) == want
        ring.unregister_buffer(sa)
        assert ring.fixed_index(ma) == -1 and ring.fixed_index(b) == sb
        assert ring.fixed_buffers == 1
        with pytest.raises(ValueError):
            ring.unregister_buffer(sa)
        with pytest.raises(ValueError):
            ring.unregister_buffer(12345)
        ma[:100] = b"\x01" * 100  # registered memory is released: writable, resizable
        assert us.send(ma[:20000]) == 20000  # sent from ordinary memory now
        assert read_datagrams(rx, 1) == [bytes(ma[:20000])]
        sa2 = ring.register_buffer(a)  # a slot is reused
        assert ring.fixed_index(ma) == sa2
        ring.unregister_buffer(sa2)
        ring.unregister_buffer(sb)
        assert ring.fixed_buffers == 0
        b.extend(b"resizable again")  # no export left


# -- 3. pinned-memory refusals (RLIMIT_MEMLOCK) -------------------------------------------------
# As root (CAP_IPC_LOCK) nothing is charged; a child that became ``nobody`` with a small
# RLIMIT_MEMLOCK has every zero-copy request charged ``len/4096 + 2`` pages while its
# pages are pinned, and the kernel refuses one over the limit with ENOMEM
# (``__io_account_mem``): at issue (the result, then a notification) or, when the
# request is prepared, before it runs (the result alone; a link it is part of is
# cancelled whole).
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop to nobody)")


def _stream_with_paused_reader(
    mode: str, client: socket.socket, server: socket.socket, memlock: int
) -> dict[str, Any]:
    """In the child: 64 KiB sendalls (64 of them, counters) to a reader that starts only
    after a second, with ``memlock`` bytes of RLIMIT_MEMLOCK; in ``auto``, first one 1 MiB
    sendall (over the limit on its own: ``always`` could never send it zero-copy)."""
    rx = VerifyingReceiver.__new__(VerifyingReceiver)
    threading.Thread.__init__(rx, daemon=True)
    rx.sock, rx.received, rx.bad_bytes, rx.poison_bytes = server, 0, 0, 0
    drop_root(memlock)
    DESTINATIONS.clear()  # what earlier tests learned (a namespace inode may be reused)
    ring = new_ring(8, 64)
    us = UringSocket(client, zerocopy=mode, ring=ring, enobufs_timeout=60)
    fired = Fired()
    starter = threading.Timer(1.0, rx.start)
    starter.start()
    offset = 0
    sizes = [1 << 20] * (mode == "auto") + [1 << 16] * 64
    for i, size in enumerate(sizes):
        d = fired.make(i)
        us.sendall(counters(offset, size).tobytes(), destructor=d)
        d.unref()
        offset += size
    us.flush(timeout=60)
    client.shutdown(socket.SHUT_WR)  # the parent's copy of the descriptor stays open
    us.close(timeout=60)
    starter.join()
    rx.join(60)
    st = us.stats
    return {
        "received": rx.received,
        "total": offset,
        "bad": rx.bad_bytes,
        "once": fired.once_each(range(len(sizes))),
        "retries": st.enobufs_retries,
        "copies": st.enobufs_copies,
        "zerocopy_sends": st.zerocopy_sends,
        "completions": st.completions,
        "in_flight": ring.in_flight,
    }


@needs_uring
@needs_root
def test_enomem_always_retries_until_room_and_loses_nothing() -> None:
    """``always``: a stream to a reader that does not read yet runs into RLIMIT_MEMLOCK
    (ENOMEM); every refused request is retried once notifications have made room: every
    byte arrives in order, every destructor fires once, every notification is counted."""
    client, server = tcp_pair(rcvbuf=65536)
    with closing_all(client, server):
        out = run_in_child(lambda: _stream_with_paused_reader("always", client, server, 256 << 10))
    assert out["received"] == out["total"] and out["bad"] == 0, out
    assert out["once"] and out["in_flight"] == 0, out
    assert out["retries"] > 0 and out["copies"] == 0, out
    assert out["completions"] == out["zerocopy_sends"], out


@needs_uring
@needs_root
def test_enomem_auto_sends_the_refused_ones_copied(lab: NetLab) -> None:
    """``auto`` across a veth (the policy starts in zero-copy for a destination it does
    not know): the refused requests are sent copied at once; nothing is lost."""
    client, server = lab.tcp_pair()
    with closing_all(client, server):
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        out = run_in_child(lambda: _stream_with_paused_reader("auto", client, server, 256 << 10))
    assert out["received"] == out["total"] and out["bad"] == 0, out
    assert out["once"] and out["in_flight"] == 0, out
    assert out["copies"] > 0, out
    assert out["completions"] == out["zerocopy_sends"], out


def _datagrams_over_the_limit(
    mode: str, tx: socket.socket, memlock: int, size: int, count: int, enobufs_timeout: float
) -> dict[str, Any]:
    drop_root(memlock)
    DESTINATIONS.clear()  # what earlier tests learned (a namespace inode may be reused)
    ring = new_ring(8, 64)
    us = UringSocket(tx, zerocopy=mode, ring=ring, enobufs_timeout=enobufs_timeout)
    fired = Fired()
    ds = [fired.make(i) for i in range(count)]
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        out["sent"] = us.send_many([datagram(i, size) for i in range(count)], destructors=ds)
    except OSError as exc:
        out["raised"] = type(exc).__name__
        out["errno"] = exc.errno
        out["items_sent"] = getattr(exc, "items_sent", None)
    out["seconds"] = time.monotonic() - t0
    for d in ds:
        d.unref()
    us.flush(timeout=30)
    st = us.stats
    out.update(
        once=fired.once_each(range(count)),
        retries=st.enobufs_retries,
        copies=st.enobufs_copies,
        bytes_sent=st.bytes_sent,
        zerocopy_sends=st.zerocopy_sends,
        completions=st.completions,
        in_flight=ring.in_flight,
    )
    return out


@pytest.fixture
def blackhole_udp(lab: NetLab) -> Iterator[socket.socket]:
    """A UDP socket in the lab's sender namespace connected to the discarding neighbour
    (true zero-copy: the frames leave through the veth and are dropped there)."""
    for ns, dev in ((lab.sender, lab.sender_if), (lab.receiver, lab.receiver_if)):
        lab.ns(ns, "ip", "link", "set", dev, "mtu", "64000")
    tx = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
    tx.connect((lab.blackhole_neighbour(), 9))
    yield tx
    tx.close()


@needs_uring
@needs_root
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_enomem_in_a_linked_batch_sends_every_datagram(
    mode: str, blackhole_udp: socket.socket
) -> None:
    """64 datagrams of 60000 B, with room for 4 in RLIMIT_MEMLOCK (256 KiB): the kernel
    charges each when it prepares the batch, refuses the 5th (ENOMEM) and cancels the
    whole link before it ran. send_many sends the ones that fit first and goes on:
    every datagram goes out once, every destructor fires once."""
    out = run_in_child(
        lambda: _datagrams_over_the_limit(mode, blackhole_udp, 256 << 10, 60000, 64, 30)
    )
    assert out.get("sent") == 64, out
    assert out["bytes_sent"] == 64 * 60000, out
    assert out["once"] and out["in_flight"] == 0 and out["retries"] > 0, out
    assert out["completions"] == out["zerocopy_sends"], out


@needs_uring
@needs_root
def test_enomem_datagram_over_the_limit_alone_auto_sends_it_copied(
    blackhole_udp: socket.socket,
) -> None:
    """A datagram charged more than RLIMIT_MEMLOCK on its own (60000 B: 16 pages, the
    limit 8) can never go zero-copy: ``auto`` sends it copied, also when it is the first
    of a send_many batch; nothing is lost."""
    out = run_in_child(
        lambda: _datagrams_over_the_limit("auto", blackhole_udp, 32 << 10, 60000, 3, 30)
    )
    assert out.get("sent") == 3 and out["copies"] == 3 and out["retries"] == 0, out
    assert out["bytes_sent"] == 3 * 60000 and out["once"] and out["in_flight"] == 0, out
    assert out["completions"] == out["zerocopy_sends"], out


@needs_uring
@needs_root
def test_enomem_datagram_over_the_limit_alone_always_retries_paced(
    blackhole_udp: socket.socket,
) -> None:
    """The same datagram in ``always``: retried, paced by notifications or 50 ms slices
    (not a busy loop of refusals), then SendBufferError after ``enobufs_timeout`` with
    items_sent; nothing sent, nothing leaked, every destructor fires once."""
    out = run_in_child(
        lambda: _datagrams_over_the_limit("always", blackhole_udp, 32 << 10, 60000, 3, 1.0)
    )
    assert out.get("raised") == "SendBufferError" and out["errno"] == errno.ENOMEM, out
    assert out["items_sent"] == 0 and out["bytes_sent"] == 0, out
    assert 0.9 < out["seconds"] < 20, out
    assert 0 < out["retries"] < 200, out  # paced: not ~10^5 refusals a second
    assert out["once"] and out["in_flight"] == 0, out


# -- 4. io_uring unavailable --------------------------------------------------------------------
_PROBE = """
import json, socket, sys
from pagefrag.errors import ZeroCopyUnsupportedError
from pagefrag import uring
out = {"reason": uring.unsupported_reason(refresh=True), "available": uring.available()}
for name, make in (("new_ring", lambda: uring.new_ring()),
                   ("default_ring", lambda: uring.default_ring())):
    try:
        make()
        out[name] = None
    except ZeroCopyUnsupportedError as exc:
        out[name] = [exc.errno, str(exc)]
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("127.0.0.1", 0))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tx.connect(rx.getsockname())
try:
    uring.UringSocket(tx)
    out["socket"] = None
except ZeroCopyUnsupportedError as exc:
    out["socket"] = [exc.errno, str(exc)]
print(json.dumps(out))
"""

# A seccomp filter refusing io_uring_setup (x86-64: 425) with errno ERR, else allowing.
_SECCOMP = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
ERR = {err}
prog = [(0x20, 0, 0, 0), (0x15, 0, 1, 425),  # nr == io_uring_setup?
        (0x06, 0, 0, 0x00050000 | ERR), (0x06, 0, 0, 0x7FFF0000)]  # RET_ERRNO, RET_ALLOW
raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
buf = ctypes.create_string_buffer(raw)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
"""


def _probe(prefix: str = "", *, pure: bool = False) -> dict[str, Any]:
    out = python_in_child(prefix + _PROBE, pure=pure)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_pure_python_core_has_no_uring_backend() -> None:
    """PAGEFRAG_PURE_PYTHON=1: the ring lives in the compiled core, so the backend says
    so: unsupported_reason() names it, and new_ring()/default_ring()/UringSocket raise
    ZeroCopyUnsupportedError (runs in both modes: it uses a child interpreter)."""
    out = _probe(pure=True)
    assert out["available"] is False
    assert "compiled core" in out["reason"] and "pure-Python" in out["reason"]
    for name in ("new_ring", "default_ring", "socket"):
        assert out[name] is not None and "compiled core" in out[name][1], out


@needs_uring
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter knows x86-64 numbers")
@pytest.mark.parametrize(
    ("err", "words"), [(errno.ENOSYS, "no io_uring"), (errno.EPERM, "disabled")]
)
def test_seccomp_filter_refusing_io_uring_is_reported(err: int, words: str) -> None:
    """A seccomp filter (as containers install) that makes io_uring_setup fail with ENOSYS
    or EPERM: ZeroCopyUnsupportedError with that errno and a message saying why, from
    new_ring, default_ring and UringSocket; unsupported_reason(refresh=True) says it."""
    out = _probe(_SECCOMP.format(err=err))
    assert out["available"] is False and words in out["reason"], out
    for name in ("new_ring", "default_ring", "socket"):
        assert out[name] is not None and out[name][0] == err and words in out[name][1], out


def _read_line(fd: int, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, "the child did not answer"
        if select.select([fd], [], [], min(left, 1.0))[0]:
            chunk = os.read(fd, 1 << 16)
            assert chunk, "the child died"
            buf += chunk
    return buf


@needs_uring
@needs_root
def test_io_uring_disabled_sysctl_is_reported() -> None:
    """``kernel.io_uring_disabled``: a process it refuses gets ZeroCopyUnsupportedError
    with EPERM from new_ring, default_ring and UringSocket, with a message saying
    io_uring is disabled, and unsupported_reason(refresh=True) says so; once the old
    value is back, a fresh probe finds io_uring again. The setting is machine-wide, so
    the test uses 1 (refused: processes without CAP_SYS_ADMIN outside io_uring_group,
    here a child that became nobody; root processes sharing the machine keep io_uring)
    for a few milliseconds, and always restores the old value."""
    path = "/proc/sys/kernel/io_uring_disabled"
    if not os.path.exists(path):
        pytest.skip("this kernel has no kernel.io_uring_disabled")
    with open(path) as f:
        old = f.read().strip()
    if old != "0":
        pytest.skip(f"kernel.io_uring_disabled is {old} here already")
    tx, rx = udp_pair()
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(go_w)
            os.close(res_r)
            drop_root(8 << 20)
            for _ in range(2):  # disabled, then restored
                os.read(go_r, 1)
                out: dict[str, Any] = {"reason": unsupported_reason(refresh=True)}
                for name, make in (
                    ("new_ring", lambda: new_ring(8, 16)),
                    ("default_ring", default_ring),
                    ("socket", lambda: UringSocket(tx)),
                ):
                    try:
                        make()
                        out[name] = None
                    except ZeroCopyUnsupportedError as exc:
                        out[name] = [exc.errno, str(exc)]
                os.write(res_w, json.dumps(out).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(res_w)
    deadline = time.monotonic() + 60
    try:
        with open(path, "w") as f:
            f.write("1")
        try:
            os.write(go_w, b"x")
            disabled = json.loads(_read_line(res_r, deadline))
        finally:
            with open(path, "w") as f:
                f.write(old)
        os.write(go_w, b"x")
        restored = json.loads(_read_line(res_r, deadline))
    finally:
        with open(path) as f:
            if f.read().strip() != old:
                with open(path, "w") as g:
                    g.write(old)
        os.close(go_w)
        os.close(res_r)
        tx.close()
        rx.close()
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert disabled["reason"] and "disabled" in disabled["reason"], disabled
    for name in ("new_ring", "default_ring", "socket"):
        err, message = disabled[name]
        assert err == errno.EPERM and "io_uring_disabled" in message, disabled
    assert restored["reason"] is None, restored
    assert restored["new_ring"] is restored["default_ring"] is restored["socket"] is None, restored


# -- 5. lifetime: garbage collection, fork ---------------------------------------------------
def _stuck_stream(ring: Any) -> tuple[UringSocket, socket.socket, socket.socket]:
    """A UringSocket whose peer reads nothing (small receive buffer)."""
    client, server = tcp_pair(rcvbuf=65536)
    return UringSocket(client, zerocopy="always", ring=ring), client, server


def _send_until_stuck(ut: UringSocket, payload: bytearray, d: FragDestructor) -> int:
    """One zero-copy send that the peer leaves unacknowledged: returns the bytes taken
    (their pages stay pinned until the peer reads)."""
    n = ut.send(payload, destructor=d)
    assert n > 0
    time.sleep(0.2)
    assert ut.outstanding == 1, "the send was released although the peer reads nothing"
    return n


def _read_exactly(sock: socket.socket, n: int, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        assert chunk, "EOF"
        buf += chunk
    return bytes(buf)


@needs_uring
def test_collected_socket_warns_and_keeps_pins_until_the_notification(fired: Fired) -> None:
    """A UringSocket collected with a send in flight warns (ResourceWarning); its pin
    stays in the ring (the memory stays exported: it cannot be resized, let alone freed)
    and its destructor fires once, only when the notification is reaped. The ring,
    with a request in flight, is not collected and refuses close() with EBUSY; idle,
    it closes and is collected."""
    ring = new_ring(8, 64)
    ut, client, server = _stuck_stream(ring)
    with closing_all(client, server):
        payload = bytearray(os.urandom(1 << 20))
        d = fired.make(0)
        n = _send_until_stuck(ut, payload, d)
        d.unref()
        from pagefrag import _uring

        assert isinstance(ut._ch, _uring.Channel)
        assert len(ut._ch.pending_pins()) == 1 and len(ring.pending_pins()) == 1
        with pytest.warns(ResourceWarning, match="UringSocket collected with 1 sends"):
            del ut
            gc.collect()
        gc.collect()
        assert not fired.counts and ring.in_flight == 1
        with pytest.raises(BufferError):
            payload.extend(b"x")  # still exported by the pin: never freed nor moved
        with pytest.raises(OSError) as info:
            ring.close()
        assert info.value.errno == errno.EBUSY and not ring.closed
        ref = weakref.ref(ring)
        del ring
        gc.collect()
        assert ref() is not None, "a ring with pages in flight was collected"
        assert _read_exactly(server, n) == bytes(payload[:n])
        assert wait_until(lambda: bool(ref().reap() >= 0 and fired.counts))  # type: ignore[union-attr]
        assert fired.once_each([0])
        payload.extend(b"x")  # released: the memory is the owner's again
        ring = ref()
        assert ring is not None and ring.in_flight == 0
        ring.close()
        del ring
        gc.collect()
        assert ref() is None
        time.sleep(0.1)
        assert fired.once_each([0])


@needs_uring
def test_fork_child_copies_are_inert_and_parent_unaffected(fired: Fired) -> None:
    """After fork(), the child's UringSocket raises ForkedSocketError and its copy of the
    ring refuses everything (never reaps or releases the parent's pins); the child's
    default_ring() is a fresh ring that works. The parent's request in flight at the
    fork is notified in the parent, its destructor fires once there."""
    parent_default = default_ring()
    ring = new_ring(8, 64)
    ut, client, server = _stuck_stream(ring)
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=parent_default)
    with closing_all(ut, us, client, server, rx):
        payload = bytes(os.urandom(1 << 20))
        d = fired.make(0)
        n = _send_until_stuck(ut, bytearray(payload), d)
        d.unref()

        def child() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, call in (
                ("send", lambda: ut.send(b"x")),
                ("sendall", lambda: us.sendall(b"x")),
                ("send_many", lambda: us.send_many([b"x"])),
                ("flush", lambda: ut.flush(0)),
            ):
                try:
                    call()
                    out[name] = "no error"
                except ForkedSocketError:
                    out[name] = "forked"
            out["ring_forked"] = ring.forked and parent_default.forked
            try:
                ring.reap()
            except OSError as exc:
                out["ring_reap"] = exc.errno
            out["ring_in_flight"] = ring.in_flight
            try:
                ring.submit()
            except OSError as exc:
                out["ring_submit"] = exc.errno
            fresh = default_ring()
            out["fresh"] = fresh is not parent_default and not fresh.forked
            tx2, rx2 = udp_pair()
            mine = Fired()
            with UringSocket(tx2, zerocopy="always") as u2:
                dd = mine.make(1)
                u2.send(b"child" * 4000, destructor=dd)
                dd.unref()
                u2.flush(10)
                out["child_once"] = mine.once_each([1])
            out["child_got"] = read_datagrams(rx2, 1)[0] == b"child" * 4000
            ut.close()  # closes the child's descriptor only
            us.close()
            out["parent_fired_here"] = dict(fired.counts)
            return out

        out = run_in_child(child)
        assert out == {
            "send": "forked",
            "sendall": "forked",
            "send_many": "forked",
            "flush": "forked",
            "ring_forked": True,
            "ring_reap": errno.EBADF,
            "ring_in_flight": 0,
            "ring_submit": errno.EBADF,
            "fresh": True,
            "child_once": True,
            "child_got": True,
            "parent_fired_here": {},
        }, out
        assert not ring.forked and ring.in_flight == 1 and ut.outstanding == 1
        assert _read_exactly(server, n) == payload[:n]
        ut.flush(timeout=30)
        assert fired.once_each([0])
        assert us.send(b"parent" * 4000) == 24000
        assert read_datagrams(rx, 1) == [b"parent" * 4000]


# -- 7. interrupts and timeouts ------------------------------------------------------------------
class PausedVerifyingReceiver(VerifyingReceiver):
    """A VerifyingReceiver that starts reading only when start() is called."""

    def __init__(self, sock: socket.socket) -> None:  # not VerifyingReceiver's: no start()
        threading.Thread.__init__(self, daemon=True)
        self.sock = sock
        self.received = self.bad_bytes = self.poison_bytes = 0


@contextlib.contextmanager
def sigint_when(cond: Callable[[], bool], delay: float = 0.3) -> Iterator[None]:
    """While the body runs, SIGINT (default handler: KeyboardInterrupt) is sent to this
    thread once ``cond()`` holds, plus ``delay`` seconds."""
    main = threading.get_ident()
    stop = threading.Event()

    def fire() -> None:
        if wait_until(lambda: cond() or stop.is_set(), timeout=30) and not stop.is_set():
            time.sleep(delay)
            if not stop.is_set():
                signal.pthread_kill(main, signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    th = threading.Thread(target=fire, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(10)
        signal.signal(signal.SIGINT, old)


@needs_uring
def test_interrupted_sendall_keeps_pins_and_the_stream_in_order(fired: Fired) -> None:
    """Ctrl-C while sendall waits for room on a peer that reads nothing: the request
    stays in flight with its pages pinned (no destructor fires); the next sendall waits
    for it, so the peer receives every byte in order; every destructor fires once."""
    ring = new_ring(8, 64)
    client, server = tcp_pair(rcvbuf=65536)
    ut = UringSocket(client, zerocopy="always", ring=ring)
    rx = PausedVerifyingReceiver(server)
    first, second = 8 << 20, 1 << 20
    with closing_all(ut, client, server):
        d0 = fired.make(0)
        with sigint_when(lambda: ring.in_flight > 0), pytest.raises(KeyboardInterrupt):
            ut.sendall(counters(0, first).tobytes(), destructor=d0)
        d0.unref()
        time.sleep(0.1)
        assert not fired.counts and ut.outstanding == 1 and ring.in_flight == 1
        rx.start()
        d1 = fired.make(1)
        ut.sendall(counters(first, second).tobytes(), destructor=d1)
        d1.unref()
        ut.flush(timeout=30)
        client.shutdown(socket.SHUT_WR)
        rx.join(60)
        assert rx.received == first + second and rx.bad_bytes == 0
        assert fired.once_each([0, 1])
        assert ut.stats.completions == ut.stats.zerocopy_sends == 2


@needs_uring
def test_sendall_timeout_keeps_what_was_sent_pinned(fired: Fired) -> None:
    """sendall(timeout=...) on a peer that reads nothing raises TimeoutError; the part
    the kernel took stays pinned until its notification, then the destructor fires
    once, and the peer receives exactly that part, in order."""
    ring = new_ring(8, 64)
    client, server = tcp_pair(rcvbuf=65536)
    ut = UringSocket(client, zerocopy="always", ring=ring)
    rx = PausedVerifyingReceiver(server)
    with closing_all(ut, client, server):
        d = fired.make(0)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            ut.sendall(counters(0, 8 << 20).tobytes(), destructor=d, timeout=0.5)
        assert time.monotonic() - t0 < 20
        d.unref()
        sent = ut.stats.bytes_sent
        assert 0 < sent < 8 << 20
        assert not fired.counts and ut.outstanding == 1
        rx.start()
        ut.flush(timeout=30)
        assert fired.once_each([0])
        client.shutdown(socket.SHUT_WR)
        rx.join(60)
        # the receiver counts a last partial 8-byte word as "bad"
        assert rx.received == sent - sent % 8 and rx.bad_bytes == sent % 8


@needs_uring
@needs_root
def test_fixed_buffer_sends_are_not_charged_per_send() -> None:
    """Proof that sends from registered memory really go as fixed buffers: as nobody with
    512 KiB of RLIMIT_MEMLOCK, registering 256 KiB charges its 64 pages once (a second
    registration of 512 KiB is refused with ENOMEM and registers nothing); four sendalls
    of the whole registered buffer then need no more room (no refusal, no retry), while
    one of 256 KiB of ordinary memory (66 more pages) is refused, and goes only in
    shorter requests (halved on each refusal). Every byte sent arrives."""
    client, server = tcp_pair()

    def body() -> dict[str, Any]:
        rx = Receiver(server)
        drop_root(512 << 10)
        ring = new_ring(8, 64)
        reg = mmap.mmap(-1, 256 << 10)
        plain = mmap.mmap(-1, 256 << 10)
        out: dict[str, Any] = {"slot": ring.register_buffer(reg)}
        try:
            ring.register_buffer(mmap.mmap(-1, 512 << 10))
        except OSError as exc:
            out["second"] = exc.errno
        out["fixed_buffers"] = ring.fixed_buffers
        ut = UringSocket(client, zerocopy="always", ring=ring, enobufs_timeout=1)
        reg[:] = b"r" * len(reg)
        for _ in range(4):
            ut.sendall(memoryview(reg))
        ut.flush(timeout=30)
        out["fixed_retries"] = ut.stats.enobufs_retries
        plain[:] = b"p" * len(plain)
        try:
            ut.sendall(memoryview(plain))
            out["plain_refused"] = ut.stats.enobufs_retries > 0
        except SendBufferError as exc:
            out["plain_refused"] = exc.errno
        client.shutdown(socket.SHUT_WR)
        ut.close(timeout=30)
        out["got_all"] = rx.join(30) == b"r" * (1 << 20) + b"p" * (256 << 10)
        return out

    with closing_all(client, server):
        out = run_in_child(body)
    assert out == {
        "slot": out["slot"],
        "second": errno.ENOMEM,
        "fixed_buffers": 1,
        "fixed_retries": 0,
        "plain_refused": True,
        "got_all": True,
    }, out


@needs_uring
def test_abort_of_one_socket_leaves_the_others_on_the_ring_alone(fired: Fired) -> None:
    """Two streams on one ring, both with a send stuck at a peer that reads nothing:
    aborting one cancels and resets only its own requests (its destructor fires once,
    after its notification); the other's stays pinned and arrives intact once its peer
    reads."""
    ring = new_ring(8, 64)
    a, ca, sa = _stuck_stream(ring)
    b, cb, sb = _stuck_stream(ring)
    with closing_all(a, b, ca, cb, sa, sb):
        payload = bytes(os.urandom(1 << 20))
        da, db = fired.make(0), fired.make(1)
        _send_until_stuck(a, bytearray(payload), da)
        n = _send_until_stuck(b, bytearray(payload), db)
        da.unref()
        db.unref()
        a.abort(timeout=30)
        assert a.closed and fired.once_each([0])
        time.sleep(0.2)
        assert b.outstanding == 1 and ring.in_flight == 1 and 1 not in fired.counts
        assert _read_exactly(sb, n) == payload[:n]
        b.flush(timeout=30)
        assert fired.once_each([0, 1]) and ring.in_flight == 0


@needs_uring
def test_a_sender_thread_may_exit_before_its_notification(fired: Fired) -> None:
    """A thread sends (its pages stay pinned at a peer that reads nothing) and exits at
    once; the kernel completes the notification without that thread, and the destructor
    fires once, in the thread that reaps it."""
    ring = new_ring(8, 64)
    ut, client, server = _stuck_stream(ring)
    reaper: list[str] = []
    with closing_all(ut, client, server):
        payload = bytes(os.urandom(1 << 20))
        d = fired.make(0, then=lambda: reaper.append(threading.current_thread().name))
        taken: list[int] = []

        def sender() -> None:
            taken.append(ut.send(bytearray(payload), destructor=d))

        th = threading.Thread(target=sender, name="sender")
        th.start()
        th.join(30)
        assert not th.is_alive(), "a thread with a send in flight could not exit"
        d.unref()
        assert taken and ut.outstanding == 1 and not fired.counts
        assert _read_exactly(server, taken[0]) == payload[: taken[0]]
        ut.flush(timeout=30)
        assert fired.once_each([0]) and reaper == [threading.current_thread().name]


# -- found in review: interrupts after filing, stale descriptors, forks, closes -------------------
class _InterruptAfter:
    """A channel whose filing calls (submit_*, file_*) raise KeyboardInterrupt right after
    the real call returned: where CPython raises a SIGINT that arrived during the call."""

    def __init__(self, ch: Any) -> None:
        self.__dict__["_real"] = ch

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not name.startswith(("submit_", "file_")):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            attr(*args, **kwargs)
            raise KeyboardInterrupt

        return call


@needs_uring
def test_an_interrupt_raised_as_a_filing_returns_never_releases_early() -> None:
    """The request is filed (its pin in the ring) when the interrupt is raised: the
    sender must not release the pin then, or the owner reuses a buffer the kernel is
    about to send. Failed before the pins were made and filed in one C call: 65536
    poison bytes at the receiver."""
    ring = new_ring(8, 64)
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    zs = UringSocket(client, zerocopy="always", ring=ring)
    buf = bytearray(b"A" * 65536)
    d = FragDestructor(lambda _: buf.__setitem__(slice(None), b"\xee" * len(buf)))
    with closing_all(zs, server):
        real = zs._ch
        zs._ch = _InterruptAfter(real)
        with pytest.raises(KeyboardInterrupt):
            zs.send([memoryview(buf)[:32768], memoryview(buf)[32768:]], destructor=d)
        zs._ch = real
        d.unref()
        assert ring.in_flight == 1 and not d.done  # the ring holds it
        zs.flush(timeout=30)
        assert d.done
        got = _read_exactly(server, 65536)
        assert got == b"A" * 65536


@needs_uring
def test_an_interrupt_raised_as_a_linked_batch_is_filed_never_releases_early(
    fired: Fired,
) -> None:
    ring = new_ring(8, 64)
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=ring)
    bufs = [bytearray(bytes([65 + i]) * 20000) for i in range(3)]
    ds = [fired.make(i) for i in range(3)]
    with closing_all(us, rx):
        real = us._ch
        us._ch = _InterruptAfter(real)
        with pytest.raises(KeyboardInterrupt) as info:
            us.send_many([[memoryview(b)] for b in bufs], destructors=ds)  # (iovecs)
        us._ch = real
        # The batch was filed whole: settled before the interrupt went on, it counts.
        # (Failed before file_linked appended to a list the caller holds: items_sent 0.)
        assert info.value.items_sent == 3  # type: ignore[attr-defined]
        for d in ds:
            d.unref()
        us.flush(timeout=30)
        assert fired.once_each([0, 1, 2])
        assert read_datagrams(rx, 3) == [bytes(b) for b in bufs]


@needs_uring
def test_a_socket_closed_behind_the_wrapper_is_ebadf_not_another_connection() -> None:
    """Failed before the check: the send went to the socket that got the same number."""
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="never", ring=new_ring(4, 8))
    other_tx, other_rx = udp_pair()
    with closing_all(rx, other_tx, other_rx):
        tx.close()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with closing_all(again):
            again.connect(other_rx.getsockname())
            if again.fileno() != us._ch.fd:
                pytest.skip("the descriptor number was not reused")
            with pytest.raises(OSError) as info:
                us.send(b"secret")
            assert info.value.errno == errno.EBADF


@needs_uring
def test_a_ring_made_directly_is_inert_in_a_forked_child() -> None:
    """Failed before every ring registered itself for fork: the child died of SIGSEGV
    (its rings are not mapped there)."""
    from pagefrag import _uring

    ring = _uring.Ring(4, 8)

    def child() -> dict[str, Any]:
        try:
            ring.reap()
        except OSError as exc:
            return {"reap": exc.errno, "forked": ring.forked}
        return {"reap": "no error"}

    assert run_in_child(child) == {"reap": errno.EBADF, "forked": True}
    ring.close()


@needs_uring
def test_a_ring_refuses_close_while_a_thread_waits_on_it() -> None:
    """Failed before waiters were counted: close() unmapped the rings under a thread
    about to read them (SIGSEGV)."""
    from pagefrag import _uring

    ring = _uring.Ring(4, 8)
    waiting = threading.Thread(target=ring.wait, args=(1.0,))
    waiting.start()
    try:
        deadline = time.monotonic() + 5
        refused = False
        while time.monotonic() < deadline and waiting.is_alive() and not refused:
            try:
                ring.close()
            except OSError as exc:
                refused = exc.errno == errno.EBUSY
            else:
                break
            time.sleep(0.001)
        assert refused or not waiting.is_alive()
    finally:
        waiting.join(10)
    ring.close()
    assert ring.closed


@needs_uring
def test_pool_buffers_take_the_flat_path_and_come_back_after_their_notifications() -> None:
    """A PoolBuffer without a destructor of its own goes as its memory and its
    destructor (one reference, registered: a fixed buffer); it returns to the pool only
    once the ring has its notification. A released one is refused before anything."""
    from pagefrag import BufferPool
    from pagefrag.errors import BufferReleasedError

    ring = new_ring(16, 64)
    pool = BufferPool(30000, 4, register=ring)
    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=ring)
    with closing_all(us, rx):
        bufs = [pool.acquire() for _ in range(4)]
        for i, b in enumerate(bufs):
            b.data[:] = bytes([97 + i]) * len(b)
            assert ring.fixed_index(b.data) >= 0
        assert us.send_many(bufs[:3]) == 3
        assert us.send(bufs[3]) == 30000
        for b in bufs:
            b.release()
        us.flush(timeout=30)
        assert pool.free == 4
        st = us.stats
        assert st.zerocopy_sends == st.completions == 4
        assert read_datagrams(rx, 4) == [bytes([97 + i]) * 30000 for i in range(4)]
        with pytest.raises(BufferReleasedError):
            us.send_many([bufs[0]])
        with pytest.raises(BufferReleasedError):
            us.send(bufs[0])
        assert ring.in_flight == 0 and us.stats.sends == 4
        # With a destructor of its own too: the general path holds both.
        extra = FragDestructor()
        b = pool.acquire()
        assert us.send_many([b], destructors=[extra]) == 1
        b.release()
        extra.unref()
        us.flush(timeout=30)
        assert extra.done and pool.free == 4


def _big_stream_send_over_the_limit(client: socket.socket, server: socket.socket) -> dict[str, Any]:
    """In the child (256 KiB of RLIMIT_MEMLOCK): one 1 MiB ``sendall`` in ``always``
    to a reader that reads; the request alone is over the limit."""
    rx = VerifyingReceiver.__new__(VerifyingReceiver)
    threading.Thread.__init__(rx, daemon=True)
    rx.sock, rx.received, rx.bad_bytes, rx.poison_bytes = server, 0, 0, 0
    drop_root(256 << 10)
    ring = new_ring(8, 64)
    us = UringSocket(client, zerocopy="always", ring=ring, enobufs_timeout=3)
    rx.start()
    fired = Fired()
    d = fired.make(0)
    try:
        us.sendall(counters(0, 1 << 20).tobytes(), destructor=d)
    except SendBufferError as exc:
        return {"error": repr(exc)}
    finally:
        d.unref()
    us.flush(timeout=60)
    client.shutdown(socket.SHUT_WR)
    us.close(timeout=60)
    rx.join(60)
    st = us.stats
    return {
        "received": rx.received,
        "bad": rx.bad_bytes,
        "once": fired.once_each([0]),
        "copies": st.enobufs_copies,
        "exact": st.completions == st.zerocopy_sends,
    }


@needs_uring
def test_enomem_always_a_stream_request_over_the_limit_goes_in_shorter_requests() -> None:
    """A stream request that alone pins more than RLIMIT_MEMLOCK is halved until the
    kernel takes it (the rest goes by the next request), as MSG_ZEROCOPY makes partial
    progress. Failed before: SendBufferError after enobufs_timeout."""
    client, server = tcp_pair(rcvbuf=65536)
    with closing_all(client, server):
        out = run_in_child(lambda: _big_stream_send_over_the_limit(client, server))
    assert out == {
        "received": 1 << 20,
        "bad": 0,
        "once": True,
        "copies": 0,
        "exact": True,
    }, out


@needs_uring
def test_a_signal_handled_by_another_thread_still_interrupts_a_waiting_send() -> None:
    """A signal whose C-level handler ran in another thread (or between two slices of
    the wait) does not interrupt the main thread's ``io_uring_enter``: its Python
    handler must still run within a slice. Hung for good before the wait checked for
    pending signals after every slice, not only on EINTR (seen as a CI-suite hang of
    the test below, whose SIGALRM came between two slices)."""
    ring = new_ring(8, 64)
    client, server = tcp_pair(rcvbuf=4096)
    with closing_all(client, server):
        zs = UringSocket(client, zerocopy="never", ring=ring)
        main = threading.get_ident()
        got: list[float] = []

        def on_usr1(*_: object) -> None:
            assert threading.get_ident() == main
            got.append(time.monotonic())
            raise KeyboardInterrupt

        def from_another_thread() -> None:
            time.sleep(0.5)
            # Delivered to this thread: the main thread's wait is not interrupted.
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

        def rescue() -> None:
            time.sleep(20)
            if not got:
                Receiver(server)  # let the send complete, so a failure is not a hang

        old = signal.signal(signal.SIGUSR1, on_usr1)
        try:
            threading.Thread(target=from_another_thread, daemon=True).start()
            threading.Thread(target=rescue, daemon=True).start()
            start = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                for _ in range(10_000):  # bounded: each send waits for room at last
                    zs.send(b"x" * 65536)
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert got and got[0] - start < 10
        Receiver(server)
        zs.close()


@needs_uring
@pytest.mark.parametrize("mode", ["never", "auto"])
@pytest.mark.parametrize("how", ["flat", "iov"])
def test_an_interrupted_copying_request_keeps_its_buffer_until_its_result(
    mode: str, how: str
) -> None:
    """A copying io_uring request waiting for room reads the memory later: it holds the
    buffer's references until its result, so a Ctrl-C while it waits and the owner's
    release() do not lend the buffer again before the kernel copied it. Failed before
    copying requests took references: the new holder's poison on the wire."""
    from pagefrag import BufferPool

    ring = new_ring(8, 64)
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with closing_all(a, b):
        filler = 0
        for _ in range(10_000):  # fill the pipe: the next send must wait for room
            try:
                filler += a.send(b"F" * 65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        zs = UringSocket(a, zerocopy=mode, ring=ring)
        pool = BufferPool(65536, 1)
        buf = pool.acquire()
        buf.data[:] = b"A" * 65536

        def on_alarm(*_: object) -> None:
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                zs.send(buf if how == "flat" else [buf])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        buf.release()
        assert pool.free == 0  # the ring still holds it
        rx = Receiver(b)  # room at last: the request copies and completes
        zs.flush(timeout=30)  # (it takes what fits: a send may be partial)
        assert pool.free == 1
        taken = zs.stats.bytes_sent
        a.shutdown(socket.SHUT_WR)
        got = rx.join(30)
        assert 0 < taken <= 65536 and got == b"F" * filler + b"A" * taken
        zs.close()


@needs_uring
def test_pool_buffers_from_a_generator_live_through_send_many() -> None:
    """The flat path replaces a pool buffer by its memory and destructor; the buffers
    themselves must live through the call. Failed before: a generator's buffers were
    collected at once, their destructors fired, DestructorError."""
    from pagefrag import BufferPool

    tx, rx = udp_pair()
    us = UringSocket(tx, zerocopy="always", ring=new_ring(8, 64))
    pool = BufferPool(20000, 2)
    with closing_all(us, rx), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # (the buffers are never released)
        assert us.send_many(pool.acquire() for _ in range(2)) == 2
        us.flush(timeout=30)
        assert len(read_datagrams(rx, 2)) == 2
