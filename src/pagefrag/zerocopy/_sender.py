"""Sender: one send call of a zero-copy socket — the policy's decision, the pin, the
system call filed with its id, ENOBUFS — run under the socket's send lock.

Kernel counterpart: ``sendmsg(2)`` with and without ``MSG_ZEROCOPY``
(``Documentation/networking/msg_zerocopy.rst``). The reasoning behind the one C-level
call-and-file step is in :mod:`.socket`; the error queue, which holds every pin, is
:mod:`._errqueue`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._destructor import FragDestructor, implementation
from .._iov import IoVec, Pin
from ._errqueue import ErrorQueue
from ._syscalls import IOV_MAX, MSG_ZEROCOPY
from .policy import Mode, ZeroCopyPolicy
from .tracker import CompletionTracker

__all__ = ["PySendPath", "SendPath", "Sender", "ZeroCopyStats", "count_sent"]

_NO_ANCDATA = ((),)
_FLAT = (bytes, bytearray)
MMSG_MAX = 1024
"""The most datagrams one ``sendmmsg`` takes (``UIO_MAXIOV``)."""


@dataclass(frozen=True)
class ZeroCopyStats:
    """Counters of one :class:`~pagefrag.zerocopy.ZeroCopySocket`."""

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


def count_sent(exc: BaseException, items: int) -> None:
    """Add ``items`` to ``exc.items_sent``: how many items of a batch had been sent when
    ``exc`` was raised (an interrupt between two of them, an error)."""
    with contextlib.suppress(AttributeError):  # (an exception class with __slots__)
        exc.items_sent = getattr(exc, "items_sent", 0) + items  # type: ignore[attr-defined]


class PySendPath:
    """The hot send calls of one socket: :meth:`file` (the zero-copy system call and its
    filing) and :meth:`send_flat` (one plain buffer the policy sends without asking),
    with the counters they keep. The pure-Python reference; the compiled twin
    (``pagefrag._speedups.SendPath``) does the same in C, so a tracked send crosses into
    Python only to read a batch of completions or on an error. Runs under the socket's
    send lock; :class:`Sender` derives from whichever is in use."""

    def __init__(
        self,
        sock: socket.socket,
        policy: ZeroCopyPolicy,
        eq: ErrorQueue,
        batch: int,
        lock: threading.RLock,
    ) -> None:
        self.lock = lock  # the socket's send lock
        self.blocked = False  # the socket is closed or forked: every send refuses
        self.sock = sock
        self.policy = policy
        self.eq = eq
        self.tracker: CompletionTracker[Pin] = eq.tracker
        self.batch = batch
        self.since_poll = self.copied_sends = self.copied_bytes = 0

    def file(self, pin: Pin, flags: int) -> int:
        """The zero-copy system call and the filing of its pin, in one C-level step (see
        :mod:`.socket`). Returns the bytes the kernel took.

        Refs: none (the pin holds them)."""
        filings = self.tracker.filings
        views: list[memoryview] = pin.views  # type: ignore[assignment]  # set while filed
        if len(views) == 1:
            sent = map(self.sock.send, views, (flags,))
        else:
            sent = map(self.sock.sendmsg, (views,), _NO_ANCDATA, (flags,))
        filings.extend(zip(sent, self.tracker.ids, (pin,)))  # noqa: B905
        n: int = filings[-1][0]  # the last filing stays put while we hold the send lock
        return n

    def file_many(self, pins: list[Pin], flags: int) -> int:
        """The datagrams of ``pins`` (at most :data:`MMSG_MAX`), each zero-copy call filed
        with its id in one C-level step; returns how many the kernel took, the first k
        (OSError when it took none). The compiled twin makes one ``sendmmsg``.

        Refs: none (the pins hold them)."""
        k = 0
        for pin in pins:
            try:
                self.file(pin, flags)
            except OSError:
                if not k:
                    raise
                break  # as sendmmsg: the error of a later datagram is not reported
            k += 1
        return k

    def copied_many(self, messages: list[list[memoryview]], flags: int) -> int:
        """The datagrams of ``messages`` copied (at most :data:`MMSG_MAX`); returns how
        many the kernel took (OSError when none). The compiled twin: one ``sendmmsg``.

        Refs: none."""
        k = 0
        for views in messages:
            try:
                if len(views) == 1:
                    n = self.sock.send(views[0], flags)
                else:
                    n = self.sock.sendmsg(views, (), flags)
            except OSError:
                if not k:
                    raise
                break
            self.copied_sends += 1
            self.copied_bytes += n
            k += 1
        return k

    def send_copied(self, data: bytes | bytearray) -> int:
        """One copying ``send`` of ``data`` under the send lock, reading no completions;
        -1 (nothing sent) when the socket is :attr:`blocked` or has a socket error
        queued.

        Refs: none."""
        with self.lock:
            if self.blocked or self.eq.errors:
                return -1
            n: int = self.sock.send(data)
            self.copied_sends += 1
            self.copied_bytes += n
            self.since_poll += 1  # the next call that polls reads what is due
            return n

    def flat_copies(self, items: Sequence[object]) -> bool:
        """Whether every item is ``bytes`` or a ``bytearray`` the policy copies without
        asking (the compiled twin also takes 1-D byte memoryviews, on a socket without a
        timeout): then :meth:`copied_flat` sends them.

        Refs: none."""
        copy_below = self.policy.copy_below
        return all(type(x) in _FLAT and len(x) < copy_below for x in items)  # type: ignore[arg-type]

    def copied_flat(self, items: Sequence[object], start: int, flags: int) -> int:
        """Datagrams ``items[start:start + MMSG_MAX]`` (accepted by :meth:`flat_copies`)
        copied; returns how many the kernel took (OSError when none). The compiled twin
        makes one ``sendmmsg`` straight from their buffers.

        Refs: none."""
        batch = items[start : start + MMSG_MAX]
        return self.copied_many([[memoryview(x)] for x in batch], flags)  # type: ignore[arg-type]

    def send(self, data: object, destructor: FragDestructor | None) -> int:
        """:meth:`send_flat` under the send lock, unless the socket is :attr:`blocked` or
        has a socket error queued; -1 when it does not send.

        Refs: as :meth:`send_flat`."""
        with self.lock:
            if self.blocked or self.eq.errors:
                return -1
            return self.send_flat(data, destructor)

    def send_flat(self, data: object, destructor: FragDestructor | None) -> int:
        """One send call of ``data`` if it is ``bytes`` or a ``bytearray`` that the policy
        sends without asking (copied below ``copy_below``, zero-copy from
        ``zerocopy_from``); -1 for anything else (the caller takes the general path).
        (The compiled twin also takes 1-D byte memoryviews, on sockets without a
        timeout.) Kernel: ``send(MSG_ZEROCOPY)``.

        Refs: +1 on ``destructor`` for a zero-copy call; none for a copied one."""
        if type(data) not in _FLAT:
            return -1
        nbytes = len(data)  # type: ignore[arg-type]  # bytes or bytearray
        policy = self.policy
        if nbytes < policy.copy_below:  # copied: holds nothing, not even the destructor
            n: int = self.sock.send(data)  # type: ignore[arg-type]
            self.copied_sends += 1
            self.copied_bytes += n
            self.after_send()
            return n
        if not nbytes or nbytes < policy.zerocopy_from:
            return -1  # the policy must be asked (a probe may be due)
        pin = Pin([memoryview(data)])  # type: ignore[arg-type]  # bound before it holds
        try:
            if destructor is not None:
                pin.take(self.eq, destructor)
            n = self.file(pin, MSG_ZEROCOPY)
        except BaseException as exc:
            return self.unfiled(pin, exc, nbytes, 0, None, None)
        return self.filed(pin, n, nbytes)

    # Provided by Sender (one copy for both cores).
    def after_send(self) -> None:
        raise NotImplementedError

    def filed(self, pin: Pin, n: int, nbytes: int) -> int:
        raise NotImplementedError

    def unfiled(
        self,
        pin: Pin,
        exc: BaseException,
        nbytes: int,
        flags: int,
        deadline: float | None,
        now: float | None,
    ) -> int:
        raise NotImplementedError

    def poll(self) -> None:
        raise NotImplementedError


if TYPE_CHECKING or implementation != "compiled":
    SendPath = PySendPath
else:
    from .._speedups import SendPath


class Sender(SendPath):
    """The send calls of one socket. Every method but :meth:`stats` runs under the
    socket's send lock."""

    def __init__(
        self,
        sock: socket.socket,
        policy: ZeroCopyPolicy,
        eq: ErrorQueue,
        *,
        enobufs_timeout: float,
        batch: int,
        lock: threading.RLock,
    ) -> None:
        super().__init__(sock, policy, eq, batch, lock)
        self.stream = sock.type == socket.SOCK_STREAM
        self.enobufs_timeout = enobufs_timeout
        self.enobufs = self.enobufs_copies = 0

    def call(
        self, iov: IoVec, destructor: FragDestructor | None, flags: int, deadline: float | None
    ) -> int:
        """One send call of ``iov`` (at most :data:`IOV_MAX` pieces of a stream), zero-copy
        if the policy says so and no piece is lent (:attr:`IoVec.lent`, always copied);
        returns the bytes taken. A zero-copy call pins ``iov`` and
        ``destructor`` first; after a partial send the pin keeps only what was taken.

        Refs: +1 per destructor for a zero-copy call (held by the error queue until the
        completion); none for a copied one."""
        # (Plain len() and no helper calls here: this runs once per send call.)
        views = iov.views
        if len(views) > IOV_MAX:
            if not self.stream:
                raise ValueError(
                    f"a datagram of {len(views)} pieces: one sendmsg takes at most {IOV_MAX}"
                )
            iov = iov.first(IOV_MAX)
            views = iov.views
        nbytes = len(views[0]) if len(views) == 1 else sum(map(len, views))
        now = time.monotonic()
        # Lent memory (a plain write's bytearray) is read by the kernel only while the
        # call runs: a copying send, whatever the policy (see pagefrag._iov).
        if not nbytes or iov.lent is not None or not self.policy.use_zerocopy(nbytes, now):
            n = self.copied(views, flags)  # no reference taken
            self.after_send()
            return n
        pin = Pin(views[:], iov.owners[:])  # bound before it holds anything
        try:
            # Taken before the kernel sees the pages, so none can fire while it reads them.
            if destructor is not None or any(iov.owners):
                pin.take(self.eq, destructor)
            n = self.file(pin, flags | MSG_ZEROCOPY)
        except BaseException as exc:
            return self.unfiled(pin, exc, nbytes, flags, deadline, now)
        return self.filed(pin, n, nbytes)

    def call_many(
        self,
        iovs: list[IoVec],
        destructors: list[FragDestructor | None],
        flags: int,
        deadline: float | None,
    ) -> int:
        """Datagrams, one per iovec (each at most :data:`IOV_MAX` pieces), in one batch
        call (``sendmmsg``) per run of items the policy treats alike (at most
        :data:`MMSG_MAX`); returns how many were sent, at least one (the first one's
        error is raised). ``destructors[i]`` is held with datagram ``i``'s pages.

        Refs: +1 per destructor (the item's and its frags') of each zero-copy datagram,
        held until its completion; none for a copied one."""
        now = time.monotonic()
        policy = self.policy
        zerocopy = None
        probe = False  # the item after the run was answered "zero-copy" (a probe)
        run: list[IoVec] = []
        for iov in iovs[:MMSG_MAX]:
            nbytes = iov.nbytes
            wants = bool(nbytes) and iov.lent is None and policy.use_zerocopy(nbytes, now)
            if zerocopy is None:
                zerocopy = wants
            elif wants is not zerocopy:
                # Only a copying policy's probe can answer "zero-copy" inside a copied
                # run; that answer moved it to PROBING, and is kept: the item goes next.
                probe = wants
                break
            run.append(iov)
        k = self._send_run(run, destructors, bool(zerocopy), flags, deadline, now)
        if probe:
            if k < len(run):
                policy.unsent(now)  # the probe does not go out now (PROBE_FAILED)
                return k
            try:
                k += self._send_run(iovs[k : k + 1], destructors[k:], True, flags, deadline, now)
            except Exception:
                pass  # as sendmmsg: a later datagram's error is met when it is sent again
            except BaseException as exc:
                count_sent(exc, k)
                raise
        return k

    def _send_run(
        self,
        run: list[IoVec],
        destructors: list[FragDestructor | None],
        zerocopy: bool,
        flags: int,
        deadline: float | None,
        now: float,
    ) -> int:
        """One batch call of the datagrams ``run``, all copied or all zero-copy (pinned,
        filed with their ids); returns how many were sent (the first one's error is
        raised, after ENOBUFS handling as for one send)."""
        if not zerocopy:
            k = self.copied_many([iov.views for iov in run], flags)
            self.after_send()
            return k
        tracker = self.tracker
        pins = [Pin(iov.views[:], iov.owners[:]) for iov in run]
        taken = 0
        first_id = tracker.next_id
        try:
            # Taken before the kernel sees the pages, so none can fire while it reads them.
            for pin, iov, destructor in zip(pins, run, destructors, strict=False):
                if destructor is not None or any(iov.owners):
                    pin.take(self.eq, destructor)
                taken += 1
            k = self.file_many(pins, flags | MSG_ZEROCOPY)
            if k < len(pins):
                # A datagram the kernel refused after taking the id of its notification
                # (see CompletionTracker.failed_send) must not shift every later id:
                # settled before anything else runs.
                self.eq.settle_failed_send()
        except BaseException as exc:
            # Filed pins are the kernel's (an interrupt may land between two filings of
            # the pure core): how many were is told by the ids they took, not by the
            # filings, which another thread's drain may have taken in meanwhile.
            filed = (tracker.next_id - first_id) & 0xFFFFFFFF
            for pin in pins[max(filed, 1) : taken]:
                pin.release(self.eq)  # never handed over
            if filed or not taken:
                if filed and isinstance(exc, Exception):
                    return filed  # as sendmmsg: a later datagram's error is not reported
                count_sent(exc, filed)
                raise
            self.unfiled(pins[0], exc, run[0].nbytes, flags, deadline, now)  # ENOBUFS...
            return 1
        for pin in pins[k:]:
            pin.release(self.eq)  # not taken by the kernel this time
        self.since_poll += k  # after_send(), inlined
        if self.since_poll >= self.batch or tracker.early:
            self.poll()
        return k

    def filed(self, pin: Pin, n: int, nbytes: int) -> int:
        """After the zero-copy call of ``pin`` took ``n`` of ``nbytes``: a partial send
        keeps only what was taken; a batch of completions is read when due."""
        if n < nbytes and pin.refs:
            self.eq.trim(pin, n)
        self.since_poll += 1  # after_send(), inlined
        if self.since_poll >= self.batch or self.tracker.early:
            self.poll()
        return n

    def unfiled(
        self,
        pin: Pin,
        exc: BaseException,
        nbytes: int,
        flags: int,
        deadline: float | None,
        now: float | None,
    ) -> int:
        """The zero-copy call of ``pin`` (or the taking of its references) raised
        ``exc``: ENOBUFS is retried (``always``) or sent copied (``auto``), anything else
        raised. Only a pin that was never filed is released: nothing the kernel holds is
        dropped, also when an interrupt lands just after the filing.

        Refs: drops the pin's if it was not filed."""
        filings = self.tracker.filings
        if now is None:
            now = time.monotonic()
        try:
            if not isinstance(exc, OSError) or not self.enobufs_after_failure(exc):
                raise exc
            n = self.after_enobufs(pin, flags, deadline)
        except BaseException:
            if not (filings and filings[-1][2] is pin):
                pin.release(self.eq)
                self.policy.unsent(now)  # a probe no completion will answer
            raise
        finally:
            # No cycle exc -> traceback -> this frame -> exc: it would keep the views of
            # the frames it passed through (and their memory) alive until a collection.
            del exc
        if filings and filings[-1][2] is pin:
            return self.filed(pin, n, nbytes)
        pin.release(self.eq)  # sent copied after ENOBUFS (auto): nothing is pinned
        self.policy.unsent(now)
        self.after_send()
        return n

    def copied(self, views: list[memoryview], flags: int) -> int:
        """One plain (copying) call of ``views``; takes no reference."""
        if len(views) == 1:
            n: int = self.sock.send(views[0], flags)
        else:
            n = self.sock.sendmsg(views, (), flags)
        self.copied_sends += 1
        self.copied_bytes += n
        return n

    def enobufs_after_failure(self, exc: OSError) -> bool:
        """A zero-copy call raised ``exc``: settle its id; True if it was ENOBUFS."""
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            return False  # refused before any notification was allocated: no id used
        self.eq.settle_failed_send()
        return exc.errno == errno.ENOBUFS

    def after_enobufs(self, pin: Pin, flags: int, deadline: float | None) -> int:
        """ENOBUFS (locked pages or optmem exhausted): ``auto`` copies at once (copying
        needs neither, and waiting would stall the caller); ``always`` processes
        completions, waits for more in poll() and retries, until the deadline."""
        if self.policy.mode is Mode.AUTO:
            self.enobufs_copies += 1
            return self.copied(pin.views, flags)  # type: ignore[arg-type]
        limit = time.monotonic() + self.enobufs_timeout
        if deadline is not None:
            limit = min(limit, deadline)
        while True:
            self.enobufs += 1
            self.eq.make_room(limit, self.enobufs_timeout)
            try:
                return self.file(pin, flags | MSG_ZEROCOPY)
            except (BlockingIOError, InterruptedError):
                raise
            except OSError as exc:
                self.eq.settle_failed_send()
                if exc.errno != errno.ENOBUFS:
                    raise

    def after_send(self) -> None:
        """Count a send call; every ``completion_batch`` of them, or when another thread
        read a completion before its filing, :meth:`poll`. (Inlined on the hot paths.)"""
        self.since_poll += 1
        if self.since_poll >= self.batch or self.tracker.early:
            self.poll()

    def poll(self) -> None:
        """Read what completed (unless another thread is reading) once a batch is due;
        apply completions another thread read before their filing."""
        if self.since_poll >= self.batch:
            self.since_poll = 0
            if self.tracker.has_pending:
                self.eq.drain(blocking=False)  # another thread is reading them: fine
        if self.tracker.early:
            self.eq.absorb()

    def stats(self, t: CompletionTracker[Pin]) -> ZeroCopyStats:
        """The counters, with those of ``t`` (the tracker, its filings taken in)."""
        return ZeroCopyStats(
            sends=self.copied_sends + t.filed_calls,
            zerocopy_sends=t.filed_calls,
            completions=t.completions,
            copied_completions=t.copied_completions,
            enobufs_retries=self.enobufs,
            bytes_sent=self.copied_bytes + t.filed_bytes,
            peak_pinned_bytes=t.peak_pinned_bytes,
            mode=self.policy.mode.value,
            current_mode=self.policy.current,
            enobufs_copies=self.enobufs_copies,
            duplicates=t.duplicates,
        )
