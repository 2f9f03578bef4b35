"""One runner per way of sending: each sends the slices of a :class:`~.workset.Work`
in turn over a connected socket for ``seconds`` and returns what it did, with a sample
of *release latencies* (how long until the sender could reuse a buffer).

The loops are kept as tight as a program's own would be: the clock is read once per
:data:`BATCH` sends, and one send in each batch is timed (for copying sends, the call;
for zero-copy, until its completion). Every pagefrag send with a destructor creates a
:class:`FragDestructor` whose ``destroy`` is a Python function (:func:`_released`, or
:func:`_stamp` for the timed one), drops the caller's reference after the send, and is
fired by the kernel's completion (or at once when the send copied).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path
from typing import Any, Protocol

from .._destructor import FragDestructor
from .._iov import IoVec
from ..pool import BufferPool, PoolBuffer, PoolExhaustedError
from ..zerocopy import ZeroCopySocket, ZeroCopyStats
from ..zerocopy._syscalls import (
    ERRQUEUE_ANCBUF,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    MSG_ZEROCOPY,
    SO_ZEROCOPY,
)
from .workset import Work

now = time.perf_counter
now_ns = time.perf_counter_ns
SO_EE_ORIGIN_ZEROCOPY = 5
BATCH = 32  # sends between clock reads and (zero-copy loops) completion reads
DRAIN_LIMIT = 30.0  # seconds a runner waits for its last completions
# seconds an io_uring row waits for notifications when the kernel refuses to pin more
# (ENOMEM: RLIMIT_MEMLOCK without CAP_IPC_LOCK), then gives up (SendBufferError)
ENOBUFS_LIMIT = 5.0
_U32 = 0xFFFFFFFF


@dataclass
class Run:
    """What one runner did. ``cpu``/``wall`` are set by runners that measure
    themselves (the C anchor, another process); otherwise the caller times the call."""

    bytes: int = 0
    messages: int = 0
    latencies: list[float] = field(default_factory=list)
    send_calls: int | None = None  # send system calls, where not one per message
    zerocopy_calls: int = 0  # calls made with MSG_ZEROCOPY
    completions: int = 0  # of those, released by the kernel (ids)
    copied: int = 0  # of those, copied by the kernel (SO_EE_CODE_ZEROCOPY_COPIED)
    cpu: float | None = None
    wall: float | None = None


Runner = Callable[[socket.socket, Work, float], Run]


def _released(data: object) -> None:
    """The ``destroy`` of an untimed send: the buffer is the benchmark's own, so there
    is nothing to give back (a program would return it to its pool here)."""


def _stamp(data: tuple[list[float], int]) -> None:
    """The ``destroy`` of a timed send: record the time (seconds, from
    ``perf_counter_ns`` stamps) since the send began."""
    latencies, start = data
    latencies.append((now_ns() - start) * 1e-9)


def run_send(sock: socket.socket, work: Work, seconds: float) -> Run:
    """Plain ``socket.send``: the bytes are copied, so the buffer is free on return."""
    r = Run()
    lat = r.latencies
    send = sock.send
    views = cycle(work.views)
    nbytes = calls = 0
    end = now() + seconds
    while True:
        t = now()
        nbytes += send(next(views))
        lat.append(now() - t)
        for view in islice(views, BATCH - 1):
            nbytes += send(view)
        calls += BATCH
        if now() >= end:
            break
    r.bytes, r.messages = nbytes, calls
    return r


class _Completions:
    """The bare loop's error-queue reader: counts released ids, and the latency of the
    timed sends among them. Knows nothing of what is pinned (no safety)."""

    def __init__(self, sock: socket.socket, run: Run) -> None:
        self.sock = sock
        self.run = run
        self.timed: dict[int, float] = {}  # id -> send time, until completed

    def read(self) -> None:
        recvmsg, r, timed = self.sock.recvmsg, self.run, self.timed
        while True:
            try:
                _, anc, _, _ = recvmsg(0, ERRQUEUE_ANCBUF, MSG_ERRQUEUE | MSG_DONTWAIT)
            except BlockingIOError:
                return
            t = now()
            for _, _, data in anc:
                # struct sock_extended_err: errno, origin, type, code, pad, info, data
                if data[4] != SO_EE_ORIGIN_ZEROCOPY:
                    continue
                lo = int.from_bytes(data[8:12], "little")  # ee_info
                hi = int.from_bytes(data[12:16], "little")  # ee_data
                n = ((hi - lo) & _U32) + 1
                r.completions += n
                if data[6] & 1:  # ee_code: SO_EE_CODE_ZEROCOPY_COPIED
                    r.copied += n
                for sid in [s for s in timed if (s - lo) & _U32 < n]:
                    r.latencies.append(t - timed.pop(sid))

    def wait(self, timeout: float) -> None:
        """Wait until the error queue holds something (POLLERR), then read it."""
        p = select.poll()
        p.register(self.sock, 0)  # POLLERR is always reported
        p.poll(timeout * 1000)
        self.read()


def run_bare_zerocopy(sock: socket.socket, work: Work, seconds: float) -> Run:
    """A hand-written ``MSG_ZEROCOPY`` loop as the C anchor's: completions read every
    :data:`BATCH` sends, ENOBUFS answered by reading completions and retrying, all of
    them drained at the end; it tracks nothing (no safety): the floor of what
    zero-copy costs from Python."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    r = Run()
    eq = _Completions(sock, r)
    send = sock.send
    views = cycle(work.views)
    nbytes = calls = 0
    end = now() + seconds
    while True:
        eq.timed[calls & _U32] = now()  # each accepted call takes the next id, from 0
        for view in islice(views, BATCH):
            while True:
                try:
                    nbytes += send(view, MSG_ZEROCOPY)
                    break
                except OSError as exc:
                    # optmem or locked pages: wait for releases, then the same slice
                    if exc.errno != errno.ENOBUFS or now() > end + DRAIN_LIMIT:
                        raise
                    eq.wait(0.1)
        calls += BATCH
        eq.read()
        if now() >= end:
            break
    r.bytes, r.messages, r.zerocopy_calls = nbytes, calls, calls
    limit = time.monotonic() + DRAIN_LIMIT
    while r.completions < calls and time.monotonic() < limit:
        eq.wait(0.1)
    return r


