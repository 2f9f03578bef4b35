"""The MSG_ZEROCOPY completion tracker: ids in, ranges in, "release these" out.

Sans-I/O: this module knows nothing of sockets. The socket wrapper files each zero-copy
send call the kernel accepted in :attr:`CompletionTracker.filings` (the structure it
appends to in the same C-level step as the system call; :meth:`CompletionTracker.sent`
for other callers) and hands it the raw ``struct sock_extended_err`` it read from the
error queue (:func:`parse_extended_err`, :meth:`CompletionTracker.complete`); the tracker
answers with the tokens (pinned buffers and destructor references) whose send calls the
kernel has released.

Kernel facts it follows (Documentation/networking/msg_zerocopy.rst): every successful
``sendmsg(..., MSG_ZEROCOPY)`` call takes the next value of a per-socket u32 counter,
which wraps; failed calls take none. A completion names the inclusive range
``[ee_info, ee_data]``; the kernel coalesces ranges, and they may arrive out of order on
retransmit and teardown. ``ee_code & SO_EE_CODE_ZEROCOPY_COPIED`` says the kernel fell back
to copying. Other messages on the error queue (ICMP errors, timestamps) are not
completions and change nothing here.
"""

from __future__ import annotations

import collections
import itertools
import operator
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._destructor import implementation

__all__ = [
    "SO_EE_ORIGIN_ZEROCOPY",
    "SO_EE_CODE_ZEROCOPY_COPIED",
    "ZeroCopyCompletion",
    "ErrQueueMessage",
    "parse_extended_err",
    "completion_range",
    "CompletionTracker",
    "PyCompletionTracker",
]

SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
_U32 = 0xFFFFFFFF
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data


@dataclass(frozen=True)
class ZeroCopyCompletion:
    """Send calls ``lo`` to ``hi`` (inclusive, modulo 2**32) are released."""

    lo: int
    hi: int
    copied: bool

    @property
    def count(self) -> int:
        return ((self.hi - self.lo) & _U32) + 1


@dataclass(frozen=True)
class ErrQueueMessage:
    """An error-queue message that is not a zero-copy completion (an ICMP error on a
    UDP socket, a local error): a real socket error for the caller."""

    errno: int
    origin: int
    type: int
    code: int
    info: int
    data: int
    offender: bytes = b""


def parse_extended_err(data: bytes) -> ZeroCopyCompletion | ErrQueueMessage:
    """Decode a ``struct sock_extended_err`` (the ``IP_RECVERR``/``IPV6_RECVERR``
    control message); the bytes after it (the offender's address) are kept raw."""
    done = completion_range(data)
    if done is not None:
        return ZeroCopyCompletion(*done)
    errno, origin, type_, code, _, info, hi = _EXTENDED_ERR.unpack_from(data)
    return ErrQueueMessage(errno, origin, type_, code, info, hi, bytes(data[_EXTENDED_ERR.size :]))


def completion_range(data: bytes) -> tuple[int, int, bool] | None:
    """``(lo, hi, copied)`` if the ``struct sock_extended_err`` in ``data`` is a
    zero-copy completion, else None: :func:`parse_extended_err`'s test without building
    an object (the completion path reads one per batch of sends)."""
    if len(data) < _EXTENDED_ERR.size:
        raise ValueError(f"sock_extended_err needs {_EXTENDED_ERR.size} bytes, got {len(data)}")
    errno, origin, _, code, _, info, hi = _EXTENDED_ERR.unpack_from(data)
    if origin == SO_EE_ORIGIN_ZEROCOPY and errno == 0:
        return info, hi, bool(code & SO_EE_CODE_ZEROCOPY_COPIED)
    return None


T = TypeVar("T")
_USED: Any = object()  # the token of an id the kernel gave a send call that failed
_HALF = 1 << 31
_MAX_EARLY = 1024  # completions "from the future" remembered at most (a sane kernel: 1 or 2)


