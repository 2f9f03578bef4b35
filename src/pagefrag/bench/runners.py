"""One runner per way of sending: each sends ``buf`` over a connected socket for
``seconds`` and returns what it sent and, per message, how long until the sender could
reuse the buffer (its *release latency*)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._destructor import FragDestructor
from ..zerocopy import ZeroCopySocket
from ..zerocopy._syscalls import (
    ERRQUEUE_ANCBUF,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    MSG_ZEROCOPY,
    SO_ZEROCOPY,
)

now = time.perf_counter


def _stamp(latencies: list[float], start: float) -> Callable[[object], None]:
    """A callback that records the time since ``start``."""

    def record(_: object) -> None:
        latencies.append(now() - start)

    return record


@dataclass
class Run:
    """What one runner did."""

    bytes: int = 0
    messages: int = 0
    latencies: list[float] = field(default_factory=list)


def run_send(sock: socket.socket, buf: bytearray, seconds: float) -> Run:
    """Plain ``socket.send``: the bytes are copied, so the buffer is free on return."""
    r = Run()
    view = memoryview(buf)
    end = now() + seconds
    while now() < end:
        t = now()
        r.bytes += sock.send(view)
        r.latencies.append(now() - t)
        r.messages += 1
    return r


def run_bare_zerocopy(sock: socket.socket, buf: bytearray, seconds: float) -> Run:
    """A hand-written ``MSG_ZEROCOPY`` loop that only counts completions (no tracking
    of what is pinned, no safety): the floor of what zero-copy costs from Python."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    r = Run()
    sent_at: list[float] = []
    done = 0
    view = memoryview(buf)

    def drain() -> int:
        n = 0
        while True:
            try:
                _, anc, _, _ = sock.recvmsg(0, ERRQUEUE_ANCBUF, MSG_ERRQUEUE | MSG_DONTWAIT)
            except BlockingIOError:
                return n
            t = now()
            for _, _, data in anc:
                lo = int.from_bytes(data[8:12], "little")
                hi = int.from_bytes(data[12:16], "little")
                for sid in range(lo, hi + 1):
                    if sid < len(sent_at):
                        r.latencies.append(t - sent_at[sid])
                n += ((hi - lo) & 0xFFFFFFFF) + 1

    end = now() + seconds
    while now() < end:
        for _ in range(16):
            try:
                t = now()
                r.bytes += sock.send(view, MSG_ZEROCOPY)
                sent_at.append(t)
                r.messages += 1
            except OSError:  # ENOBUFS: read completions, go on
                break
        done += drain()
    limit = time.monotonic() + 30
    while done < r.messages and time.monotonic() < limit:
        time.sleep(0.0002)
        done += drain()
    return r


def run_pagefrag(mode: str) -> Callable[[socket.socket, bytearray, float], Run]:
    """``ZeroCopySocket.send`` with a destructor per message, fired by the completion."""

    def run(sock: socket.socket, buf: bytearray, seconds: float) -> Run:
        zs = ZeroCopySocket(sock, zerocopy=mode)
        r = Run()
        lat = r.latencies
        end = now() + seconds
        while now() < end:
            t = now()
            d = FragDestructor(_stamp(lat, t))
            r.bytes += zs.send(buf, destructor=d)
            d.unref()
            r.messages += 1
        zs.flush(timeout=30)
        return r

    return run


def run_asyncio_streams(sock: socket.socket, buf: bytearray, seconds: float) -> Run:
    """asyncio streams: ``write(); await drain()``; the bytes are copied into the
    transport's buffer, so the release latency is the time until ``drain()`` returns."""

    async def main() -> Run:
        r = Run()
        _, writer = await asyncio.open_connection(sock=sock)
        end = now() + seconds
        while now() < end:
            t = now()
            writer.write(buf)
            await writer.drain()
            r.latencies.append(now() - t)
            r.bytes += len(buf)
            r.messages += 1
        writer.close()
        await writer.wait_closed()
        return r

    return asyncio.run(main())


def run_pagefrag_aio(sock: socket.socket, buf: bytearray, seconds: float) -> Run:
    """pagefrag.aio: ``write_zerocopy(); await drain()`` (the buffer by reference, as the
    other pagefrag rows); the handle fires on the kernel's release."""
    from ..aio import open_connection

    async def main() -> Run:
        r = Run()
        _, writer = await open_connection(sock=sock, zerocopy="always")
        lat = r.latencies
        end = now() + seconds
        while now() < end:
            t = now()
            handle = writer.write_zerocopy(buf)
            handle.add_done_callback(_stamp(lat, t))
            await writer.drain()
            r.bytes += len(buf)
            r.messages += 1
        await writer.wait_released()
        writer.close()
        await writer.wait_closed()
        return r

    return asyncio.run(main())


def run_zmq(endpoint: str, buf: bytearray, seconds: float) -> Run:
    """pyzmq ``send(copy=False, track=True)``, each message's ``MessageTracker`` waited
    on: the closest guarantee a Python library offers (libzmq dropped the buffer)."""
    import zmq

    # A context of its own: libzmq connects from its I/O thread, which must be born in
    # the caller's network namespace.
    ctx: Any = zmq.Context()
    push: Any = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.setsockopt(zmq.SNDTIMEO, 10_000)  # never wait forever for a peer
    push.connect(endpoint)
    r = Run()
    window: list[tuple[float, Any]] = []
    end = now() + seconds
    while now() < end:
        t = now()
        window.append((t, push.send(buf, copy=False, track=True)))
        r.bytes += len(buf)
        r.messages += 1
        while window and (len(window) > 64 or window[0][1].done):
            t0, tracker = window.pop(0)
            tracker.wait()
            r.latencies.append(now() - t0)
    for t0, tracker in window:
        tracker.wait()
        r.latencies.append(now() - t0)
    push.close()
    ctx.term()
    return r
