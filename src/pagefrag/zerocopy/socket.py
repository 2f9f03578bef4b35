"""ZeroCopySocket: zero-copy sends through Linux ``MSG_ZEROCOPY``, with destructors that
fire only when the kernel's completion notification says the pages are released.

This module only moves bytes; the references live in the core (:mod:`pagefrag._iov`:
each zero-copy call holds one :class:`~pagefrag._iov.Pin`), the bookkeeping in the
sans-I/O :class:`CompletionTracker` and :class:`ZeroCopyPolicy`, the reading of
completions in :mod:`._errqueue`. Kernel counterpart: the sender side of
``Documentation/networking/msg_zerocopy.rst`` (``SO_ZEROCOPY``, ``MSG_ZEROCOPY``, completions
on ``MSG_ERRQUEUE``).

Theory of operation. Before a zero-copy send call, the socket pins its bytes
(:meth:`IoVec.pin <pagefrag._iov.IoVec.pin>`): one reference on the destructor of every
piece it hands the kernel (a frag's destructor, and the call's own ``destructor=``
argument) and a memoryview of each piece, so Python can neither free nor resize the
memory. The system call and the
filing of the pin under the call's id are one C-level expression::

    filings.extend(zip(map(sock.send, pin.views, (flags,)), ids, (pin,)))

``map`` calls ``send``, ``zip`` draws the next id and ``deque.extend`` appends, all in C:
no bytecode runs between the kernel's return and the record, so no signal handler
(``KeyboardInterrupt``) can run there — CPython runs them only between bytecodes. If
``send`` raises, nothing was accepted and no id was drawn. (No ``strict=`` on these
``zip`` calls: a keyword argument costs ~300 ns per call.) After a partial stream send the
references of the pieces past the bytes taken are dropped. When the error queue reports
the id, the pin is released: views dropped, references dropped — and a destructor whose
last reference that was fires. A send that is copied (small, ``never``, ``auto`` after the
kernel kept copying or refused with ``ENOBUFS``, or an iovec with memory lent only for
the call: :attr:`IoVec.lent <pagefrag._iov.IoVec.lent>`) takes no references at all.

Threads. Any number of threads may send and read completions on one socket at once.
Each send call (``send``, ``send_iov``) is atomic with its id's filing, and a ``sendall``
holds the send lock for all its calls, so concurrent ``sendall`` calls do not interleave
their bytes (concurrent ``send`` calls on a stream may: a stream has one order). A
sender blocked in the kernel blocks other senders, not the readers of completions: one
thread may loop in ``poll_completions`` while others send. Destructors run in whichever
thread reads their completion, never under the completion lock; in a sending thread,
under its send lock: a destructor must not wait for another thread that sends on this
socket (it would wait for the lock its own thread holds). ``close``/``abort`` wait for a
send in progress (within their timeout). After ``fork()`` the child's copy is inert
(``ForkedSocketError``; ``close()`` only closes the child's descriptor).

Two locks: the *send lock* (re-entrant) makes each send call — policy decision,
system call, filing — one critical section, and ``sendall`` holds it for all its calls, so
the bytes of concurrent ``sendall`` calls never interleave. The *completion lock* covers
reading the error queue and the tracker's bookkeeping; it is never held while a sender
waits in the kernel, nor while a destructor runs. A sending thread that reads
completions (every ``completion_batch`` sends, on ENOBUFS, while ``sendall`` waits) runs
their destructors with the send lock still held. A completion read by one thread before
the sender thread filed its pin is remembered by the tracker and applied at the filing.
"""

from __future__ import annotations