class Sender(Protocol):
    """What the pagefrag runners drive: :class:`ZeroCopySocket` or
    :class:`~pagefrag.uring.UringSocket` (the same surface)."""

    def send(self, data: Any, *, destructor: FragDestructor | None = None) -> int: ...
    def send_many(
        self, items: Sequence[Any], *, destructors: Sequence[FragDestructor | None] | None = ...
    ) -> int: ...
    def flush(self, timeout: float | None = None) -> None: ...
    def abort(self, timeout: float | None = ...) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...
    def poll_completions(self, timeout: float | None = 0) -> int: ...
    @property
    def stats(self) -> ZeroCopyStats: ...


Batch = Callable[[Any, Iterator[memoryview], list[float]], int]
"""Sends one batch of :data:`BATCH` slices from the cycle through a :class:`Sender`;
returns the bytes taken."""


def _sends(zs: Sender, views: Iterator[memoryview], lat: list[float]) -> int:
    nbytes = 0
    send = zs.send
    d = FragDestructor(_stamp, (lat, now_ns()))
    nbytes += send(next(views), destructor=d)
    d.unref()
    for view in islice(views, BATCH - 1):
        d = FragDestructor(_released)
        nbytes += send(view, destructor=d)
        d.unref()
    return nbytes


def _sends_bare(zs: Sender, views: Iterator[memoryview], lat: list[float]) -> int:
    nbytes = 0
    send = zs.send
    for view in islice(views, BATCH):
        nbytes += send(view)
    return nbytes


