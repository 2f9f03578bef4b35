"""The io_uring backend: zero-copy sends as ``IORING_OP_SEND_ZC`` requests on a ring.

``_ring`` makes rings (the compiled ``pagefrag._uring`` on the raw system calls) and
says whether they work here; ``socket`` holds :class:`UringSocket`, the counterpart of
:class:`~pagefrag.zerocopy.ZeroCopySocket`. Kernel: ``io_uring/net.c``, ``notif.c``."""

from ._ring import Ring, default_ring, new_ring, unsupported_reason
from .socket import UringSocket

__all__ = ["Ring", "UringSocket", "available", "default_ring", "new_ring", "unsupported_reason"]


def available() -> bool:
    """Whether io_uring zero-copy sends work in this process (see
    :func:`unsupported_reason` for why not)."""
    return unsupported_reason() is None
