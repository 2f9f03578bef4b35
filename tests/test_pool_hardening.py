"""BufferPool off the happy path: use after release, buffers dropped without release,
waiters whose event loop closed, destructors firing in other threads (issue 9, items 6,
7 and the pool side of 3)."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator

import pytest
from helpers import Receiver

from pagefrag import BufferPool, DestructorError, PoolBuffer, PoolExhaustedError, SkBuff, leaks
from pagefrag.errors import BufferReleasedError
from pagefrag.zerocopy import ZeroCopySocket


@pytest.fixture
def level() -> Iterator[None]:
    before = leaks.get_level()
    leaks.clear_collected()
    yield
    leaks.set_level(before)
    leaks.clear_collected()


def wait_until(cond: object, timeout: float = 30.0) -> bool:
    """Poll ``cond()`` every 10 ms for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(cond())  # type: ignore[operator]


def acquire_here(pool: BufferPool) -> PoolBuffer:
    return pool.acquire()  # the warnings must name this line


ACQUIRE_LINE = acquire_here.__code__.co_firstlineno + 1


def pool_resource_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and "PoolBuffer" in str(w.message)
    ]


# -- item 6: a released buffer refuses access ----------------------------------------------
def test_a_released_buffer_refuses_data_frag_and_being_sent(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp_pair
    pool = BufferPool(4096, 2)
    buf = pool.acquire()
    buf.data[:5] = b"hello"
    assert bytes(buf.frag(5).view()) == b"hello"
    buf.release()
    assert pool.free == 2
    with pytest.raises(BufferReleasedError):
        buf.data  # noqa: B018
    with pytest.raises(BufferReleasedError):
        buf.frag(5)
    with pytest.raises(BufferReleasedError), buf:
        pass
    zs = ZeroCopySocket(client, zerocopy="always")
    with pytest.raises(BufferReleasedError):
        zs.sendall(buf)  # sent whole
    with pytest.raises(BufferReleasedError):
        zs.send([b"head", buf])
    assert zs.stats.bytes_sent == 0 and pool.free == 2
    # The same buffer, lent again, works as a fresh one: whole, as a frag, sent.
    again = pool.acquire()
    again.data[:4] = b"abcd"
    rx = Receiver(server)
    zs.sendall(again.frag(4))
    zs.sendall(again)
    again.release()
    zs.close(timeout=30)  # closes the socket: the receiver sees EOF
    got = rx.join()
    assert got[:8] == b"abcdabcd" and len(got) == 4 + 4096
    assert wait_until(lambda: pool.free == 2)


def test_a_second_release_raises_and_does_not_drop_a_writes_reference() -> None:
    pool = BufferPool(1024, 2)
    buf = pool.acquire()
    skb = SkBuff()
    skb.add_frag(buf.frag(100))  # a write in flight: holds the destructor
    buf.release()
    assert buf.destructor.refcount == 1 and pool.free == 1
    with pytest.raises(BufferReleasedError) as info:
        buf.release()
    assert isinstance(info.value, DestructorError)  # what a double release always raised
    # Unchanged: the write still holds the buffer; the pool did not get it back early.
    assert buf.destructor.refcount == 1 and pool.free == 1 and not buf.released
    skb.free()
    assert pool.free == 2 and buf.released


def test_concurrent_releases_of_one_buffer_drop_exactly_one_reference() -> None:
    pool = BufferPool(1024, 1)
    for _ in range(50):
        buf = pool.acquire()
        skb = SkBuff()
        skb.add_frag(buf.frag())
        outcomes: list[str] = []
        start = threading.Barrier(4)

        def release(
            b: PoolBuffer = buf, outcomes: list[str] = outcomes, start: threading.Barrier = start
        ) -> None:
            start.wait(30)
            try:
                b.release()
                outcomes.append("ok")
            except BufferReleasedError:
                outcomes.append("refused")

        threads = [threading.Thread(target=release) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]
        assert buf.destructor.refcount == 1 and pool.free == 0  # the skb's reference
        skb.free()
        assert pool.free == 1


# -- item 6: a buffer dropped without release() -------------------------------------------
def test_a_dropped_buffer_returns_to_the_pool_and_warns_where_it_was_acquired() -> None:
    pool = BufferPool(1024, 2)
    buf = acquire_here(pool)
    ref = weakref.ref(buf)
    assert pool.free == 1
    gc.disable()  # the finalizer must not need the cycle collector: no cycle keeps it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del buf
        assert ref() is None
    finally:
        gc.enable()
    (msg,) = pool_resource_warnings(caught)
    assert "never released" in msg and f"{__file__}:{ACQUIRE_LINE}" in msg
    assert pool.free == 2
    both = [pool.acquire(timeout=5), pool.acquire(timeout=5)]  # both lendable again
    for b in both:
        b.release()


def test_a_dropped_buffer_in_a_reference_cycle_returns_when_the_collector_runs() -> None:
    pool = BufferPool(1024, 1)
    buf = pool.acquire()
    cycle: list[object] = [buf]
    cycle.append(cycle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del buf, cycle
        gc.collect()
    assert len(pool_resource_warnings(caught)) == 1
    assert pool.free == 1


def test_a_dropped_buffer_with_a_write_in_flight_stays_lent_until_the_completion(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = tcp_pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    pool = BufferPool(1 << 20, 1)
    zs = ZeroCopySocket(client, zerocopy="always")
    buf = pool.acquire()
    buf.data[:] = b"\x5a" * len(buf)
    destructor = buf.destructor
    # The peer does not read: part of the buffer fills its window and the send queue,
    # pinned by the kernel; the rest never leaves.
    with pytest.raises(TimeoutError):
        for _ in range(64):  # more than any send buffer holds
            zs.sendall(buf, timeout=0.5)
    assert zs.outstanding > 0 and destructor.refcount >= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del buf
    assert len(pool_resource_warnings(caught)) == 1
    # The holder's reference is gone, but the kernel still holds the pages: still lent.
    assert destructor.refcount >= 1 and not destructor.done and pool.free == 0
    with pytest.raises(PoolExhaustedError):
        pool.acquire(timeout=0.2)
    rx = Receiver(server)
    zs.close(timeout=60)
    rx.join(60)
    assert destructor.done and pool.free == 1


def test_a_buffer_released_then_dropped_is_not_released_twice() -> None:
    pool = BufferPool(1024, 1)
    buf = pool.acquire()
    skb = SkBuff()
    skb.add_frag(buf.frag())
    buf.release()
    destructor = buf.destructor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del buf
        gc.collect()
    assert not pool_resource_warnings(caught)
    assert destructor.refcount == 1 and pool.free == 0  # the skb's reference survives
    skb.free()
    assert destructor.done and pool.free == 1


def test_a_dropped_buffer_is_listed_by_the_leak_detector(level: None) -> None:
    leaks.set_level("paranoid")
    pool = BufferPool(1024, 1)
    buf = acquire_here(pool)
    skb = SkBuff()
    skb.add_frag(buf.frag())
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        del buf
    (rec,) = [r for r in leaks.collected() if "PoolBuffer" in r.kind]
    assert f"{__file__}:{ACQUIRE_LINE}" in rec.created_at
    assert "pool buffer 0" in rec.destructor
    # At the moment it was dropped: the holder's reference and the skb's.
    assert rec.refcount == 2
    assert rec.holders[0].holder == "creator"
    assert any(f"SkBuff#{skb._id}" in h.holder for h in rec.holders)
    assert "PoolBuffer" in leaks.format_report()
    skb.free()
    assert pool.free == 1
    assert not [r for r in leaks.report() if "pool buffer 0" in r.destructor]


def test_a_buffer_dropped_while_its_destructor_lock_is_held_returns_later() -> None:
    """A finalizer can run inside any bytecode, in principle while this very thread holds
    the destructor's lock (cyclic garbage collected inside ``ref()``). It must not deadlock:
    the drop is handed to another thread, which waits for the lock."""
    pool = BufferPool(1024, 1)
    buf = pool.acquire()
    destructor = buf.destructor
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with destructor._lock:  # as if we were inside ref() when the collector ran
            del buf
            assert pool.free == 0
    assert len(pool_resource_warnings(caught)) == 1
    assert wait_until(lambda: pool.free == 1)
    assert destructor.done and destructor.refcount == 0


# -- item 7: a waiter whose event loop closed -------------------------------------------------
def start_a_waiter_on_a_loop_that_then_closes(
    pool: BufferPool, before_close: Callable[[], None] = lambda: None
) -> tuple[threading.Thread, list[BaseException]]:
    """A thread that starts an ``acquire_async`` waiter on a fresh loop, calls
    ``before_close()``, then closes that loop while the waiter still waits. Returns the
    thread (started) and the errors it met."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop = asyncio.new_event_loop()

            async def start_waiter() -> asyncio.Future[PoolBuffer]:
                waiter = asyncio.ensure_future(pool.acquire_async())
                for _ in range(5):
                    await asyncio.sleep(0)  # the waiter registers itself and waits
                assert not waiter.done()
                return waiter

            waiter = loop.run_until_complete(start_waiter())
            before_close()
            loop.close()  # its waiter is abandoned mid-wait
            assert not waiter.done()
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def wait_on_a_loop_that_then_closes(pool: BufferPool) -> None:
    t, errors = start_a_waiter_on_a_loop_that_then_closes(pool)
    t.join(30)
    assert not t.is_alive() and not errors, errors


def test_a_waiter_on_a_closed_loop_does_not_swallow_the_buffer() -> None:
    pool = BufferPool(1024, 1)
    held = pool.acquire()
    wait_on_a_loop_that_then_closes(pool)
    unraisable: list[object] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        held.release()
    finally:
        sys.unraisablehook = old_hook
    assert not unraisable
    assert pool.free == 1
    pool.acquire(timeout=5).release()


def test_a_waiter_on_a_closed_loop_is_skipped_for_the_next_waiter() -> None:
    pool = BufferPool(1024, 1)
    held = pool.acquire()
    wait_on_a_loop_that_then_closes(pool)

    async def main() -> bytes:
        waiter = asyncio.ensure_future(pool.acquire_async())
        for _ in range(5):
            await asyncio.sleep(0)
        # Released from another thread, as a completion reader would.
        threading.Thread(target=held.release).start()
        buf = await asyncio.wait_for(waiter, 30)
        buf.data[:2] = b"ok"
        out = bytes(buf.data[:2])
        buf.release()
        return out

    assert asyncio.run(main()) == b"ok"
    assert pool.free == 1


def test_a_hand_over_queued_on_a_loop_that_closes_before_running_it_is_not_lost() -> None:
    """The loop is alive (not running) when the buffer comes back, so the hand-over is
    queued on it; then the loop is closed, which drops the hand-over unrun."""
    pool = BufferPool(1024, 1)
    held = pool.acquire()
    released = threading.Event()

    def hand_over_queued() -> None:
        assert released.wait(30)
        assert pool.free == 0  # the hand-over waits in this loop's queue

    t, errors = start_a_waiter_on_a_loop_that_then_closes(pool, hand_over_queued)
    time.sleep(0.2)
    held.release()
    released.set()
    t.join(30)
    assert not t.is_alive() and not errors, errors
    gc.collect()
    assert wait_until(lambda: pool.free == 1)
    pool.acquire(timeout=5).release()


# -- item 3, pool side: destructors firing in other threads ------------------------------------
def test_acquire_wakes_when_another_thread_fires_the_destructor() -> None:
    pool = BufferPool(1024, 1)
    buf = pool.acquire()
    skb = SkBuff()
    skb.add_frag(buf.frag())  # the write in flight
    buf.release()
    got: list[PoolBuffer] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=30)))
    waiter.start()
    time.sleep(0.05)
    assert not got
    # The completion reader is a third thread: it drops the last reference.
    reader = threading.Thread(target=skb.free)
    reader.start()
    reader.join(30)
    waiter.join(30)
    assert len(got) == 1 and pool.free == 0
    got[0].release()
    assert pool.free == 1


def test_many_threads_never_share_a_lent_buffer() -> None:
    pool = BufferPool(256, 3)
    errors: list[str] = []
    in_flight: list[SkBuff] = []
    lock = threading.Lock()

    def worker(me: int) -> None:
        for i in range(300):
            buf = pool.acquire(timeout=30)
            mark = bytes([me]) * len(buf)
            buf.data[:] = mark
            time.sleep(0)
            if bytes(buf.data) != mark:
                errors.append(f"worker {me} round {i}: buffer shared")
            skb = SkBuff()
            skb.add_frag(buf.frag())
            buf.release()
            with lock:
                in_flight.append(skb)

    def completer(stop: threading.Event) -> None:
        # Fires destructors from its own thread, as a completion reader does.
        while not stop.is_set() or in_flight:
            with lock:
                batch = in_flight[:]
                del in_flight[:]
            for skb in batch:
                skb.free()
            time.sleep(0.001)

    stop = threading.Event()
    reader = threading.Thread(target=completer, args=(stop,))
    reader.start()
    workers = [threading.Thread(target=worker, args=(k + 1,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    reader.join(30)
    assert not errors and not any(t.is_alive() for t in workers)
    assert pool.free == pool.count and pool.in_use == 0
