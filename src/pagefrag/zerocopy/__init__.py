"""The kernel bridge: zero-copy sends through Linux ``MSG_ZEROCOPY``.

``tracker`` and ``policy`` are sans-I/O; ``socket`` moves the bytes."""

from ._syscalls import TcpInfo, tcp_info
from .policy import Mode, ZeroCopyPolicy
from .socket import DEFAULT_MIN_ZEROCOPY_SIZE, ZeroCopySocket, ZeroCopyStats
from .tracker import CompletionTracker, ErrQueueMessage, ZeroCopyCompletion, parse_extended_err

__all__ = [
    "DEFAULT_MIN_ZEROCOPY_SIZE",
    "CompletionTracker",
    "ErrQueueMessage",
    "Mode",
    "TcpInfo",
    "ZeroCopyCompletion",
    "ZeroCopyPolicy",
    "ZeroCopySocket",
    "ZeroCopyStats",
    "parse_extended_err",
    "tcp_info",
]
