"""The asyncio side of a ``pagefrag://`` connection: a ``BufferedProtocol`` feeding the
sans-I/O :class:`~._framing.MessageReader` (the transport receives straight into the
reader's buffers) and queueing whole messages for :meth:`PagefragComm.read`, with the
write side's flow control (``pause_writing``/``resume_writing``) as awaitables.

Rule: nothing here takes a reference or writes; it only reads, waits and reports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ._framing import FramingError, MessageReader

__all__ = ["CommProtocol"]

logger = logging.getLogger("pagefrag.dask")


class CommProtocol(asyncio.BufferedProtocol):
    """One connection's protocol. ``read_high_water``: received, unread bytes above
    which reading pauses (the peer is then held back by TCP) until :meth:`next_message`
    takes them below a quarter of it. ``on_made``: called with the protocol once the
    connection is made (a listener makes its comm there)."""

    def __init__(
        self,
        reader: MessageReader,
        read_high_water: int,
        on_made: Callable[[CommProtocol], None] | None = None,
    ) -> None:
        self.reader = reader
        self.transport: asyncio.Transport | None = None
        self._read_high = read_high_water
        self._taken = 0  # bytes of the messages taken by next_message()
        self._on_made = on_made
        self._message_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.lost: asyncio.Future[None] | None = None
        self.exc: BaseException | None = None  # why the connection ended, if it failed
        self.eof = False
        self.stopped = False  # closed or aborted here: no read waits any longer

    # -- the transport's calls -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.lost = asyncio.get_running_loop().create_future()
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        reader = self.reader
        before = reader.message_bytes
        try:
            reader.buffer_updated(nbytes)
        except (FramingError, MemoryError) as exc:
            # Never trust the network: a header out of bounds, or a frame it claims that
            # cannot be allocated, ends this connection (and only it).
            logger.warning("pagefrag comm: %r; aborting the connection", exc)
            self.exc = exc
            assert self.transport is not None
            self.transport.abort()
            return
        if reader.message_bytes != before:
            if self.unread > self._read_high and self.transport is not None:
                self.transport.pause_reading()
            self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # the transport closes (our writes are sent and released first)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.exc is None:
            self.exc = exc
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the comm's calls ------------------------------------------------------------------
    @property
    def unread(self) -> int:
        """Bytes of whole messages received and not yet taken."""
        return self.reader.message_bytes - self._taken

    @property
    def done(self) -> bool:
        """The connection is lost (``connection_lost`` has run)."""
        return self.lost is not None and self.lost.done()

    async def writable(self) -> None:
        """Return once the transport takes more (unsent plus pinned bytes at or below the
        low-water mark) or the connection is lost."""
        while self._paused and not self.done:
            waiter = self._drain_waiter
            if waiter is None or waiter.done():
                waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # several writers may wait on one future

    async def next_message(self) -> list[memoryview] | None:
        """The next whole message's frames; None once none will come (end of stream,
        failure or loss) and none is left."""
        reader = self.reader
        while not reader.messages:
            if self.eof or self.done or self.stopped:
                return None
            waiter = self._message_waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._message_waiter = None
        frames, nbytes = reader.messages.popleft()
        self._taken += nbytes
        transport = self.transport
        if (
            self.unread <= self._read_high // 4
            and transport is not None
            and not transport.is_reading()
            and not self.done
            and not self.eof
        ):
            transport.resume_reading()
        return frames

    def stop(self) -> None:
        """Our own close() or abort(): a read waiting for a message returns None now
        (as a closed stream fails a pending read at once), not at ``connection_lost``,
        which close() may reach only after ``linger``."""
        self.stopped = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._message_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
