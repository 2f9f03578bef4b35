"""ZeroCopySocket off the happy path (issue 9): Ctrl-C in a send, several sender threads,
a poller thread, fork(), a peer that vanishes, non-root limits, huge iovecs, bad input.
Real kernel, real sockets, real signals and processes; every loop bounded."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import POISON, Fired, Receiver, Run

import pagefrag
from pagefrag import Frag, FragDestructor, IoVec
from pagefrag.errors import CompletionTimeoutError, QueuedSocketError
from pagefrag.testing.netlab import NetLab
from pagefrag.zerocopy import CompletionTracker, ZeroCopySocket, tcp_info

SRC = str(Path(pagefrag.__file__).resolve().parent.parent)  # for child interpreters
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def stream_bytes(offset: int, size: int) -> np.ndarray:
    """The stream's expected bytes at any ``offset``: little-endian u64 word counters
    (the word at byte ``8k`` is ``k``), so a send may stop at any byte."""
    first, skip = divmod(offset, 8)
    words = np.arange(first, first + (skip + size + 7) // 8, dtype="<u8").view(np.uint8)
    return words[skip : skip + size]


def loopback_pair(
    sndbuf: int | None = None, rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    if rcvbuf is not None:  # before accept: the window is advertised from the start
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client = socket.socket()
    if sndbuf is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    client.connect(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    return client, server


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    client, server = loopback_pair()
    yield client, server
    client.close()
    server.close()


# -- 1. KeyboardInterrupt inside a blocking sendall ------------------------------------------


class CreditReceiver(threading.Thread):
    """Reads only as many bytes as it is allowed to, checking each against
    :func:`stream_bytes`; counts wrong and poison bytes."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.cond = threading.Condition()
        self.credit = 0
        self.received = 0
        self.bad_bytes = 0
        self.poison_bytes = 0
        self.error: BaseException | None = None
        self.start()

    def allow(self, n: float) -> None:
        """Read at most ``n`` more bytes from now on (what was allowed before lapses)."""
        with self.cond:
            self.credit = n
            self.cond.notify_all()

    def run(self) -> None:
        try:
            self.sock.settimeout(120)
            while True:
                with self.cond:
                    if not self.cond.wait_for(lambda: self.credit > 0, 120):
                        return
                    want = int(min(self.credit, 1 << 20))
                chunk = self.sock.recv(want)
                if not chunk:
                    return
                got = np.frombuffer(chunk, dtype=np.uint8)
                wrong = got != stream_bytes(self.received, len(chunk))
                self.bad_bytes += int(wrong.sum())
                self.poison_bytes += int(((got == POISON) & wrong).sum())
                with self.cond:
                    self.received += len(chunk)
                    self.credit -= len(chunk)
                    self.cond.notify_all()
        except BaseException as exc:
            self.error = exc


