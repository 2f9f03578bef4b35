"""One epoll instance per event loop, shared by every :class:`ZeroCopyTransport` of it.

Rule: this module is the only place that talks to the loop's reader registration for
transports, and it knows nothing of sockets beyond their descriptor numbers.

Theory of operation. The loop is never shown a transport's socket: a socket with a
pending error-queue message (a zero-copy completion) reports ``POLLERR``, and libuv, under
uvloop, stops watching a descriptor that does. Each socket is instead registered,
edge-triggered, in one epoll instance per loop, and only that epoll descriptor is given
to ``loop.add_reader``. On a wake-up the poller takes every ready ``(fd, events)`` pair
and hands the events to the handler registered for the descriptor. So a connection costs
its socket and nothing else; the loop pays one descriptor for all of them.

The poller is created with the loop's first transport and removed with its last; it is
kept in a dictionary keyed weakly on the loop, and holds the loop only weakly, so a loop
that is dropped takes its poller with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import weakref
from collections.abc import Callable

__all__ = ["POLL_ALL", "POLL_READ", "LoopPoller", "poller_for"]

Handler = Callable[[int], None]

_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPoller] = (
    weakref.WeakKeyDictionary()
)
POLL_ALL = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET  # ERR and HUP are implied
"""Readable, writable, error, hang-up: a socket whose sends the transport makes itself."""
POLL_READ = select.EPOLLIN | select.EPOLLET
"""Readable, error, hang-up: a socket whose sends go through an io_uring ring (the ring
tells when they are done; writable edges would only wake the loop for nothing)."""


class LoopPoller:
    """The shared epoll instance of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_ref = weakref.ref(loop)
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        try:
            loop.add_reader(self._epoll.fileno(), self._on_ready)
        except BaseException:
            self._epoll.close()
            raise

    def register(self, fd: int, handler: Handler, events: int = POLL_ALL) -> None:
        """Watch ``fd`` (edge-triggered; ``events``: :data:`POLL_ALL` or
        :data:`POLL_READ`) and call ``handler(events)`` on each change."""
        try:
            try:
                self._epoll.register(fd, events)
            except FileExistsError:
                # A descriptor closed behind its transport's back and reused: the
                # number is ours now.
                self._epoll.modify(fd, events)
        except BaseException:
            if not self._handlers:
                self._retire()
            raise
        self._handlers[fd] = handler

    def replace(self, fd: int, old: Handler, new: Handler) -> bool:
        """Hand ``fd`` from ``old`` to ``new`` if ``old`` still owns it (the number may
        have been reused by another transport: then nothing changes and False is
        returned). The epoll registration is kept as it is."""
        if self._handlers.get(fd) != old:
            return False
        self._handlers[fd] = new
        return True

    def unregister(self, fd: int, handler: Handler) -> None:
        """Stop watching ``fd`` if ``handler`` still owns it; the last one removes the
        poller from its loop."""
        if self._handlers.get(fd) != handler:
            return  # the number was reused by another transport: leave it alone
        del self._handlers[fd]
        # Already closed: the kernel dropped the registration with the file.
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        if not self._handlers:
            self._retire()

    def _retire(self) -> None:
        loop = self._loop_ref()
        if loop is not None:
            if _POLLERS.get(loop) is self:
                del _POLLERS[loop]
            if not loop.is_closed():
                loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    def _on_ready(self) -> None:
        try:
            ready = self._epoll.poll(0)
        except OSError:  # closed under us
            return
        self._deliver(ready)

    def _deliver(self, ready: list[tuple[int, int]]) -> None:
        handlers = self._handlers
        for i, (fd, events) in enumerate(ready):
            handler = handlers.get(fd)
            if handler is None:
                continue  # unregistered earlier in this batch
            try:
                handler(events)
            except BaseException:
                # Edge-triggered: the events already taken would never be reported
                # again. Hand the rest over before the exception goes up.
                loop = self._loop_ref()
                if i + 1 < len(ready) and loop is not None and not loop.is_closed():
                    loop.call_soon(self._deliver, ready[i + 1 :])
                raise

    def __len__(self) -> int:
        return len(self._handlers)


def poller_for(loop: asyncio.AbstractEventLoop) -> LoopPoller:
    """The loop's shared poller, created on first use."""
    poller = _POLLERS.get(loop)
    if poller is None:
        poller = _POLLERS[loop] = LoopPoller(loop)
    return poller
