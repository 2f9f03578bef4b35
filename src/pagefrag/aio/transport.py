"""ZeroCopyTransport: an asyncio transport whose writes go out with ``MSG_ZEROCOPY`` and
report, per write, when the kernel has released every page.

Theory of operation. The transport owns a non-blocking TCP socket wrapped in a
:class:`ZeroCopySocket`. Completions arrive on the socket's error queue, which ``epoll``
reports as ``EPOLLERR``. The event loop is never shown the socket itself: the transport
registers it, edge-triggered, in a private epoll instance and gives *that* descriptor to
``add_reader``. Each wake-up reports what changed — readable (``EPOLLIN``), writable
(``EPOLLOUT``), completions (``EPOLLERR``) — and the transport reads, sends or drains the
error queue. No timer, no busy loop, and reading may be paused without missing a
completion. (Showing the socket to the loop would not do: a pending error-queue message
makes the descriptor report ``POLLERR`` and libuv, under uvloop, stops watching it.)

Each ``write`` is queued with one reference on every destructor its bytes carry and one on
its *write handle* (a :class:`FragDestructor` returned to the caller), so nothing the
queue still holds can be released by its owner. The queue is handed to the kernel as the
socket accepts it; the kernel bridge then holds its own references until the completions
arrive, and the queue's are dropped. The handle fires when the last of them is gone.

Flow control counts pinned bytes with unsent ones: the protocol is paused above the
high-water mark until both together fall to the low-water mark.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import select
import socket
from typing import Any

from .._destructor import FragDestructor
from ..errors import PageFragError
from ..zerocopy._syscalls import disconnect
from ..zerocopy.socket import Data, ZeroCopySocket, advance, pieces, take_refs

__all__ = ["ZeroCopyTransport", "DEFAULT_HIGH_WATER"]

DEFAULT_HIGH_WATER = 4 << 20
"""Unsent plus pinned bytes above which the protocol is paused. A zero-copy write stays
pinned until the peer ACKs it, so this is the in-flight window: far above asyncio's
64 KiB, which would stall every write on a round trip."""

_READ_SIZE = 256 * 1024
# Connections lost with pages still pinned, whose completions never came within the
# linger time: kept alive (pins and descriptor) for the life of the process.
_LINGERING: list[ZeroCopySocket] = []


class _Write:
    __slots__ = ("handle", "owners", "refs", "views")

    def __init__(
        self,
        views: list[memoryview],
        owners: list[FragDestructor | None],
        handle: FragDestructor,
        refs: list[FragDestructor],
    ) -> None:
        self.views = views
        self.owners = owners
        self.handle = handle
        self.refs = refs  # the queue's references: dropped once every byte is sent


class ZeroCopyTransport(asyncio.Transport):
    """A stream transport with per-write release notification (Linux ``MSG_ZEROCOPY``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        zerocopy: str = "auto",
        min_zerocopy_size: int | None = None,
        high_water: int | None = None,
        low_water: int | None = None,
        linger: float = 30.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("ZeroCopyTransport carries TCP streams")
        sock.setblocking(False)
        kwargs = {} if min_zerocopy_size is None else {"min_zerocopy_size": min_zerocopy_size}
        self._zs = ZeroCopySocket(sock, zerocopy=zerocopy, **kwargs)
        self._sock = sock
        self._loop = loop
        self._protocol = protocol
        self._queue: collections.deque[_Write] = collections.deque()
        self._handles: set[FragDestructor] = set()  # writes not released yet
        self._unsent = 0
        self._closing = False  # close() or abort() was called, or the connection failed
        self._lost = False  # connection_lost has been scheduled
        self._exc: Exception | None = None
        self._reading = True
        self._writing_paused = False
        self._linger = linger
        self._linger_timer: asyncio.TimerHandle | None = None
        self.set_write_buffer_limits(high_water, low_water)
        super().__init__(
            {
                "socket": sock,
                "sockname": sock.getsockname(),
                "peername": sock.getpeername(),
                "zerocopy_socket": self._zs,
                **(extra or {}),
            }
        )
        self._read_scheduled = False
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        loop.add_reader(self._epoll.fileno(), self._on_events)
        loop.call_soon(protocol.connection_made, self)

    # -- events ----------------------------------------------------------------------------
    def _on_events(self) -> None:
        try:
            ready = self._epoll.poll(0)
        except OSError:  # closed under us
            return
        for _, ev in ready:
            if ev & select.EPOLLERR:
                self._on_error_queue()
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and self._reading:
                self._read_ready()
            if ev & select.EPOLLOUT and self._queue:
                self._flush_queue()

    # -- reading ---------------------------------------------------------------------------
    def _read_ready(self) -> None:
        """Read until the socket is empty (the registration is edge-triggered), a bounded
        number of times per turn of the loop; more is scheduled, not waited for."""
        self._read_scheduled = False
        for _ in range(16):
            if not self._reading:
                return
            try:
                data = self._sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fatal(exc)
                return
            if not data:
                self._reading = False
                keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
                if not keep_open:
                    self.close()
                return
            self._protocol.data_received(data)  # type: ignore[attr-defined]
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read_ready)

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._schedule_read()  # data may have arrived while paused: no new edge comes

    def is_reading(self) -> bool:
        return self._reading

    # -- writing ---------------------------------------------------------------------------
    def write(  # type: ignore[override]
        self, data: Data, destructor: FragDestructor | None = None
    ) -> FragDestructor:
        """Queue ``data`` (bytes-like, sequence of buffers or frags, ``SkBuff``,
        ``PoolBuffer``) and return its write handle: awaitable, fired when the kernel has
        released every page of this write. ``destructor``, if given, fires after it.

        Refs: one per piece's destructor while queued; the kernel bridge holds its own
        until the completions."""
        if self._closing:
            raise ConnectionError("write() on a closing transport")
        views, owners = pieces(data)
        handle = FragDestructor(None, name="write")
        self._handles.add(handle)
        handle.add_done_callback(self._handles.discard)
        if destructor is not None:
            destructor.ref()
            handle.add_done_callback(lambda _: destructor.unref())
        try:
            refs = take_refs(owners, self)
        except BaseException:
            handle.unref()
            raise
        nbytes = sum(map(len, views))
        if not nbytes:
            self._release(_Write(views, owners, handle, refs))
            return handle
        self._queue.append(_Write(views, owners, handle, refs))
        self._unsent += nbytes
        if len(self._queue) == 1:
            self._flush_queue()
        self._maybe_pause_protocol()
        return handle

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush_queue(self) -> None:
        queue = self._queue
        while queue:
            w = queue[0]
            try:
                n = self._zs.send_iov(w.views, w.owners, w.handle)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fatal(exc)
                return
            self._unsent -= n
            advance(w.views, w.owners, n)
            if w.views:
                continue  # the kernel took part: try again until it refuses
            queue.popleft()
            self._release(w)
        # What is left goes out on the next EPOLLOUT edge.
        self._after_progress()

    def _release(self, w: _Write) -> None:
        """Drop the queue's references of a write that is sent or abandoned."""
        refs, w.refs = w.refs, []
        for d in refs:
            d.unref(holder=self)
        w.handle.unref()

    def _on_error_queue(self) -> None:
        try:
            self._zs.poll_completions(0)
        except PageFragError as exc:  # an error-queue message that is a real socket error
            self._fatal(exc)
        self._after_progress()

    def _after_progress(self) -> None:
        self._maybe_resume_protocol()
        if self._closing and not self._queue and not self._zs.outstanding:
            self._finish()

    async def wait_released(self) -> None:
        """Wait until every write so far has been released by the kernel."""
        for handle in list(self._handles):
            await handle

    def get_write_buffer_size(self) -> int:
        """Unsent plus pinned bytes: what the program has handed over and may not reuse."""
        return self._unsent + self._zs.pinned_bytes

    @property
    def pinned_bytes(self) -> int:
        return self._zs.pinned_bytes

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def _maybe_pause_protocol(self) -> None:
        if not self._writing_paused and self.get_write_buffer_size() > self._high_water:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _maybe_resume_protocol(self) -> None:
        if self._writing_paused and self.get_write_buffer_size() <= self._low_water:
            self._writing_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._queue:
            raise RuntimeError("write_eof() with data still queued")
        self._sock.shutdown(socket.SHUT_WR)

    @property
    def zerocopy_stats(self) -> Any:
        return self._zs.stats

    # -- closing ---------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, wait for every completion, then close (connection_lost)."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        self._after_progress()

    def abort(self) -> None:
        """Disconnect at once (RST, kernel queues purged), drop what was never sent, read
        the completions of what was, then close."""
        if self._lost:
            return
        self._closing = True
        self.pause_reading()
        self._drop_queue()
        try:
            disconnect(self._sock)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EINVAL):
                raise
        self._zs.poll_completions(0)
        self._after_progress()
        self._arm_linger()

    def _fatal(self, exc: Exception) -> None:
        """The connection failed: nothing more will be sent; wait for the completions of
        what the kernel held (it purges its queues on reset), then report the loss."""
        if self._exc is None:
            self._exc = exc
        self._closing = True
        self.pause_reading()
        self._drop_queue()
        self._after_progress()
        self._arm_linger()

    def _drop_queue(self) -> None:
        queue, self._queue = self._queue, collections.deque()
        self._unsent = 0
        for w in queue:
            self._release(w)

    def _arm_linger(self) -> None:
        if not self._lost and self._linger_timer is None:
            self._linger_timer = self._loop.call_later(self._linger, self._give_up)

    def _give_up(self) -> None:
        # The kernel never reported some pages released: keep them pinned for good
        # rather than let them be reused, and report the loss.
        self._linger_timer = None
        if self._zs.outstanding:
            _LINGERING.append(self._zs)
            self._finish(force=True)

    def _finish(self, force: bool = False) -> None:
        if self._lost:
            return
        self._lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        loop = self._loop
        loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        if not force:
            self._zs.close(timeout=0)
        loop.call_soon(self._protocol.connection_lost, self._exc)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return (
            f"<ZeroCopyTransport {state} unsent={self._unsent} "
            f"pinned={self._zs.pinned_bytes} outstanding={self._zs.outstanding}>"
        )