class Interrupter(threading.Thread):
    """Sends SIGINT to the main thread after each requested delay, then acknowledges."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.requests: queue.SimpleQueue[float | None] = queue.SimpleQueue()
        self.sent: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self.target = threading.main_thread().ident
        self.start()

    def run(self) -> None:
        while (delay := self.requests.get()) is not None:
            time.sleep(delay)
            assert self.target is not None
            signal.pthread_kill(self.target, signal.SIGINT)
            self.sent.put(True)


def test_ctrl_c_in_a_blocking_sendall_never_releases_early_nor_desyncs_ids(
    fired: Fired, record_property: Callable[[str, object], None]
) -> None:
    """SIGINT while ``sendall`` blocks in the kernel: the kernel returns a partial count
    and CPython raises KeyboardInterrupt right after the call returned. The pages the
    kernel took must stay pinned (a buffer is poisoned and reused the moment its
    destructor fires: no poison and no stale byte may reach the peer), the tracker's ids
    must stay the kernel's (a last send after everything completes must complete), and
    the socket must stay usable."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    client, server = loopback_pair(sndbuf=128 * 1024, rcvbuf=64 * 1024)
    rx = CreditReceiver(server)
    interrupter = Interrupter()
    # Completions only where the test asks: no destructor runs inside the interrupted call.
    zs = ZeroCopySocket(client, zerocopy="always", completion_batch=10**9)
    size, count = 1 << 20, 6
    pool = [bytearray(size) for _ in range(count)]
    free = collections.deque(range(count))

    def release(idx: int) -> None:
        pool[idx][:] = bytes([POISON]) * size  # the owner reuses the memory at once
        free.append(idx)

    rng = random.Random(9)
    hits = interrupts = made = 0
    deadline = time.monotonic() + 90
    try:
        for it in range(40):
            while not free:
                assert time.monotonic() < deadline, "no buffer came back"
                rx.allow(256 * 1024)
                zs.poll_completions(timeout=0.1)
            idx = free.popleft()
            before = zs.stats.bytes_sent
            np.frombuffer(pool[idx], dtype=np.uint8)[:] = stream_bytes(before, size)
            d = fired.make(it, then=lambda idx=idx: release(idx))
            made += 1
            rx.allow(256 * 1024)  # room in the pipe: the call takes some, then blocks
            interrupter.requests.put(rng.uniform(0.02, 0.12))
            try:
                zs.sendall(pool[idx], destructor=d)
                time.sleep(30)  # sent in full before the signal: it lands here
            except KeyboardInterrupt:
                interrupts += 1
            assert interrupter.sent.get(timeout=30)
            d.unref()
            taken = zs.stats.bytes_sent - before
            # A blocking call returns a partial count only when a signal cut it short:
            # KeyboardInterrupt came after the kernel had accepted that call.
            hits += 0 < taken < size
            if time.monotonic() > deadline - 30:
                break
        interrupter.requests.put(None)
        rx.allow(float("inf"))
        zs.flush(timeout=60)
        # The ids still match the kernel's: a last send completes under its id.
        probe = stream_bytes(zs.stats.bytes_sent, 100_000).tobytes()
        d = fired.make(10_000)
        zs.sendall(probe, destructor=d)
        d.unref()
        try:
            zs.flush(timeout=30)
            ids_in_step = True
        except CompletionTimeoutError:
            ids_in_step = False
        st = zs.stats
        if ids_in_step:
            zs.close(timeout=30)
        else:
            with contextlib.suppress(CompletionTimeoutError):
                zs.abort(timeout=5)
        rx.join(60)
    finally:
        signal.signal(signal.SIGINT, old_handler)
        interrupter.requests.put(None)
    record_property("interrupts", interrupts)
    record_property("window_hits", hits)
    print(f"\n{interrupts} interrupts, {hits} after the kernel accepted the call")
    assert rx.poison_bytes == 0 and rx.bad_bytes == 0
    assert ids_in_step, "the last send never completed: the tracker's ids drifted"
    assert rx.error is None and not rx.is_alive()
    assert rx.received == st.bytes_sent
    assert fired.once_each([*range(made), 10_000])
    assert st.duplicates == 0 and st.completions == st.zerocopy_sends
    assert hits >= 3, f"the window was hit only {hits} times in {interrupts} interrupts"


# -- 2. several sender threads ---------------------------------------------------------------

HEADER = struct.Struct("<IIQ")  # thread, seq, payload bytes


