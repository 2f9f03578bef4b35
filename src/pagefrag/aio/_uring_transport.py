"""UringTransport: :class:`ZeroCopyTransport` whose zero-copy writes go as io_uring
``SEND_ZC`` requests on the loop's ring (``backend="uring"``).

Kernel counterpart: ``io_uring/net.c`` (``io_send_zc``) and ``io_uring/notif.c``: a
request's result says how many bytes the kernel took; its notification
(``IORING_CQE_F_NOTIF``), later, that the kernel has let go of its pages.

Rule: only the sending differs from :class:`ZeroCopyTransport`; the write queue
(:mod:`._writes`), flow control (:mod:`._flow`), the lifecycle (:mod:`._lifecycle`),
reading (:mod:`._reading`) and every protocol callback are the same code. This module
says what goes to the kernel when; :mod:`._uring_bridge` makes the requests and holds
their references; :mod:`._ring_loop` reaps.

Theory of operation. One request in flight per socket: io_uring may complete two sends
on one TCP socket out of order when the first waits for room, so the head of the queue
is sent, and the next only once its result is in (:meth:`UringTransport._flush_queue`).
The result credits the queue as the kernel's ``send`` return does in
:class:`ZeroCopyTransport` (a short result leaves the rest at the head, sent by the next
request); the request's pin holds the write's handle until the notification, so the
handle fires when the kernel has released every page. Writes the policy copies (small
ones, plain mutable buffers, ``zerocopy="never"``) are copied by one ``sendmsg`` at once,
coalesced as in :class:`ZeroCopyTransport`; when the socket is full the rest is made
the transport's own (a plain buffer may be reused once ``write()`` returns) and sent by a
copying request. Nothing waits in a call: results and notifications wake the loop
through the ring's descriptor. The socket itself is watched for reads only.

Flow control counts unsent plus pinned bytes, as :class:`ZeroCopyTransport`: the bytes
of the request in flight are counted once. ``close()`` sends the queue and waits for
every notification (bounded by ``linger``; past it the pins are kept and released when
the notifications come, the socket closed then); ``abort()`` cancels the request in
flight (``IORING_OP_ASYNC_CANCEL``), disconnects, drops the queue, and still releases
only on notifications.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import select
import socket
from typing import Any

from ..errors import PageFragError
from ..zerocopy._syscalls import IOV_MAX
from ..zerocopy.policy import Mode
from ._lifecycle import REPORTED, Event, State
from ._poller import POLL_READ
from ._ring_loop import ring_for
from ._uring_bridge import UringBridge
from ._writes import _Write
from .transport import ZeroCopyTransport, _socket_error

__all__ = ["UringTransport"]

_EPOLLERR = select.EPOLLERR
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_REFUSALS = (errno.ENOBUFS, errno.ENOMEM)  # pinned-memory limits: retried, never lost

Queue = collections.deque[_Write]


class UringTransport(ZeroCopyTransport):
    """A stream transport with per-write release notification whose zero-copy writes are
    io_uring ``SEND_ZC`` requests on the loop's ring (one in flight per socket). The
    arguments and every promise are :class:`ZeroCopyTransport`'s;
    :class:`ZeroCopyUnsupportedError` where io_uring zero-copy sends cannot run."""

    _POLL_EVENTS = POLL_READ
    _zs: UringBridge  # type: ignore[assignment]  # the bridge of this backend
    _copy_head = False  # the head's zero-copy request was refused (auto): copy it

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any, **kwargs: Any
    ) -> None:
        try:
            super().__init__(loop, sock, protocol, **kwargs)
        except BaseException:
            bridge = self.__dict__.get("_zs")
            if bridge is not None:
                bridge.forget()
            raise

    def _open_bridge(self, sock: socket.socket, zerocopy: str, min_size: int | None) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("UringTransport carries TCP streams")
        lring = ring_for(self._loop)
        self._zs = UringBridge(lring, sock, zerocopy, min_size, self._flush_queue, self._released)
        self._send_copied = self._zs.send_copied

    # -- events ----------------------------------------------------------------------------
    def _on_events(self, ev: int) -> None:
        """What the shared poller reports for this socket: reads and socket errors (the
        ring reports the sends)."""
        if ev & _EPOLLERR and not self._reading:
            self._check_socket_error()
        if ev & _READ_EVENTS and self._reading:
            self._read_ready()

    def _released(self) -> None:
        """The ring released pins of this socket's requests (after the reap)."""
        state = self._state
        if state is State.LINGERING:
            if not self._zs.outstanding:
                self._close_socket()
                self._to(Event.RELEASED)
            return
        if state in REPORTED:
            return
        if self._stall.since is not None and self._writes.queue:
            self._flush_queue()  # notifications freed what ENOBUFS was waiting for
            return
        self._after_progress()

    # -- sending ---------------------------------------------------------------------------
    def _flush_queue(self) -> None:
        """Hand the queue to the kernel: take the result of the request in flight, then
        send the head (copied at once, or as the next request) until a request waits
        for its result. Kernel: ``sendmsg``, ``io_uring_enter``.

        Refs: a request's pin holds the write handle until the notification; a write
        sent whole releases the queue's pin (:meth:`WriteQueue.sent`)."""
        zs = self._zs
        if zs.pumping:
            return  # the loop below is running (a callback of a reap inside it)
        zs.pumping = True
        try:
            go_on = self._pump()
        finally:
            zs.pumping = False
        if go_on:
            self._after_progress()

    def _pump(self) -> bool:
        """:meth:`_flush_queue`'s loop; False if the connection failed or was aborted
        meanwhile (its own teardown has run)."""
        writes = self._writes
        queue = writes.queue
        zs = self._zs
        for _ in range(1 << 20):  # bounded: each turn sends bytes or takes a result
            req = zs.request
            if req is not None:
                if not req.done_result:
                    zs.kick()  # (filed but never handed over if an interrupt came between)
                    if not req.done_result:
                        return True  # its result wakes the loop through the ring
                zs.request = None
                if zs.sent_by is queue and not self._took(req):
                    return writes.queue is queue
                if writes.queue is not queue:
                    return False
            if not queue or self._state in REPORTED:
                return True
            if not self._send_head(queue):
                return writes.queue is queue
        return True

    def _took(self, req: Any) -> bool:
        """Credit the queue with the result of ``req``; False to stop sending (ENOBUFS
        waits, or the connection failed)."""
        res = int(req.result)
        if res >= 0:
            if res:
                if self._stall.since is not None:
                    self._stall.progress()
                self._writes.sent(res)
            return True
        if req.zerocopy and -res in _REFUSALS:
            # Too much memory pinned (optmem, RLIMIT_MEMLOCK): copy, or wait for room.
            if self._policy.mode is Mode.AUTO:
                self._zs.enobufs_copies += 1
                self._copy_head = True
                return True
            self._zs.enobufs_retries += 1
            self._wait_enobufs()
            return False
        self._force_close(_socket_error(OSError(-res, os.strerror(-res))))
        return False

    def _send_head(self, queue: Queue) -> bool:
        """Send the first write: what the policy copies at once, as much as the socket
        takes; the rest (or a zero-copy write) as one request. False if it failed."""
        writes = self._writes
        zs = self._zs
        w = queue[0]
        zs.feed_policy()
        zc = not self._copy_head and w.iov.lent is None and self._policy.use_zerocopy(w.left)
        if not zc:
            batch = writes.gather(self._policy.copy_below) if len(queue) > 1 else None
            try:
                n = zs.copy((batch or w.iov).views[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._force_close(_socket_error(exc))
                return False
            if n:
                if self._stall.since is not None:
                    self._stall.progress()
                if batch is not None:
                    writes.credit(n)
                else:
                    writes.sent(n)
                return writes.queue is queue
            # The socket is full: the ring sends it once there is room, after write()
            # has returned, so a plain buffer's bytes must be the transport's own now.
            w.iov.own()
        iov = w.iov if len(w.iov.views) <= IOV_MAX else w.iov.first(IOV_MAX)
        try:
            zs.submit(iov, w.handle, zc, queue)
        except OSError as exc:
            self._force_close(exc)
            return False
        self._copy_head = False
        return writes.queue is queue

    # -- what the shared code reads --------------------------------------------------------
    def get_write_buffer_size(self) -> int:
        """Unsent plus pinned bytes (the request in flight counted once). Kernel: none.
        Refs: none."""
        zs = self._zs
        size = self._writes.unsent + zs.pinned_bytes
        req = zs.request
        if req is not None and req.zerocopy and zs.sent_by is self._writes.queue:
            size -= req.nbytes
        return size

    # -- closing ---------------------------------------------------------------------------
    def _reset(self) -> None:
        """Cancel the request in flight, then disconnect (RST, queues purged); its result
        and the notifications still come, through the ring."""
        self._zs.cancel()
        super()._reset()

    def _linger_socket(self) -> None:
        # The ring, not the socket, reports the notifications: stop watching the socket;
        # _released() closes it once the kernel holds nothing more.
        self._poller.unregister(self._fd, self._on_events)

    def _close_socket(self) -> None:
        if self._state is not State.LINGERING:
            self._poller.unregister(self._fd, self._on_events)
        try:
            self._zs.close(timeout=0)
        except (OSError, PageFragError) as exc:  # EBADF: closed behind our back
            if self._exc is None and self._state is not State.LINGERING:
                self._exc = _socket_error(exc)