def _send_many(zs: Sender, views: Iterator[memoryview], lat: list[float]) -> int:
    items = list(islice(views, BATCH))
    ds = [FragDestructor(_stamp, (lat, now_ns()))]
    ds += [FragDestructor(_released) for _ in range(BATCH - 1)]
    zs.send_many(items, destructors=ds)
    for d in ds:
        d.unref()
    return sum(map(len, items))


Step = Callable[[list[float]], int]
"""Sends one batch of :data:`BATCH` messages; returns the bytes taken."""


def _cycling(batch: Batch) -> Callable[[Sender, Work], Step]:
    """Steps of ``batch`` over the slices of the working set, in turn."""

    def steps(zs: Sender, work: Work) -> Step:
        views = cycle(work.views)
        return lambda lat: batch(zs, views, lat)

    return steps


def _tracked(
    open_sender: Callable[[socket.socket, Work], Sender],
    steps: Callable[[Sender, Work], Step],
) -> Runner:
    """A runner: the :class:`Sender` ``open_sender`` wraps the socket in, its ``steps``
    until the time is up, then every completion read (or, interrupted, an abort that
    does not wait)."""

    def run(sock: socket.socket, work: Work, seconds: float) -> Run:
        zs = open_sender(sock, work)
        r = Run()
        step = steps(zs, work)
        nbytes = calls = 0
        done = False
        try:
            end = now() + seconds
            while True:
                nbytes += step(r.latencies)
                calls += BATCH
                if now() >= end:
                    break
            zs.flush(timeout=DRAIN_LIMIT)
            done = True
            stats = zs.stats
        finally:
            if not done:
                # Interrupted (an error, SIGTERM, Ctrl-C): do not wait for the kernel;
                # the buffer lives as long as the process.
                with contextlib.suppress(Exception):
                    zs.abort(timeout=1)
        zs.close(timeout=1)
        r.bytes, r.messages = nbytes, calls
        r.zerocopy_calls = stats.zerocopy_sends
        r.completions, r.copied = stats.completions, stats.copied_completions
        return r

    return run


def _zerocopy_socket(mode: str, batch: Batch) -> Runner:
    return _tracked(lambda sock, work: ZeroCopySocket(sock, zerocopy=mode), _cycling(batch))


def run_pagefrag(mode: str, destructor: bool = True) -> Runner:
    """``ZeroCopySocket(zerocopy=mode).send``, with a :class:`FragDestructor` per send
    (fired by the kernel's completion) or, ``destructor=False``, none."""
    return _zerocopy_socket(mode, _sends if destructor else _sends_bare)


def run_pagefrag_many(mode: str) -> Runner:
    """``ZeroCopySocket(zerocopy=mode).send_many`` of batches of 32 slices, a
    :class:`FragDestructor` per item (datagrams: one ``sendmmsg`` per batch with the
    compiled core; a stream: one iovec)."""
    return _zerocopy_socket(mode, _send_many)


_fixed: dict[int, Any] = {}  # id of the working-set buffer -> a ring with it registered


def fixed_ring(work: Work) -> Any:
    """A ring of its own (made once per process) on which ``work``'s whole working set
    is one registered (fixed) buffer: sends of its slices go with
    ``IORING_RECVSEND_FIXED_BUF``, their pages pinned once, at registration. Kept apart
    from the default ring so that the other io_uring rows pin their pages per send."""
    from ..uring import new_ring

    base = work.views[0].obj
    key = id(base)
    if key not in _fixed:
        ring = new_ring()
        ring.register_buffer(memoryview(base).cast("B"))
        _fixed[key] = ring
    return _fixed[key]


