"""pagefrag: know when the network stack is really finished with your memory.

Per-paged-fragment destructors (Linux "net: add support for per-paged-fragment
destructors") and a socket-buffer model with the kernel's reference rules.
"""

from ._destructor import FragDestructor
from ._skbuff import MAX_SKB_FRAGS, Frag, SkBuff
from .errors import (
    CompletionTimeoutError,
    DestructorError,
    DoubleFreeError,
    FragError,
    FragSharedError,
    InvalidRangeError,
    NotContiguousError,
    PageFragError,
    QueuedSocketError,
    SendBufferError,
    SkbFreedError,
    TooManyFragsError,
    ZeroCopyError,
    ZeroCopyUnsupportedError,
)
from .pool import BufferPool, PoolBuffer, PoolExhaustedError
from .zerocopy import ZeroCopySocket, ZeroCopyStats

__version__ = "0.1.0"

__all__ = [
    "MAX_SKB_FRAGS",
    "BufferPool",
    "CompletionTimeoutError",
    "DestructorError",
    "DoubleFreeError",
    "Frag",
    "FragDestructor",
    "FragError",
    "FragSharedError",
    "InvalidRangeError",
    "NotContiguousError",
    "PageFragError",
    "PoolBuffer",
    "PoolExhaustedError",
    "QueuedSocketError",
    "SendBufferError",
    "SkBuff",
    "SkbFreedError",
    "TooManyFragsError",
    "ZeroCopyError",
    "ZeroCopySocket",
    "ZeroCopyStats",
    "ZeroCopyUnsupportedError",
]
