"""Helpers the test files share (imported as ``from helpers import ...``; pytest puts
``tests/`` on ``sys.path``). Fixtures and hooks stay in ``conftest.py``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extras on Linux
    uvloop = None

from pagefrag import FragDestructor, aio
from pagefrag.testing.netlab import NetLab
from pagefrag.zerocopy import ZeroCopySocket, tcp_info

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class Receiver:
    """A thread that reads a socket to EOF (stream) or until told (datagrams)."""

    def __init__(self, sock: socket.socket, *, stream: bool = True, paused: bool = False) -> None:
        self.sock = sock
        self.stream = stream
        self.data = bytearray()
        self.datagrams: list[bytes] = []
        self.go = threading.Event()
        if not paused:
            self.go.set()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.go.wait(60)
            self.sock.settimeout(30)
            while True:
                chunk = self.sock.recv(1 << 20)
                if self.stream:
                    if not chunk:
                        return
                    self.data += chunk
                else:
                    self.datagrams.append(chunk)
        except (TimeoutError, OSError) as exc:
            if self.stream:
                self.error = exc

    def join(self, timeout: float = 30) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receiver did not finish"
        return bytes(self.data)


class Fired:
    """Destructors that record when they fire, and how often."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.lock = threading.Lock()

    def make(self, key: int, then: Callable[[], None] | None = None) -> FragDestructor:
        def destroy(_: object) -> None:
            with self.lock:
                self.counts[key] = self.counts.get(key, 0) + 1
            if then is not None:
                then()

        return FragDestructor(destroy, key)

    def once_each(self, keys: range | list[int]) -> bool:
        return all(self.counts.get(k) == 1 for k in keys) and set(self.counts) == set(keys)


POISON = 0xEE


def counters(offset: int, size: int) -> np.ndarray:
    """The stream's expected bytes at ``offset``: little-endian u64 word counters."""
    first = offset // 8
    return np.arange(first, first + size // 8, dtype="<u8").view(np.uint8)


class VerifyingReceiver(threading.Thread):
    """Reads the stream to EOF, checking every byte against ``counters``."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.received = 0
        self.bad_bytes = 0
        self.poison_bytes = 0
        self.start()

    def run(self) -> None:
        self.sock.settimeout(60)
        carry = b""
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            data = carry + chunk
            usable = len(data) - len(data) % 8
            got = np.frombuffer(data[:usable], dtype=np.uint8)
            want = counters(self.received, usable)
            wrong = got != want
            self.bad_bytes += int(wrong.sum())
            self.poison_bytes += int(((got == POISON) & wrong).sum())
            self.received += usable
            carry = data[usable:]
        self.bad_bytes += len(carry)


LOOPS = ["asyncio", *(["uvloop"] if uvloop is not None else [])]

STREAMS: dict[str, Any] = {"asyncio": asyncio, "pagefrag": aio}
"""The stream modules a side-by-side test runs the same body against."""
"""The event loops every asyncio test runs on."""
Run = Callable[..., Any]


def run_on(loop: str, coro: Awaitable[Any], timeout: float = 60) -> Any:
    """Run ``coro`` to completion on a fresh ``loop`` ("asyncio" or "uvloop"), bounded."""
    if loop == "uvloop":
        return uvloop.run(asyncio.wait_for(coro, timeout))
    return asyncio.run(asyncio.wait_for(coro, timeout))


def python_in_child(code: str, *, pure: bool, path: str = SRC) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter importing pagefrag from ``path`` (the pure
    core if ``pure``, else whichever it selects); raises if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PAGEFRAG_PURE_PYTHON"}
    if pure:
        env["PAGEFRAG_PURE_PYTHON"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-c", code]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)


Items = list[tuple[bytearray, FragDestructor]]


def poison_run(
    lab: NetLab,
    send: Callable[[ZeroCopySocket, Items], None],
    *,
    buf_size: int,
    pool_size: int,
    total: int,
    batch: int = 1,
) -> ZeroCopySocket:
    """The seed's bug, caught or not: ``total`` bytes of counters go out through ``send``
    (``batch`` buffers at a time, each with its destructor) from a pool whose buffers are
    poisoned and reused the moment their destructor fires, under 2 % loss, so TCP
    retransmits from those very pages. Asserts that not one poison byte reached the
    receiver, that the loss caused retransmits and that every destructor fired once;
    returns the closed socket (for its stats)."""
    lab.add_loss(2)
    client, server = lab.tcp_pair()
    rx = VerifyingReceiver(server)
    zs = ZeroCopySocket(client, zerocopy="always")
    pool = [bytearray(buf_size) for _ in range(pool_size)]
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(pool_size):
        free.put(i)
    fired = Fired()

    def release(idx: int) -> None:
        pool[idx][:] = bytes([POISON]) * buf_size  # the owner reuses the memory at once
        free.put(idx)

    deadline = time.monotonic() + 120
    n = 0
    for offset in range(0, total, buf_size * batch):
        items: Items = []
        for k in range(batch):
            while free.empty():
                assert time.monotonic() < deadline, "no buffer came back"
                zs.poll_completions(timeout=0.2)
            idx = free.get()
            np.frombuffer(pool[idx], dtype=np.uint8)[:] = counters(offset + k * buf_size, buf_size)
            items.append((pool[idx], fired.make(n, then=lambda idx=idx: release(idx))))
            n += 1
        send(zs, items)
        for _, d in items:
            d.unref()
    retransmits = tcp_info(client).total_retrans
    zs.close(timeout=60)
    rx.join(60)
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert retransmits > 0, "2 % loss must cause TCP retransmits"
    assert rx.received == total
    assert rx.poison_bytes == 0 and rx.bad_bytes == 0
    assert fired.once_each(range(n))
    return zs


def drop_sent_udp(lab: Any, match: str) -> None:
    """In the lab's sender namespace, drop outgoing UDP matching ``match`` (an nft
    expression after ``udp``, e.g. ``"length 1007"``) at the output hook: the send
    call fails with ``EPERM`` after the kernel took it. :func:`stop_dropping` ends it."""
    lab.ns(
        lab.sender,
        "nft",
        "add table inet out; add chain inet out o "
        f"{{ type filter hook output priority 0; }}; add rule inet out o udp {match} drop",
    )


def stop_dropping(lab: Any) -> None:
    lab.ns(lab.sender, "nft", "delete table inet out")


@contextlib.asynccontextmanager
async def comm_across(lab: NetLab) -> AsyncIterator[Any]:
    """A ``pagefrag://`` comm from the lab's sender namespace to a listener in its
    receiver namespace whose handler reads (and drops) every message until the end.
    Serialization stays in the loop (``allow_offload`` off): no distributed offload
    thread outlives the test. The listener is stopped afterwards."""
    from distributed.comm import connect, listen

    from pagefrag.testing.netlab import RECEIVER_IP

    async def hold(comm: Any) -> None:
        with contextlib.suppress(OSError):
            while True:
                await comm.read()

    with lab.inside(lab.receiver):
        listener = listen(f"pagefrag://{RECEIVER_IP}:0", hold)
        await listener.start()
    try:
        with lab.inside(lab.sender):
            comm = await connect(listener.contact_address, timeout=30)
        comm.allow_offload = False
        yield comm
    finally:
        listener.stop()