def _uring_socket(mode: str, batch: Batch, fixed: bool) -> Runner:
    from ..uring import UringSocket

    def open_sender(sock: socket.socket, work: Work) -> Sender:
        ring = fixed_ring(work) if fixed else None
        return UringSocket(sock, zerocopy=mode, ring=ring, enobufs_timeout=ENOBUFS_LIMIT)

    return _tracked(open_sender, _cycling(batch))


def run_uring(mode: str, fixed: bool = False) -> Runner:
    """``UringSocket(zerocopy=mode).send`` (one ``io_uring_enter`` per send), a
    :class:`FragDestructor` per send, fired by the request's notification CQE.
    ``fixed``: the working set is a registered buffer of the socket's ring."""
    return _uring_socket(mode, _sends, fixed)


def run_uring_many(mode: str, fixed: bool = False) -> Runner:
    """``UringSocket(zerocopy=mode).send_many`` of batches of 32 slices, a
    :class:`FragDestructor` per item (datagrams: one linked batch, one
    ``io_uring_enter``; a stream: one iovec)."""
    return _uring_socket(mode, _send_many, fixed)


def run_asyncio_streams(sock: socket.socket, work: Work, seconds: float) -> Run:
    """asyncio streams: ``write(); await drain()``; the bytes are copied into the
    transport's buffer, so the release latency is the time until ``drain()`` returns."""

    async def main() -> Run:
        r = Run()
        _, writer = await asyncio.open_connection(sock=sock)
        views = cycle(work.views)
        end = now() + seconds
        while now() < end:
            t = now()
            writer.write(next(views))
            await writer.drain()
            r.latencies.append(now() - t)
            r.bytes += work.size
            r.messages += 1
        writer.close()
        await writer.wait_closed()
        return r

    return asyncio.run(main())


def _stamp_handle(latencies: list[float], start: float) -> Callable[[object], None]:
    def record(_: object) -> None:
        latencies.append(now() - start)

    return record


def run_pagefrag_aio(sock: socket.socket, work: Work, seconds: float) -> Run:
    """pagefrag.aio: ``write_zerocopy(); await drain()`` (the buffer by reference, as the
    other pagefrag rows); the handle fires on the kernel's release."""
    from ..aio import open_connection

    async def main() -> Run:
        r = Run()
        _, writer = await open_connection(sock=sock, zerocopy="always")
        lat = r.latencies
        views = cycle(work.views)
        end = now() + seconds
        while now() < end:
            handle = writer.write_zerocopy(next(views))
            handle.add_done_callback(_stamp_handle(lat, now()))
            await writer.drain()
            r.bytes += work.size
            r.messages += 1
        await writer.wait_released()
        st = writer.transport.zerocopy_stats  # type: ignore[attr-defined]
        r.send_calls, r.zerocopy_calls, r.completions, r.copied = (
            st.sends,
            st.zerocopy_sends,
            st.completions,
            st.copied_completions,
        )
        writer.close()
        await writer.wait_closed()
        return r

    return asyncio.run(main())


def run_zmq(endpoint: str, work: Work, seconds: float) -> Run:
    """pyzmq ``send(copy=False, track=True)``, each message's ``MessageTracker`` waited
    on: the closest guarantee a Python library offers (libzmq dropped the buffer)."""
    import zmq

    # A context of its own: libzmq connects from its I/O thread, which must be born in
    # the caller's network namespace.
    ctx: Any = zmq.Context()
    push: Any = ctx.socket(zmq.PUSH)
    finished = False
    try:
        push.setsockopt(zmq.LINGER, 5000)
        push.setsockopt(zmq.SNDTIMEO, 10_000)  # never wait forever for a peer
        push.connect(endpoint)
        r = Run()
        views = cycle(work.views)
        window: list[tuple[float, Any]] = []
        end = now() + seconds
        while now() < end:
            t = now()
            window.append((t, push.send(next(views), copy=False, track=True)))
            r.bytes += work.size
            r.messages += 1
            while window and (len(window) > 64 or window[0][1].done):
                t0, tracker = window.pop(0)
                tracker.wait()
                r.latencies.append(now() - t0)
        for t0, tracker in window:
            tracker.wait()
            r.latencies.append(now() - t0)
        finished = True
        return r
    finally:
        # Interrupted (SIGTERM, Ctrl-C): drop what is queued instead of lingering.
        push.close(linger=None if finished else 0)
        ctx.term()


