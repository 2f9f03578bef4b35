"""The kernel bridge of a :class:`~._uring_transport.UringTransport`: its socket's channel
on the loop's ring, the one request in flight, and the copying sends made at once.

Rule: this module takes a request's references (a :class:`Pin` per request, released by
the ring when it reaps the request's notification) and nothing else; which bytes to send
and when is the transport's. It offers the transport the surface of
:class:`~pagefrag.zerocopy.ZeroCopySocket` the shared transport code reads
(``outstanding``, ``pinned_bytes``, ``poll_completions``, ``close``, ``stats``,
``_policy``), none of which waits.

Theory of operation. A zero-copy write goes as ``IORING_OP_SEND_ZC`` (or ``SENDMSG_ZC``)
requests (without ``MSG_WAITALL``: see :data:`SEND_FLAGS`): each one's pin holds a
reference on every destructor of its bytes and on the write's handle, and the ring
releases it only when it reaps the request's notification (``IORING_CQE_F_NOTIF``), so
the handle fires only once the kernel has let go of every page. A copying send needs no
notification: it is one ``send``/``sendmsg`` made at once (as :class:`ZeroCopyTransport`
makes it); when the socket is full, the rest goes as a copying request
(``IORING_OP_SEND``) that the ring sends once there is room. Every request's result and
notification are reaped in the loop's thread (:mod:`._ring_loop`); the bridge only
defers the transport's callbacks.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from .._destructor import FragDestructor
from .._iov import IoVec
from ..uring.socket import UringSocket
from ..zerocopy._sender import ZeroCopyStats
from ._ring_loop import LoopRing

__all__ = ["UringBridge"]

SEND_FLAGS = 0
"""The requests' ``msg_flags``. Not ``MSG_WAITALL``: with it io_uring retries a short send
itself and, when the retry fails after some bytes went (a reset), completes with the
byte count and the socket's error is gone (consumed by the failed retry), so the next
request would only see ``EPIPE``. Without it each request takes what the socket has room
for, the transport sends the rest by the next, and a reset is ``ECONNRESET``."""


class UringBridge:
    """One TCP socket's sends on the loop's ring. ``on_result()`` is called (deferred,
    in the loop) when the request in flight has its result; ``on_released()`` when the
    ring has released requests' pins. ``request``: the request in flight (its result not
    yet taken by the transport) and ``sent_by``, the write queue it was sent from."""

    def __init__(
        self,
        lring: LoopRing,
        sock: socket.socket,
        zerocopy: str,
        min_size: int | None,
        on_result: Callable[[], object],
        on_released: Callable[[], object],
    ) -> None:
        kwargs = {} if min_size is None else {"min_zerocopy_size": min_size}
        lring.attach()
        try:
            # The socket's own waits are never used: only its channel, policy and close.
            self.socket = UringSocket(
                sock, zerocopy=zerocopy, enobufs_timeout=0, ring=lring.ring, **kwargs
            )
        except BaseException:
            lring.detach()  # the ring goes again if nobody else uses it
            raise
        self._sock = sock
        self._lring = lring
        self._ch: Any = self.socket._ch
        self._ch.on_result = self._result
        self._policy = self.socket._policy
        self._on_result = on_result
        self._on_released = on_released
        self._release_due = False
        self._taken: Any = None  # the last request whose result the transport took
        self.sent_by: object = None
        self.pumping = False  # the transport is sending: it reads results itself
        self.copied_sends = self.copied_bytes = 0
        self.enobufs_copies = self.enobufs_retries = 0
        self._attached = True

    # -- sending ---------------------------------------------------------------------------
    def send_copied(self, data: bytes | bytearray | memoryview) -> int:
        """One copying ``send`` now (the small-write path); ``BlockingIOError`` when the
        socket is full. Kernel: ``send()``. Refs: none."""
        n = self._sock.send(data)
        self.copied_sends += 1
        self.copied_bytes += n
        return n

    def copy(self, views: list[memoryview]) -> int:
        """One copying ``sendmsg`` of ``views`` now; ``BlockingIOError`` when the socket
        is full. Kernel: ``sendmsg()``. Refs: none."""
        n = self._sock.sendmsg(views) if len(views) > 1 else self._sock.send(views[0])
        self.copied_sends += 1
        self.copied_bytes += n
        return n

    def submit(self, iov: IoVec, handle: FragDestructor, zerocopy: bool, owner: object) -> Any:
        """Send ``iov`` as one request (it may take fewer bytes): zero-copy (``SEND_ZC``), its pin
        holding ``handle`` and every destructor of the bytes until the notification, or
        copying (``SEND``), its pin keeping the views until the result. ``owner``: the
        write queue it is sent from. Kernel: ``io_uring_enter``.

        Refs: a zero-copy request takes one on each piece's destructor and on ``handle``,
        dropped when the ring reaps its notification."""
        if self._sock.fileno() != self._ch.fd:
            raise OSError(errno.EBADF, "the transport's socket was closed")
        self.sent_by = owner  # before: an interrupt may come as the filing returns
        # Pinned and filed in one C call (a copying request holds the references too,
        # until its result: the ring copies when there is room): the pin is the ring's
        # from then on, and the request is the channel's last (see request).
        req = self._ch.submit_iov(
            iov.views, iov.owners, handle, zerocopy, SEND_FLAGS, self._released
        )
        self._lring.submit()  # a socket with room sends it here: its result is in
        return req

    @property
    def request(self) -> Any:
        """The request in flight: the channel's last one (filed in C, so it is known
        even if an interrupt was raised as the filing returned) until the transport
        takes its result (``request = None``)."""
        req = self._ch.last_request
        return None if req is self._taken else req

    @request.setter
    def request(self, value: None) -> None:
        if value is not None:
            raise ValueError("only None: the channel knows its requests")
        self._taken = self._ch.last_request

    def kick(self) -> None:
        """Hand a filed request to the kernel if nothing did (an interrupt between the
        filing and its submit). Kernel: ``io_uring_enter``. Refs: none."""
        self._lring.submit()

    def cancel(self) -> None:
        """Cancel the request in flight, if any. Kernel: ``IORING_OP_ASYNC_CANCEL``.

        Refs: none here (its result and notification release as usual)."""
        if self._ch.in_flight:
            self._lring.ring.cancel(self._ch)

    def feed_policy(self) -> None:
        """Tell the ``auto`` policy what the notifications said (copied or not). Kernel:
        none. Refs: none."""
        self.socket._feed_policy()

    # -- the ring's callbacks (in a reap) --------------------------------------------------
    def _result(self, _req: Any) -> None:
        if not self.pumping:
            self._lring.defer(self._on_result)

    def _released(self, _req: Any) -> None:
        """The ring released a request (its pin: destructors and write handles may have
        fired)."""
        if not self._release_due:
            self._release_due = True
            self._lring.defer(self._run_released)

    def _run_released(self) -> None:
        self._release_due = False
        self._on_released()

    # -- ZeroCopySocket's surface, as the transport reads it ----------------------------------
    @property
    def outstanding(self) -> int:
        """Requests the kernel holds: zero-copy ones not notified yet, and a copying one
        without its result."""
        ch = self._ch
        if ch.in_flight and not ch.last_request.zerocopy:
            return int(ch.outstanding) + 1
        return int(ch.outstanding)

    @property
    def pinned_bytes(self) -> int:
        return int(self._ch.pinned_bytes)

    def poll_completions(self, timeout: float | None = 0) -> int:
        """Reap the ring (never waits); how many of this socket's requests were
        notified. Refs: drops those of every request notified."""
        before = self._ch.completions
        self._lring.reap()
        return int(self._ch.completions - before)

    def close(self, timeout: float | None = 0) -> None:
        """Close the socket (the kernel holds nothing of it) and leave the ring. Kernel:
        ``close()``. Refs: none left to drop."""
        try:
            self.socket.close(timeout)
        finally:
            if self._attached:
                self._attached = False
                self._lring.detach()

    def forget(self) -> None:
        """The transport was never made: leave the ring (nothing was sent). Kernel: none.
        Refs: none."""
        if self._attached:
            self._attached = False
            self._lring.detach()

    @property
    def stats(self) -> ZeroCopyStats:
        """The counters so far (read as they are: reaping is the loop's): requests and
        the copying sends made at once, together."""
        ch = self._ch
        return ZeroCopyStats(
            sends=ch.sends + self.copied_sends,
            zerocopy_sends=ch.zerocopy_sends,
            completions=ch.completions,
            copied_completions=ch.copied_completions,
            enobufs_retries=self.enobufs_retries,
            bytes_sent=ch.bytes_sent + self.copied_bytes,
            peak_pinned_bytes=ch.peak_pinned_bytes,
            mode=self._policy.mode.value,
            current_mode=self._policy.current,
            enobufs_copies=self.enobufs_copies,
        )
