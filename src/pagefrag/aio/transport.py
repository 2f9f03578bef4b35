"""ZeroCopyTransport: an asyncio transport whose writes go out with ``MSG_ZEROCOPY`` and
report, per write, when the kernel has released every page.

Theory of operation. The transport owns a non-blocking TCP socket wrapped in a
:class:`ZeroCopySocket`. Completions arrive on the socket's error queue, which ``epoll``
reports as ``EPOLLERR``. The event loop is never shown the socket itself: the transport
registers it, edge-triggered, in the epoll instance its loop shares among all transports
(:mod:`._poller`), and only *that* descriptor is given to ``add_reader``. Each wake-up
reports what changed — readable (``EPOLLIN``), writable (``EPOLLOUT``), completions or a
socket error (``EPOLLERR``) — and the transport reads, sends or drains the error queue. No
timer, no busy loop, and reading may be paused without missing a completion. (Showing
the socket to the loop would not do: a pending error-queue message makes the descriptor
report ``POLLERR`` and libuv, under uvloop, stops watching it.)

Nothing blocks inside a callback. ``ENOBUFS`` (``net.core.optmem_max`` or the locked-page
limit) leaves the write queued: it is retried when completions arrive, or after a short
timer, and the connection fails only after ``enobufs_timeout`` seconds without progress
(:mod:`._stall`).

A plain ``write`` keeps asyncio's contract: a mutable buffer may be reused once the call
returns (it is sent copied, and copied into the queue if it cannot go at once); ``bytes``,
frags and ``write_zerocopy`` go by reference (:mod:`._writes`, :mod:`pagefrag._iov`).

Each ``write`` is queued (:mod:`._writes`) with a :class:`Pin` of its bytes and its
*write handle* (a :class:`FragDestructor` returned to the caller), so nothing the queue
still holds can be released by its owner. The queue is handed to the kernel as the
socket accepts it; the kernel bridge then holds its own references until the completions
arrive, and the queue's pin is released. The handle fires when the last of them is gone.

Small writes. A ``bytes`` or ``bytearray`` write the policy copies (below its
``copy_below``), with nothing queued before it, is one copying ``send`` and nothing
else: taken whole, it returns :data:`SENT`, one shared handle that has already fired
(no handle, pin or queue entry is made); what the kernel does not take is queued as any
write. Queued small writes go out coalesced, several in one ``sendmsg``
(:meth:`WriteQueue.gather <._writes.WriteQueue.gather>`).

The rest lives beside this module, one concern each: reading and the guarded protocol
callbacks (:mod:`._reading`); flow control (:mod:`._flow`), which counts pinned bytes
with unsent ones: the protocol is paused above the high-water mark until both together
fall to the low-water mark; the lifecycle (open, closing, lingering, lost), one table
(:mod:`._lifecycle`); connections lost with pages still pinned (:mod:`._linger`). Every
way to end a connection but ``close()`` is one path,
:meth:`ZeroCopyTransport._force_close`.

The io_uring backend (``backend="uring"``) is this class with another kernel bridge
(:meth:`ZeroCopyTransport._open_bridge`) and its own sending: :mod:`._uring_transport`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from typing import Any

from .._destructor import FragDestructor
from .._iov import Data, IoVec, check_destructor
from ..errors import PageFragError, QueuedSocketError, SendBufferError
from ..zerocopy._syscalls import disconnect, set_nodelay
from ..zerocopy.socket import ZeroCopySocket
from ._flow import DEFAULT_HIGH_WATER, FlowControlMixin
from ._lifecycle import REPORTED, Event, State, transition
from ._linger import linger as _hand_over
from ._linger import still_pinned
from ._poller import POLL_ALL as _POLL_ALL
from ._poller import poller_for
from ._reading import ReadingMixin
from ._stall import EnobufsStall, stalled
from ._writes import WriteQueue

__all__ = [
    "DEFAULT_ENOBUFS_TIMEOUT",
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LINGER",
    "SENT",
    "ZeroCopyTransport",
]

DEFAULT_LINGER = 30.0
"""Seconds ``close()``, ``abort()`` or a failure wait for the kernel's completions before
the connection is reported lost with the pages still pinned."""

DEFAULT_ENOBUFS_TIMEOUT = 30.0
"""Seconds of ``ENOBUFS`` without progress after which the connection fails."""

LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
"""Writes ignored after close() or the loss before each further one logs a warning (as
asyncio's ``constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES``)."""

logger = logging.getLogger("pagefrag.aio")

_EPOLLERR = select.EPOLLERR
_EPOLLOUT = select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OPEN, _CLOSING = State.OPEN, State.CLOSING
_FLAT = (bytes, bytearray)

SENT = FragDestructor(None, name="write")
"""The handle of every write that :meth:`ZeroCopyTransport.write` copied whole into the
kernel at once (small, nothing queued before it): one shared handle, fired (its one
reference dropped at import), so such a write creates no object. Awaiting it returns at
once; ``ref()`` on it raises :class:`DestructorError`, as on any fired handle."""
SENT.unref()


def _socket_error(exc: Exception) -> Exception:
    """The error a connection fails with, as asyncio's transports give it: a socket error
    the zero-copy layer queued (:class:`QueuedSocketError`, read from the error queue or
    ``SO_ERROR``: a reset, TCP giving up) becomes the plain ``OSError`` subclass of its
    errno (``ConnectionResetError`` for ``ECONNRESET``), caused by the original."""
    if isinstance(exc, QueuedSocketError) and exc.errno:
        err = OSError(exc.errno, os.strerror(exc.errno))  # OSError picks the subclass
        err.__cause__ = exc
        return err
    return exc


def _peername(sock: socket.socket) -> Any:
    """The peer's address, or None for a connection already reset (``ENOTCONN``) when
    its accept is processed, as asyncio's transports record it: the reset then ends the
    connection at its first read, not the set-up with an error."""
    try:
        return sock.getpeername()
    except OSError:
        return None


class ZeroCopyTransport(ReadingMixin, FlowControlMixin):
    """A stream transport with per-write release notification (Linux ``MSG_ZEROCOPY``).

    ``linger``: seconds ``close()``, ``abort()`` or a failed connection wait for the
    kernel's completions before the loss is reported with the pages still pinned (None:
    no bound). ``enobufs_timeout``: seconds of ``ENOBUFS`` without progress after which
    the connection fails with :class:`SendBufferError`; until then the write waits in the
    loop, never inside a call."""

    _ignored_writes = 0  # writes after close() or the loss (see _ignored_write)
    _POLL_EVENTS = _POLL_ALL  # what the shared poller watches the socket for
    _failed = False  # abort() or a failure: flow control no longer resumes the protocol
    _server: Any = None  # the ZeroCopyServer of create_server() counting this connection

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
        linger: float | None = DEFAULT_LINGER,
        enobufs_timeout: float = DEFAULT_ENOBUFS_TIMEOUT,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("ZeroCopyTransport carries TCP streams")
        if linger is not None and not linger >= 0:
            raise ValueError(f"linger must be >= 0 seconds or None, not {linger!r}")
        if not enobufs_timeout >= 0:
            raise ValueError(f"enobufs_timeout must be >= 0 seconds, not {enobufs_timeout!r}")
        sock.setblocking(False)
        self._loop = loop
        self._open_bridge(sock, zerocopy, min_zerocopy_size)
        # Its copy_below (below it every send is copied) is read on each small write.
        self._policy = self._zs._policy
        set_nodelay(sock)
        self._sock = sock
        self.set_protocol(protocol)  # and the read path its kind needs (._reading)
        self._writes = WriteQueue(self)
        self._state = _OPEN  # changed only by _to(): the table of ._lifecycle
        self._exc: Exception | None = None  # what connection_lost will be given
        self._eof = 0  # write_eof(): 1 once called (FIN after the queue), 2 once sent
        self._linger = linger
        self._linger_timer: asyncio.TimerHandle | None = None
        self._enobufs_timeout = enobufs_timeout
        self._stall = EnobufsStall()
        self.set_write_buffer_limits(high_water, low_water)
        super().__init__(
            {
                "socket": sock,
                "sockname": sock.getsockname(),
                "peername": _peername(sock),
                "zerocopy_socket": self._zs,
                **(extra or {}),
            }
        )
        self._fd = sock.fileno()
        self._poller = poller_for(loop)
        self._poller.register(self._fd, self._on_events, self._POLL_EVENTS)
        loop.call_soon(protocol.connection_made, self)

    def _open_bridge(self, sock: socket.socket, zerocopy: str, min_size: int | None) -> None:
        """Make the kernel bridge of this transport's sends (``_zs``: here a
        :class:`ZeroCopySocket`) and ``_send_copied``, the one copying ``send`` of the
        small-write path (-1: refused, the bridge's ``send_copied`` raises why)."""
        kwargs = {} if min_size is None else {"min_zerocopy_size": min_size}
        # enobufs_timeout=0: the socket never waits; ENOBUFS is waited for in the loop.
        self._zs = ZeroCopySocket(sock, zerocopy=zerocopy, enobufs_timeout=0, **kwargs)
        self._send_copied = self._zs._tx.send_copied

    def _to(self, event: Event) -> bool:
        """Take the lifecycle transition of ``event``; False if the table has none (the
        event is ignored)."""
        state = transition(self._state, event)
        if state is None:
            return False
        self._state = state
        return True

    # -- events ----------------------------------------------------------------------------
    def _on_events(self, ev: int) -> None:
        """What the shared poller reports for this socket."""
        if ev & _EPOLLERR:
            if not self._reading:
                # Nobody reads, so no recv() would raise a socket error (ETIMEDOUT when
                # TCP gave up, a reset): take it before the completions it comes with,
                # or a close would end as if everything had been delivered.
                self._check_socket_error()
            self._on_error_queue()
        if ev & _READ_EVENTS and self._reading:
            self._read_ready()
        if ev & _EPOLLOUT and self._writes.queue:
            self._flush_queue()

    def _check_socket_error(self) -> None:
        if self._state in REPORTED:
            return
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._force_close(OSError(err, os.strerror(err)))  # OSError picks the subclass

    # -- writing ---------------------------------------------------------------------------
    def write(  # type: ignore[override]
        self, data: Data, destructor: FragDestructor | None = None
    ) -> FragDestructor:
        """Queue ``data`` (bytes-like, sequence of buffers or frags, ``SkBuff``,
        ``PoolBuffer``) and return its write handle: awaitable, fired when the kernel has
        released every page of this write. ``destructor``, if given, fires after it.

        As asyncio's, the caller may reuse a plain mutable buffer (bytearray, numpy
        array, mmap, a memoryview of one) once ``write()`` returns: it is sent copied, and
        what cannot go at once is copied into the queue. ``bytes``, frags, pool buffers
        and skbs go zero-copy by reference; so does everything when ``destructor`` is
        given (then reuse waits for it), or with :meth:`write_zerocopy`.

        A write that raises (bad data, a destructor that has already fired, a write after
        ``write_eof()``: ``RuntimeError``) changes nothing: no reference taken, no handle
        registered. After ``close()``, a failure or the loss of the connection a write is
        ignored, as asyncio's: its data is checked, then a handle that has already fired
        is returned (the kernel never saw those bytes); ``drain()`` raises
        ``ConnectionResetError`` once the loss is reported.

        A ``bytes`` or ``bytearray`` write below the copy threshold that the kernel takes
        whole at once, with nothing queued before it, is copied and done when ``write()``
        returns: it returns :data:`SENT`, one shared handle that has already fired.

        Refs: one per piece's destructor while queued (a :class:`Pin`), one on
        ``destructor`` until the handle fires; the kernel bridge holds its own until the
        completions. An ignored write, or one copied whole at once, takes none."""
        if (
            destructor is None
            and type(data) in _FLAT
            and not self._writes.queue
            and self._state is _OPEN
            and not self._eof
            and 0 < len(data) < self._policy.copy_below  # type: ignore[arg-type]
        ):
            # The small-write path: one copying send, no handle, pin or queue entry.
            try:
                # The sender's own call (C with the compiled core); -1: refused, and
                # the socket's method raises why.
                n = self._send_copied(data)  # type: ignore[arg-type]  # bytes, bytearray
                if n < 0:
                    n = self._zs.send_copied(data)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                n = 0  # the socket is full: queued below
            except OSError as exc:
                # As the queued path fails: the write queued, then dropped by the failure
                # (its handle fires; bytes dropped, so the connection is reset).
                handle, _ = self._writes.push(data, None, True)
                self._force_close(_socket_error(exc))
                return handle
            if n == len(data):  # type: ignore[arg-type]
                # Nothing queued, nothing pinned by this write: flow control and the
                # lifecycle have nothing new to see.
                return SENT
            if n:
                data = memoryview(data)[n:]  # type: ignore[arg-type]  # the rest, queued
        return self._write(data, destructor, destructor is None)

    def write_zerocopy(
        self, data: Data, destructor: FragDestructor | None = None
    ) -> FragDestructor:
        """:meth:`write`, with mutable buffers too sent zero-copy by reference: the
        caller must not change ``data`` until the returned handle fires (the kernel has
        released every page). Kernel: ``sendmsg(MSG_ZEROCOPY)``.

        Refs: as :meth:`write`."""
        return self._write(data, destructor, False)

    def _write(self, data: Data, destructor: FragDestructor | None, lent: bool) -> FragDestructor:
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._state is not _OPEN:
            return self._ignored_write(data, destructor)
        writes = self._writes
        handle, w = writes.push(data, destructor, lent)
        if w is not None:
            if len(writes.queue) == 1:
                self._flush_queue()
            if lent and w.iov.lent is not None and w.iov.views:
                # What the kernel did not take is no longer the caller's. This write's
                # own, not the queue's last: callbacks the send ran may have queued more.
                w.iov.own()
            self._maybe_pause_protocol()
        return handle

    def _ignored_write(self, data: Data, destructor: FragDestructor | None) -> FragDestructor:
        """A write after close() or the loss: checked as any write (TypeError for what is
        not data), then dropped, as asyncio's ``_SelectorSocketTransport.write`` drops it
        once ``_conn_lost`` (with its warning after a few)."""
        IoVec.of(data)
        check_destructor(destructor)
        self._ignored_writes += 1
        if self._ignored_writes > LOG_THRESHOLD_FOR_CONNLOST_WRITES:
            logger.warning("write() ignored: the transport is closing or its connection lost")
        handle = FragDestructor(None, name="write")
        handle.unref()  # fired: nothing of it was, or will be, handed to the kernel
        return handle

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush_queue(self) -> None:
        writes = self._writes
        queue = writes.queue
        while queue:
            w = queue[0]
            # Several small writes queued (the socket was full): one copying call for as
            # many as fit, each credited in order as the kernel takes its bytes.
            batch = writes.gather(self._policy.copy_below) if len(queue) > 1 else None
            try:
                if batch is not None:
                    n = self._zs.send_iov(batch)
                else:
                    n = self._zs.send_iov(w.iov, w.handle)
            except (BlockingIOError, InterruptedError):
                break
            except SendBufferError:  # nothing sent, nothing kept: wait in the loop
                if not self._wait_enobufs():
                    return
                break
            except OSError as exc:
                self._force_close(_socket_error(exc))
                return
            if writes.queue is not queue:
                return  # a callback the send ran aborted or failed the connection
            if self._stall.since is not None:
                self._stall.progress()
            if batch is not None:
                writes.credit(n)
                if n < writes.gathered:
                    # The socket is full (a partial send sets SOCK_NOSPACE): the next
                    # EPOLLOUT edge says when, rather than a call refused now.
                    if writes.queue is queue:
                        break
                    return
            else:
                writes.sent(n)  # a part: try again until the kernel refuses
            if writes.queue is not queue:
                return  # a handle that fired ran a callback that aborted the connection
        # What is left goes out on the next EPOLLOUT edge.
        self._after_progress()

    def _wait_enobufs(self) -> bool:
        """ENOBUFS: keep the write queued and retry when completions arrive or after a
        short timer; fail the connection after ``enobufs_timeout`` seconds without
        progress. False if it failed."""
        timeout = self._enobufs_timeout
        if self._stall.refused(self._loop.time(), timeout):
            self._force_close(stalled(timeout, self._zs.outstanding))
            return False
        self._stall.retry_later(self._loop, self._retry_send)
        return True

    def _retry_send(self) -> None:
        if self._writes.queue and self._state not in REPORTED:
            self._flush_queue()

    def _on_error_queue(self) -> None:
        if self._state in REPORTED:
            return
        try:
            released = self._zs.poll_completions(0)
        except PageFragError as exc:  # an error-queue message that is a real socket error
            self._force_close(_socket_error(exc))
            released = 0
        if released and self._stall.since is not None and self._writes.queue:
            self._flush_queue()  # completions freed what ENOBUFS was waiting for
            return
        self._after_progress()

    def _after_progress(self) -> None:
        if self._writing_paused and not self._failed:
            # Not after abort() or a failure: as asyncio's, a paused protocol learns of
            # those from connection_lost, so drain() raises rather than returns.
            self._maybe_resume_protocol()
        if self._eof == 1 and not self._writes.queue and self._state is _OPEN:
            self._eof = 2  # every byte is handed over: the FIN follows, as asyncio's
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._force_close(exc)
        if self._state is _CLOSING and not self._writes.queue and not self._zs.outstanding:
            self._finish(Event.RELEASED)

    async def wait_released(self) -> None:
        """Wait until every write so far has been released by the kernel."""
        for handle in list(self._writes.handles):
            await handle

    def get_write_buffer_size(self) -> int:
        """Unsent plus pinned bytes: what the program has handed over and may not reuse."""
        return self._writes.unsent + self._zs.pinned_bytes

    @property
    def pinned_bytes(self) -> int:
        return self._zs.pinned_bytes

    @property
    def dropped_bytes(self) -> int:
        """Bytes written but never handed to the kernel: dropped by abort(), a failure
        of the connection or the linger bound (a running total)."""
        return self._writes.dropped

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close once every queued byte is handed to the kernel (at once when none
        is queued); a later write() raises RuntimeError, as asyncio's. Kernel:
        ``shutdown(SHUT_WR)``. Refs: none."""
        if self._state is _OPEN and not self._eof:
            self._eof = 1
            self._after_progress()

    @property
    def zerocopy_stats(self) -> Any:
        return self._zs.stats

    # -- closing ---------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._state is not _OPEN

    def close(self) -> None:
        """Send what is queued, wait for every completion, then close (connection_lost).

        Bounded by ``linger`` seconds: past it the connection is reported lost with
        :class:`CompletionTimeoutError` (``wait_closed()`` raises it), writes never sent
        are dropped (their handles fire: the kernel never saw those pages), and the pages
        the kernel still holds stay pinned until it releases them: the socket stays
        watched while the loop runs, so their handles fire then and the socket is closed.

        Refs: dropped as the completions arrive; never before."""
        if not self._to(Event.CLOSE):
            return
        self.pause_reading()
        self._after_progress()
        self._arm_linger()

    def abort(self) -> None:
        """Disconnect at once (RST, kernel queues purged), drop what was never sent, read
        the completions of what was, then close. Kernel: ``connect(AF_UNSPEC)``
        (``tcp_disconnect``). Bounded by ``linger`` as :meth:`close`.

        Refs: the queue's pins released at once; the kernel's dropped as the completions
        arrive, never before."""
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        """A protocol callback raised: as asyncio, report it to the loop's exception
        handler (socket errors are not logged), then fail the connection."""
        if not isinstance(exc, OSError):
            self._report(message, exc)
        self._force_close(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _force_close(self, exc: Exception | None) -> None:
        """The one teardown path but close(): abort() (``exc`` None) or a failure of the
        connection (``exc``, what connection_lost gets). Nothing more is sent; what was
        never sent is dropped (its handles fire); the connection is reset (always on
        abort, on failure if bytes of the stream were dropped); then the completions of
        what the kernel held are awaited, up to ``linger``, and the loss reported."""
        if not self._to(Event.FORCE_CLOSE):
            return
        if self._exc is None:
            self._exc = exc
        self._failed = True
        self.pause_reading()
        # A failure with bytes dropped resets rather than let the peer read a truncated
        # stream that ends like a whole one.
        reset = exc is None or bool(self._writes.queue)
        self._writes.drop()
        if reset:
            try:
                self._reset()
            except (OSError, PageFragError) as err:
                # EBADF: the socket was closed behind our back. Still the loss path
                # below; on abort the error is the connection's.
                if self._exc is None:
                    self._exc = err
        self._after_progress()
        self._arm_linger()

    def _reset(self) -> None:
        """Disconnect (RST, kernel queues purged, the descriptor kept open so the
        completions still arrive) and read what is already there."""
        disconnect(self._sock)
        # Our own reset sets the socket error (ECONNRESET): it is no failure to report.
        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._zs.poll_completions(0)

    def _arm_linger(self) -> None:
        if self._state is _CLOSING and self._linger_timer is None and self._linger is not None:
            self._linger_timer = self._loop.call_later(self._linger, self._give_up)

    def _give_up(self) -> None:
        # Past the linger bound: report the loss now. Pages the kernel has not reported
        # released stay pinned rather than be reused, until their late completions.
        self._linger_timer = None
        if self._state is not _CLOSING:
            return
        zs = self._zs
        if not (self._writes.queue or zs.outstanding):
            self._finish(Event.RELEASED)  # released meanwhile, without a wake-up that noticed
            return
        if self._exc is None:
            self._exc = still_pinned(zs, self._linger, self._writes.unsent)
        self._writes.drop()  # never handed to the kernel: those handles may fire
        self._finish(Event.LINGER_EXPIRED if zs.outstanding else Event.RELEASED)

    def _finish(self, event: Event) -> None:
        """Report the loss. LINGER_EXPIRED: the kernel still holds pages; the socket is
        handed to :mod:`._linger`, which releases them whenever their completions come."""
        if not self._to(event):
            return
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._stall.cancel()
        if self._state is State.LINGERING:
            self._linger_socket()
        else:
            self._close_socket()
        self._loop.call_soon(self._connection_lost)

    def _connection_lost(self) -> None:
        # As asyncio's _call_connection_lost: the server hears of the loss after the
        # protocol, even if the protocol's callback raises.
        try:
            self._protocol.connection_lost(self._exc)
        finally:
            server, self._server = self._server, None
            if server is not None:
                server._detach()

    def _linger_socket(self) -> None:
        """Past the linger bound: hand the socket, pins and all, to :mod:`._linger`,
        which releases them as their completions come, then closes it."""
        _hand_over(
            self._zs,
            self._poller,
            self._fd,
            self._on_events,
            lambda: self._to(Event.RELEASED),
        )

    def _close_socket(self) -> None:
        """The kernel holds nothing more: stop watching the socket and close it."""
        self._poller.unregister(self._fd, self._on_events)
        try:
            self._zs.close(timeout=0)
        except (OSError, PageFragError) as exc:  # EBADF: closed behind our back
            if self._exc is None:
                self._exc = _socket_error(exc)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._state.value} unsent={self._writes.unsent} "
            f"pinned={self._zs.pinned_bytes} outstanding={self._zs.outstanding}>"
        )