def run_c(binary: Path, mode: str) -> Runner:
    """The C anchor (benchmarks/zc_anchor.c, built by :mod:`.anchor`) in a child
    process, on the caller's socket (inherited): ``mode`` ``copy``, ``zerocopy``, or
    one of the io_uring loops (``uring-copy``, ``uring-zc``, ``uring-fixed[-N]``).
    The child measures its own wall and CPU time; it runs on the caller's core."""

    def run(sock: socket.socket, work: Work, seconds: float) -> Run:
        fd = sock.fileno()
        argv = [str(binary), f"fd:{fd}", str(work.size), str(work.workset), str(seconds), mode]
        # subprocess.run kills the child if anything (SIGTERM, Ctrl-C) interrupts the wait.
        out = subprocess.run(
            argv, pass_fds=(fd,), capture_output=True, text=True, timeout=seconds + 60
        )
        if out.returncode != 0:
            raise RuntimeError(f"{binary.name} {mode}: {out.stderr.strip()}")
        d = json.loads(out.stdout.strip().splitlines()[-1])
        return Run(
            bytes=d["bytes"],
            messages=d["calls"],
            zerocopy_calls=d["zerocopy_calls"],
            completions=d["completions"],
            copied=d["copied"],
            cpu=d["cpu_s"],
            wall=d["wall_s"],
        )

    return run


_pools: dict[int, BufferPool] = {}  # buffer size -> a registered pool spanning the working set


