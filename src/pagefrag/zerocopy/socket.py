"""ZeroCopySocket: zero-copy sends through Linux ``MSG_ZEROCOPY``, with destructors that
fire only when the kernel's completion notification says the pages are released.

This module only moves bytes and feeds the sans-I/O :class:`CompletionTracker`; the
reference rules live in the core. Kernel counterpart: the sender side of
``Documentation/networking/msg_zerocopy.rst`` (``SO_ZEROCOPY``, ``MSG_ZEROCOPY``, completions
on ``MSG_ERRQUEUE``).

Theory of operation. Before a zero-copy send call, the socket takes one reference on the
destructor of every piece it hands the kernel (a frag's destructor, and the call's own
``destructor=`` argument) and keeps a memoryview of each piece, so Python can neither free
nor resize the memory. When the call returns ``n`` bytes, the references of the pieces
past ``n`` are dropped at once; the rest form a *pin*, filed in the tracker under the call's
id. When the error queue reports that id, the pin is released: views dropped, references
dropped — and a destructor whose last reference that was fires. A send that is copied
(small, ``never``, or ``auto`` after the kernel kept copying) takes no references at all.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._buffers import byte_view
from .._destructor import FragDestructor
from .._skbuff import Frag, SkBuff
from ..errors import (
    CompletionTimeoutError,
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
from .policy import Mode, ZeroCopyPolicy
from .tracker import CompletionTracker, ErrQueueMessage, ZeroCopyCompletion, parse_extended_err

__all__ = [
    "DEFAULT_MIN_ZEROCOPY_SIZE",
    "ZeroCopySocket",
    "ZeroCopyStats",
    "advance",
    "pieces",
    "take_refs",
]

DEFAULT_MIN_ZEROCOPY_SIZE = 16 * 1024
"""Below this, ``auto`` copies. The kernel documentation puts the break-even near 10 KB
per call on a real NIC; measured here over veth (where delivery copies anyway) a bare
MSG_ZEROCOPY loop reaches ``socket.send`` at 32 KiB (8 KiB: 0.48 vs 1.01 GB/s, 16 KiB:
0.65 vs 1.06, 32 KiB: 0.95 vs 0.92). 16 KiB sits between; on copying paths ``auto``
stops asking for zero-copy anyway."""

Data = SkBuff | Sequence[Any] | Any

# Pins of sockets that were garbage-collected while the kernel still held their pages.
# Keeping them forever is a leak, but freeing them could let Python reuse memory the
# kernel may still transmit.
_IMMORTAL_PINS: list[object] = []


# What one zero-copy send call holds until its completion: the views (so Python can
# neither free nor resize the memory) and one destructor reference per piece.
_Pin = tuple[list[memoryview], list[FragDestructor]]
_FLAT = (bytes, bytearray)


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


def advance(views: list[memoryview], owners: list[FragDestructor | None], n: int) -> None:
    """Drop the first ``n`` bytes of an iovec in place (after a partial stream send)."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
        owners.pop(0)
    if n:
        views[0] = views[0][n:]