import errno
import math
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from .._buffers import as_timeout
from .._destructor import FragDestructor
from .._iov import Data, IoVec, Pin, check_destructor
from ..errors import (
    CompletionTimeoutError,
    ForkedSocketError,
    ZeroCopyUnsupportedError,
)
from ._deadline import acquire_within, deadline_after
from ._errqueue import ErrorQueue, queued_error
from ._items import batch_destructors, datagram_iovecs, stream_iovec
from ._sender import MMSG_MAX, Sender, ZeroCopyStats, count_sent
from ._syscalls import (
    MSG_DONTWAIT,
    check_connected_inet,
    disconnect,
    enable_recverr,
    enable_zerocopy,
)
from ._wrapper import SocketWrapper
from .destinations import start_policy
from .policy import DEFAULT_MIN_ZEROCOPY_SIZE, Mode, ZeroCopyPolicy
from .tracker import CompletionTracker, ErrQueueMessage

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "DEFAULT_MIN_ZEROCOPY_SIZE", "ZeroCopySocket", "ZeroCopyStats"]

DEFAULT_CLOSE_TIMEOUT = 30.0
"""How long ``close()`` waits for the kernel's completions unless told otherwise: TCP
itself may take ~15 minutes to give up on a dead peer."""

# Pins of sockets that were garbage-collected while the kernel still held their pages.
# Keeping them forever is a leak, but freeing them could let Python reuse memory the
# kernel may still transmit.
_IMMORTAL_PINS: list[object] = []


