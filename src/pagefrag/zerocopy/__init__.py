"""The kernel bridge: zero-copy sends through Linux ``MSG_ZEROCOPY``.

``tracker`` and ``policy`` are sans-I/O; ``socket`` moves the bytes; ``backend`` picks
this bridge or io_uring (:mod:`pagefrag.uring`)."""

from ._syscalls import TcpInfo, tcp_info
from .backend import BACKENDS, choose_backend, zerocopy_socket
from .policy import Mode, ZeroCopyPolicy
from .socket import DEFAULT_MIN_ZEROCOPY_SIZE, ZeroCopySocket, ZeroCopyStats
from .tracker import CompletionTracker, ErrQueueMessage, ZeroCopyCompletion, parse_extended_err

__all__ = [
    "BACKENDS",
    "DEFAULT_MIN_ZEROCOPY_SIZE",
    "CompletionTracker",
    "ErrQueueMessage",
    "Mode",
    "TcpInfo",
    "ZeroCopyCompletion",
    "ZeroCopyPolicy",
    "ZeroCopySocket",
    "ZeroCopyStats",
    "choose_backend",
    "parse_extended_err",
    "tcp_info",
    "zerocopy_socket",
]