def record_payload(thread: int, seq: int, size: int) -> np.ndarray:
    words = np.arange(size // 8, dtype="<u8") | np.uint64((thread << 56) | (seq << 32))
    return words.view(np.uint8)


class RecordReceiver(threading.Thread):
    """Reads framed records to EOF and checks each against :func:`record_payload`."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.records: dict[int, int] = collections.defaultdict(int)  # thread -> next seq
        self.bad_records = 0
        self.poison_bytes = 0
        self.error: BaseException | None = None
        self.start()

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                if buf:
                    raise EOFError("stream ended inside a record")
                return b""
            buf += chunk
        return bytes(buf)

    def run(self) -> None:
        try:
            self.sock.settimeout(120)
            while head := self._exact(HEADER.size):
                thread, seq, size = HEADER.unpack(head)
                body = np.frombuffer(self._exact(size), dtype=np.uint8)
                want = record_payload(thread, seq, size)
                self.poison_bytes += int(((body == POISON) & (body != want)).sum())
                if seq != self.records[thread] or not np.array_equal(body, want):
                    self.bad_records += 1
                self.records[thread] = seq + 1
        except BaseException as exc:
            self.error = exc


def test_threads_sending_on_one_socket_under_loss(lab: NetLab, fired: Fired) -> None:
    """4 threads send framed records on one socket (always zero-copy) over veth with 2 %
    loss, each from its own 3 buffers poisoned and reused the moment their destructor
    fires, each waiting for buffers with poll_completions. Every record arrives intact
    and in order per thread; every destructor fires once; the ids never drift."""
    lab.add_loss(2)
    client, server = lab.tcp_pair()
    rx = RecordReceiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    threads, per_thread, size = 4, 40, 192 * 1024
    errors: list[BaseException] = []

    def sender(t: int) -> None:
        bufs = [bytearray(HEADER.size + size) for _ in range(3)]
        free: collections.deque[int] = collections.deque(range(3))

        def release(idx: int) -> None:
            bufs[idx][:] = bytes([POISON]) * len(bufs[idx])
            free.append(idx)

        try:
            deadline = time.monotonic() + 150
            for seq in range(per_thread):
                while not free:
                    assert time.monotonic() < deadline, "no buffer came back"
                    zs.poll_completions(timeout=0.05)
                idx = free.popleft()
                buf = bufs[idx]
                buf[: HEADER.size] = HEADER.pack(t, seq, size)
                np.frombuffer(buf, dtype=np.uint8)[HEADER.size :] = record_payload(t, seq, size)
                d = fired.make(t * 1000 + seq, then=lambda idx=idx: release(idx))
                zs.sendall(buf, destructor=d)
                d.unref()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(200)
    assert not any(w.is_alive() for w in workers), "a sender is stuck"
    assert lab.dropped() > 0, "the loss rule must drop frames"
    retransmits = tcp_info(client).total_retrans
    zs.close(timeout=90)
    rx.join(90)
    assert not errors, errors
    assert rx.error is None and not rx.is_alive()
    assert rx.poison_bytes == 0 and rx.bad_records == 0
    assert dict(rx.records) == {t: per_thread for t in range(threads)}
    assert fired.once_each([t * 1000 + s for t in range(threads) for s in range(per_thread)])
    st = zs.stats
    assert st.duplicates == 0 and st.completions == st.zerocopy_sends
    assert retransmits > 0


# -- 3. one sender thread and one poller thread ----------------------------------------------


def test_a_sender_thread_and_a_poller_thread(fired: Fired) -> None:
    """The layout BufferPool.acquire suggests: one thread sends from a small pool, another
    loops in poll_completions. Completions read before their pin is filed must not be
    lost as duplicates: every buffer comes back, nothing is counted as a duplicate."""
    client, server = loopback_pair()
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="always", completion_batch=10**9)
    size, count, total = 64 * 1024, 8, 2500
    pool = [bytearray(size) for _ in range(count)]
    free: collections.deque[int] = collections.deque(range(count))
    cond = threading.Condition()
    stop = threading.Event()
    errors: list[BaseException] = []

    def release(idx: int) -> None:
        pool[idx][:] = bytes([POISON]) * size
        with cond:
            free.append(idx)
            cond.notify()

    def poller() -> None:
        try:
            while not stop.is_set():
                zs.poll_completions(timeout=0.05)
        except BaseException as exc:
            errors.append(exc)

    def sender() -> None:
        try:
            for i in range(total):
                with cond:
                    assert cond.wait_for(lambda: free, 20), f"the pool ran dry at send {i}"
                    idx = free.popleft()
                np.frombuffer(pool[idx], dtype=np.uint8)[:] = stream_bytes(i * size, size)
                d = fired.make(i, then=lambda idx=idx: release(idx))
                zs.sendall(pool[idx], destructor=d)
                d.unref()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=poller), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    threads[1].join(120)
    deadline = time.monotonic() + 30
    while zs.outstanding and time.monotonic() < deadline:  # the poller reads them all
        time.sleep(0.05)
    stop.set()
    threads[0].join(30)
    assert not errors, errors
    assert zs.outstanding == 0, "pins stuck: their completions were lost"
    st = zs.stats
    zs.close(timeout=10)
    data = rx.join(60)
    assert len(data) == total * size
    assert np.array_equal(np.frombuffer(data, dtype=np.uint8), stream_bytes(0, total * size))
    assert fired.once_each(range(total))
    assert st.duplicates == 0 and st.completions == st.zerocopy_sends >= total


def test_tracker_remembers_a_completion_read_before_its_filing() -> None:
    t: CompletionTracker[str] = CompletionTracker(first_id=2**32 - 1)
    t.sent("a", 10)
    assert t.complete(2**32 - 1, 1) == ["a"]  # ids 0 and 1: not filed yet
    assert t.duplicates == 0 and t.outstanding == 0
    t.sent("b", 10)  # the kernel's id 0
    assert t.absorb() == ["b"] and t.completions == 2
    t.sent("c", 10)  # id 1: its completion came first too
    t.sent("d", 10)  # id 2
    assert t.complete(2, 2) == ["c", "d"] and t.duplicates == 0
    assert t.complete(0, 2) == [] and t.duplicates == 3  # genuinely seen before
    assert t.outstanding == 0 and t.pinned_bytes == 0 and t.next_id == 3


# -- 5. fork() -----------------------------------------------------------------------------


def test_forked_child_is_inert_and_the_parent_still_flushes(fired: Fired) -> None:
    """With pins outstanding, a child's copy refuses to send or read completions
    (ForkedSocketError) and close() only closes its descriptor; the parent then reads
    every completion itself."""
    client, server = loopback_pair(rcvbuf=64 * 1024)
    client.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 << 20)
    zs = ZeroCopySocket(client, zerocopy="always")
    sent = bytearray()
    for i in range(4):
        buf = bytearray([i + 1]) * (1 << 20)
        d = fired.make(i)
        zs.sendall(buf, destructor=d, timeout=10)
        d.unref()
        sent += buf
    assert zs.outstanding > 0, "the stalled peer must leave sends pinned"
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must leave through os._exit, whatever happens
        code = 0
        try:
            os.read(go_r, 1)  # the parent's receiver is reading: completions come now
            forked_error = getattr(pagefrag.errors, "ForkedSocketError", ())

            ops = [
                lambda: zs.poll_completions(timeout=2),
                lambda: zs.flush(timeout=2),
                lambda: zs.send(bytearray(100_000)),
                lambda: zs.sendall(b"x"),
                lambda: zs.send_iov(IoVec([memoryview(b"y")], [None])),
                lambda: zs.abort(timeout=2),
            ]
            for bit, op in enumerate(ops):
                try:
                    op()
                    code |= 1 << bit
                except forked_error:
                    pass
                except BaseException:
                    code |= 1 << bit
            zs.close(timeout=2)
            if not zs.closed:
                code |= 1 << 6
            time.sleep(0.5)  # the completions keep arriving: the child must not read them
        except BaseException:
            code |= 1 << 7
        finally:
            os._exit(code)
    os.close(go_r)
    rx = Receiver(server)
    os.write(go_w, b"!")
    os.close(go_w)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child did not exit")
        time.sleep(0.05)
    try:
        zs.flush(timeout=30)
        flushed = True
    except CompletionTimeoutError:
        flushed = False
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the child's copy was not inert"
    assert flushed, "the parent's completions were read by the child"
    zs.close(timeout=10)
    assert rx.join() == sent
    assert fired.once_each(range(4))
    assert zs.stats.completions == zs.stats.zerocopy_sends and zs.stats.duplicates == 0


# -- 10, 11. a peer that vanishes ------------------------------------------------------------


def test_close_without_timeout_is_bounded_and_keeps_the_pins(lab: NetLab, fired: Fired) -> None:
    client, server = lab.tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)  # room for it all
    probe = ZeroCopySocket(lab.tcp_pair()[0])
    assert probe.close_timeout == 30.0  # the default bound
    probe.abort()
    zs = ZeroCopySocket(client, zerocopy="always", close_timeout=2.0)
    lab.add_loss(100)
    data = bytearray(b"q") * (1 << 20)
    d = fired.make(0)
    zs.sendall(data, destructor=d, timeout=10)
    d.unref()
    t0 = time.monotonic()
    with pytest.raises(CompletionTimeoutError) as info:
        zs.close()
    waited = time.monotonic() - t0
    assert lab.dropped() > 0
    assert 1.5 < waited < 20
    assert not zs.closed and zs.outstanding > 0 and info.value.outstanding > 0
    assert fired.counts == {}, "nothing may fire while the kernel holds the pages"
    lab.add_loss(0)
    rx = Receiver(server)
    zs.close(timeout=60)  # the retransmission gets through now
    assert rx.join() == data and fired.once_each([0])


@pytest.mark.parametrize("when", ["while_in_flight", "after_tcp_gave_up"])
def test_close_surfaces_etimedout_when_tcp_gives_up(lab: NetLab, fired: Fired, when: str) -> None:
    """TCP_USER_TIMEOUT of 1 s and every frame dropped: TCP gives up (ETIMEDOUT) and
    purges what it never delivered. close() must say so, not return normally."""
    client, server = lab.tcp_pair()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
    client.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    zs = ZeroCopySocket(client, zerocopy="always")  # the default close bound: 30 s
    lab.add_loss(100)
    d = fired.make(0)
    zs.sendall(bytearray(b"t") * (1 << 20), destructor=d, timeout=10)
    d.unref()
    if when == "after_tcp_gave_up":
        deadline = time.monotonic() + 60
        while tcp_info(client).state != 7:  # TCP_CLOSE
            assert time.monotonic() < deadline, "TCP did not give up"
            time.sleep(0.1)
    with pytest.raises(QueuedSocketError) as info:
        zs.close()
    assert info.value.errno == errno.ETIMEDOUT
    assert lab.dropped() > 0
    assert zs.closed and fired.once_each([0])  # the purge completed every send
    server.close()


# -- 12. non-root, default-sized RLIMIT_MEMLOCK ----------------------------------------------

NON_ROOT_SCRIPT = r"""
import json, os, resource, socket, sys, threading, time
from pagefrag import FragDestructor, IoVec
from pagefrag.errors import SendBufferError
from pagefrag.zerocopy import ZeroCopySocket

mode = sys.argv[1]
if len(sys.argv) > 2:
    # A NetLab's namespaces (sender, receiver): a peer auto does not know to copy (issue
    # 12: loopback starts copying, and would never meet ENOBUFS).
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def socket_in(ns):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        assert libc.setns(there, 0x40000000) == 0
        try:
            return socket.socket()
        finally:
            assert libc.setns(home, 0x40000000) == 0
            os.close(there)
            os.close(home)
    srv = socket_in(sys.argv[3])
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    srv.bind(("198.18.0.2", 0))
    srv.listen()
    client = socket_in(sys.argv[2])
    client.connect(srv.getsockname())
else:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client = socket.create_connection(srv.getsockname())
server, _ = srv.accept()
client.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), 64 << 20)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # all ids non-zero: every capability (CAP_IPC_LOCK) gone
out = {"euid": os.geteuid()}
fired = []
if mode == "auto":
    zs = ZeroCopySocket(client, zerocopy="auto", enobufs_timeout=20)
    sent = bytearray()
    t0 = time.monotonic()
    try:
        for i in range(3):
            buf = bytearray([i + 1]) * (4 << 20)
            d = FragDestructor(fired.append, i)
            zs.sendall(buf, destructor=d)  # the peer is not reading yet
            d.unref()
            sent += buf
    except Exception as exc:
        out["error"] = repr(exc)
    out["seconds"] = time.monotonic() - t0
    got = bytearray()
    def read():
        server.settimeout(30)
        while chunk := server.recv(1 << 20):
            got.extend(chunk)
    reader = threading.Thread(target=read)
    reader.start()
    zs.close(timeout=30)
    reader.join(60)
    st = zs.stats
    out.update(intact=bytes(got) == bytes(sent), fired=fired,
               enobufs_copies=getattr(st, "enobufs_copies", None),
               enobufs_retries=st.enobufs_retries, completions=st.completions,
               zerocopy_sends=st.zerocopy_sends, bytes_sent=st.bytes_sent)