class CompletionTracker(Generic[T]):
    """Which zero-copy send calls are still pinned, and what each one holds.

    ``T`` is whatever the caller must keep alive and release per call (pinned views,
    destructor references).

    Theory of operation. A call the kernel accepted is *filed* by appending
    ``(nbytes, sid, token)`` to :attr:`filings`, where ``sid`` is drawn from :attr:`ids`
    (``itertools.count``: ids are unbounded here and compared modulo 2**32 with the
    kernel's). The socket does this in one C-level expression together with the system
    call, so nothing can come between the kernel's return and the record (see
    ``socket.py``); :meth:`sent` is the same for plain Python callers. The tracker takes
    filings in lazily (:meth:`absorb`, also done by :meth:`complete`). A completion for an
    id not filed yet — read by another thread between the kernel's return and the filing —
    is remembered in :attr:`early` and applied when the filing is taken in, instead of
    being counted as a duplicate.

    Concurrency: only ``filings.extend`` may run concurrently with the other methods
    (appends at the right are atomic, and :meth:`absorb` never removes the last filing,
    so a filer can read its own entry back as ``filings[-1]``). Everything else must be
    serialized by the caller.
    """

    def __init__(self, first_id: int = 0) -> None:
        first = first_id & _U32
        self.filings: collections.deque[tuple[int, int, T]] = collections.deque()
        self.ids = itertools.count(first)
        self.early: dict[int, bool] = {}  # sid -> copied, completed before being filed
        self._absorbed = first  # every filing with a smaller sid has been taken in
        self._pending: dict[int, tuple[T, int]] = {}
        self._pinned = 0
        self._failed: int | None = None
        self.peak_pinned_bytes = 0
        self.completions = 0
        self.copied_completions = 0
        self.duplicates = 0
        self.ids_used_by_failed_sends = 0
        self.filed_calls = 0
        self.filed_bytes = 0

    def _next(self) -> int:
        filings = self.filings
        return filings[-1][1] + 1 if filings else self._absorbed

    @property
    def next_id(self) -> int:
        """The id the kernel will give the next successful zero-copy send call."""
        return self._next() & _U32

    @property
    def outstanding(self) -> int:
        """Zero-copy send calls whose completion has not been taken in."""
        return len(self._pending) + self._next() - self._absorbed

    @property
    def has_pending(self) -> bool:
        """Whether any zero-copy send call has not completed (the cheap test of
        :attr:`outstanding`)."""
        return bool(self._pending) or self._next() > self._absorbed

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the calls still outstanding."""
        filings = self.filings
        total = self._pinned
        for k in range(len(filings) - 1, -1, -1):  # by index: appends may run meanwhile
            nbytes, sid, _ = filings[k]
            if sid < self._absorbed:
                break
            total += nbytes
        return total

    def sent(self, token: T, nbytes: int) -> int:
        """Record one send call the kernel accepted with ``MSG_ZEROCOPY``; returns its id.

        ``nbytes`` must be an integer (TypeError, nothing filed)."""
        if type(nbytes) is not int:
            operator.index(nbytes)  # the TypeError of a float (the compiled class's too)
        self.filings.extend(zip((nbytes,), self.ids, (token,)))  # noqa: B905
        return self.filings[-1][1] & _U32

    def absorb(self) -> list[T]:
        """Take in what was filed since the last call. Returns the tokens of filings
        whose completion had already come (:attr:`early`): they are released now."""
        filings = self.filings
        pending = self._pending
        early = self.early
        released: list[T] = []
        while filings:
            nbytes, sid, token = filings[0]
            if sid >= self._absorbed:
                if early and sid in early:
                    copied = early.pop(sid)
                    if token is not _USED:
                        released.append(token)
                        self.completions += 1
                        self.copied_completions += copied
                elif sid not in pending:  # (an interrupted absorb may repeat a filing)
                    pending[sid] = (token, nbytes)
                    self._pinned += nbytes
                    if self._pinned > self.peak_pinned_bytes:
                        self.peak_pinned_bytes = self._pinned
                self._absorbed = sid + 1
                if token is not _USED:
                    self.filed_calls += 1
                    self.filed_bytes += nbytes
            if len(filings) == 1:
                break  # the last filing stays: its filer may still read it back
            filings.popleft()
        if early and min(early) < self._absorbed:
            # Never filed (a call made behind the tracker's back): forget them, or every
            # later filing would pay for a look.
            for sid in [s for s in early if s < self._absorbed]:
                del early[sid]
                self.duplicates += 1
        return released

    def complete(self, lo: int, hi: int, copied: bool = False) -> list[T]:
        """Release the send calls in ``[lo, hi]`` (inclusive, wrapping at 2**32) and
        return their tokens. Ids already completed (or before the first) are counted as
        duplicates and otherwise ignored; ids not filed yet (ahead of the filings, within
        half the id space) are remembered until they are."""
        lo &= _U32  # non-integers raise here, before anything is taken in
        span = (hi - lo) & _U32
        released = self.absorb()
        nxt = self._absorbed
        ulo = nxt + ((((lo - nxt) & _U32) ^ _HALF) - _HALF)  # nearest to nxt modulo 2**32
        uhi = ulo + span
        if uhi >= nxt:  # ahead: read before the call that used it was filed
            start = max(ulo, nxt)
            if uhi - start < _MAX_EARLY:
                for sid in range(start, uhi + 1):
                    self.early[sid] = copied
            else:
                self.duplicates += uhi - start + 1
            uhi = start - 1
        if ulo > uhi:
            return released
        pending = self._pending
        width = uhi - ulo + 1
        if width <= len(pending):
            ids: Iterable[int] = range(ulo, uhi + 1)
        else:  # a wide range: walk what is pending instead
            ids = sorted(i for i in list(pending) if ulo <= i <= uhi)
            self.duplicates += width - len(ids)
        done = 0
        for sid in ids:
            entry = pending.pop(sid, None)
            if entry is None:
                self.duplicates += 1
                continue
            token, nbytes = entry
            self._pinned -= nbytes
            if token is not _USED:
                released.append(token)
                done += 1
        self.completions += done
        if copied:
            self.copied_completions += done
        return released

    def pending_tokens(self) -> list[T]:
        """Tokens of every send call still pinned (for keeping them alive)."""
        tokens = [token for token, _ in list(self._pending.values())]
        tokens += [e[2] for e in list(self.filings) if e[1] >= self._absorbed]
        return [t for t in tokens if t is not _USED]

    def failed_send(self) -> int:
        """A zero-copy send call failed. The kernel may still have used an id for it: a
        UDP datagram dropped on the transmit path (``EPERM`` from a netfilter drop,
        ``ENOBUFS`` from a full queue with ``IP_RECVERR``) returns an error *after* its
        notification took the id, and that notification is already queued when the call
        returns. Returns that id; read the error queue (its completion, if any, lands in
        :attr:`early`), then call :meth:`settle_failed`."""
        self._failed = self._next()
        return self._failed & _U32

    def settle_failed(self, sid: int) -> bool:
        """Resolve :meth:`failed_send`: True if the kernel used the id (its completion
        was read): the id is then consumed here as the kernel did; False otherwise."""
        failed, self._failed = self._failed, None
        if failed is None or failed & _U32 != sid & _U32 or failed != self._next():
            raise RuntimeError("settle_failed must directly follow failed_send")
        if failed not in self.early:
            return False
        # File an already-completed placeholder: the id is consumed in one C-level step.
        self.filings.extend(zip((0,), self.ids, (_USED,)))  # noqa: B905
        self.ids_used_by_failed_sends += 1
        return True


# The pure-Python class above is the reference implementation; the compiled one
# (pagefrag._speedups, Cython) has the same API, results and concurrency contract and is
# checked against it step by step (tests/test_speedups_tracker.py). Chosen with
# FragDestructor (pagefrag._destructor: PAGEFRAG_PURE_PYTHON=1, or no build, means pure);
# every user imports CompletionTracker from here.
PyCompletionTracker = CompletionTracker

if not TYPE_CHECKING and implementation == "compiled":
    from .._speedups import CompletionTracker
