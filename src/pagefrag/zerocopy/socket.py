"""ZeroCopySocket: zero-copy sends through Linux ``MSG_ZEROCOPY``, with destructors that
fire only when the kernel's completion notification says the pages are released.

This module only moves bytes and feeds the sans-I/O :class:`CompletionTracker`; the
reference rules live in the core. Kernel counterpart: the sender side of
``Documentation/networking/msg_zerocopy.rst`` (``SO_ZEROCOPY``, ``MSG_ZEROCOPY``, completions
on ``MSG_ERRQUEUE``).

Theory of operation. Before a zero-copy send call, the socket takes one reference on the
destructor of every piece it hands the kernel (a frag's destructor, and the call's own
``destructor=`` argument) and keeps a memoryview of each piece, so Python can neither free
nor resize the memory: together they form the call's *pin*. The system call and the
filing of the pin under the call's id are one C-level expression::

    filings.extend(zip(map(sock.send, views, (flags,)), ids, (pin,)))

``map`` calls ``send``, ``zip`` draws the next id and ``deque.extend`` appends, all in C:
no bytecode runs between the kernel's return and the record, so no signal handler
(``KeyboardInterrupt``) can run there — CPython runs them only between bytecodes. If
``send`` raises, nothing was accepted and no id was drawn. (No ``strict=`` on these
``zip`` calls: a keyword argument costs ~300 ns per call.) After a partial stream send the
references of the pieces past the bytes taken are dropped. When the error queue reports
the id, the pin is released: views dropped, references dropped — and a destructor whose
last reference that was fires. A send that is copied (small, ``never``, ``auto`` after the
kernel kept copying or refused with ``ENOBUFS``) takes no references at all.

Threads. Two locks: the *send lock* (re-entrant) makes each send call — policy decision,
system call, filing — one critical section, and ``sendall`` holds it for all its calls, so
the bytes of concurrent ``sendall`` calls never interleave. The *completion lock* covers
reading the error queue and the tracker's bookkeeping; it is never held while a sender
waits in the kernel, nor while a destructor runs. A sending thread that reads
completions (every ``completion_batch`` sends, on ENOBUFS, while ``sendall`` waits) runs
their destructors with the send lock still held. A completion read by one thread before
the sender thread filed its pin is remembered by the tracker and applied at the filing.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import math
import os
import select
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._buffers import byte_view
from .._destructor import FragDestructor
from .._skbuff import Frag, SkBuff
from ..errors import (
    CompletionTimeoutError,
    ForkedSocketError,
    QueuedSocketError,
    SendBufferError,
    ZeroCopyUnsupportedError,
)
from ..pool import PoolBuffer
from ._syscalls import (
    ERRQUEUE_ANCBUF,
    IP_RECVERR,
    IPV6_RECVERR,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    MSG_ZEROCOPY,
    RECVERR_CMSGS,
    SO_ZEROCOPY,
    SOL_IP,
    SOL_IPV6,
    disconnect,
)
from .policy import DEFAULT_MIN_ZEROCOPY_SIZE, Mode, ZeroCopyPolicy
from .tracker import CompletionTracker, ErrQueueMessage, ZeroCopyCompletion, parse_extended_err

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_MIN_ZEROCOPY_SIZE",
    "IOV_MAX",
    "ZeroCopySocket",
    "ZeroCopyStats",
    "advance",
    "pieces",
    "take_refs",
]


DEFAULT_CLOSE_TIMEOUT = 30.0
"""How long ``close()`` waits for the kernel's completions unless told otherwise: TCP
itself may take ~15 minutes to give up on a dead peer."""


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    return value if value > 0 else 1024


IOV_MAX = _iov_max()
"""The most pieces one ``sendmsg`` may carry (``UIO_MAXIOV``); more fail with EMSGSIZE."""

Data = SkBuff | Sequence[Any] | Any

# Pins of sockets that were garbage-collected while the kernel still held their pages.
# Keeping them forever is a leak, but freeing them could let Python reuse memory the
# kernel may still transmit.
_IMMORTAL_PINS: list[object] = []

# What one zero-copy send call holds until its completion: [views, references]. Both are
# replaced by None when the completion releases it (under the completion lock).
_Pin = list[Any]
_FLAT = (bytes, bytearray)
_NO_REFS: tuple[FragDestructor, ...] = ()
_NO_ANCDATA = ((),)
_ZC = (MSG_ZEROCOPY,)
# Arguments of the error-queue reads: map(recvmsg, ...) reads until EAGAIN, in C.
_RECV_ARGS = (
    itertools.repeat(0),
    itertools.repeat(ERRQUEUE_ANCBUF),
    itertools.repeat(MSG_ERRQUEUE | MSG_DONTWAIT),
)

# Every ZeroCopySocket not yet closed: a forked child makes its copies inert.
_LIVE: weakref.WeakSet[ZeroCopySocket] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for zs in list(_LIVE):
        zs._inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class ZeroCopyStats:
    """Counters of one :class:`ZeroCopySocket`."""

    sends: int
    zerocopy_sends: int
    completions: int
    copied_completions: int
    enobufs_retries: int
    bytes_sent: int
    peak_pinned_bytes: int
    mode: str
    current_mode: str
    enobufs_copies: int = 0
    """``auto`` calls refused with ENOBUFS (optmem or locked pages) and sent copied."""
    duplicates: int = 0
    """Completion ids that matched no outstanding call (a healthy socket: 0)."""


def advance(views: list[memoryview], owners: list[FragDestructor | None], n: int) -> None:
    """Drop the first ``n`` bytes of an iovec in place (after a partial stream send)."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
        owners.pop(0)
    if n:
        views[0] = views[0][n:]


