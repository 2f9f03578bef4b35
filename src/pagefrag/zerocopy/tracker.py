"""The MSG_ZEROCOPY completion tracker: ids in, ranges in, "release these" out.

Sans-I/O: this module knows nothing of sockets. The socket wrapper tells it each
zero-copy send call the kernel accepted (:meth:`CompletionTracker.sent`) and hands it the
raw ``struct sock_extended_err`` it read from the error queue (:func:`parse_extended_err`,
:meth:`CompletionTracker.complete`); the tracker answers with the tokens (pinned buffers
and destructor references) whose send calls the kernel has released.

Kernel facts it follows (Documentation/networking/msg_zerocopy.rst): every successful
``sendmsg(..., MSG_ZEROCOPY)`` call takes the next value of a per-socket u32 counter,
which wraps; failed calls take none. A completion names the inclusive range
``[ee_info, ee_data]``; the kernel coalesces ranges, and they may arrive out of order on
retransmit and teardown. ``ee_code & SO_EE_CODE_ZEROCOPY_COPIED`` says the kernel fell back
to copying. Other messages on the error queue (ICMP errors, timestamps) are not
completions and change nothing here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "SO_EE_ORIGIN_ZEROCOPY",
    "SO_EE_CODE_ZEROCOPY_COPIED",
    "ZeroCopyCompletion",
    "ErrQueueMessage",
    "parse_extended_err",
    "CompletionTracker",
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
    if len(data) < _EXTENDED_ERR.size:
        raise ValueError(f"sock_extended_err needs {_EXTENDED_ERR.size} bytes, got {len(data)}")
    errno, origin, type_, code, _, info, hi = _EXTENDED_ERR.unpack_from(data)
    if origin == SO_EE_ORIGIN_ZEROCOPY and errno == 0:
        return ZeroCopyCompletion(info, hi, bool(code & SO_EE_CODE_ZEROCOPY_COPIED))
    return ErrQueueMessage(errno, origin, type_, code, info, hi, bytes(data[_EXTENDED_ERR.size :]))


T = TypeVar("T")
_UNCERTAIN: Any = object()  # the token of an id a failed send may have used


class CompletionTracker(Generic[T]):
    """Which zero-copy send calls are still pinned, and what each one holds.

    ``T`` is whatever the caller must keep alive and release per call (pinned views,
    destructor references)."""

    def __init__(self, first_id: int = 0) -> None:
        self._next = first_id & _U32
        self._pending: dict[int, tuple[T, int]] = {}
        self.pinned_bytes = 0
        self.peak_pinned_bytes = 0
        self.completions = 0
        self.copied_completions = 0
        self.duplicates = 0
        self.ids_used_by_failed_sends = 0

    @property
    def next_id(self) -> int:
        """The id the kernel will give the next successful zero-copy send call."""
        return self._next

    @property
    def outstanding(self) -> int:
        """Zero-copy send calls whose completion has not arrived."""
        return len(self._pending)

    def sent(self, token: T, nbytes: int) -> int:
        """Record one send call the kernel accepted with ``MSG_ZEROCOPY``; returns its id."""
        sid = self._next
        self._next = (sid + 1) & _U32
        self._pending[sid] = (token, nbytes)
        self.pinned_bytes += nbytes
        if self.pinned_bytes > self.peak_pinned_bytes:
            self.peak_pinned_bytes = self.pinned_bytes
        return sid

    def complete(self, lo: int, hi: int, copied: bool = False) -> list[T]:
        """Release the send calls in ``[lo, hi]`` (inclusive, wrapping at 2**32) and
        return their tokens, in id order. Ids not pending (already completed, or never
        sent) are counted as duplicates and otherwise ignored."""
        lo &= _U32
        span = (hi - lo) & _U32
        pending = self._pending
        if span < len(pending):
            ids = [(lo + k) & _U32 for k in range(span + 1)]
        else:  # a wide range: walk what is pending instead
            ids = sorted(
                (i for i in pending if ((i - lo) & _U32) <= span), key=lambda i: (i - lo) & _U32
            )
        released: list[T] = []
        for sid in ids:
            entry = pending.pop(sid, None)
            if entry is None:
                self.duplicates += 1
                continue
            token, nbytes = entry
            self.pinned_bytes -= nbytes
            if token is not _UNCERTAIN:
                released.append(token)
        self.completions += len(released)
        if copied:
            self.copied_completions += len(released)
        if span >= len(ids):
            self.duplicates += span + 1 - len(ids)
        return released

    def pending_tokens(self) -> list[T]:
        """Tokens of every send call still pinned (for keeping them alive)."""
        return [token for token, _ in self._pending.values() if token is not _UNCERTAIN]

    def failed_send(self) -> int:
        """A zero-copy send call failed. The kernel may still have used an id for it: a
        UDP datagram dropped on the transmit path (``EPERM`` from a netfilter drop,
        ``ENOBUFS`` from a full queue with ``IP_RECVERR``) returns an error *after* its
        notification took the id, and that notification is already queued when the call
        returns. Reserve the id; after reading the error queue call :meth:`settle_failed`.
        """
        sid = self._next
        self._next = (sid + 1) & _U32
        self._pending[sid] = (_UNCERTAIN, 0)
        return sid

    def settle_failed(self, sid: int) -> bool:
        """Resolve :meth:`failed_send`: True if the kernel used the id (its completion
        was read); otherwise give the id back, as the kernel did."""
        if sid not in self._pending:
            self.ids_used_by_failed_sends += 1
            return True
        if (sid + 1) & _U32 != self._next:
            raise RuntimeError("settle_failed must directly follow failed_send")
        del self._pending[sid]
        self._next = sid
        return False
