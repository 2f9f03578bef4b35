"""IoVec and Pin: bytes that travel with their lifetime. Every reference an I/O layer
holds moves here.

Rule: outside :mod:`._skbuff` (the frags an skb holds) and :mod:`._destructor` (the
count itself), this is the only module that takes or drops a reference on a
:class:`FragDestructor`. The kernel bridge and the asyncio transport hold references
only as :class:`Pin` objects and release them only through it. (A creator still drops
its own first reference with ``unref()``: that one is the API's, not a holder's.)

Theory of operation. An :class:`IoVec` is what a send hands the kernel: byte views and,
beside each, the destructor of its pages (None for memory nobody tracks). A
:class:`Pin` is what one holder keeps alive for as long as the kernel (or a write queue)
may read the bytes: the views, so Python can neither free nor resize the memory, and one
reference on each destructor. The model is Seastar's ``deleter``
(``include/seastar/core/deleter.hh``): one object owning a buffer's lifetime, shared by
the holders of its pieces. Kernel counterparts: the iovec of ``sendmsg``, and the
``skb_frag_destructor_ref`` a zero-copy send takes on every frag it pins.

Lent memory. A plain mutable buffer (bytearray, numpy array, mmap, array, a memoryview
of one) written through asyncio's ``write()`` is only *lent* for the call: the caller may
reuse it once the call returns. ``IoVec.of(data, lent=True)`` marks those pieces
(:attr:`IoVec.lent`); a send of an iovec with a lent piece is a copying send (the kernel
reads the bytes before the call returns), and a holder that keeps the bytes past the call
takes a copy first (:meth:`IoVec.own`). Immutable ``bytes`` (and views of them), frags,
pool buffers and skbs are never lent: their lifetime is the holder's pin or their
destructor's, so they may go zero-copy by reference.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TypeAlias

from ._buffers import byte_view
from ._destructor import FragDestructor, each, implementation
from ._skbuff import Frag, SkBuff
from .pool import PoolBuffer

if TYPE_CHECKING:  # collections.abc.Buffer is Python 3.12; the checker knows it here
    from typing_extensions import Buffer

__all__ = ["Data", "IoVec", "Pin", "Unrefs"]

Piece: TypeAlias = "SkBuff | Frag | PoolBuffer | Buffer"
Data: TypeAlias = "Piece | Sequence[Piece]"
"""What a send takes: one piece, or a list or tuple of pieces. A piece is an
:class:`SkBuff` (its head, then its frags), a :class:`Frag`, a :class:`PoolBuffer` (all
of it) or any C-contiguous buffer (bytes, bytearray, memoryview, mmap, array, numpy
array)."""

_NO_REFS: list[FragDestructor] = []  # shared, never appended to: a pin that holds none


def check_destructor(d: object) -> None:
    """``TypeError`` unless ``d`` is a :class:`FragDestructor` or None."""
    if d is not None and not isinstance(d, FragDestructor):
        raise TypeError(f"destructor must be a FragDestructor or None, not {type(d).__name__}")


def _immutable(view: memoryview) -> bool:
    """Whether nobody can change the bytes of ``view``: a view of ``bytes``. Conservative:
    a read-only view of a bytearray (or an mmap opened for reading) is not."""
    return view.readonly and isinstance(view.obj, bytes)


class IoVec:
    """Byte views with the destructor of each: ``views[i]`` belongs to ``owners[i]``
    (None: memory nobody tracks). ``lent``: None, or ``lent[i]`` true when ``views[i]``
    is mutable memory lent only for the call (see the module docstring). Kernel
    counterpart: the ``struct iovec`` array of one ``sendmsg``. Takes no reference by
    itself (see :meth:`pin`)."""

    __slots__ = ("lent", "owners", "views")

    def __init__(
        self,
        views: list[memoryview],
        owners: list[FragDestructor | None],
        lent: list[bool] | None = None,
    ) -> None:
        self.views = views
        self.owners = owners
        self.lent = lent

    @classmethod
    def of(cls, data: Data, lent: bool = False) -> IoVec:
        """The views of ``data`` (see :data:`Data`). ``TypeError`` for what is not one.
        ``lent``: the plain buffers are lent only for the call (asyncio's ``write``):
        mark the mutable ones in :attr:`lent`.

        Refs: none."""
        kind = type(data)
        if kind is bytes:
            return cls([memoryview(data)], [None])  # type: ignore[arg-type]  # bytes
        if kind is bytearray:
            return cls([memoryview(data)], [None], [True] if lent else None)  # type: ignore[arg-type]
        if isinstance(data, SkBuff):
            views = data.iovecs()
            owners: list[FragDestructor | None] = [None] * (len(views) - data.nr_frags)
            owners.extend(f.destructor for f in data.frags)
            return cls(views, owners)
        items = data if isinstance(data, (list, tuple)) else (data,)
        views, owners = [], []
        marks: list[int] = []  # the lent pieces
        for item in items:
            if isinstance(item, SkBuff):
                part = cls.of(item)
                views += part.views
                owners += part.owners
                continue
            if isinstance(item, PoolBuffer):
                item = item.frag()
            if isinstance(item, Frag):
                views.append(item.view())
                owners.append(item.destructor)
            else:
                view = byte_view(item)
                if lent and not _immutable(view):
                    marks.append(len(views))
                views.append(view)
                owners.append(None)
        if not marks:
            return cls(views, owners)
        flags = [False] * len(views)
        for i in marks:
            flags[i] = True
        return cls(views, owners, flags)

    @property
    def nbytes(self) -> int:
        views = self.views
        return len(views[0]) if len(views) == 1 else sum(map(len, views))

    def __len__(self) -> int:
        """How many pieces are left."""
        return len(self.views)

    def first(self, count: int) -> IoVec:
        """The first ``count`` pieces (for an iovec limit), sharing their views."""
        lent = self.lent
        if lent is not None:
            lent = lent[:count]
            if not any(lent):
                lent = None
        return IoVec(self.views[:count], self.owners[:count], lent)

    def head(self, n: int) -> IoVec:
        """The first ``n`` bytes (a shorter stream send), sharing their views.

        Refs: none."""
        views: list[memoryview] = []
        for view in self.views:
            if n <= 0:
                break
            views.append(view if len(view) <= n else view[:n])
            n -= len(view)
        k = len(views)
        lent = self.lent
        if lent is not None:
            lent = lent[:k]
            if not any(lent):
                lent = None
        return IoVec(views, self.owners[:k], lent)

    def advance(self, n: int) -> None:
        """Drop the first ``n`` bytes in place (after a partial stream send).

        Refs: none (a holder's references are in its :class:`Pin`)."""
        views, owners, lent = self.views, self.owners, self.lent
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
            owners.pop(0)
            if lent is not None:
                lent.pop(0)
        if n:
            views[0] = views[0][n:]

    def own(self) -> None:
        """Replace every lent view by a copy of its bytes (``bytes``, immutable), so the
        caller may reuse its buffer while this iovec is still held (a write still
        queued when ``write()`` returns). In place: the list of views is shared with the
        holder's :class:`Pin`, which then keeps the copies, not the caller's memory.

        Refs: none."""
        lent = self.lent
        if lent is None:
            return
        views = self.views
        if len(lent) == 1:  # one buffer written: no loop
            if lent[0]:
                views[0] = memoryview(views[0].tobytes())
        else:
            for i, mark in enumerate(lent):
                if mark:
                    views[i] = memoryview(views[i].tobytes())
        self.lent = None

    def pin(self, holder: object, extra: FragDestructor | None = None) -> Pin:
        """A :class:`Pin` of these bytes for ``holder``: a copy of the views and one
        reference on each owner (and on ``extra``, the call's own destructor), all or
        nothing: if one cannot be taken (a destructor that has fired), those taken are
        dropped and the error raised. Kernel: ``skb_frag_destructor_ref`` per frag.

        Refs: +1 on every owner and on ``extra``."""
        pin = Pin(self.views[:], self.owners[:])
        pin.take(holder, extra)
        return pin


class Pin:
    """What one holder keeps alive: views (so Python cannot free or resize their memory)
    and one reference per destructor (Seastar: a ``deleter``). For the kernel bridge,
    what one zero-copy call holds until its completion; for a write queue, what a write
    holds until the kernel has taken it. ``views`` and ``refs`` are None once released.

    Not thread-safe by itself: its holder serializes :meth:`trim` and :meth:`detach`."""

    __slots__ = ("owners", "refs", "views")

    def __init__(
        self,
        views: list[memoryview] | None,
        owners: list[FragDestructor | None] | None = None,
    ) -> None:
        """Pin ``views`` (``owners[i]``, the destructor of ``views[i]``, or None: no
        piece has one). Takes no reference yet: :meth:`take` does.

        Refs: none."""
        self.views = views
        self.owners = owners
        self.refs: list[FragDestructor] | None = _NO_REFS

    def take(self, holder: object, extra: FragDestructor | None = None) -> None:
        """Take one reference on every owner and on ``extra`` (the call's own destructor),
        all or nothing: each is in :attr:`refs` as soon as it is taken, so a failure
        drops exactly those. Call it inside the ``try`` whose ``except`` releases the
        pin, with the pin already bound: then an interrupt can only land inside a
        ``ref()`` (a reference that leaks, never one dropped early).

        Refs: +1 on every owner and on ``extra``."""
        refs: list[FragDestructor] = []
        self.refs = refs
        try:
            for d in self.owners or ():
                if d is not None:
                    if type(d) is not FragDestructor:
                        check_destructor(d)
                    d.ref(holder=holder)
                    refs.append(d)
            if extra is not None:  # last: trim() keeps it whatever the kernel took
                if type(extra) is not FragDestructor:
                    check_destructor(extra)
                extra.ref(holder=holder)
                refs.append(extra)
        except BaseException:
            self.release(holder)
            raise

    def trim(self, n: int) -> list[FragDestructor]:
        """Keep only the first ``n`` bytes (after a partial send took them): the views
        and references of the pieces past them leave the pin and are returned, for the
        caller to drop (:func:`unref_all`) outside its locks. The ``extra`` reference
        stays (``n > 0``). A pin already released returns nothing.

        Refs: moves those of the pieces not covered out of the pin."""
        views, refs = self.views, self.refs
        if views is None or not refs:
            return []
        taken = iter(refs)
        owners = self.owners or [None] * len(views)
        kept_views: list[memoryview] = []
        kept_owners: list[FragDestructor | None] = []
        kept_refs: list[FragDestructor] = []
        dropped: list[FragDestructor] = []
        pos = 0
        for view, owner in zip(views, owners, strict=True):
            covered = pos < n
            if covered:
                kept_views.append(view if pos + len(view) <= n else view[: n - pos])
                kept_owners.append(owner)
            if owner is not None:
                (kept_refs if covered else dropped).append(next(taken))
            pos += len(view)
        kept_refs.extend(taken)  # the extra one
        self.views, self.owners, self.refs = kept_views, kept_owners, kept_refs
        return dropped

    def detach(self) -> list[FragDestructor]:
        """Release the views and hand over the references, for the caller to drop
        (:class:`Unrefs`, :func:`unref_all`) once its locks are released.

        Refs: moves them out of the pin."""
        refs, self.refs = self.refs, None
        self.views = self.owners = None
        return refs or []

    def release(self, holder: object) -> None:
        """Release the views and drop every reference now; destructors whose last
        reference this was fire, in this thread. Releasing twice drops nothing.

        Refs: -1 on each held."""
        refs, self.refs = self.refs, None
        self.views = self.owners = None
        unref_all(refs or (), holder)

    @property
    def released(self) -> bool:
        return self.refs is None

    def __repr__(self) -> str:
        if self.refs is None:
            return "<Pin released>"
        nbytes = sum(map(len, self.views or ()))
        return f"<Pin {nbytes} bytes, {len(self.refs)} refs>"


def unref_all(refs: Iterable[FragDestructor], holder: object) -> None:
    """Drop one reference of ``holder`` on each. Kernel: ``skb_frag_destructor_unref``.

    Refs: -1 on each, also when one raises an interrupt (raised after the last)."""
    each(lambda d: d.unref(holder=holder), refs)


class Unrefs:
    """References detached under a lock, waiting to be dropped after it is released
    (a destructor may run anything: never under the holder's lock). Any thread may
    :meth:`run` them; each is dropped exactly once."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        # Public for the completion path: queue.extend(pin.detach()) is C all the way,
        # no bytecode (no interrupt) between a pin's detach and its references' queueing.
        self.queue: collections.deque[FragDestructor] = collections.deque()

    def extend(self, refs: list[FragDestructor]) -> None:
        """Queue references already detached. Refs: moves them to the queue."""
        if refs:
            self.queue.extend(refs)

    def detach(self, pins: Iterable[Pin]) -> int:
        """Detach every pin of ``pins`` (views released) and queue its references;
        returns how many pins. Refs: moves them from the pins to the queue."""
        extend = self.queue.extend
        count = 0
        for pin in pins:
            extend(pin.detach())  # C all the way: no bytecode between detach and queueing
            count += 1
        return count

    def run(self, holder: object) -> None:
        """Drop every queued reference. Refs: -1 on each."""
        queue = self.queue
        interrupt: BaseException | None = None
        while queue:
            try:
                d = queue.popleft()
            except IndexError:  # another thread took the last one
                break
            try:
                d.unref(holder=holder)
            except (KeyboardInterrupt, SystemExit) as exc:  # raised after the last
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt


# The pure-Python Pin and Unrefs above are the reference; the compiled twins
# (pagefrag._speedups) are used with the compiled FragDestructor, whose references they
# take and drop in C. The whole test suite runs against each (tests/run).
PyPin, PyUnrefs = Pin, Unrefs
if not TYPE_CHECKING and implementation == "compiled":
    from ._speedups import Pin, Unrefs
