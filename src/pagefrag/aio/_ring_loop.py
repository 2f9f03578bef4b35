"""One io_uring ring per event loop, watched by the loop, shared by every
:class:`~._uring_transport.UringTransport` of it.

Rule: this module is the only place that reaps the ring of a loop or watches its
descriptor; it knows nothing of transports beyond the callables they hand it.

Theory of operation. The ring's descriptor is readable while completions wait in its
completion ring, so it is given to ``loop.add_reader`` (asyncio's loop and uvloop alike:
it never reports ``POLLERR``). Every reap happens in the loop's thread: in the reader, and
inside :meth:`LoopRing.submit` (``io_uring_enter`` runs a send at once when the socket has
room, and its result is reaped right there). So destructors, write handles and the
channels' ``on_result`` callbacks all run in the loop's thread, never in another.

Callbacks run by a reap only *ask* for work (:meth:`LoopRing.defer`): a transport's
result or notification is handled after the reap, from a queue drained in order, so one
transport's submission never runs inside another's (no recursion however many transports
share the ring). A deferral made outside a drain is drained at the next turn of the loop.

Lifetime. The ring is made with the loop's first uring transport
(:func:`ring_for`; :class:`ZeroCopyUnsupportedError` where io_uring cannot run) and
closed once no transport uses it and no request is in flight. A loop closed with requests
in flight never releases them early: the ring keeps them (``pagefrag._uring`` never
collects a ring with requests in its table), their pins and their transports alive for
the life of the process.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import Callable
from typing import Any

from ..uring import new_ring

__all__ = ["LoopRing", "ring_for"]

_RINGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopRing] = weakref.WeakKeyDictionary()


class LoopRing:
    """The ring of one event loop and the work its completions asked for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ring: Any = new_ring()
        self._loop_ref = weakref.ref(loop)
        self._fd = self.ring.fileno()
        self._users = 0
        self._due: collections.deque[Callable[[], object]] = collections.deque()
        self._draining = False
        self._scheduled = False
        try:
            loop.add_reader(self._fd, self._on_readable)
        except BaseException:
            self.ring.close()
            raise

    # -- users -----------------------------------------------------------------------------
    def attach(self) -> None:
        """A transport uses the ring from now on. Kernel: none. Refs: none."""
        self._users += 1

    def detach(self) -> None:
        """A transport is done with the ring (its socket holds nothing in it any more);
        the last one closes it once nothing is in flight. Kernel: ``close()`` of the
        ring. Refs: none."""
        self._users -= 1
        self._maybe_retire()

    # -- the ring --------------------------------------------------------------------------
    def submit(self) -> None:
        """Hand the prepared requests to the kernel and reap what is ready (a send the
        socket had room for has its result already). Kernel: ``io_uring_enter``.

        Refs: drops those of every request completed (destructors may run here)."""
        self.ring.submit()

    def reap(self) -> int:
        """Take every completion that is ready. Kernel: none (the completion ring is
        shared memory). Refs: as :meth:`submit`."""
        return int(self.ring.reap())

    def defer(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` once the current reap is over: at the end of the drain running
        now, or at the next turn of the loop. Kernel: none. Refs: none."""
        self._due.append(fn)
        if not self._draining and not self._scheduled:
            loop = self._loop_ref()
            if loop is not None and not loop.is_closed():
                self._scheduled = True
                loop.call_soon(self._run_due)

    def _on_readable(self) -> None:
        self._draining = True
        try:
            self.ring.reap()
            self._drain()
        finally:
            self._draining = False
        self._maybe_retire()

    def _run_due(self) -> None:
        self._scheduled = False
        if self._draining:
            return  # the drain running now takes them
        self._draining = True
        try:
            self._drain()
        finally:
            self._draining = False

    def _drain(self) -> None:
        due = self._due
        while due:
            fn = due.popleft()
            try:
                fn()
            except BaseException:
                # The rest still runs, at the next turn; the exception goes to the loop.
                loop = self._loop_ref()
                if due and not self._scheduled and loop is not None and not loop.is_closed():
                    self._scheduled = True
                    loop.call_soon(self._run_due)
                raise

    def _maybe_retire(self) -> None:
        """No transport left and nothing in flight: close the ring and stop watching it."""
        if self._users or self.ring.closed or self.ring.in_flight:
            return
        loop = self._loop_ref()
        if loop is not None:
            if _RINGS.get(loop) is self:
                del _RINGS[loop]
            if not loop.is_closed():
                loop.remove_reader(self._fd)
        self.ring.close()

    def __repr__(self) -> str:
        return f"<LoopRing fd={self._fd} users={self._users} in_flight={self.ring.in_flight}>"


def ring_for(loop: asyncio.AbstractEventLoop) -> LoopRing:
    """The loop's ring, made on first use (:class:`ZeroCopyUnsupportedError` where
    io_uring zero-copy sends cannot run). Kernel: ``io_uring_setup``. Refs: none."""
    lring = _RINGS.get(loop)
    if lring is None or lring.ring.closed:
        lring = _RINGS[loop] = LoopRing(loop)
    return lring
