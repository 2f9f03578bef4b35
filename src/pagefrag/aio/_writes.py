"""The write queue of the zero-copy transport: the writes it has accepted and not yet
handed whole to the kernel, each with what it holds and the handle its caller awaits.

Rule: this module holds every reference the transport takes, and only as :class:`Pin`
objects (:mod:`.._iov`); it knows nothing of sockets or of the event loop.

Theory of operation. A write is queued with a :class:`Pin` of its bytes (one reference
on every destructor they carry), so nothing the queue still holds can be released by its
owner, and a *write handle*: a :class:`FragDestructor` created for the write and
returned to the caller. Its bytes are handed to the kernel as the socket accepts them;
the kernel bridge then holds its own references (on the pages and on the handle) until
their completions, and once the whole write is sent the queue releases its pin and the
handle's first reference. So the handle fires when the kernel has released the last
page. A write's own ``destructor`` is held by a second pin, released when the handle
fires.

Small writes queued behind a full socket go out coalesced (:meth:`WriteQueue.gather`):
one copying ``sendmsg`` for as many as fit (:data:`COALESCE_PIECES` pieces,
:data:`COALESCE_BYTES` bytes), each write credited in order as the kernel takes its
bytes (:meth:`WriteQueue.credit`). Only writes the policy would copy anyway (shorter
than its ``copy_below``) are coalesced: a copying call holds no reference, so each
write's handle and pin stay exactly as for a write sent by itself, released once the
kernel has taken its last byte. A write that would go zero-copy is sent by itself.

Lent memory (asyncio's contract: the caller may reuse a buffer once ``write()`` returns).
A plain write's mutable buffers are pushed *lent* (:attr:`IoVec.lent`): the kernel bridge
sends them copied, and as ``write()`` returns the transport copies what is still queued
of *that* write (:meth:`IoVec.own` of the write :meth:`WriteQueue.push` returned; not
"the last one": callbacks run during the send may have queued others since). So no
queued write and no kernel pin ever refers to lent memory after its ``write()`` has
returned.
"""

from __future__ import annotations

import collections

from .._destructor import FragDestructor, each
from .._iov import Data, IoVec, Pin, check_destructor
from ..zerocopy._syscalls import IOV_MAX

__all__ = ["COALESCE_BYTES", "COALESCE_PIECES", "WriteQueue"]

COALESCE_BYTES = 256 << 10
"""At most this many bytes of queued small writes go in one coalesced send call."""
COALESCE_PIECES = IOV_MAX
"""At most this many pieces (iovec entries) in one coalesced send call."""


class _Write:
    __slots__ = ("handle", "hold", "iov", "left")

    def __init__(self, iov: IoVec, hold: Pin | None, handle: FragDestructor, left: int) -> None:
        self.iov = iov  # what is still to send: advanced as the kernel takes it
        # The queue's references (None: no piece has a destructor; the views in iov
        # keep the memory alive): released once every byte is sent.
        self.hold = hold
        self.handle = handle
        self.left = left  # bytes of iov not yet taken by the kernel