def registered_pool(work: Work) -> BufferPool:
    """A :class:`BufferPool` (made once per process and size) of ``work.workset //
    work.size`` buffers of ``work.size`` bytes — as much distinct memory as the working
    set — registered as fixed buffers of a ring of its own (``register=ring``)."""
    from ..uring import new_ring

    if work.size not in _pools:
        count = max(1, work.workset // work.size)
        _pools[work.size] = BufferPool(work.size, count, register=new_ring())
    return _pools[work.size]


def pool_fits(work: Work) -> bool:
    """Whether a registered pool can span ``work``'s working set (one fixed-buffer slot
    per buffer, at most ``MAX_FIXED_BUFFERS``)."""
    from .._uring import MAX_FIXED_BUFFERS

    return work.workset // work.size <= MAX_FIXED_BUFFERS


def _acquire(pool: BufferPool, zs: Sender) -> PoolBuffer:
    """A free buffer; none free: reap this socket's notifications (the pool's buffers
    come back on them) and ask again, up to :data:`DRAIN_LIMIT`."""
    try:
        return pool.acquire(timeout=0)
    except PoolExhaustedError:
        limit = now() + DRAIN_LIMIT
        while True:
            zs.poll_completions(0.01)
            try:
                return pool.acquire(timeout=0)
            except PoolExhaustedError:
                if now() > limit:
                    raise


def _pool_steps(many: bool) -> Callable[[Sender, Work], Step]:
    """Each send takes a free buffer of the registered pool (its destructor, fresh per
    loan, held by the send until the notification), sends all of it and releases it: it
    returns to the pool when the kernel lets go. The timed send also carries a stamping
    :class:`FragDestructor` (``destructor=``; not with ``send_many`` on a stream, whose
    items go as one iovec: no release latency there)."""

    def steps(zs: Sender, work: Work) -> Step:
        pool = registered_pool(work)
        size = work.size
        stream = zs.socket.type == socket.SOCK_STREAM  # type: ignore[attr-defined]

        def sends(lat: list[float]) -> int:
            send = zs.send
            buf = _acquire(pool, zs)
            d = FragDestructor(_stamp, (lat, now_ns()))
            nbytes = send(buf, destructor=d)
            d.unref()
            buf.release()
            for _ in range(BATCH - 1):
                buf = _acquire(pool, zs)
                nbytes += send(buf)
                buf.release()
            return nbytes

        def send_many(lat: list[float]) -> int:
            bufs = [_acquire(pool, zs) for _ in range(BATCH)]
            if stream:  # one iovec: an item with a destructor of its own takes no other
                zs.send_many(bufs)
            else:
                d = FragDestructor(_stamp, (lat, now_ns()))
                zs.send_many(bufs, destructors=[d] + [None] * (BATCH - 1))
                d.unref()
            for buf in bufs:
                buf.release()
            return BATCH * size

        return send_many if many else sends

    return steps


def run_uring_pool(mode: str, many: bool = False) -> Runner:
    """``UringSocket(zerocopy=mode)`` on the ring of a registered :class:`BufferPool`
    (:func:`registered_pool`): every send (``many``: ``send_many`` of 32) is a whole
    pool buffer, a fixed buffer (``IORING_RECVSEND_FIXED_BUF``), with the buffer's own
    destructor held until the notification."""
    from ..uring import UringSocket

    def open_sender(sock: socket.socket, work: Work) -> Sender:
        ring = registered_pool(work).ring
        return UringSocket(sock, zerocopy=mode, ring=ring, enobufs_timeout=ENOBUFS_LIMIT)

    return _tracked(open_sender, _pool_steps(many))


def run_uring_raw(per_enter: int, pin: bool) -> Runner:
    """The time-split rows: the compiled ring driven directly, on the ring where the
    working set is registered (:func:`fixed_ring`): ``per_enter`` linked
    ``Channel.submit_one`` zero-copy requests, one ``Ring.submit`` (one
    ``io_uring_enter``), each result waited for (``Channel.wait_result``). ``pin``:
    each request also pins its slice in Python, as ``UringSocket``'s generic path does
    (``IoVec.of``, ``IoVec.pin`` with a :class:`FragDestructor` per send, fired by the
    notification; plain buffers take the compiled ``send_flat`` paths instead);
    otherwise it holds nothing (no safety: the floor of the Python calls into the
    ring). Datagram sockets only."""
    from .. import _uring

    def run(sock: socket.socket, work: Work, seconds: float) -> Run:
        ring = fixed_ring(work)
        ch = _uring.Channel(ring, sock.fileno(), False)
        submit_one, wait_result = ch.submit_one, ch.wait_result
        r = Run()
        lat = r.latencies
        views = cycle(work.views)
        nbytes = calls = 0
        last = per_enter - 1
        try:
            end = now() + seconds
            while True:
                for _ in range(BATCH // per_enter):
                    reqs = []
                    for k, view in enumerate(islice(views, per_enter)):
                        if pin:
                            d = (
                                FragDestructor(_stamp, (lat, now_ns()))
                                if k == 0
                                else FragDestructor(_released)
                            )
                            iov = IoVec.of(view)
                            reqs.append(
                                submit_one(iov.pin(ch.holder, d), iov.views, True, 0, k < last)
                            )
                            d.unref()
                        else:
                            reqs.append(submit_one(None, [view], True, 0, k < last))
                    ring.submit()
                    for req in reqs:
                        wait_result(req, None)
                        if req.result < 0:
                            raise OSError(-req.result, os.strerror(-req.result))
                        nbytes += req.result
                calls += BATCH
                if now() >= end:
                    break
        finally:
            # Pins (if any) are released only by notifications: wait for them all.
            ch.wait_all(time.monotonic() + DRAIN_LIMIT)
        r.bytes, r.messages = nbytes, calls
        r.zerocopy_calls = ch.zerocopy_sends
        r.completions, r.copied = ch.completions, ch.copied_completions
        return r

    return run
