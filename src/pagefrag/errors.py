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