def take_refs(destructors: Iterable[FragDestructor | None], holder: object) -> list[FragDestructor]:
    """One reference on each destructor given (None skipped), all or nothing: if one
    fails (already destroyed), those taken are dropped again and the error raised."""
    refs: list[FragDestructor] = []
    try:
        for d in destructors:
            if d is not None:
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
    the kernel really does it), ``"always"`` or ``"never"``.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        zerocopy: str = "auto",
        min_zerocopy_size: int = DEFAULT_MIN_ZEROCOPY_SIZE,
        enobufs_timeout: float = 30.0,
        completion_batch: int = 16,
    ) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"ZeroCopySocket needs an IPv4 or IPv6 socket, not {sock.family!r}")
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise ValueError(f"ZeroCopySocket needs a TCP or UDP socket, not {sock.type!r}")
        sock.getpeername()  # raises OSError(ENOTCONN) for an unconnected socket
        self._sock = sock
        self._stream = sock.type == socket.SOCK_STREAM
        self._policy = ZeroCopyPolicy(zerocopy, min_zerocopy_size)
        self._tracker: CompletionTracker[_Pin] = CompletionTracker()
        self._enobufs_timeout = enobufs_timeout
        self._batch = max(1, completion_batch)
        self._since_poll = 0
        self._errors: collections.deque[ErrQueueMessage] = collections.deque()
        self._closed = False
        self._sends = self._zc_sends = self._enobufs = self._bytes = 0
        self._poller = select.poll()
        self._poller.register(sock.fileno(), 0)  # POLLERR/POLLHUP are always reported
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

    # -- sending -------------------------------------------------------------------------
    def send(self, data: Data, *, destructor: FragDestructor | None = None) -> int:
        """Send once and return how many bytes the kernel took, like ``socket.send``:
        for a stream the caller trims and sends the rest; a datagram socket sends one
        datagram. ``data``: an :class:`SkBuff`, a buffer, or a sequence of buffers (one
        ``sendmsg`` with an iovec). ``destructor``, if given, is held until the kernel has
        released every page of this call.

        Refs: a zero-copy call takes one per piece sent (frag destructors, ``destructor``)
        and drops them on its completion; a copied call takes none."""
        if self._closed or self._errors:
            self._check_open()
            self._raise_queued_error()
        if destructor is None and type(data) in _FLAT:
            # The hot paths: one plain buffer, no references to take.
            nbytes = len(data)
            if nbytes < self._policy.copy_below:
                n: int = self._sock.send(data)  # type: ignore[arg-type]  # bytes or bytearray
                self._sends += 1
                self._bytes += n
                if self._tracker._pending:
                    self._maybe_poll()
                return n
            if nbytes >= self._policy.zerocopy_from and nbytes:
                view = memoryview(data)  # type: ignore[arg-type]
                n = self._zerocopy_call([view], 0, None)
                self._file_pin(([view], []), n)
                return n
        views, owners = pieces(data)
        return self.send_iov(views, owners, destructor)

    def sendall(
        self, data: Data, *, destructor: FragDestructor | None = None, timeout: float | None = None
    ) -> None:
        """Send every byte, as ``socket.sendall``; ``TimeoutError`` after ``timeout``
        seconds (what was sent stays sent and pinned until its completion)."""
        self._check_open()
        self._raise_queued_error()
        views, owners = pieces(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        # With a deadline, never block inside the kernel: wait in poll() instead.
        flags = MSG_DONTWAIT if deadline is not None else 0
        while views:
            try:
                n = self.send_iov(views, owners, destructor, flags, deadline)
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
        for the whole call. ``deadline`` bounds ENOBUFS retries. Returns bytes taken.

        Refs: as :meth:`send`. The lists are not kept: the caller may trim them after."""
        nbytes = sum(map(len, views)) if len(views) != 1 else len(views[0])
        sock = self._sock
        if not nbytes or not self._policy.use_zerocopy(nbytes):
            n: int = (
                sock.send(views[0], flags) if len(views) == 1 else sock.sendmsg(views, (), flags)
            )
            self._sends += 1
            self._bytes += n
            if self._tracker._pending:
                self._maybe_poll()
            return n
        # Taken before the kernel sees the pages, so none can fire while it reads them.
        refs = take_refs((*owners, destructor), self) if destructor or any(owners) else []
        # (A pin without references still keeps its views: the memory stays alive.)
        try:
            n = self._zerocopy_call(views, flags, deadline)
        except BaseException:
            for d in refs:
                d.unref(holder=self)
            raise
        # A copy of the list: callers (sendall, transports) go on to trim theirs.
        self._file_pin(
            (views[:], refs) if n == nbytes else self._covered(views, owners, refs, destructor, n),
            n,
        )
        return n

    def _zerocopy_call(self, views: list[memoryview], flags: int, deadline: float | None) -> int:
        """One ``sendmsg(MSG_ZEROCOPY)``; a failure is settled (did it use an id?), and
        ENOBUFS retried."""
        try:
            if len(views) == 1:
                return self._sock.send(views[0], flags | MSG_ZEROCOPY)
            return self._sock.sendmsg(views, (), flags | MSG_ZEROCOPY)
        except (BlockingIOError, InterruptedError):
            raise  # refused before any notification was allocated: no id used
        except OSError as exc:
            self._settle_failed_send()
            if exc.errno != errno.ENOBUFS:
                raise
        return self._send_after_enobufs(views, flags, deadline)

    def _file_pin(self, pin: _Pin, n: int) -> None:
        """File what a zero-copy call of ``n`` bytes holds under its id."""
        self._sends += 1
        self._zc_sends += 1
        self._bytes += n
        self._tracker.sent(pin, n)
        self._maybe_poll()

    def _covered(
        self,
        views: list[memoryview],
        owners: list[FragDestructor | None],
        refs: list[FragDestructor],
        destructor: FragDestructor | None,
        n: int,
    ) -> _Pin:
        """Split the call's views and references at byte ``n``: the covered ones are
        pinned, the others' references are dropped now."""
        kept_views: list[memoryview] = []
        kept_refs: list[FragDestructor] = []
        dropped: list[FragDestructor] = []
        ref_iter = iter(refs)
        pos = 0
        for view, owner in zip(views, owners, strict=True):
            covered = pos < n
            if covered:
                kept_views.append(view if pos + len(view) <= n else view[: n - pos])
            if owner is not None:
                (kept_refs if covered else dropped).append(next(ref_iter))
            pos += len(view)
        if destructor is not None:
            (kept_refs if n else dropped).append(next(ref_iter))
        for d in dropped:
            d.unref(holder=self)
        return kept_views, kept_refs

    def _send_after_enobufs(
        self, views: list[memoryview], flags: int, deadline: float | None
    ) -> int:
        """ENOBUFS (optmem or locked-page limit): process completions, wait for more,
        retry — until the deadline. Never spins: it sleeps in poll() for POLLERR."""
        limit: float | None = None
        while True:
            self._enobufs += 1
            if not self._drain_errqueue():
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
                if len(views) == 1:
                    return self._sock.send(views[0], flags | MSG_ZEROCOPY)
                return self._sock.sendmsg(views, (), flags | MSG_ZEROCOPY)
            except (BlockingIOError, InterruptedError):
                raise
            except OSError as exc:
                self._settle_failed_send()
                if exc.errno != errno.ENOBUFS:
                    raise

    def _settle_failed_send(self) -> None:
        """Did the failed call use an id? Its notification, if any, is already queued
        (the kernel dropped the datagram inside the call): read the queue and see."""
        sid = self._tracker.failed_send()
        self._drain_errqueue()
        self._tracker.settle_failed(sid)

    def _maybe_poll(self) -> None:
        self._since_poll += 1
        if self._since_poll >= self._batch:
            self._since_poll = 0
            self._drain_errqueue()

    # -- completions ---------------------------------------------------------------------
    def poll_completions(self, timeout: float | None = 0) -> int:
        """Read the error queue; return how many send calls completed. With a timeout,
        wait up to it for the first completion when none is ready."""
        self._check_open()
        n = self._drain_errqueue()
        if not n and timeout != 0 and self._tracker.outstanding:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not n and self._tracker.outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._wait_error_queue(remaining)
                n = self._drain_errqueue()
        self._raise_queued_error()
        return n

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every zero-copy send has completed. Raises
        :class:`CompletionTimeoutError` (pins kept, nothing fired) when it runs out."""
        self._check_open()
        self._flush(timeout)
        self._raise_queued_error()

    def _flush(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain_errqueue()
            if not self._tracker.outstanding:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise CompletionTimeoutError(
                    f"the kernel still holds {self._tracker.outstanding} sends "
                    f"({self._tracker.pinned_bytes} bytes) after {timeout:g}s; "
                    "their buffers stay pinned",
                    self._tracker.outstanding,
                    self._tracker.pinned_bytes,
                )
            self._wait_error_queue(remaining)

    def _drain_errqueue(self) -> int:
        """Read every message on the error queue; release the pins of completed calls."""
        sock = self._sock
        timeout = sock.gettimeout()
        if timeout:  # a timeout would make recvmsg wait for *data* first
            sock.settimeout(0.0)
        released = 0
        try:
            while True:
                try:
                    _, ancdata, _, _ = sock.recvmsg(0, ERRQUEUE_ANCBUF, MSG_ERRQUEUE | MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                for level, kind, payload in ancdata:
                    if (level, kind) in RECVERR_CMSGS:
                        released += self._on_message(parse_extended_err(payload))
        finally:
            if timeout:
                sock.settimeout(timeout)
        return released

    def _on_message(self, msg: ZeroCopyCompletion | ErrQueueMessage) -> int:
        if isinstance(msg, ErrQueueMessage):
            self._errors.append(msg)
            return 0
        pins = self._tracker.complete(msg.lo, msg.hi, msg.copied)
        self._policy.on_completion(msg.copied, len(pins), time.monotonic())
        for _views, refs in pins:
            for d in refs:
                d.unref(holder=self)
        return len(pins)

    def _wait_error_queue(self, timeout: float | None) -> None:
        """Sleep until the error queue has something (POLLERR), at most ``timeout``."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000) + 1)
        events = self._poller.poll(ms)
        if events and not events[0][1] & select.POLLERR:
            # POLLHUP without POLLERR (a closed connection) would wake us at once,
            # forever: sleep a little instead of spinning.
            time.sleep(min(0.01, timeout if timeout is not None else 0.01))
        elif events and not self._errors:
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:  # a pending socket error (sk_err) also raises POLLERR; consume it
                self._errors.append(ErrQueueMessage(err, 0, 0, 0, 0, 0))

    def _wait_writable(self, deadline: float | None) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"sendall did not finish in time ({self.outstanding} pinned)")
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLOUT)
        ms = -1 if remaining is None else int(remaining * 1000) + 1
        if any(ev & select.POLLERR for _, ev in p.poll(ms)):
            self._drain_errqueue()
            self._raise_queued_error()

    def _raise_queued_error(self) -> None:
        if self._errors:
            msg = self._errors.popleft()
            exc = QueuedSocketError(msg.errno, f"{os.strerror(msg.errno)} (from the error queue)")
            exc.report = msg
            raise exc

    # -- closing -------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Flush, then close: no notification is ever delivered after ``close()``.
        On :class:`CompletionTimeoutError` the socket stays open and the pins alive."""
        if self._closed:
            return
        self._flush(timeout)
        self._close()

    def abort(self, timeout: float | None = 10.0) -> None:
        """Disconnect abortively (TCP: RST, queues purged) while keeping the descriptor
        open, read the completions of everything purged, then close."""
        if self._closed:
            return
        try:
            disconnect(self._sock)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EINVAL):
                raise
        self._flush(timeout)
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._errors.clear()
        self._poller.unregister(self._sock.fileno())
        self._sock.close()

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "ZeroCopySocket is closed")

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
        if getattr(self, "_closed", True) or not self._tracker.outstanding:
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
    @property
    def outstanding(self) -> int:
        """Zero-copy send calls the kernel has not released yet."""
        return self._tracker.outstanding

    @property
    def pinned_bytes(self) -> int:
        return self._tracker.pinned_bytes

    @property
    def stats(self) -> ZeroCopyStats:
        t = self._tracker
        return ZeroCopyStats(
            sends=self._sends,
            zerocopy_sends=self._zc_sends,
            completions=t.completions,
            copied_completions=t.copied_completions,
            enobufs_retries=self._enobufs,
            bytes_sent=self._bytes,
            peak_pinned_bytes=t.peak_pinned_bytes,
            mode=self._policy.mode.value,
            current_mode=self._policy.current,
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
        state = "closed" if self._closed else f"outstanding={self.outstanding}"
        return f"<ZeroCopySocket fd={self._sock.fileno()} {self._policy.mode.value} {state}>"