class ZeroCopySocket(SocketWrapper):
    """A connected TCP or UDP socket (IPv4 or IPv6, blocking or not) whose sends hand
    their pages to the kernel with ``MSG_ZEROCOPY`` and release them only on the kernel's
    completion.

    ``zerocopy``: ``"auto"`` (zero-copy for sends of at least ``min_zerocopy_size`` while
    the kernel really does it; a call refused with ENOBUFS is sent copied at once),
    ``"always"`` (ENOBUFS: wait up to ``enobufs_timeout`` for completions, then
    :class:`SendBufferError`) or ``"never"``. ``close_timeout``: how long :meth:`close`
    waits for completions by default (None: no bound).

    Threads and fork: see the module docstring (any number of threads may send and read
    completions at once; a forked child's copy is inert).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        zerocopy: str = "auto",
        min_zerocopy_size: int = DEFAULT_MIN_ZEROCOPY_SIZE,
        enobufs_timeout: float = 30.0,
        completion_batch: int = 32,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if not isinstance(sock, socket.socket):
            raise TypeError(f"ZeroCopySocket wraps a socket.socket, not {type(sock).__name__}")
        if enobufs_timeout is None:
            raise TypeError("enobufs_timeout must be a number, not NoneType")
        enobufs_seconds = as_timeout(enobufs_timeout, "enobufs_timeout")
        self._close_timeout = as_timeout(close_timeout, "close_timeout")
        check_connected_inet(sock)
        self._sock = sock
        self._stream = sock.type == socket.SOCK_STREAM
        self._policy = ZeroCopyPolicy(zerocopy, min_zerocopy_size)
        if self._policy.mode is Mode.AUTO:
            # Once, at set-up: a destination known to copy (local, or learned by an
            # earlier socket) starts copying; state changes teach the shared cache.
            start_policy(self._policy, sock, time.monotonic())
        self._tracker: CompletionTracker[Pin] = CompletionTracker()
        # The error queue holds the pins: every reference is taken in its name.
        self._eq = ErrorQueue(sock, self._tracker, self._policy)
        self._tx = Sender(
            sock,
            self._policy,
            self._eq,
            enobufs_timeout=math.inf if enobufs_seconds is None else enobufs_seconds,
            batch=max(1, completion_batch),
            lock=threading.RLock(),
        )
        self._closed = self._forked = False
        if self._policy.mode is not Mode.NEVER:
            try:
                enable_zerocopy(sock)
            except ZeroCopyUnsupportedError:
                if self._policy.mode is Mode.ALWAYS:
                    raise
                self._policy.mode = Mode.NEVER
        if not self._stream:
            # ICMP errors arrive on the error queue, in order with the completions.
            enable_recverr(sock)
        self._watch_fork()

    # -- sending -------------------------------------------------------------------------
    def send(self, data: Data, *, destructor: FragDestructor | None = None) -> int:
        """Send once and return how many bytes the kernel took, like ``socket.send``:
        for a stream the caller trims and sends the rest; a datagram socket sends one
        datagram. ``data``: an :class:`SkBuff`, a buffer, or a sequence of buffers (one
        ``sendmsg`` with an iovec; a stream sends at most ``IOV_MAX`` pieces per call).
        ``destructor``, if given, is held until the kernel has released every page of
        this call. Kernel: ``sendmsg(MSG_ZEROCOPY)``.

        Refs: a zero-copy call takes one per piece sent (frag destructors, ``destructor``)
        and drops them on its completion; a copied call takes none."""
        if destructor is not None and type(destructor) is not FragDestructor:
            check_destructor(destructor)
        # The hot path: one plain buffer the policy sends without asking, in C with the
        # compiled core; -1 means anything else (or a refusal, raised below).
        n: int = self._tx.send(data, destructor)
        if n < 0:
            with self._send_lock:
                if self._blocked or self._eq.errors:
                    self._refuse()
                n = self._tx.call(IoVec.of(data), destructor, 0, None)
        return n

    def send_copied(self, data: bytes | bytearray) -> int:
        """One copying send of one flat buffer, whatever the mode: the kernel has copied
        what it took when this returns. Unlike :meth:`send` it reads no completions (an
        event loop reads them when the socket reports ``EPOLLERR``), so no destructor
        runs inside it. Returns the bytes taken, as ``socket.send``. Kernel: ``send``.

        Refs: none."""
        n: int = self._tx.send_copied(data)
        while n < 0:  # closed, forked, or a socket error queued: raise it
            self._refuse()
            n = self._tx.send_copied(data)
        return n

    def sendall(
        self, data: Data, *, destructor: FragDestructor | None = None, timeout: float | None = None
    ) -> None:
        """Send every byte, as ``socket.sendall``; ``TimeoutError`` after ``timeout``
        seconds (what was sent stays sent and pinned until its completion). Holds the
        send lock throughout: another thread's bytes never land in the middle. Kernel:
        ``sendmsg(MSG_ZEROCOPY)`` until every byte is taken.

        Refs: as :meth:`send`, for each call it makes."""
        check_destructor(destructor)
        self._sendall(IoVec.of(data), destructor, deadline_after(timeout))

    def send_many(
        self,
        items: Sequence[Data],
        *,
        destructors: Sequence[FragDestructor | None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send every item in as few system calls as the kernel allows, and return how
        many items were sent (all of them). A datagram socket sends each item as its own
        datagram, up to 1024 per ``sendmmsg`` (the pure-Python core: one ``sendmsg``
        each); a stream sends all the items' bytes in order, as one iovec (``IOV_MAX``
        pieces per ``sendmsg``), with ``sendall``'s guarantees (no other thread's bytes
        in between; ``TimeoutError`` after ``timeout``, what was sent stays sent).
        ``destructors[i]``, if given, is held until the kernel has released every page of
        ``items[i]``; on a stream that item must be plain memory (a Frag, SkBuff or
        PoolBuffer brings destructors of its own: ``ValueError``). Bad input raises
        before anything is sent. An error (or an interrupt) raised midway carries
        ``items_sent``: the items before it were sent. As with ``sendmmsg``, a datagram
        refused after others in its batch is tried again as the first of the next batch,
        and its error raised only if it fails then too. Kernel:
        ``sendmmsg``/``sendmsg`` with ``MSG_ZEROCOPY``.

        Refs: as :meth:`send`, for each datagram or call."""
        items, ds = batch_destructors(items, destructors)
        deadline = deadline_after(timeout)
        if not self._stream and self._tx.flat_copies(items):
            # The hot path: plain buffers the policy copies (destructors are not held for
            # copies: the kernel copied the bytes before the call returned).
            return self._send_batches(items, ds, deadline, flat=True)
        if self._stream:
            self._sendall(stream_iovec(items, ds), None, deadline)
            return len(items)
        return self._send_batches(datagram_iovecs(items), ds, deadline, flat=False)

    def _send_batches(
        self,
        items: list[Any],
        ds: list[FragDestructor | None],
        deadline: float | None,
        *,
        flat: bool,
    ) -> int:
        """Datagrams in batches under the send lock, until all are sent: ``items`` are
        plain buffers to copy (``flat``) or iovecs. Returns how many."""
        flags = MSG_DONTWAIT if deadline is not None else 0
        tx = self._tx
        done = 0
        with self._send_lock:
            try:
                while done < len(items):
                    if self._blocked or self._eq.errors:
                        self._refuse()
                    try:
                        if flat:
                            done += tx.copied_flat(items, done, flags)
                            tx.after_send()
                        else:
                            end = done + MMSG_MAX
                            done += tx.call_many(items[done:end], ds[done:end], flags, deadline)
                    except BlockingIOError:
                        self._eq.wait_writable(deadline)
            except BaseException as exc:
                count_sent(exc, done)  # the caller learns what to send again
                raise
        return done

    def _sendall(
        self, iov: IoVec, destructor: FragDestructor | None, deadline: float | None
    ) -> None:
        """Send every byte of ``iov`` under the send lock (a datagram: one call)."""
        # With a deadline, never block inside the kernel: wait in poll() instead.
        flags = MSG_DONTWAIT if deadline is not None else 0
        with self._send_lock:
            while iov.views:
                if self._blocked or self._eq.errors:
                    self._refuse()
                try:
                    n = self._tx.call(iov, destructor, flags, deadline)
                except BlockingIOError:
                    self._eq.wait_writable(deadline)
                    continue
                if not self._stream:
                    return
                iov.advance(n)

    def send_iov(
        self,
        iov: IoVec,
        destructor: FragDestructor | None = None,
        flags: int = 0,
        deadline: float | None = None,
    ) -> int:
        """One send call of ``iov`` (at most ``IOV_MAX`` pieces of a stream; a datagram
        of more raises ``ValueError``), ``destructor`` held for the whole call; returns the
        bytes taken. ``deadline`` bounds ENOBUFS retries (``always``); with
        ``enobufs_timeout=0`` ``auto`` copies at once, ``always`` raises
        :class:`SendBufferError` with nothing sent or kept. An ``iov`` with a lent piece
        (:attr:`IoVec.lent <pagefrag._iov.IoVec.lent>`) is sent copied whatever the mode.
        Kernel: ``sendmsg``.

        Refs: as :meth:`send`. ``iov`` is not kept: the caller advances it after."""
        if type(iov) is not IoVec:
            raise TypeError(f"send_iov takes an IoVec, not {type(iov).__name__}")
        if destructor is not None and type(destructor) is not FragDestructor:
            check_destructor(destructor)
        with self._send_lock:
            if self._blocked or self._eq.errors:
                self._refuse()
            return self._tx.call(iov, destructor, flags, deadline)

    # -- completions ---------------------------------------------------------------------
    def poll_completions(self, timeout: float | None = 0) -> int:
        """Read the error queue; return how many send calls completed. With a timeout,
        wait up to it for the first completion when none is ready. Any thread may call
        it while others send. Kernel: ``recvmsg(MSG_ERRQUEUE)``.

        Refs: drops the references of every call completed (destructors may fire here)."""
        self._check_usable()
        return self._eq.poll(timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every zero-copy send has completed. Raises
        :class:`CompletionTimeoutError` (pins kept, nothing fired) when it runs out.

        Refs: drops the references of every call completed."""
        self._check_usable()
        self._eq.flush(deadline_after(timeout))
        self._eq.raise_queued()

    # -- closing -------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Flush, then close: no notification is ever delivered after ``close()``.
        ``timeout`` defaults to the socket's ``close_timeout``; when it runs out,
        :class:`CompletionTimeoutError` is raised and the socket stays open with its pins
        alive (a later ``flush``/``abort``/``close`` can finish). If the connection failed
        while sends were in flight (TCP gave up: ``ETIMEDOUT``; a reset), the socket is
        closed and the error raised (:class:`QueuedSocketError`): their data may never
        have been delivered. In a forked child, only closes the child's descriptor.
        Kernel: ``close()``.

        Refs: drops the references of every call completed while flushing."""
        if self._closed:
            return
        if self._forked:
            self._close_descriptor()
            return
        error = self._shut(self._close_timeout if timeout is None else timeout, reset=False)
        if error is not None:
            raise queued_error(error)

    def abort(self, timeout: float | None = 10.0) -> None:
        """Disconnect abortively (TCP: RST, queues purged) while keeping the descriptor
        open, read the completions of everything purged, then close. Kernel:
        ``connect(AF_UNSPEC)`` (``tcp_disconnect``).

        Refs: drops the references of every call completed."""
        if self._closed:
            return
        self._check_usable()
        self._shut(timeout, reset=True)

    def _shut(self, timeout: float | None, *, reset: bool) -> ErrQueueMessage | None:
        """Close and abort: (reset,) take the send lock, flush, close. Returns the socket
        error that lost sends in flight (a connection that failed with sends in flight
        lost them: TCP purges what it never delivered; a datagram's errors are dropped)."""
        deadline = deadline_after(timeout)
        if reset:
            disconnect(self._sock)  # also wakes a sender blocked in the kernel
        held: list[bool] = []
        try:
            if not acquire_within(self._send_lock, deadline, held):
                raise CompletionTimeoutError(
                    "a send call is still in progress in another thread",
                    self._tracker.outstanding,
                    self._tracker.pinned_bytes,
                )
            if self._closed:
                return None
            had_sends = not reset and self._stream and self.outstanding > 0
            self._eq.flush(deadline)
            eq = self._eq
            lost = had_sends and (eq.errors or eq.take_socket_error())
            error = eq.errors.popleft() if lost else None
            self._close_descriptor()
            return error
        finally:
            if held and held[0]:
                self._send_lock.release()

    @property
    def _send_lock(self) -> threading.RLock:
        """The send lock (see the module docstring); the sender's, which takes it itself
        on the hot path."""
        lock: threading.RLock = self._tx.lock
        return lock

    @property
    def _blocked(self) -> bool:
        """Closed or forked: every send refuses."""
        return bool(self._tx.blocked)

    def _close_descriptor(self) -> None:
        self._closed = self._tx.blocked = True
        self._unwatch_fork()
        self._eq.close()
        self._sock.close()

    def _inherited(self) -> None:
        """In a forked child: this copy must never read the parent's error queue nor
        send on its socket; fresh locks (a parent thread may have held them)."""
        self._forked = self._tx.blocked = True
        self._tx.lock = threading.RLock()
        self._eq.after_fork()

    def _check_usable(self) -> None:
        if self._forked:
            raise ForkedSocketError(
                "this ZeroCopySocket belongs to the parent process; after fork() the "
                "child may only close() its copy"
            )
        if self._closed:
            raise OSError(errno.EBADF, "ZeroCopySocket is closed")

    def _refuse(self) -> None:
        self._check_usable()
        self._eq.raise_queued()

    def __del__(self) -> None:
        if not getattr(self, "_blocked", True) and self._tracker.has_pending:
            _keep_forever(self._tracker)

    # -- state ---------------------------------------------------------------------------
    def _counted(self) -> CompletionTracker[Pin]:
        # In a forked child nothing is taken in: that would run the parent's destructors.
        return self._tracker if self._forked else self._eq.absorb()

    @property
    def outstanding(self) -> int:
        """Zero-copy send calls the kernel has not released yet."""
        return self._counted().outstanding

    @property
    def pinned_bytes(self) -> int:
        return self._counted().pinned_bytes

    @property
    def stats(self) -> ZeroCopyStats:
        return self._tx.stats(self._counted())

    def _held(self) -> int:
        return self._tracker.outstanding


def _keep_forever(tracker: CompletionTracker[Pin]) -> None:
    """A socket collected while the kernel holds pages of its sends: keep their pins."""
    pins = tracker.pending_tokens()
    _IMMORTAL_PINS.extend(pins)
    warnings.warn(
        f"ZeroCopySocket collected with {len(pins)} sends still held by the kernel; "
        "their buffers are kept alive forever (close() or abort() first)",
        ResourceWarning,
        stacklevel=3,
    )