else:
    for timeout in (1.0, 0.0):
        zs = ZeroCopySocket(client, zerocopy="always", enobufs_timeout=timeout)
        d = FragDestructor(fired.append, timeout)
        t0 = time.monotonic()
        try:
            zs.send_iov(IoVec([memoryview(bytearray(4 << 20))], [None]), d)
            out[f"raised_{timeout}"] = None
        except SendBufferError as exc:
            out[f"raised_{timeout}"] = exc.errno
        out[f"seconds_{timeout}"] = time.monotonic() - t0
        out[f"refcount_{timeout}"] = d.refcount
        out[f"bytes_sent_{timeout}"] = zs.stats.bytes_sent
        d.unref()
print(json.dumps(out))
"""


def run_as_nobody(mode: str, lab: NetLab | None = None) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root first")
    where = [] if lab is None else [lab.sender, lab.receiver]
    out = subprocess.run(
        [sys.executable, "-c", NON_ROOT_SCRIPT, mode, *where],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["euid"] == 65534
    return result


def test_non_root_auto_copies_what_exceeds_the_memlock_limit_at_once(lab: NetLab) -> None:
    """uid 65534, RLIMIT_MEMLOCK 1 MiB, 4 MiB sends (each needs more locked pages than
    allowed): auto sends them copied at once, without waiting, intact. Over veth, not
    loopback: auto starts copying towards loopback (issue 12) and would ask for nothing."""
    r = run_as_nobody("auto", lab)
    assert "error" not in r, r
    assert r["seconds"] < 10, r  # enobufs_timeout is 20 s: not one wait
    assert r["enobufs_copies"] >= 3 and r["enobufs_retries"] == 0
    assert r["intact"] and sorted(r["fired"]) == [0, 1, 2]
    assert r["completions"] == r["zerocopy_sends"]
    assert r["bytes_sent"] == 3 * (4 << 20)


def test_non_root_always_raises_after_enobufs_timeout_and_zero_never_waits() -> None:
    """always waits up to enobufs_timeout, then SendBufferError; with enobufs_timeout=0
    it never waits. Either way nothing was sent and no reference is kept."""
    r = run_as_nobody("always")
    assert r["raised_1.0"] == errno.ENOBUFS and 0.9 < r["seconds_1.0"] < 10
    assert r["raised_0.0"] == errno.ENOBUFS and r["seconds_0.0"] < 0.8
    for t in ("1.0", "0.0"):
        assert r[f"refcount_{t}"] == 1 and r[f"bytes_sent_{t}"] == 0


# -- 13. more pieces than IOV_MAX ------------------------------------------------------------


def test_sendall_of_3000_pieces_splits_at_iov_max(
    pair: tuple[socket.socket, socket.socket], fired: Fired
) -> None:
    client, server = pair
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    pages = [bytearray(bytes([k + 1]) * 100_000) for k in range(3)]
    ds = [fired.make(k) for k in range(3)]
    frags = [Frag(pages[i % 3], (i // 3) * 100, 100, ds[i % 3]) for i in range(3000)]
    zs.sendall(frags)
    for d in ds:
        d.unref()
    zs.close()
    assert rx.join() == b"".join(bytes(f.view()) for f in frags)
    assert fired.once_each(range(3))
    assert zs.stats.zerocopy_sends >= 3 and zs.stats.completions == zs.stats.zerocopy_sends


def test_aio_write_of_3000_pieces_arrives_intact(run: Run) -> None:
    from pagefrag.aio import ZeroCopyStreamWriter, open_connection, start_server

    pieces = [bytes([k % 251]) * (k % 97 + 1) for k in range(3000)]
    received = bytearray()

    async def main() -> None:
        done = asyncio.Event()

        async def sink(reader: asyncio.StreamReader, writer: ZeroCopyStreamWriter) -> None:
            while chunk := await reader.read(1 << 20):
                received.extend(chunk)
            writer.close()
            done.set()

        server = await start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await open_connection("127.0.0.1", port, zerocopy="always")
        handle = writer.write(pieces)
        await handle
        writer.close()
        await writer.wait_closed()
        await done.wait()
        server.close()

    run(main())
    assert bytes(received) == b"".join(pieces)


def test_a_datagram_of_more_than_iov_max_pieces_is_refused_before_anything(fired: Fired) -> None:
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx_sock.getsockname())
    zs = ZeroCopySocket(tx, zerocopy="always")
    page = bytearray(5000)
    d = fired.make(0)
    frags = [Frag(page, i, 1, d) for i in range(1025)]
    for call in (lambda: zs.send(frags), lambda: zs.sendall(frags)):
        with pytest.raises(ValueError, match="1025 pieces"):
            call()
    assert d.refcount == 1 and zs.stats.sends == 0 and zs.stats.bytes_sent == 0
    assert zs.send(frags[:1024], destructor=None) == 1024  # the most one call takes
    d.unref()
    zs.close(timeout=10)
    assert fired.once_each([0])
    rx_sock.close()


# -- 18. types checked at the boundary -------------------------------------------------------


def test_wrong_types_raise_type_error_and_change_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    with pytest.raises(TypeError):
        ZeroCopySocket(5)  # type: ignore[arg-type]
    zs = ZeroCopySocket(pair[0], zerocopy="always")
    owner = FragDestructor(None)
    frag = Frag(bytearray(100_000), 0, 100_000, owner)
    for call in (
        lambda: zs.send(b"x" * 100_000, destructor="x"),  # type: ignore[arg-type]
        lambda: zs.send([frag], destructor="x"),  # type: ignore[arg-type]
        lambda: zs.sendall(b"x", destructor="x"),  # type: ignore[arg-type]
        lambda: zs.send_iov(IoVec([memoryview(b"x")], [None]), "x"),  # type: ignore[arg-type]
        lambda: zs.send_iov(IoVec([memoryview(b"x")], ["x"])),  # type: ignore[list-item]
        lambda: zs.send_iov(IoVec([memoryview(b"x")], [owner, "x"])),  # type: ignore[list-item]
        lambda: zs.send_iov([memoryview(b"x")]),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError):
            call()
    assert owner.refcount == 1
    st = zs.stats
    assert st.sends == 0 and st.bytes_sent == 0 and zs.outstanding == 0
    owner.unref()
    zs.close()


# -- an interrupt storm: no lock may stay held ---------------------------------------------

STORM_SCRIPT = r"""
import json, signal, socket, sys, threading, time
from pagefrag import FragDestructor
from pagefrag.zerocopy import ZeroCopySocket

