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
import collections
import threading
from types import TracebackType

from ._destructor import FragDestructor
from ._skbuff import Frag
from .errors import PageFragError

__all__ = ["BufferPool", "PoolBuffer", "PoolExhaustedError"]


class PoolExhaustedError(PageFragError, TimeoutError):
    """No buffer came back before the timeout of a synchronous ``acquire``."""


class PoolBuffer:
    """One buffer of a :class:`BufferPool`, lent until :meth:`release` and until every
    write of it has been released by the kernel."""

    __slots__ = ("_index", "_mem", "_pool", "destructor")

    def __init__(self, pool: BufferPool, index: int, mem: bytearray) -> None:
        self._pool = pool
        self._index = index
        self._mem = mem
        self.destructor = FragDestructor(pool._returned, index, name=f"pool buffer {index}")

    @property
    def data(self) -> memoryview:
        """The whole buffer, writable. Hand its bytes to a socket through :meth:`frag` (or
        the buffer itself), never through this view: a bare view carries no destructor."""
        return memoryview(self._mem)

    def frag(self, size: int | None = None, offset: int = 0) -> Frag:
        """``size`` bytes from ``offset`` as a frag carrying this buffer's destructor."""
        return Frag(
            self._mem, offset, len(self._mem) - offset if size is None else size, self.destructor
        )

    def release(self) -> None:
        """Drop the holder's reference: the buffer returns once every write is released.
        Releasing twice raises :class:`DestructorError`."""
        self.destructor.unref()

    @property
    def released(self) -> bool:
        """True once the buffer is back in the pool (its destructor fired)."""
        return self.destructor.done

    def __len__(self) -> int:
        return len(self._mem)

    def __enter__(self) -> PoolBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class BufferPool:
    """``count`` buffers of ``buffer_size`` bytes, reused only once released by the stack."""

    def __init__(self, buffer_size: int, count: int) -> None:
        if buffer_size <= 0 or count <= 0:
            raise ValueError("buffer_size and count must be positive")
        self.buffer_size = buffer_size
        self.count = count
        self._mems = [bytearray(buffer_size) for _ in range(count)]
        self._free: collections.deque[int] = collections.deque(range(count))
        self._cond = threading.Condition()
        self._waiters: collections.deque[asyncio.Future[PoolBuffer]] = collections.deque()

    @property
    def free(self) -> int:
        """Buffers ready to hand out."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Buffers held by their holders or still pinned by the kernel."""
        return self.count - len(self._free)

    def acquire(self, timeout: float | None = None) -> PoolBuffer:
        """A free buffer; waits up to ``timeout`` for one to come back (another thread
        must be processing completions), then raises :class:`PoolExhaustedError`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise PoolExhaustedError(
                    f"all {self.count} buffers are in use or pinned by the kernel"
                )
            return self._lend(self._free.popleft())

    async def acquire_async(self) -> PoolBuffer:
        """A free buffer, waiting (without blocking the loop) until one comes back."""
        with self._cond:
            if self._free:
                return self._lend(self._free.popleft())
            fut: asyncio.Future[PoolBuffer] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            with self._cond:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if fut.done() and not fut.cancelled():  # handed over as we were cancelled
                fut.result().release()
            raise

    def _lend(self, index: int) -> PoolBuffer:
        return PoolBuffer(self, index, self._mems[index])

    def _returned(self, index: int) -> None:
        """The destructor of buffer ``index`` fired (in whichever thread): hand it to the
        first async waiter, else to the free list."""
        with self._cond:
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.get_loop().call_soon_threadsafe(self._hand_over, fut, index)
                    return
            self._free.append(index)
            self._cond.notify()

    def _hand_over(self, fut: asyncio.Future[PoolBuffer], index: int) -> None:
        if fut.done():  # cancelled meanwhile: give the buffer to the next one
            self._returned(index)
        else:
            fut.set_result(self._lend(index))
