"""Sender: one send call of a zero-copy socket — the policy's decision, the pin, the
system call filed with its id, ENOBUFS — run under the socket's send lock.

Kernel counterpart: ``sendmsg(2)`` with and without ``MSG_ZEROCOPY``
(``Documentation/networking/msg_zerocopy.rst``). The reasoning behind the one C-level
call-and-file step is in :mod:`.socket`; the error queue, which holds every pin, is
:mod:`._errqueue`.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from .._destructor import FragDestructor
from .._iov import IoVec, Pin
from ._errqueue import ErrorQueue
from ._syscalls import IOV_MAX, MSG_ZEROCOPY
from .policy import Mode, ZeroCopyPolicy
from .tracker import CompletionTracker

__all__ = ["Sender", "ZeroCopyStats"]

_NO_ANCDATA = ((),)


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


class Sender:
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
    ) -> None:
        self.sock = sock
        self.stream = sock.type == socket.SOCK_STREAM
        self.policy = policy
        self.eq = eq
        self.tracker: CompletionTracker[Pin] = eq.tracker
        self.enobufs_timeout = enobufs_timeout
        self.batch = batch
        self.since_poll = 0
        self.copied_sends = self.copied_bytes = self.enobufs = self.enobufs_copies = 0

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
        filings = self.tracker.filings
        try:
            # Taken before the kernel sees the pages, so none can fire while it reads them.
            if destructor is not None or any(iov.owners):
                pin.take(self.eq, destructor)
            try:
                n = self.file(pin, flags | MSG_ZEROCOPY)
            except OSError as exc:
                if not self.enobufs_after_failure(exc):
                    raise  # (a bare raise: no frame keeps the pin's views alive through exc)
                n = self.after_enobufs(pin, flags, deadline)
        except BaseException:
            # Nothing may be dropped that the kernel holds: only if the pin was not filed.
            if not (filings and filings[-1][2] is pin):
                pin.release(self.eq)
                self.policy.unsent(now)  # a probe no completion will answer
            raise
        if not (filings and filings[-1][2] is pin):
            pin.release(self.eq)  # sent copied after ENOBUFS (auto): nothing is pinned
            self.policy.unsent(now)
        elif n < nbytes and pin.refs:
            self.eq.trim(pin, n)
        self.since_poll += 1  # after_send(), inlined
        if self.since_poll >= self.batch or self.tracker.early:
            self.poll()
        return n

    def syscall(self, views: list[memoryview], flags: int) -> map[int]:
        """The ``send``/``sendmsg`` of ``views``, made when the iterator is drawn: drawn
        inside ``deque.extend``, the call and its filing are one C-level step."""
        if len(views) == 1:
            return map(self.sock.send, views, (flags,))
        return map(self.sock.sendmsg, (views,), _NO_ANCDATA, (flags,))

    def file(self, pin: Pin, flags: int) -> int:
        """The zero-copy system call and the filing of its pin, in one C-level step (see
        the module docstring). Returns the bytes the kernel took."""
        filings = self.tracker.filings
        sent = self.syscall(pin.views, flags)  # type: ignore[arg-type]  # views while filed
        filings.extend(zip(sent, self.tracker.ids, (pin,)))  # noqa: B905
        n: int = filings[-1][0]  # the last filing stays put while we hold the send lock
        return n

    def copied(self, views: list[memoryview], flags: int) -> int:
        """One plain (copying) call of ``views``; takes no reference."""
        n: int = next(self.syscall(views, flags))
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