class WriteQueue:
    """The writes of one transport, first to send first. ``holder`` is who the pins'
    references are recorded for (the transport, in leak reports). ``unsent``: bytes
    queued and not yet taken by the kernel; ``dropped``: bytes :meth:`drop` abandoned
    unsent, ever; ``handles``: the handles not fired yet."""

    __slots__ = ("_holder", "dropped", "gathered", "handles", "queue", "unsent")

    def __init__(self, holder: object) -> None:
        self._holder = holder
        self.queue: collections.deque[_Write] = collections.deque()
        self.handles: set[FragDestructor] = set()
        self.unsent = 0
        self.dropped = 0
        self.gathered = 0  # bytes of the last iovec gather() returned

    def push(
        self, data: Data, destructor: FragDestructor | None, lent: bool = False
    ) -> tuple[FragDestructor, _Write | None]:
        """Queue ``data`` and return its write handle and the queued write (None: nothing
        queued, the handle has fired already). ``lent``: its plain mutable buffers are
        lent only until the caller's ``write()`` returns, which must then copy what is
        still queued (``write.iov.own()``). Raises, with no reference taken and no handle
        made, for data that is not :data:`Data`, a ``destructor`` that is not a
        :class:`FragDestructor`, or a destructor (the write's or its pieces') that has
        fired.

        Refs: +1 on every piece's destructor (the queue's pin); +1 on ``destructor``
        until the handle fires."""
        holder = self._holder
        iov = IoVec.of(data, lent)
        if destructor is not None:
            check_destructor(destructor)
        # Bound before they hold anything, taken in the try that releases them: all or
        # nothing (DestructorError if one has fired), and no interrupt loses one. (No
        # pin at all for what holds nothing: most writes.)
        hold = Pin(iov.views, iov.owners) if any(iov.owners) else None
        keep = Pin(None, [destructor]) if destructor is not None else None
        if hold is not None or keep is not None:
            try:
                if hold is not None:
                    hold.take(holder)
                if keep is not None:
                    keep.take(holder)
            except BaseException:
                if hold is not None:
                    hold.release(holder)
                if keep is not None:
                    keep.release(holder)
                raise
        handle = FragDestructor(None, name="write")
        self.handles.add(handle)  # until it fires (see _release)
        if keep is not None:
            handle.add_done_callback(lambda _: keep.release(holder))
        nbytes = sum(map(len, iov.views))  # (not iov.nbytes: one call less per write)
        w = _Write(iov, hold, handle, nbytes)
        if not nbytes:
            self._release(w)
            return handle, None
        self.queue.append(w)
        self.unsent += nbytes
        return handle, w

    def sent(self, n: int) -> None:
        """The kernel took the first ``n`` bytes of the first write; once all of it is
        taken, the write leaves the queue.

        Refs: a write sent whole releases its pin and its handle's first reference."""
        w = self.queue[0]
        self.unsent -= n
        w.left -= n
        w.iov.advance(n)
        if not w.left:
            self.queue.popleft()
            self._release(w)

    def gather(self, copy_below: float) -> IoVec | None:
        """The first writes, as one iovec for one *copying* send call, when there are at
        least two of them to send and each is shorter than ``copy_below`` (would be
        copied anyway): as many as fit in :data:`COALESCE_PIECES` pieces and
        :data:`COALESCE_BYTES` bytes. None when fewer than two qualify. The iovec's
        pieces are marked lent (:attr:`IoVec.lent`), so the kernel bridge copies them
        whatever its policy (a zero-copy call would pin one extra destructor for the
        whole call, not one per write). Credit what the kernel took with :meth:`credit`.

        Refs: none (each write's pin holds its bytes until :meth:`credit` releases it)."""
        views: list[memoryview] = []
        total = 0
        count = 0
        for w in self.queue:
            wv = w.iov.views
            nbytes = w.left
            if nbytes >= copy_below and w.iov.lent is None:
                break  # would go zero-copy: sent by itself
            if count and (
                total + nbytes > COALESCE_BYTES or len(views) + len(wv) > COALESCE_PIECES
            ):
                break
            views += wv
            total += nbytes
            count += 1
        if count < 2:
            return None
        self.gathered = total
        return IoVec(views, [None] * len(views), [True] * len(views))

    def credit(self, n: int) -> None:
        """The kernel took the first ``n`` bytes of the queue (a :meth:`gather` call):
        each write it covered whole leaves the queue in order and is released; the
        next is advanced past the rest.

        Refs: as :meth:`sent`, for every write covered whole."""
        queue = self.queue
        self.unsent -= n
        while n:
            w = queue[0]
            left = w.left
            if n < left:
                w.left = left - n
                w.iov.advance(n)
                return
            n -= left
            queue.popleft()
            self._release(w)  # its handle may fire: a callback may abort (drop) the queue
            if self.queue is not queue:
                return

    def drop(self) -> None:
        """Abandon every queued write: the kernel never saw their unsent bytes.

        Refs: releases each write's pin and its handle's first reference (the handle
        fires once the kernel has released the part it took)."""
        queue, self.queue = self.queue, collections.deque()
        self.dropped += self.unsent
        self.unsent = 0
        try:
            each(self._release, queue)  # every write, also if a handle raises an interrupt
        finally:
            # Emptied: whoever still refers to the old deque (the io_uring bridge's
            # sent_by) must not keep the writes' views, and so their memory, alive.
            queue.clear()

    def _release(self, w: _Write) -> None:
        if w.hold is not None:
            w.hold.release(self._holder)
        handle = w.handle
        handle.unref()  # the reference the handle was created with
        # Out of `handles` once fired: now (a copied write), or at its completion.
        if handle.done:
            self.handles.discard(handle)
        else:
            handle.add_done_callback(self.handles.discard)
