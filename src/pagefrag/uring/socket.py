"""UringSocket: zero-copy sends through io_uring (``IORING_OP_SEND_ZC``), with the
surface of :class:`~pagefrag.zerocopy.ZeroCopySocket`.

Kernel counterpart: ``io_uring/net.c`` (``io_send_zc``, ``io_sendmsg_zc``) and
``io_uring/notif.c``: each zero-copy request posts its result, then — once the kernel has
dropped its last reference to the pages — one notification (``IORING_CQE_F_NOTIF``),
with ``IORING_NOTIF_USAGE_ZC_COPIED`` in its ``res`` when it copied after all.

Theory of operation. A send pins its bytes — a reference on the destructor of every
piece, and on the call's own ``destructor=`` — and files the request holding the pin in
one call of the compiled core (:meth:`pagefrag._uring.Channel.submit_iov`, ``file_linked``,
``send_flat``, ``send_flat_batch``: no bytecode runs in between, so an interrupt never
finds a filed pin in the caller's hands), and the ring releases it when it reaps the
notification — never at the result, which only says how many bytes were taken. A request
the ring never issued posts no ``F_MORE`` and is released at its result. Memory inside a
fixed buffer (``BufferPool(register=True)``, :meth:`Ring.register_buffer`) goes with
``IORING_RECVSEND_FIXED_BUF``: its pages were pinned once, at registration.

Order on a stream: one request in flight per TCP socket. io_uring may complete two sends
on one socket out of order when the first waits for room (poll) and the second finds
some; so a stream's next request is submitted only once the previous one's result is in
(``MSG_WAITALL`` makes ``sendall``'s request take every byte or fail). Datagrams of one
``send_many`` are linked (``IOSQE_IO_LINK``): they go in order, and the first that fails
cancels the rest, so ``items_sent`` is exact, as with ``sendmmsg``.

Threads: any number may send on one socket (the send lock makes each call one critical
section, ``sendall`` whole) and any thread may reap the ring; destructors run in the
thread that reaps their notification. After ``fork()`` the child's copy is inert.

Lifetime: the ring, not the socket, holds the pins. A socket collected with sends in
flight warns (``ResourceWarning``); its pins stay in the ring until their notifications
are reaped (closing the descriptor does not stop them), and a ring with requests in
flight is never collected.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from .._buffers import as_timeout
from .._destructor import FragDestructor
from .._iov import Data, IoVec, check_destructor
from ..errors import (
    CompletionTimeoutError,
    ForkedSocketError,
    QueuedSocketError,
    SendBufferError,
)
from ..pool import PoolBuffer
from ..zerocopy._deadline import acquire_within, deadline_after
from ..zerocopy._items import batch_destructors, datagram_iovecs, stream_iovec
from ..zerocopy._sender import ZeroCopyStats, count_sent
from ..zerocopy._syscalls import IOV_MAX, check_connected_inet, disconnect
from ..zerocopy._wrapper import SocketWrapper
from ..zerocopy.destinations import start_policy
from ..zerocopy.policy import DEFAULT_MIN_ZEROCOPY_SIZE, Mode, ZeroCopyPolicy
from ._ring import default_ring

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "UringSocket"]

DEFAULT_CLOSE_TIMEOUT = 30.0
MSG_WAITALL = int(socket.MSG_WAITALL)
_REFUSALS = (errno.ENOBUFS, errno.ENOMEM)  # pinned-memory limits: retried, never lost


def _flat(data: object) -> bool:
    """One plain run of bytes the compiled path sends as it is."""
    kind = type(data)
    if kind is bytes or kind is bytearray:
        return True
    return kind is memoryview and data.ndim == 1 and data.format == "B" and data.c_contiguous  # type: ignore[attr-defined]


def _flattened(
    items: list[Any], ds: list[FragDestructor | None]
) -> tuple[list[Any], list[FragDestructor | None]] | None:
    """The items and destructors for the compiled flat path — each pool buffer without
    a destructor of its own as its memory and its destructor — or None when an item
    cannot take it. New lists: the items themselves live on in the caller's."""
    flat: list[Any] = []
    owners: list[FragDestructor | None] = []
    for item, d in zip(items, ds, strict=True):
        if type(item) is PoolBuffer:
            if d is not None:
                return None  # two destructors for one item: the general path
            mem, d = item.parts()  # BufferReleasedError before anything is sent
            item = mem
        elif not _flat(item):
            return None
        flat.append(item)
        owners.append(d)
    return flat, owners


