"""The exception hierarchy of pagefrag: every error the library raises derives from
:class:`PageFragError`.

Each class also derives from the built-in exception a Python programmer would expect
(``ValueError`` for a bad range, ``TimeoutError`` for a timeout, ...), so ``except
ValueError`` keeps working. An operation that raises one of these has changed nothing:
no reference count, no frag, no byte.
"""

from __future__ import annotations

__all__ = [
    "PageFragError",
    "DestructorError",
    "FragError",
    "InvalidRangeError",
    "NotContiguousError",
    "TooManyFragsError",
    "FragSharedError",
    "SkbFreedError",
    "DoubleFreeError",
    "ZeroCopyError",
    "ZeroCopyUnsupportedError",
    "CompletionTimeoutError",
    "SendBufferError",
    "QueuedSocketError",
    "RecordTooLargeError",
    "CodecError",
    "AuthenticationError",
    "BufferInUseError",
    "BufferReleasedError",
    "NotABufferError",
    "ForkedSocketError",
]


class PageFragError(Exception):
    """Base class of every exception raised by pagefrag."""


class DestructorError(PageFragError, RuntimeError):
    """A :class:`FragDestructor` was misused: ``ref()`` after it was destroyed, or
    ``unref()`` with no reference left to drop."""


class FragError(PageFragError):
    """A paged fragment or a socket buffer was given something it cannot hold."""


class InvalidRangeError(FragError, ValueError):
    """An offset, size, length or index lies outside what the buffer or skb holds."""


class NotContiguousError(FragError, BufferError):
    """A page is not a C-contiguous buffer (or not a buffer at all): the stack could
    not hand it to the kernel as one span of bytes."""


class TooManyFragsError(FragError, OverflowError):
    """An skb would hold more than ``MAX_SKB_FRAGS`` (17) paged fragments."""


class FragSharedError(FragError):
    """``set_destructor`` on a frag that already has one, or whose descriptor has
    already been shared (cloned or copied into another skb)."""


class SkbFreedError(FragError):
    """The skb was already freed: it holds no data and no references any more."""


class DoubleFreeError(SkbFreedError):
    """``free()`` was called on an skb that was already freed (``kfree_skb`` twice)."""


class ZeroCopyError(PageFragError):
    """Base class of the kernel bridge's errors (``MSG_ZEROCOPY`` sends)."""


class ZeroCopyUnsupportedError(ZeroCopyError, OSError):
    """``zerocopy="always"`` on a socket or kernel without ``SO_ZEROCOPY``."""


class CompletionTimeoutError(ZeroCopyError, TimeoutError):
    """The kernel still held pages when the timeout ran out. Nothing was released early:
    the pinned buffers stay alive and their destructors fire when the completions come."""

    def __init__(self, message: str, outstanding: int = 0, pinned_bytes: int = 0) -> None:
        super().__init__(message)
        self.outstanding = outstanding
        self.pinned_bytes = pinned_bytes


class SendBufferError(ZeroCopyError, OSError):
    """``ENOBUFS`` kept coming (optmem or locked-page limit) until the timeout ran out.
    No byte of the refused call was sent."""


class QueuedSocketError(ZeroCopyError, OSError):
    """A real socket error read from the error queue (an ICMP error on a UDP socket).
    ``report`` holds the decoded ``sock_extended_err``."""

    report: object = None


class RecordTooLargeError(PageFragError, ValueError):
    """An RPC message is larger than the peer accepts (its ``max_record``, announced when
    the connection opens). Raised before anything is sent; the connection stays usable."""

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class CodecError(PageFragError, ValueError):
    """An RPC message body could not be decoded (malformed, hostile, over a limit, an
    unknown registered type) or encoded (nested too deeply). Nothing was executed."""


class AuthenticationError(PageFragError, ConnectionError):
    """The RPC peer failed the HMAC challenge (wrong or missing key) or refused ours; the
    connection was closed before any message was decoded."""


class BufferInUseError(PageFragError, BufferError):
    """An RPC call with ``safe=True`` ended (cancelled, failed or answered) but the kernel
    had not released every transmission of its pages within ``release_timeout``: the
    buffer is **not** free. Await ``released`` before reusing it."""

    def __init__(self, message: str, released: object = None) -> None:
        super().__init__(message)
        self.released = released


class BufferReleasedError(DestructorError):
    """A :class:`~pagefrag.PoolBuffer` was used after ``release()``: its memory may already
    be lent to another holder. A second ``release()`` raises it too (a
    :class:`DestructorError`, as a double release always did) and drops nothing."""


class NotABufferError(NotContiguousError, TypeError):
    """A page that is not a buffer at all (an ``int``, a ``str``, ...): a
    :class:`NotContiguousError` that is also the ``TypeError`` Python would raise."""


class ForkedSocketError(ZeroCopyError, OSError):
    """A :class:`ZeroCopySocket` used in a child process after ``fork()``. The child's
    copy is inert: its error queue and its zero-copy accounting belong to the parent, so
    the child may only ``close()`` its descriptor."""