def _check_destructor(d: object) -> None:
    if d is not None and not isinstance(d, FragDestructor):
        raise TypeError(f"destructor must be a FragDestructor or None, not {type(d).__name__}")


def take_refs(destructors: Iterable[FragDestructor | None], holder: object) -> list[FragDestructor]:
    """One reference on each destructor given (None skipped), all or nothing: if one
    fails (already destroyed, not a destructor), those taken are dropped again and the
    error raised."""
    refs: list[FragDestructor] = []
    try:
        for d in destructors:
            if d is not None:
                _check_destructor(d)
                d.ref(holder=holder)
                refs.append(d)
    except BaseException:
        for d in refs:
            d.unref(holder=holder)
        raise
    return refs


def pieces(data: Data) -> tuple[list[memoryview], list[FragDestructor | None]]:
    """The byte views a send hands the kernel, and the destructor of each: an
    :class:`SkBuff` (its head, then its frags), a :class:`Frag`, a :class:`PoolBuffer`
    (all of it), a buffer, or a list or tuple of frags, pool buffers and buffers."""
    if type(data) in _FLAT:
        return [memoryview(data)], [None]  # type: ignore[arg-type]  # bytes or bytearray
    if isinstance(data, SkBuff):
        views = data.iovecs()
        owners: list[FragDestructor | None] = [None] * (len(views) - data.nr_frags)
        owners.extend(f.destructor for f in data.frags)
        return views, owners
    items = data if isinstance(data, (list, tuple)) else (data,)
    views, owners = [], []
    for item in items:
        if isinstance(item, PoolBuffer):
            item = item.frag()
        if isinstance(item, Frag):
            views.append(item.view())
            owners.append(item.destructor)
        else:
            views.append(byte_view(item))
            owners.append(None)
    return views, owners