ls = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(ls.getsockname())
s, _ = ls.accept()
threading.Thread(target=lambda: [None for _ in iter(lambda: s.recv(1 << 20), b"")],
                 daemon=True).start()
zs = ZeroCopySocket(c, zerocopy="always")
armed = [False]

def interrupt(*_):
    if armed[0]:
        armed[0] = False
        raise KeyboardInterrupt

signal.signal(signal.SIGALRM, interrupt)
sys.unraisablehook = lambda *_: None  # interrupts inside destroy callbacks are expected
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
buf = bytearray(32768)
sends = interrupts = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    d = FragDestructor(None)
    try:
        armed[0] = True
        zs.sendall(buf, destructor=d)
        zs.poll_completions()
    except KeyboardInterrupt:
        interrupts += 1
    armed[0] = False
    d.unref()
    sends += 1
signal.setitimer(signal.ITIMER_REAL, 0)
t0 = time.monotonic()
zs.flush(timeout=20)
zs.close(timeout=20)
print(json.dumps({"sends": sends, "interrupts": interrupts,
                  "flush_close_s": time.monotonic() - t0}))
"""


def test_an_interrupt_storm_never_leaves_a_lock_held() -> None:
    """A KeyboardInterrupt every millisecond (SIGALRM) into sendall and poll_completions
    for 3 s, then flush() and close() must return: an interrupt that landed between a
    lock's acquisition and its try (the completion lock in the error-queue reader, the
    send lock in close/abort) used to leave it held, and every later call hung. (Leaked
    references of the interrupted releases are a documented limit, not tested here.)"""
    out = subprocess.run(
        [sys.executable, "-c", STORM_SCRIPT, "3"],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["interrupts"] > 100, r  # the storm really hit
    assert r["flush_close_s"] < 20, r