_MAX_REQUEST = 1 << 30  # bytes per stream request (io_uring lengths are 32 bits)
_SHORTEST_REFUSED = 64 * 1024  # a refused stream request is halved down to this, then waits


def _head(data: Any, n: int) -> memoryview:
    """The first ``n`` bytes of a flat buffer."""
    return memoryview(data)[:n]


def _nbytes(data: Any) -> int:
    return data.nbytes if type(data) is IoVec or type(data) is memoryview else len(data)


def _os_error(res: int) -> OSError:
    err = -res
    return OSError(err, os.strerror(err))


class UringSocket(SocketWrapper):
    """A connected TCP or UDP socket (IPv4 or IPv6) whose sends go through an io_uring
    ring as ``SEND_ZC`` requests, each pinning its pages until the kernel's notification.

    ``zerocopy``: ``"auto"`` (zero-copy for sends of at least ``min_zerocopy_size`` while
    notifications say the kernel really does it; a request refused for pinned memory,
    ``ENOMEM``/``ENOBUFS``, is sent copied at once), ``"always"`` (a refusal waits up to
    ``enobufs_timeout`` for notifications, then :class:`SendBufferError`) or ``"never"``
    (copying ``IORING_OP_SEND``). ``ring``: the ring to use (default: the process's,
    :func:`~pagefrag.uring.default_ring`); many sockets may share one. ``close_timeout``:
    how long :meth:`close` waits for notifications by default (None: no bound).
    :class:`ZeroCopyUnsupportedError` where io_uring zero-copy cannot run.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        zerocopy: str = "auto",
        min_zerocopy_size: int = DEFAULT_MIN_ZEROCOPY_SIZE,
        enobufs_timeout: float = 30.0,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
        ring: Any = None,
    ) -> None:
        if not isinstance(sock, socket.socket):
            raise TypeError(f"UringSocket wraps a socket.socket, not {type(sock).__name__}")
        if enobufs_timeout is None:
            raise TypeError("enobufs_timeout must be a number, not NoneType")
        self._enobufs_timeout = as_timeout(enobufs_timeout, "enobufs_timeout")
        self._close_timeout = as_timeout(close_timeout, "close_timeout")
        check_connected_inet(sock)
        self._policy = ZeroCopyPolicy(zerocopy, min_zerocopy_size)
        from .. import _uring  # only reached with a ring: the compiled core is there

        self._ring = default_ring() if ring is None else ring
        self._sock = sock
        self._stream = sock.type == socket.SOCK_STREAM
        self._ch = _uring.Channel(self._ring, sock.fileno(), self._stream)
        self._lock = threading.RLock()
        self._closed = self._forked = False
        self._enobufs_retries = self._enobufs_copies = 0
        self._refusal_deadline: float | None = None  # of the call being refused
        if self._policy.mode is Mode.AUTO:
            start_policy(self._policy, sock, time.monotonic())
        self._watch_fork()

    # -- sending -------------------------------------------------------------------------
    def send(self, data: Data, *, destructor: FragDestructor | None = None) -> int:
        """Send once and return how many bytes the kernel took, like ``socket.send``
        (a datagram socket sends one datagram; a stream may take fewer bytes: at most
        ``IOV_MAX`` pieces). ``destructor``, if given, is held until the kernel has
        released every page of this call. Kernel: ``IORING_OP_SEND_ZC`` (one piece) or
        ``IORING_OP_SENDMSG_ZC``, one ``io_uring_enter``.

        Refs: a zero-copy request takes one per piece sent (frag destructors,
        ``destructor``) and drops them on its notification; a copied one takes none."""
        if destructor is not None and type(destructor) is not FragDestructor:
            check_destructor(destructor)
        with self._lock:
            self._check_usable()
            if _flat(data):
                if self._stream and len(data) > _MAX_REQUEST:  # type: ignore[arg-type]
                    data = _head(data, _MAX_REQUEST)  # a stream may take fewer bytes
                return self._call(data, destructor, 0, None)
            if type(data) is PoolBuffer and destructor is None:
                mem, own = data.parts()  # one buffer, one destructor: the flat path
                return self._call(mem, own, 0, None)
            iov = IoVec.of(data)
            if self._stream:
                iov = iov.first(IOV_MAX)
                if iov.nbytes > _MAX_REQUEST:
                    iov = iov.head(_MAX_REQUEST)
            elif len(iov.views) > IOV_MAX:
                raise ValueError(f"a datagram of {len(iov.views)} pieces (at most {IOV_MAX})")
            return self._call(iov, destructor, 0, None)

    def send_copied(self, data: bytes | bytearray) -> int:
        """One copying send of one buffer, whatever the mode (the kernel has copied what
        it took when this returns). Kernel: ``IORING_OP_SEND``.

        Refs: none."""
        iov = IoVec.of(data)
        with self._lock:
            self._check_usable()
            return self._call(iov, None, 0, None, copy=True)

    def sendall(
        self, data: Data, *, destructor: FragDestructor | None = None, timeout: float | None = None
    ) -> None:
        """Send every byte, as ``socket.sendall``; ``TimeoutError`` after ``timeout``
        seconds (what was sent stays sent and pinned until its notification). Holds the
        send lock throughout. Kernel: ``SEND_ZC``/``SENDMSG_ZC`` with ``MSG_WAITALL``.

        Refs: as :meth:`send`, for each request it makes."""
        check_destructor(destructor)
        with self._lock:
            self._check_usable()
            self._sendall(IoVec.of(data), destructor, deadline_after(timeout))

    def _sendall(
        self, iov: IoVec, destructor: FragDestructor | None, deadline: float | None
    ) -> None:
        if not self._stream:
            if len(iov.views) > IOV_MAX:
                raise ValueError(f"a datagram of {len(iov.views)} pieces (at most {IOV_MAX})")
            self._call(iov, destructor, 0, deadline)
            return
        while iov.views:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("sendall timed out; what was sent stays sent")
            part = iov.first(IOV_MAX)
            if part.nbytes > _MAX_REQUEST:
                part = part.head(_MAX_REQUEST)  # a request's length is 32 bits
            n = self._call(part, destructor, MSG_WAITALL, deadline)
            iov.advance(n)

    def send_many(
        self,
        items: Sequence[Data],
        *,
        destructors: Sequence[FragDestructor | None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send every item with as few ``io_uring_enter`` calls as the ring allows, and
        return how many were sent (all). A datagram socket sends each item as a
        datagram, linked in order (``IOSQE_IO_LINK``) in batches of the ring's size; a
        stream sends all the items' bytes in order with ``sendall``'s guarantees.
        ``destructors[i]`` is held until the kernel has released ``items[i]``'s pages.
        An error (or interrupt) raised midway carries ``items_sent``; a datagram that
        fails after others in its batch is tried again first in the next batch and its
        error raised only if it fails then too. Kernel: ``SEND_ZC`` per datagram.

        Refs: as :meth:`send`, for each request."""
        listed, ds = batch_destructors(items, destructors)
        deadline = deadline_after(timeout)
        with self._lock:
            self._check_usable()
            if self._stream:
                self._sendall(stream_iovec(listed, ds), None, deadline)
                return len(listed)
            flat = _flattened(listed, ds) if deadline is None else None
            if flat is not None:
                return self._send_datagrams(*flat, None, flat=True)
            return self._send_datagrams(datagram_iovecs(listed), ds, deadline, flat=False)

    def _send_datagrams(
        self,
        items: list[Any],
        ds: list[FragDestructor | None],
        deadline: float | None,
        *,
        flat: bool,
    ) -> int:
        """Datagrams in linked batches until all are sent; ``items`` are flat buffers
        (``flat``: the compiled batch) or iovecs."""
        done = 0
        batch = limit = max(1, self._ring.sq_entries)
        try:
            while done < len(items):
                self._feed_policy()
                n = min(len(items) - done, limit)
                limit = batch
                threshold = self._policy.threshold()
                if flat and threshold is not None:
                    # One linked batch; each item zero-copy by its size, in C.
                    zc = threshold >= 0
                    sent, res, refused = self._ch.send_flat_batch(items, ds, done, n, threshold, 0)
                else:
                    now = time.monotonic()
                    use = self._policy.use_zerocopy
                    zc = use(_nbytes(items[done]), now)
                    run = 1  # a batch is a run of items the policy treats alike
                    while run < n and use(_nbytes(items[done + run]), now) == zc:
                        run += 1
                    if flat:
                        sent, res, refused = self._ch.send_flat_batch(
                            items, ds, done, run, 0 if zc else -1, 0
                        )
                    else:
                        sent, res, refused = self._batch(
                            items[done : done + run], ds[done : done + run], zc, deadline
                        )
                done += sent
                if res >= 0 or sent:
                    continue  # a datagram that failed after others is the next one's first
                if refused > 0 and res == -errno.ECANCELED:
                    # Pinned memory is charged when the kernel prepares a request: one
                    # refused then cancels its whole link before any of it ran. The ones
                    # before it go on their own.
                    self._enobufs_retries += 1
                    limit = refused
                elif refused == 0:
                    # The first refused goes as one send (auto: copied; always: once
                    # notifications have made room), which counts its copy or retry.
                    self._one_of_many(items[done], ds[done], deadline)
                    done += 1
                elif res == -errno.ECANCELED:
                    raise TimeoutError("send_many timed out")
                else:
                    raise _os_error(res)
        except BaseException as exc:
            count_sent(exc, done)
            raise
        return done

    def _one_of_many(self, item: Any, d: FragDestructor | None, deadline: float | None) -> None:
        """One datagram of a ``send_many`` sent alone; an error or interrupt raised
        while its request is in flight first settles it, so ``items_sent`` counts it
        exactly when it went."""
        before = self._ch.last_request
        try:
            self._call(item, d, 0, deadline)
        except BaseException as exc:
            req = self._ch.last_request
            if req is not None and req is not before:
                count_sent(exc, self._ring.settle([req]))
            raise

    def _batch(
        self, iovs: list[IoVec], ds: list[FragDestructor | None], zc: bool, deadline: float | None
    ) -> tuple[int, int, int]:
        """One linked batch of iovecs: its :meth:`Ring.outcome <pagefrag._uring.Ring.outcome>`."""
        ch = self._ch
        # Pinned and filed in one C call, which appends each request to reqs as it is
        # filed: the pins are the ring's from then on, and an interrupt raised as the
        # call returns still finds every request here to settle.
        reqs: list[Any] = []
        try:
            ch.file_linked(reqs, [i.views for i in iovs], [i.owners for i in iovs], ds, zc, 0)
            self._ring.submit()
            for req in reqs:
                if not ch.wait_result(req, deadline):
                    self._cancel(req)
            for req in reqs:
                ch.wait_result(req, None)
        except BaseException as exc:
            # Interrupted: learn exactly what went (items_sent must be true).
            if reqs:
                count_sent(exc, self._ring.settle(reqs))
            raise
        outcome: tuple[int, int, int] = self._ring.outcome(reqs)
        return outcome

    def _call(
        self,
        data: Any,
        destructor: FragDestructor | None,
        flags: int,
        deadline: float | None,
        *,
        copy: bool = False,
    ) -> int:
        """One request under the send lock; returns the bytes taken. ``data``: an
        :class:`IoVec`, or one flat buffer (sent by the compiled path)."""
        ch = self._ch
        if self._stream and ch.in_flight and not ch.wait_idle(deadline):
            raise TimeoutError("a send on this stream is still in flight")
        self._feed_policy()
        if type(data) is not IoVec and deadline is not None:
            data = IoVec.of(data)
        flat = type(data) is not IoVec
        zc = not copy and (flat or not data.lent) and self._policy.use_zerocopy(_nbytes(data))
        self._refusal_deadline = None
        while True:
            if flat:
                res: int = ch.send_flat(data, destructor, zc, flags)
            else:
                res = self._request(data, destructor, zc, flags, deadline)
            if res >= 0:
                return res
            size = _nbytes(data)
            if (
                zc
                and self._stream
                and self._policy.mode is Mode.ALWAYS
                and -res in _REFUSALS
                and size > _SHORTEST_REFUSED
            ):
                # Too much to pin at once (RLIMIT_MEMLOCK): a stream may take fewer bytes
                # now and the rest in the next request, as MSG_ZEROCOPY's would.
                self._enobufs_retries += 1
                data = data.head(size // 2) if type(data) is IoVec else _head(data, size // 2)
                continue
            if not (zc and self._refused(res)):
                raise _os_error(res)
            zc = self._policy.mode is not Mode.AUTO

    def _request(
        self,
        iov: IoVec,
        destructor: FragDestructor | None,
        zc: bool,
        flags: int,
        deadline: float | None,
    ) -> int:
        """One request of an iovec, waited for until ``deadline`` (then cancelled:
        ``TimeoutError`` if nothing was sent); returns its result."""
        ch = self._ch
        # Pinned and filed in one C call (a copy's pin takes no reference): the pin is
        # the ring's from then on, whatever is raised after.
        req = ch.submit_iov(iov.views, iov.owners, destructor, zc, flags)
        if not ch.wait_result(req, deadline):
            self._cancel(req)
            if req.result == 0 or req.result == -errno.ECANCELED:
                raise TimeoutError("the send timed out with nothing sent")
        return int(req.result)

    def _refused(self, res: int) -> bool:
        """A zero-copy request refused for pinned memory (``ENOMEM``/``ENOBUFS``):
        ``auto`` sends it copied (True); ``always`` waits for a notification and tries
        again (True), or raises :class:`SendBufferError` after ``enobufs_timeout``.
        False: another error, for the caller to raise."""
        if -res not in _REFUSALS:
            return False
        if self._policy.mode is Mode.AUTO:
            self._enobufs_copies += 1
            self._policy.unsent(time.monotonic())
            return True
        if self._refusal_deadline is None and self._enobufs_timeout is not None:
            self._refusal_deadline = time.monotonic() + self._enobufs_timeout
        self._enobufs_retries += 1
        if not self._make_room(self._ch.last_request, self._refusal_deadline):
            raise SendBufferError(
                -res, f"{os.strerror(-res)}: the kernel kept refusing zero-copy sends"
            )
        return True

    def _make_room(self, refused: Any, deadline: float | None) -> bool:
        """Wait for one notification of this socket's, after that of the ``refused``
        request (which frees nothing); when no request of this socket holds pages (the
        memory is held elsewhere, or this send alone is over the limit), for up to 50 ms
        (any completion on the ring ends it); until ``deadline`` at most."""
        ch = self._ch

        def wait() -> bool:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._ring.wait(0.05 if left is None else min(left, 0.05))
            return True

        while refused is not None and not refused.finished:
            if not wait():
                return False
        before = ch.completions
        if not ch.outstanding and not wait():
            return False
        while ch.completions == before and ch.outstanding:
            if not wait():
                return False
        return deadline is None or time.monotonic() < deadline

    def _cancel(self, req: Any) -> None:
        """Cancel a request whose deadline passed, and wait for its result."""
        self._ring.cancel(req=req)
        self._ch.wait_result(req, None)

    def _feed_policy(self) -> None:
        zc, copied = self._ch.take_fresh()
        if zc or copied:
            now = time.monotonic()
            policy = self._policy
            if copied:
                policy.on_completion(True, copied, now)
            if zc:
                policy.on_completion(False, zc, now)

    # -- completions ---------------------------------------------------------------------
    def poll_completions(self, timeout: float | None = 0) -> int:
        """Reap the ring; return how many of this socket's requests were notified. With
        a timeout, wait up to it for the first completion when none is ready. Kernel:
        ``io_uring_enter(GETEVENTS)``.

        Refs: drops the references of every request notified (destructors may fire)."""
        self._check_usable()
        before = self._ch.completions
        self._ring.reap()
        if self._ch.completions == before and timeout != 0 and self._ch.outstanding:
            self._ring.wait(timeout)
        return int(self._ch.completions - before)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every zero-copy request has been notified. Raises
        :class:`CompletionTimeoutError` (pins kept, nothing fired) when it runs out.

        Refs: drops the references of every request notified."""
        self._check_usable()
        if not self._ch.wait_all(deadline_after(timeout)):
            raise CompletionTimeoutError(
                "the kernel still holds pages of this socket's sends",
                self._ch.outstanding,
                self._ch.pinned_bytes,
            )

    # -- closing -------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Flush, then close. ``timeout`` defaults to ``close_timeout``; when it runs out,
        :class:`CompletionTimeoutError` is raised and the socket stays open with its
        pins alive. If the connection failed with sends in flight (``SO_ERROR``: a reset,
        TCP gave up), the socket is closed and :class:`QueuedSocketError` raised. In a
        forked child, only closes the child's descriptor. Kernel: ``close()``.

        Refs: drops the references of every request notified while flushing."""
        if self._closed:
            return
        if self._forked:
            self._close_descriptor()
            return
        err = self._shut(self._close_timeout if timeout is None else timeout, reset=False)
        if err:
            raise QueuedSocketError(err, f"{os.strerror(err)} (sends were in flight)")

    def abort(self, timeout: float | None = 10.0) -> None:
        """Cancel what has not been sent (``IORING_OP_ASYNC_CANCEL``), disconnect
        abortively (TCP: RST, queues purged; ``connect(AF_UNSPEC)``), wait for the
        notifications of everything purged, then close. Raises
        :class:`CompletionTimeoutError` (socket left open, pins kept) if they do not
        come within ``timeout``.

        Refs: drops the references of every request notified."""
        if self._closed:
            return
        self._check_usable()
        self._shut(timeout, reset=True)

    def _shut(self, timeout: float | None, *, reset: bool) -> int:
        deadline = deadline_after(timeout)
        ch = self._ch
        if reset:
            if ch.in_flight:
                self._ring.cancel(ch)
            disconnect(self._sock)
        held: list[bool] = []
        try:
            if not acquire_within(self._lock, deadline, held):
                raise CompletionTimeoutError(
                    "a send call is still in progress in another thread",
                    ch.outstanding,
                    ch.pinned_bytes,
                )
            if self._closed:
                return 0
            had_sends = not reset and self._stream and ch.outstanding > 0
            if not ch.wait_all(deadline):
                raise CompletionTimeoutError(
                    "the kernel still holds pages of this socket's sends",
                    ch.outstanding,
                    ch.pinned_bytes,
                )
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if had_sends else 0
            self._close_descriptor()
            return err
        finally:
            if held and held[0]:
                self._lock.release()

    def _close_descriptor(self) -> None:
        self._closed = True
        self._unwatch_fork()
        self._sock.close()

    def _inherited(self) -> None:
        self._forked = True
        self._lock = threading.RLock()

    def _check_usable(self) -> None:
        if self._forked:
            raise ForkedSocketError(
                "this UringSocket belongs to the parent process; after fork() the child "
                "may only close() its copy"
            )
        if self._closed or self._sock.fileno() != self._ch.fd:
            # (a socket closed behind the wrapper's back: its number may be another's now)
            raise OSError(errno.EBADF, "UringSocket is closed")

    def __del__(self) -> None:
        ch = getattr(self, "_ch", None)
        if ch is not None and not self._closed and not self._forked and ch.outstanding:
            warnings.warn(
                f"UringSocket collected with {ch.outstanding} sends still held by the "
                "kernel; the ring keeps their buffers until it is told they are released",
                ResourceWarning,
                stacklevel=2,
            )

    # -- state ---------------------------------------------------------------------------
    def _reaped(self) -> Any:
        if not self._forked and not self._closed:
            self._ring.reap()
        return self._ch

    @property
    def outstanding(self) -> int:
        """Zero-copy requests the kernel has not released yet."""
        return int(self._reaped().outstanding)

    @property
    def pinned_bytes(self) -> int:
        return int(self._reaped().pinned_bytes)

    @property
    def stats(self) -> ZeroCopyStats:
        ch = self._reaped()
        return ZeroCopyStats(
            sends=ch.sends,
            zerocopy_sends=ch.zerocopy_sends,
            completions=ch.completions,
            copied_completions=ch.copied_completions,
            enobufs_retries=self._enobufs_retries,
            bytes_sent=ch.bytes_sent,
            peak_pinned_bytes=ch.peak_pinned_bytes,
            mode=self._policy.mode.value,
            current_mode=self._policy.current,
            enobufs_copies=self._enobufs_copies,
        )

    def _held(self) -> int:
        return int(self._ch.outstanding)

    @property
    def ring(self) -> Any:
        """The ring this socket's requests go through."""
        return self._ring
