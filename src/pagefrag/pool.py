"""BufferPool: writable buffers that return to the pool only when the network stack is
done with them.

Every buffer handed out carries a fresh :class:`FragDestructor`. The holder owns its first
reference; every write of the buffer's bytes (``buf.frag(...)``, or the buffer itself, given
to ``ZeroCopySocket`` or ``pagefrag.aio``) holds more until the kernel releases the pages.
The buffer comes back — to a waiting ``acquire`` or to the free list — when the destructor
fires: after ``release()`` *and* after the last write's completion. No I/O here.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import threading
import warnings
import weakref
from types import TracebackType
from typing import Any

from . import leaks
from ._buffers import as_index, as_timeout
from ._destructor import FragDestructor
from ._skbuff import Frag
from .errors import BufferReleasedError, PageFragError

__all__ = ["BufferPool", "PoolBuffer", "PoolExhaustedError"]


class PoolExhaustedError(PageFragError, TimeoutError):
    """No buffer came back before the timeout of a synchronous ``acquire``."""


class PoolBuffer:
    """One buffer of a :class:`BufferPool`, lent until :meth:`release` and until every
    write of it has been released by the kernel.

    Once released it refuses access (:class:`BufferReleasedError`): its memory may be
    lent to someone else. One garbage-collected without :meth:`release` warns
    (``ResourceWarning``, naming where it was acquired; recorded by
    :func:`pagefrag.leaks.collected` when leak detection is on) and is released then:
    it returns to the pool once the writes still in flight are released."""

    __slots__ = ("__weakref__", "_index", "_mem", "_pool", "_released", "_watch", "destructor")

    def __init__(
        self, pool: BufferPool, index: int, mem: bytearray, *, acquired_at: leaks.Site = None
    ) -> None:
        self._pool = pool
        self._index = index
        self._mem = mem
        self._released = False
        self.destructor = FragDestructor(pool._returned, index, name=f"pool buffer {index}")
        # Frags and pins hold the destructor, never this object: when it is collected,
        # only the holder's reference is left to drop. The entry does not reference the
        # buffer, so it cannot keep it alive; the registry (not the buffer) keeps the
        # weakref alive, so its callback also runs when the buffer dies in a cycle.
        self._watch = weakref.ref(self, _collected)
        _unreleased[self._watch] = (self.destructor, acquired_at)

    def _check(self) -> None:
        if self._released:
            raise BufferReleasedError(
                f"{self!r} was released: its memory may already be lent to another holder"
            )

    @property
    def data(self) -> memoryview:
        """The whole buffer, writable. Hand its bytes to a socket through :meth:`frag` (or
        the buffer itself), never through this view: a bare view carries no destructor.
        Raises :class:`BufferReleasedError` once released; do not keep the view past
        :meth:`release` either (it would write into a buffer lent to someone else)."""
        self._check()
        return memoryview(self._mem)

    def frag(self, size: int | None = None, offset: int = 0) -> Frag:
        """``size`` bytes from ``offset`` as a frag carrying this buffer's destructor.
        Raises :class:`BufferReleasedError` once released.

        Refs: none (the frag's holder, an skb or a send, takes its own)."""
        self._check()
        if type(offset) is not int:
            offset = as_index(offset, "offset")
        return Frag(
            self._mem, offset, len(self._mem) - offset if size is None else size, self.destructor
        )

    def parts(self) -> tuple[bytearray, FragDestructor]:
        """The whole buffer's memory and its destructor, for a send that holds one
        reference on it (the io_uring fast path). Raises :class:`BufferReleasedError`
        once released.

        Refs: none (the send takes its own)."""
        self._check()
        return self._mem, self.destructor

    def release(self) -> None:
        """Drop the holder's reference: the buffer returns once every write is released.
        From now on the buffer refuses access. Releasing twice raises
        :class:`BufferReleasedError` (a :class:`DestructorError`) and drops nothing.

        Refs: -1 (the holder's), once."""
        # dict.pop is atomic: of two racing releases exactly one finds the entry (the
        # collection callback cannot race us: it runs only once self is gone). The entry
        # is popped and recorded in one C-level step, so an interrupt landing right after
        # the pop cannot lose the holder's reference: the finally drops it.
        popped: list[object] = []
        try:
            popped.extend(map(_unreleased.pop, (self._watch,), (None,)))
        finally:
            if popped and popped[0] is not None:
                self._released = True
                self.destructor.unref()
        if popped[0] is None:
            raise BufferReleasedError(f"{self!r} was already released")

    @property
    def released(self) -> bool:
        """True once the buffer is back in the pool (its destructor fired)."""
        return self.destructor.done

    def __len__(self) -> int:
        return len(self._mem)

    def __enter__(self) -> PoolBuffer:
        self._check()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "lent"
        return f"<PoolBuffer {self._index} {state} size={len(self._mem)} at {id(self):#x}>"


# The buffers lent and not released yet: their destructor and where they were acquired,
# keyed by a weak reference to the buffer (lighter than weakref.finalize per acquire).
_unreleased: dict[weakref.ref[PoolBuffer], tuple[FragDestructor, leaks.Site]] = {}
# At exit buffers still held are no leak worth a warning, and callbacks that ran while
# modules are torn down could fail: forget them first.
atexit.register(_unreleased.clear)


def _collected(watch: weakref.ref[PoolBuffer]) -> None:
    """A :class:`PoolBuffer` was garbage-collected: if it was not released, report it and
    drop the holder's reference it still counted."""
    entry = _unreleased.pop(watch, None)
    if entry is None:
        return  # released: nothing to do
    destructor, acquired_at = entry
    where = leaks.format_site(acquired_at)
    try:
        warnings.warn(
            f"PoolBuffer ({destructor.name}) acquired at {where} was never released; "
            "releasing it now (it returns to the pool once its writes are released)",
            ResourceWarning,
            stacklevel=1,  # a finalizer has no caller worth naming; the site is in the text
        )
    finally:
        # A finalizer runs wherever the collector does, possibly in this thread while it
        # holds this destructor's lock (inside ref()): then the drop waits in a thread.
        if destructor._lock.acquire(blocking=False):
            destructor._lock.release()
            _drop_holder_ref(destructor, where)
        else:
            threading.Thread(
                target=_drop_holder_ref,
                args=(destructor, where),
                name="pagefrag-pool-drop",
                daemon=True,
            ).start()


def _drop_holder_ref(destructor: FragDestructor, acquired_at: str) -> None:
    if leaks.enabled:
        rec = leaks.snapshot(destructor, leaks.KIND_POOL_BUFFER, acquired_at)
        if rec is not None:
            leaks.note_collected(rec)
    destructor.unref()


class _HandOver:
    """A returned buffer on its way to an ``acquire_async`` waiter through the waiter's
    loop. If the loop is closed before the hand-over runs, the loop drops it unrun: the
    buffer then goes back to the pool instead of being lost."""

    __slots__ = ("acquired_at", "index", "pool", "taken")

    def __init__(self, pool: BufferPool, index: int, acquired_at: leaks.Site) -> None:
        self.pool = pool
        self.index = index
        self.acquired_at = acquired_at
        self.taken = False

    def __del__(self) -> None:
        if not self.taken:
            self.taken = True
            self.pool._returned(self.index)


def _register(mems: list[bytearray], register: object) -> tuple[Any, list[int]]:
    """Register every buffer with the ring (``True``: the default one), all or none;
    returns the ring and the slots."""
    from .uring import default_ring

    ring: Any = default_ring() if register is True else register
    slots: list[int] = []
    try:
        for mem in mems:
            slots.append(ring.register_buffer(mem))
    except BaseException:
        _unregister(ring, slots)
        raise
    return ring, slots


def _unregister(ring: Any, slots: list[int]) -> None:
    for slot in slots:
        ring.unregister_buffer(slot)
    slots.clear()


class BufferPool:
    """``count`` buffers of ``buffer_size`` bytes, reused only once released by the stack.

    Thread-safe: buffers may be acquired in any thread, and a buffer's destructor may
    fire (the buffer come back) in any thread — the one reading completions."""

    def __init__(self, buffer_size: int, count: int, *, register: object = False) -> None:
        """``register``: True (the process's default io_uring ring) or a ring makes every
        buffer a fixed buffer of that ring: its pages are pinned once, now, and a
        ``UringSocket`` on the ring sends from them with ``IORING_RECVSEND_FIXED_BUF``
        (no pinning per send). :class:`ZeroCopyUnsupportedError` where io_uring is not
        available; ``OSError(ENOMEM)`` past ``RLIMIT_MEMLOCK`` (registered pages count
        against it without ``CAP_IPC_LOCK``). Nothing stays registered if it fails.
        Kernel: ``IORING_REGISTER_BUFFERS_UPDATE``.

        Refs: none."""
        buffer_size = as_index(buffer_size, "buffer_size")
        count = as_index(count, "count")
        if buffer_size <= 0 or count <= 0:
            raise ValueError("buffer_size and count must be positive")
        if not isinstance(register, bool) and type(register).__name__ != "Ring":
            raise TypeError(f"register must be a bool or a Ring, not {type(register).__name__}")
        self.buffer_size = buffer_size
        self.count = count
        self._mems = [bytearray(buffer_size) for _ in range(count)]
        self.ring: Any = None
        """The io_uring ring whose fixed buffers these are (``register=``), or None."""
        if register is not False:
            self.ring, slots = _register(self._mems, register)
            # Unregistered when the pool goes: a request still using a buffer keeps it
            # registered inside the kernel until it finishes.
            weakref.finalize(self, _unregister, self.ring, slots)
        self._free: collections.deque[int] = collections.deque(range(count))
        self._cond = threading.Condition()  # an RLock: a finalizer may return a buffer
        self._waiters: collections.deque[tuple[asyncio.Future[PoolBuffer], leaks.Site]] = (
            collections.deque()
        )

    @property
    def free(self) -> int:
        """Buffers ready to hand out."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Buffers held by their holders or still pinned by the kernel."""
        return self.count - len(self._free)

    def acquire(self, timeout: float | None = None) -> PoolBuffer:
        """A free buffer; waits up to ``timeout`` seconds (``None``: for ever) for one to
        come back, then raises :class:`PoolExhaustedError`.

        A buffer comes back when its destructor fires, in whichever thread drops the last
        reference: its holder's ``release()``, or the thread that reads the completions of
        its writes. Waiting here blocks this thread, so those completions must be read by
        another thread (``ZeroCopySocket.poll_completions`` in a loop, an event loop in
        ``pagefrag.aio``); a single-threaded sender reads them itself (``flush()``,
        ``poll_completions()``) before it asks. Refs: the buffer's destructor starts with
        one reference, the holder's (dropped by :meth:`PoolBuffer.release`)."""
        timeout = as_timeout(timeout)
        site = leaks.site()  # formatted only if the buffer is ever dropped unreleased
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise PoolExhaustedError(
                    f"all {self.count} buffers are in use or pinned by the kernel"
                )
            return self._lend(self._free.popleft(), site)

    async def acquire_async(self) -> PoolBuffer:
        """A free buffer, waiting (without blocking the loop) until one comes back, in
        whichever thread. Refs: as :meth:`acquire`."""
        site = leaks.site()
        with self._cond:
            if self._free:
                return self._lend(self._free.popleft(), site)
            fut: asyncio.Future[PoolBuffer] = asyncio.get_running_loop().create_future()
            self._waiters.append((fut, site))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._cond:
                for entry in self._waiters:
                    if entry[0] is fut:
                        self._waiters.remove(entry)
                        break
            if fut.done() and not fut.cancelled():  # handed over as we were cancelled
                fut.result().release()
            raise

    def _lend(self, index: int, acquired_at: leaks.Site) -> PoolBuffer:
        return PoolBuffer(self, index, self._mems[index], acquired_at=acquired_at)

    def _returned(self, index: int) -> None:
        """The destructor of buffer ``index`` fired (in whichever thread): hand it to the
        first async waiter whose loop can still run the hand-over, else to the free list."""
        with self._cond:
            while self._waiters:
                fut, site = self._waiters.popleft()
                if fut.done():
                    continue
                loop = fut.get_loop()
                if loop.is_closed():
                    continue  # nobody will ever run its hand-over: the next one
                hand_over = _HandOver(self, index, site)
                try:
                    loop.call_soon_threadsafe(self._hand_over, fut, hand_over)
                except RuntimeError:  # closed just now
                    hand_over.taken = True
                    continue
                return
            self._free.append(index)
            self._cond.notify()

    def _hand_over(self, fut: asyncio.Future[PoolBuffer], hand_over: _HandOver) -> None:
        hand_over.taken = True
        if fut.done():  # cancelled meanwhile: give the buffer to the next one
            self._returned(hand_over.index)
        else:
            fut.set_result(self._lend(hand_over.index, hand_over.acquired_at))
