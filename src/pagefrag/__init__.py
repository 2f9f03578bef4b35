"""pagefrag: know when the network stack is really finished with your memory.

Per-paged-fragment destructors (Linux "net: add support for per-paged-fragment
destructors") and a socket-buffer model with the kernel's reference rules.
"""

from ._destructor import FragDestructor, implementation
from ._iov import IoVec
from ._skbuff import MAX_SKB_FRAGS, Frag, SkBuff
from .errors import (
    AuthenticationError,
    BufferInUseError,
    BufferReleasedError,
    CodecError,
    CompletionTimeoutError,
    DestructorError,
    DoubleFreeError,
    ForkedSocketError,
    FragError,
    FragSharedError,
    InvalidRangeError,
    NotABufferError,
    NotContiguousError,
    PageFragError,
    QueuedSocketError,
    RecordTooLargeError,
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
    "AuthenticationError",
    "BufferInUseError",
    "BufferPool",
    "BufferReleasedError",
    "CodecError",
    "CompletionTimeoutError",
    "DestructorError",
    "DoubleFreeError",
    "ForkedSocketError",
    "Frag",
    "FragDestructor",
    "FragError",
    "FragSharedError",
    "InvalidRangeError",
    "IoVec",
    "NotABufferError",
    "NotContiguousError",
    "PageFragError",
    "PoolBuffer",
    "PoolExhaustedError",
    "QueuedSocketError",
    "RecordTooLargeError",
    "SendBufferError",
    "SkBuff",
    "SkbFreedError",
    "TooManyFragsError",
    "ZeroCopyError",
    "ZeroCopySocket",
    "ZeroCopyStats",
    "ZeroCopyUnsupportedError",
    "implementation",
]