class ZeroCopySocket:
    """A connected TCP or UDP socket (IPv4 or IPv6, blocking or not) whose sends hand
    their pages to the kernel with ``MSG_ZEROCOPY`` and release them only on the kernel's
    completion.

    ``zerocopy``: ``"auto"`` (zero-copy for sends of at least ``min_zerocopy_size`` while
    the kernel really does it; a call refused with ENOBUFS is sent copied at once),
    ``"always"`` (ENOBUFS: wait up to ``enobufs_timeout`` for completions, then
    :class:`SendBufferError`) or ``"never"``. ``close_timeout``: how long :meth:`close`
    waits for completions by default (None: no bound).

    Threading model. Any number of threads may send and read completions on one socket
    at once. Each send call (``send``, ``send_iov``) is atomic with its id's filing, and a
    ``sendall`` holds the send lock for all its calls, so concurrent ``sendall`` calls do
    not interleave their bytes (concurrent ``send`` calls on a stream may: a stream has
    one order). A sender blocked in the kernel blocks other senders, not the readers of
    completions: one thread may loop in :meth:`poll_completions` while others send.
    Destructors run in whichever thread reads their completion, never under the
    completion lock; in a sending thread, under its send lock: a destructor must not wait
    for another thread that sends on this socket (it would wait for the lock its own
    thread holds). ``close``/``abort`` wait for a send in progress (within their timeout).
    After ``fork()`` the child's copy is inert (:class:`ForkedSocketError`; ``close()``
    only closes the child's descriptor).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        zerocopy: str = "auto",
        min_zerocopy_size: int = DEFAULT_MIN_ZEROCOPY_SIZE,
        enobufs_timeout: float = 30.0,
        completion_batch: int = 16,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if not isinstance(sock, socket.socket):
            raise TypeError(f"ZeroCopySocket wraps a socket.socket, not {type(sock).__name__}")
        for name, value in (("enobufs_timeout", enobufs_timeout), ("close_timeout", close_timeout)):
            if value is None and name == "close_timeout":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"ZeroCopySocket needs an IPv4 or IPv6 socket, not {sock.family!r}")
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise ValueError(f"ZeroCopySocket needs a TCP or UDP socket, not {sock.type!r}")
        sock.getpeername()  # raises OSError(ENOTCONN) for an unconnected socket
        self._sock = sock
        self._stream = sock.type == socket.SOCK_STREAM
        self._policy = ZeroCopyPolicy(zerocopy, min_zerocopy_size)
        self._tracker: CompletionTracker[_Pin] = CompletionTracker()
        self._enobufs_timeout = float(enobufs_timeout)
        self._close_timeout = None if close_timeout is None else float(close_timeout)
        self._batch = max(1, completion_batch)
        self._since_poll = 0
        self._errors: collections.deque[ErrQueueMessage] = collections.deque()
        self._closed = False
        self._forked = False
        self._blocked = False  # closed or forked: every send refuses
        self._copied_sends = self._copied_bytes = self._enobufs = self._enobufs_copies = 0
        self._send_lock = threading.RLock()
        self._lock = threading.Lock()  # the completion lock
        self._received: collections.deque[tuple[Any, ...]] = collections.deque()
        self._unrefs: collections.deque[FragDestructor] = collections.deque()
        self._errsock: socket.socket | None = None
        if self._policy.mode is not Mode.NEVER:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
            except OSError as exc:
                if self._policy.mode is Mode.ALWAYS:
                    raise ZeroCopyUnsupportedError(
                        exc.errno, f"SO_ZEROCOPY is not supported here: {exc.strerror}"
                    ) from exc
                self._policy.mode = Mode.NEVER
        if not self._stream:
            # Queue ICMP errors on the error queue, where they arrive in order with the
            # completions and surface as QueuedSocketError.
            with_v6 = sock.family == socket.AF_INET6
            sock.setsockopt(
                SOL_IPV6 if with_v6 else SOL_IP, IPV6_RECVERR if with_v6 else IP_RECVERR, 1
            )
        _LIVE.add(self)

    # -- sending -------------------------------------------------------------------------
    def send(self, data: Data, *, destructor: FragDestructor | None = None) -> int:
        """Send once and return how many bytes the kernel took, like ``socket.send``:
        for a stream the caller trims and sends the rest; a datagram socket sends one
        datagram. ``data``: an :class:`SkBuff`, a buffer, or a sequence of buffers (one
        ``sendmsg`` with an iovec; a stream sends at most :data:`IOV_MAX` pieces per call).
        ``destructor``, if given, is held until the kernel has released every page of
        this call. Kernel: ``sendmsg(MSG_ZEROCOPY)``.

        Refs: a zero-copy call takes one per piece sent (frag destructors, ``destructor``)
        and drops them on its completion; a copied call takes none."""
        if destructor is not None and type(destructor) is not FragDestructor:
            _check_destructor(destructor)
        if type(data) in _FLAT:
            # The hot paths: one plain buffer.
            nbytes = len(data)
            policy = self._policy
            if nbytes < policy.copy_below:  # copied: holds nothing, not even `destructor`
                with self._send_lock:
                    if self._blocked or self._errors:
                        self._refuse()
                    n: int = self._sock.send(data)  # type: ignore[arg-type]  # bytes or bytearray
                    self._copied_sends += 1
                    self._copied_bytes += n
                    self._since_poll += 1
                    if self._since_poll >= self._batch:
                        self._poll_after_send()
                return n
            if destructor is None and nbytes >= policy.zerocopy_from and nbytes:
                pin: _Pin = [[memoryview(data)], _NO_REFS]  # type: ignore[arg-type]
                tracker = self._tracker
                filings = tracker.filings
                with self._send_lock:
                    if self._blocked or self._errors:
                        self._refuse()
                    try:  # _file, inlined: the system call and the filing in one C step
                        sent = map(self._sock.send, pin[0], _ZC)
                        filings.extend(zip(sent, tracker.ids, (pin,)))  # noqa: B905
                        n = filings[-1][0]
                    except OSError as exc:
                        if not self._enobufs_after_failure(exc):
                            raise
                        n = self._after_enobufs(pin, 0, None)
                    self._since_poll += 1
                    if self._since_poll >= self._batch:
                        self._poll_after_send()
                    if tracker.early:
                        self._absorb_early()
                return n
        views, owners = pieces(data)
        with self._send_lock:
            return self._send(views, owners, destructor, 0, None)

    def sendall(
        self, data: Data, *, destructor: FragDestructor | None = None, timeout: float | None = None
    ) -> None:
        """Send every byte, as ``socket.sendall``; ``TimeoutError`` after ``timeout``
        seconds (what was sent stays sent and pinned until its completion). Holds the
        send lock throughout: another thread's bytes never land in the middle. Kernel:
        ``sendmsg(MSG_ZEROCOPY)`` until every byte is taken.

        Refs: as :meth:`send`, for each call it makes."""
        _check_destructor(destructor)
        views, owners = pieces(data)
        deadline = _deadline(timeout)
        # With a deadline, never block inside the kernel: wait in poll() instead.
        flags = MSG_DONTWAIT if deadline is not None else 0
        with self._send_lock:
            while views:
                try:
                    n = self._send(views, owners, destructor, flags, deadline)
                except BlockingIOError:
                    self._wait_writable(deadline)
                    continue
                if not self._stream:
                    return
                advance(views, owners, n)

    def send_iov(
        self,
        views: list[memoryview],
        owners: list[FragDestructor | None],
        destructor: FragDestructor | None = None,
        flags: int = 0,
        deadline: float | None = None,
    ) -> int:
        """The one send call under :meth:`send` and :meth:`sendall`: ``views`` as one
        iovec, ``owners[i]`` the destructor of ``views[i]`` (or None), ``destructor`` held
        for the whole call. ``deadline`` bounds ENOBUFS retries (``always``); with
        ``enobufs_timeout=0`` an ENOBUFS never waits: ``auto`` copies the call,
        ``always`` raises :class:`SendBufferError` with nothing sent and no reference kept.
        A stream sends at most :data:`IOV_MAX` pieces (the count returned says how far it
        got); a datagram of more pieces raises ``ValueError``. Returns bytes taken.
        Kernel: ``sendmsg(MSG_ZEROCOPY)``.

        Refs: as :meth:`send`. The lists are not kept: the caller may trim them after."""
        _check_destructor(destructor)
        with self._send_lock:
            return self._send(views, owners, destructor, flags, deadline)

    def _send(
        self,
        views: list[memoryview],
        owners: list[FragDestructor | None],
        destructor: FragDestructor | None,
        flags: int,
        deadline: float | None,
    ) -> int:
        """One send call; the send lock is held."""
        if self._blocked or self._errors:
            self._refuse()
        if len(views) > IOV_MAX:
            if not self._stream:
                raise ValueError(
                    f"a datagram of {len(views)} pieces: one sendmsg takes at most {IOV_MAX}"
                )
            views, owners = views[:IOV_MAX], owners[:IOV_MAX]
        nbytes = len(views[0]) if len(views) == 1 else sum(map(len, views))
        if not nbytes or not self._policy.use_zerocopy(nbytes):
            # Copied: no reference taken (owners are checked where one is).
            n: int = self._send_copied(views, flags)
            self._since_poll += 1
            if self._since_poll >= self._batch:
                self._poll_after_send()
            return n
        pin: _Pin = [views[:], _NO_REFS]  # a copy: callers go on to trim theirs
        filings = self._tracker.filings
        try:
            if destructor is not None or any(owners):
                # Taken before the kernel sees the pages, so none can fire while it reads
                # them; each is in the pin's list as soon as it is taken.
                refs: list[FragDestructor] = []
                pin[1] = refs
                for d in owners:
                    if d is not None:
                        if type(d) is not FragDestructor:
                            _check_destructor(d)
                        d.ref(holder=self)
                        refs.append(d)
                if destructor is not None:
                    destructor.ref(holder=self)
                    refs.append(destructor)
            n = self._zerocopy_call(pin, flags, deadline)
        except BaseException:
            # Nothing may be dropped that the kernel holds: only if the pin was not filed.
            if not (filings and filings[-1][2] is pin):
                self._drop(pin)
            raise
        if not (filings and filings[-1][2] is pin):
            self._drop(pin)  # sent copied after ENOBUFS (auto): nothing is pinned
        elif n < nbytes and pin[1]:
            self._trim(pin, owners, destructor, n)
        self._since_poll += 1
        if self._since_poll >= self._batch:
            self._poll_after_send()
        if self._tracker.early:
            self._absorb_early()
        return n

    def _file(self, pin: _Pin, flags: int) -> int:
        """The zero-copy system call and the filing of its pin, in one C-level step (see
        the module docstring). Returns the bytes the kernel took."""
        views = pin[0]
        filings = self._tracker.filings
        if len(views) == 1:
            sent = map(self._sock.send, views, (flags,))
            filings.extend(zip(sent, self._tracker.ids, (pin,)))  # noqa: B905
        else:
            sent = map(self._sock.sendmsg, (views,), _NO_ANCDATA, (flags,))
            filings.extend(zip(sent, self._tracker.ids, (pin,)))  # noqa: B905
        n: int = filings[-1][0]  # the last filing stays put while we hold the send lock
        return n

    def _zerocopy_call(self, pin: _Pin, flags: int, deadline: float | None) -> int:
        """One ``sendmsg(MSG_ZEROCOPY)`` of the pin's views, filed; a failure is settled
        (did it use an id?), and ENOBUFS copied (``auto``) or retried (``always``).
        The send lock is held."""
        try:
            return self._file(pin, flags | MSG_ZEROCOPY)
        except OSError as exc:
            if not self._enobufs_after_failure(exc):
                raise  # (a bare raise: no frame keeps the pin's views alive through exc)
        return self._after_enobufs(pin, flags, deadline)

    def _enobufs_after_failure(self, exc: OSError) -> bool:
        """A zero-copy call raised ``exc``: settle its id; True if it was ENOBUFS."""
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            return False  # refused before any notification was allocated: no id used
        self._settle_failed_send()
        return exc.errno == errno.ENOBUFS

    def _after_enobufs(self, pin: _Pin, flags: int, deadline: float | None) -> int:
        """ENOBUFS: copied at once (``auto``) or retried (``always``)."""
        zflags = flags | MSG_ZEROCOPY
        if self._policy.mode is Mode.AUTO:
            # Locked pages or optmem exhausted: copying needs neither, and waiting would
            # stall the caller for completions that may be slow to come.
            self._enobufs_copies += 1
            return self._send_copied(pin[0], flags)
        return self._retry_after_enobufs(pin, zflags, deadline)

    def _send_copied(self, views: list[memoryview], flags: int) -> int:
        """One plain (copying) ``send``/``sendmsg`` of ``views``; takes no reference."""
        sock = self._sock
        n: int = sock.send(views[0], flags) if len(views) == 1 else sock.sendmsg(views, (), flags)
        self._copied_sends += 1
        self._copied_bytes += n
        return n

    def _retry_after_enobufs(self, pin: _Pin, zflags: int, deadline: float | None) -> int:
        """ENOBUFS in ``always``: process completions, wait for more, retry — until the
        deadline. Never spins: it sleeps in poll() for POLLERR."""
        limit: float | None = None
        while True:
            self._enobufs += 1
            if not self._drain():
                if limit is None:
                    limit = time.monotonic() + self._enobufs_timeout
                    if deadline is not None:
                        limit = min(limit, deadline)
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    raise SendBufferError(
                        errno.ENOBUFS,
                        f"ENOBUFS for {self._enobufs_timeout:g}s with {self.outstanding} sends "
                        "outstanding (net.core.optmem_max or RLIMIT_MEMLOCK too small)",
                    )
                self._wait_error_queue(min(remaining, 0.05))
            try:
                return self._file(pin, zflags)
            except (BlockingIOError, InterruptedError):
                raise
            except OSError as exc:
                self._settle_failed_send()
                if exc.errno != errno.ENOBUFS:
                    raise

    def _drop(self, pin: _Pin) -> None:
        """Drop the references of a pin the kernel never took."""
        refs, pin[1] = pin[1], None
        for d in refs or ():
            d.unref(holder=self)

    def _trim(
        self,
        pin: _Pin,
        owners: list[FragDestructor | None],
        destructor: FragDestructor | None,
        n: int,
    ) -> None:
        """After a partial send of ``n`` bytes, keep in the filed pin only the views and
        references of the pieces the kernel took; drop the others' references now."""
        dropped: list[FragDestructor] = []
        with self._lock:
            if pin[1] is None:
                return  # its completion came first and released every reference
            refs = iter(pin[1])
            kept_views: list[memoryview] = []
            kept_refs: list[FragDestructor] = []
            pos = 0
            for view, owner in zip(pin[0], owners, strict=True):
                covered = pos < n
                if covered:
                    kept_views.append(view if pos + len(view) <= n else view[: n - pos])
                if owner is not None:
                    (kept_refs if covered else dropped).append(next(refs))
                pos += len(view)
            if destructor is not None:
                kept_refs.append(next(refs))  # n > 0: the call's own reference stays
            pin[0], pin[1] = kept_views, kept_refs
        for d in dropped:
            d.unref(holder=self)

    def _absorb_early(self) -> None:
        """A completion was read (by another thread) before its pin was filed."""
        with self._lock:
            self._release(self._tracker.absorb())
        self._run_unrefs()

    def _poll_after_send(self) -> None:
        self._since_poll = 0
        if self._tracker.outstanding:
            self._drain(blocking=False)  # another thread is reading them: fine

    def _settle_failed_send(self) -> None:
        """Did the failed call use an id? Its notification, if any, is already queued
        (the kernel dropped the datagram inside the call): read the queue and see.
        The send lock is held, so no other call can take the id meanwhile."""
        tracker = self._tracker
        with self._lock:
            sid = tracker.failed_send()
            try:
                self._drain_locked()
            finally:
                tracker.settle_failed(sid)
                self._release(tracker.absorb())
        self._run_unrefs()

    # -- completions ---------------------------------------------------------------------
    def poll_completions(self, timeout: float | None = 0) -> int:
        """Read the error queue; return how many send calls completed. With a timeout,
        wait up to it for the first completion when none is ready. Any thread may call
        it while others send. Kernel: ``recvmsg(MSG_ERRQUEUE)``.

        Refs: drops the references of every call completed (destructors may fire here)."""
        self._check_usable()
        n = self._drain()
        if not n and timeout != 0 and self._tracker.outstanding:
            deadline = _deadline(timeout)
            while not n and self._tracker.outstanding:
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    break
                self._wait_error_queue(remaining)
                n = self._drain()
        self._raise_queued_error()
        return n

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every zero-copy send has completed. Raises
        :class:`CompletionTimeoutError` (pins kept, nothing fired) when it runs out.

        Refs: drops the references of every call completed."""
        self._check_usable()
        self._flush(_deadline(timeout))
        self._raise_queued_error()

    def _flush(self, deadline: float | None) -> None:
        while True:
            self._drain()
            if not self._tracker.outstanding:
                return
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise CompletionTimeoutError(
                    f"the kernel still holds {self._tracker.outstanding} sends "
                    f"({self._tracker.pinned_bytes} bytes); their buffers stay pinned",
                    self._tracker.outstanding,
                    self._tracker.pinned_bytes,
                )
            self._wait_error_queue(remaining)

    def _drain(self, blocking: bool = True) -> int:
        """Read the error queue and release what completed; returns how many calls."""
        lock = self._lock
        if not blocking and lock.locked():
            return 0  # another thread is reading the queue right now
        # "with", not acquire() then try: an interrupt landing between the two would
        # leave the lock held for good (every later flush/close would hang).
        with lock:
            n = self._drain_locked()
        self._run_unrefs()
        return n

    def _drain_locked(self) -> int:
        """The completion lock is held. Messages are appended to ``_received`` by C code
        as they are read, and each is removed only after it was processed: an interrupt
        cannot lose a completion (processing one twice is harmless: the tracker counts
        the second as a duplicate)."""
        tracker = self._tracker
        released = self._release(tracker.absorb())
        received = self._received
        sock = self._sock
        # A socket with a timeout would wait for *data* before an error-queue read:
        # read through a twin descriptor without one (changing the timeout of the
        # shared socket would disturb a concurrent sender).
        reader = sock if not sock.gettimeout() else self._timeoutless()
        with contextlib.suppress(BlockingIOError, InterruptedError):  # until it is empty
            received.extend(map(reader.recvmsg, *_RECV_ARGS))
        while received:
            for level, kind, payload in received[0][1]:
                if (level, kind) in RECVERR_CMSGS:
                    released += self._on_message(parse_extended_err(payload))
            received.popleft()
        return released + self._release(tracker.absorb())

    def _timeoutless(self) -> socket.socket:
        if self._errsock is None:
            twin = socket.socket(fileno=os.dup(self._sock.fileno()))
            # The original has a timeout, so its description is O_NONBLOCK already:
            # a timeout of 0 on the twin keeps it so and makes Python call at once.
            twin.settimeout(0.0)
            self._errsock = twin
        return self._errsock

    def _on_message(self, msg: ZeroCopyCompletion | ErrQueueMessage) -> int:
        if isinstance(msg, ErrQueueMessage):
            self._errors.append(msg)
            return 0
        pins = self._tracker.complete(msg.lo, msg.hi, msg.copied)
        self._policy.on_completion(msg.copied, len(pins), time.monotonic())
        return self._release(pins)

    def _release(self, pins: list[_Pin]) -> int:
        """Completed pins: move their references to the unref queue (completion lock
        held); the destructors run after the lock is dropped."""
        for pin in pins:
            refs, pin[1] = pin[1], None
            pin[0] = None
            if refs:
                self._unrefs.extend(refs)
        return len(pins)

    def _run_unrefs(self) -> None:
        unrefs = self._unrefs
        while unrefs:
            try:
                d = unrefs.popleft()
            except IndexError:  # another thread took the last one
                return
            d.unref(holder=self)

    def _wait_error_queue(self, timeout: float | None) -> None:
        """Sleep until the error queue has something (POLLERR), at most ``timeout``."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000) + 1)
        poller = select.poll()  # one per wait: a poll object refuses concurrent use
        poller.register(self._sock.fileno(), 0)  # POLLERR/POLLHUP are always reported
        events = poller.poll(ms)
        if events and not events[0][1] & select.POLLERR:
            # POLLHUP without POLLERR (a closed connection) would wake us at once,
            # forever: sleep a little instead of spinning.
            time.sleep(min(0.01, timeout if timeout is not None else 0.01))
        elif events and not self._errors:
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:  # a pending socket error (sk_err) also raises POLLERR; consume it
                self._errors.append(ErrQueueMessage(err, 0, 0, 0, 0, 0))

    def _wait_writable(self, deadline: float | None) -> None:
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"sendall did not finish in time ({self.outstanding} pinned)")
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLOUT)
        ms = -1 if remaining is None else int(remaining * 1000) + 1
        if any(ev & select.POLLERR for _, ev in p.poll(ms)):
            self._drain()
            self._raise_queued_error()

    def _raise_queued_error(self) -> None:
        if self._errors:
            try:
                msg = self._errors.popleft()
            except IndexError:  # another thread raised it
                return
            raise _queued_error(msg)

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
        if timeout is None:
            timeout = self._close_timeout
        deadline = _deadline(timeout)
        held: list[bool] = []
        try:
            self._acquire_send_lock(held, deadline)
            if self._closed:
                return
            # A connection that failed with sends in flight lost them (TCP purges what
            # it never delivered). A datagram socket's errors are per datagram: dropped.
            had_sends = self._stream and self.outstanding > 0
            self._flush(deadline)
            error: ErrQueueMessage | None = None
            if had_sends:
                if self._errors:  # a stream's are pending socket errors (sk_err)
                    error = self._errors.popleft()
                else:
                    err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        error = ErrQueueMessage(err, 0, 0, 0, 0, 0)
            self._close()
        finally:
            if held and held[0]:
                self._send_lock.release()
        if error is not None:
            raise _queued_error(error)

    def abort(self, timeout: float | None = 10.0) -> None:
        """Disconnect abortively (TCP: RST, queues purged) while keeping the descriptor
        open, read the completions of everything purged, then close. Kernel:
        ``connect(AF_UNSPEC)`` (``tcp_disconnect``).

        Refs: drops the references of every call completed."""
        if self._closed:
            return
        self._check_usable()
        deadline = _deadline(timeout)
        try:
            disconnect(self._sock)  # also wakes a sender blocked in the kernel
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EINVAL):
                raise
        held: list[bool] = []
        try:
            self._acquire_send_lock(held, deadline)
            if self._closed:
                return
            self._flush(deadline)
            self._close()
        finally:
            if held and held[0]:
                self._send_lock.release()

    def _acquire_send_lock(self, held: list[bool], deadline: float | None) -> None:
        """Acquire the send lock within the deadline and record it in ``held`` in the same
        C-level step (``list.extend(map(...))``), so that the caller's ``finally`` knows
        to release it even when an interrupt lands right after the acquisition."""
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        held.extend(map(self._send_lock.acquire, (True,), (wait,)))
        if not held[0]:
            raise CompletionTimeoutError(
                "a send call is still in progress in another thread",
                self._tracker.outstanding,
                self._tracker.pinned_bytes,
            )

    def _close(self) -> None:
        self._errors.clear()
        self._close_descriptor()

    def _close_descriptor(self) -> None:
        self._closed = self._blocked = True
        _LIVE.discard(self)
        if self._errsock is not None:
            self._errsock.close()
        self._sock.close()

    def _inherited(self) -> None:
        """In a forked child: this copy must never read the parent's error queue nor
        send on its socket; fresh locks (a parent thread may have held them)."""
        self._forked = self._blocked = True
        self._send_lock = threading.RLock()
        self._lock = threading.Lock()

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
        self._raise_queued_error()

    def __enter__(self) -> ZeroCopySocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_blocked", True) or not self._tracker.outstanding:
            return
        pins = self._tracker.pending_tokens()
        _IMMORTAL_PINS.extend(pins)
        warnings.warn(
            f"ZeroCopySocket collected with {len(pins)} sends still held by the kernel; "
            "their buffers are kept alive forever (close() or abort() first)",
            ResourceWarning,
            stacklevel=2,
        )

    # -- state ---------------------------------------------------------------------------
    def _absorbed(self) -> CompletionTracker[_Pin]:
        """The tracker with every filing taken in (for exact counts)."""
        with self._lock:
            self._release(self._tracker.absorb())
        self._run_unrefs()
        return self._tracker

    @property
    def outstanding(self) -> int:
        """Zero-copy send calls the kernel has not released yet."""
        return self._absorbed().outstanding

    @property
    def pinned_bytes(self) -> int:
        return self._absorbed().pinned_bytes

    @property
    def close_timeout(self) -> float | None:
        """How long :meth:`close` waits by default (None: no bound)."""
        return self._close_timeout

    @property
    def stats(self) -> ZeroCopyStats:
        t = self._absorbed()
        return ZeroCopyStats(
            sends=self._copied_sends + t.filed_calls,
            zerocopy_sends=t.filed_calls,
            completions=t.completions,
            copied_completions=t.copied_completions,
            enobufs_retries=self._enobufs,
            bytes_sent=self._copied_bytes + t.filed_bytes,
            peak_pinned_bytes=t.peak_pinned_bytes,
            mode=self._policy.mode.value,
            current_mode=self._policy.current,
            enobufs_copies=self._enobufs_copies,
            duplicates=t.duplicates,
        )

    @property
    def socket(self) -> socket.socket:
        """The wrapped socket (for reads and options; send through this wrapper)."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else "inherited by a child"
            if self._forked
            else f"outstanding={self._tracker.outstanding}"
        )
        return f"<ZeroCopySocket fd={self._sock.fileno()} {self._policy.mode.value} {state}>"


def _deadline(timeout: float | None) -> float | None:
    """The monotonic time at which ``timeout`` seconds run out (None: never)."""
    if timeout is None or math.isinf(timeout):
        return None
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline; may be negative)."""
    return None if deadline is None else deadline - time.monotonic()


def _queued_error(msg: ErrQueueMessage) -> QueuedSocketError:
    exc = QueuedSocketError(msg.errno, f"{os.strerror(msg.errno)} (from the error queue)")
    exc.report = msg
    return exc
