"""Connections reported lost while the kernel still holds their pages: kept alive, pins
and descriptor, and still watched by the loop's poller until the kernel releases the
last page (then closed and forgotten), or for as long as the process lives if the loop
goes first.

Rule: a socket handed here is no transport's any more; nothing here reports anything
(``connection_lost`` was reported before the hand-over).

Theory of operation. A transport whose linger bound ran out with completions still due
hands its socket over with :func:`linger`. Its descriptor stays registered in the loop's
shared poller, under a handler of this module: each wake-up reads the completions that
came (their pins are released, their write handles fire); once the kernel holds nothing
more, the socket is closed and unregistered. Freeing the pins earlier could let Python
reuse memory the kernel may still transmit, so the registry keeps the sockets alive even
when their loop and its poller are gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..errors import CompletionTimeoutError, PageFragError
from ..zerocopy.socket import ZeroCopySocket
from ._poller import LoopPoller

__all__ = ["linger", "still_pinned"]

_LINGERING: list[ZeroCopySocket] = []


def linger(
    zs: ZeroCopySocket,
    poller: LoopPoller,
    fd: int,
    handler: Callable[[int], None],
    on_released: Callable[[], object],
) -> None:
    """Take over ``zs`` (registered in ``poller`` as ``fd`` with ``handler``): release its
    pages as their completions come, then close it and call ``on_released()``.

    Refs: drops the kernel bridge's references as the completions arrive; never before."""

    def on_events(_events: int) -> None:
        # The loss was reported already: a late socket error (TCP giving up, a reset, a
        # descriptor closed behind our back) is nobody's to handle; the completions
        # that came with it were drained before it was raised.
        with contextlib.suppress(PageFragError, OSError):
            zs.poll_completions(0)
        if zs.outstanding:
            return
        poller.unregister(fd, on_events)
        with contextlib.suppress(PageFragError, OSError):
            zs.close(timeout=0)
        with contextlib.suppress(ValueError):
            _LINGERING.remove(zs)
        on_released()

    _LINGERING.append(zs)
    # Replaces the transport's handler, only if the number is still the transport's: a
    # descriptor closed behind its back may have been reused by another connection, whose
    # handler must stay. Then no completion can come; the pins stay in the registry.
    poller.replace(fd, handler, on_events)


def still_pinned(zs: ZeroCopySocket, linger: float | None, unsent: int) -> CompletionTimeoutError:
    """The loss a transport reports when its linger bound ran out first."""
    return CompletionTimeoutError(
        f"the kernel still holds {zs.outstanding} sends ({zs.pinned_bytes} bytes) "
        f"after {linger:g}s, with {unsent} bytes never sent; their buffers stay pinned",
        zs.outstanding,
        zs.pinned_bytes,
    )
