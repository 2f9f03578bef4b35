"""The bookkeeping of an ``ENOBUFS`` stall of the zero-copy transport: since when the
socket has refused writes without progress, and the timer that retries them.

Theory of operation. ``ENOBUFS`` (``net.core.optmem_max`` or the locked-page limit)
leaves the write queued. Completions free what it waits for, so the transport retries
when they arrive; a short timer retries too, in case none comes. Any byte taken ends the
stall; ``timeout`` seconds of refusals without one fail the connection. Nothing here
waits: the transport asks and acts."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from ..errors import SendBufferError

__all__ = ["ENOBUFS_RETRY", "EnobufsStall", "stalled"]

ENOBUFS_RETRY = 0.05
"""Seconds: the retry timer while ENOBUFS and no completion comes."""


class EnobufsStall:
    """One transport's ENOBUFS stall: the loop time of its first refusal (None: no
    stall) and the pending retry timer."""

    __slots__ = ("since", "timer")

    def __init__(self) -> None:
        self.since: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def progress(self) -> None:
        """The socket took bytes: a later ENOBUFS starts a new stall."""
        self.since = None

    def refused(self, now: float, timeout: float) -> bool:
        """Record a refusal at loop time ``now``; True once the stall has lasted
        ``timeout`` seconds (the connection should fail)."""
        if self.since is None:
            self.since = now
            return False
        return now - self.since >= timeout

    def retry_later(self, loop: asyncio.AbstractEventLoop, retry: Callable[[], None]) -> None:
        """Call ``retry`` after :data:`ENOBUFS_RETRY` seconds, unless already due."""
        if self.timer is None:
            self.timer = loop.call_later(ENOBUFS_RETRY, self._fire, retry)

    def _fire(self, retry: Callable[[], None]) -> None:
        self.timer = None
        retry()

    def cancel(self) -> None:
        """Stop the retry timer (the connection is lost)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def stalled(timeout: float, outstanding: int) -> SendBufferError:
    """The failure of a connection whose stall lasted ``timeout`` seconds."""
    return SendBufferError(
        errno.ENOBUFS,
        f"ENOBUFS for {timeout:g}s with {outstanding} sends outstanding "
        "(net.core.optmem_max or RLIMIT_MEMLOCK too small)",
    )
