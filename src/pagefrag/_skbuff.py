"""Frag and SkBuff: the socket-buffer model. Every frag reference moves here.

Rule 1: this is the only module that takes or drops the references an skb holds on its
paged fragments (``_frag_ref`` / ``_frag_unref``); what an I/O layer holds while the kernel
reads the pages is taken and dropped only in :mod:`._iov`. Everything else calls the
operations below.

Rule 2: this module knows nothing of sockets or I/O; it mirrors the reference rules of
``net/core/skbuff.c``.

Theory of operation. An :class:`SkBuff` is a handle on a :class:`_SharedInfo` (the
kernel's ``skb_shared_info``): a linear head and up to ``MAX_SKB_FRAGS`` frag
descriptors. The shared info holds exactly one reference per frag descriptor it
contains: on the frag's destructor when it has one, otherwise on the page itself (which
Python keeps alive by holding it). Clones share the shared info and count themselves in
``dataref``; they take no frag references. The frags are released when the last skb
sharing them is freed (``skb_release_data``). Any operation that changes the layout of
a cloned skb first gives it a private shared info (``pskb_expand_head``), taking one
reference per frag copied. Descriptors copied into another shared info (``pskb_copy``,
a split through a frag, ``skb_segment``) take a reference each; frags dropped whole by
pull, trim, trim_head and orphan release theirs.

Every operation validates its arguments before it changes anything, so an exception
leaves every reference count as it was.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Sequence
from types import TracebackType

from . import leaks
from ._buffers import as_index, byte_view
from ._destructor import FragDestructor, each
from .errors import (
    DestructorError,
    DoubleFreeError,
    FragSharedError,
    InvalidRangeError,
    SkbFreedError,
    TooManyFragsError,
)

__all__ = ["MAX_SKB_FRAGS", "Frag", "SkBuff"]

MAX_SKB_FRAGS = 17
"""Kernel ``MAX_SKB_FRAGS`` with 4 KiB pages and 64 KiB GSO."""

_skb_ids = itertools.count(1)


class Frag:
    """An immutable paged-fragment descriptor ``(page, offset, size, destructor)``.

    Kernel counterpart: ``skb_frag_t``. ``page`` is any C-contiguous buffer (bytes,
    bytearray, memoryview, mmap, array, numpy array); the descriptor names ``size``
    bytes of it from ``offset``. A descriptor takes no reference by itself: the skb that
    holds it does.
    """

    __slots__ = ("_destructor", "_offset", "_page", "_pageview", "_shared", "_size")

    def __init__(
        self,
        page: object,
        offset: int = 0,
        size: int | None = None,
        destructor: FragDestructor | None = None,
    ) -> None:
        view = byte_view(page)
        # type() is int first: the cheap test on the hot path; as_index for the rest
        # (NumPy integers pass, floats and bools raise TypeError).
        if type(offset) is not int:
            offset = as_index(offset, "offset")
        if size is None:
            size = len(view) - offset
        elif type(size) is not int:
            size = as_index(size, "size")
        if offset < 0 or size <= 0 or offset + size > len(view):
            raise InvalidRangeError(
                f"frag [{offset}, {offset}+{size}) does not fit a page of {len(view)} bytes "
                "(a frag holds at least one byte)"
            )
        if destructor is not None and not isinstance(destructor, FragDestructor):
            raise TypeError("destructor must be a FragDestructor or None")
        self._page = page
        self._pageview = view
        self._offset = offset
        self._size = size
        self._destructor = destructor
        # Set once the descriptor is visible to more than one holder (a clone shares
        # it, or it was copied into another skb): set_destructor is refused from then.
        self._shared = False

    def _derive(self, offset: int, size: int, destructor: FragDestructor | None = None) -> Frag:
        """A descriptor for another range of the same page (no validation: callers
        compute ranges inside this one)."""
        f = Frag.__new__(Frag)
        f._page = self._page
        f._pageview = self._pageview
        f._offset = offset
        f._size = size
        f._destructor = self._destructor if destructor is None else destructor
        f._shared = self._shared
        return f

    def _slice(self, start: int, stop: int) -> Frag:
        """Bytes ``[start, stop)`` of this frag, relative to the frag."""
        return self._derive(self._offset + start, stop - start)

    @property
    def page(self) -> object:
        return self._page

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def size(self) -> int:
        return self._size

    @property
    def destructor(self) -> FragDestructor | None:
        return self._destructor

    def view(self) -> memoryview:
        """The frag's bytes, without copying (kernel: ``skb_frag_address``)."""
        return self._pageview[self._offset : self._offset + self._size]

    def __repr__(self) -> str:
        d = f", destructor={self._destructor!r}" if self._destructor is not None else ""
        return f"Frag(<{type(self._page).__name__}>, offset={self._offset}, size={self._size}{d})"


def _frag_ref(frag: Frag, holder: _SharedInfo) -> None:
    """Kernel ``__skb_frag_ref``: on the destructor when there is one; a page without
    one is kept alive by the descriptor itself."""
    if frag._destructor is not None:
        frag._destructor.ref(holder=holder)


def _frag_unref(frag: Frag, holder: _SharedInfo) -> None:
    """Kernel ``__skb_frag_unref``."""
    if frag._destructor is not None:
        frag._destructor.unref(holder=holder)


def _frag_range(frags: Sequence[Frag], start: int, stop: int) -> list[Frag]:
    """Descriptors for bytes ``[start, stop)`` of the frags' concatenation."""
    out: list[Frag] = []
    pos = 0
    for f in frags:
        end = pos + f._size
        if end > start and pos < stop:
            lo = max(start, pos) - pos
            hi = min(stop, end) - pos
            out.append(f if (lo == 0 and hi == f._size) else f._slice(lo, hi))
        if end >= stop:
            break
        pos = end
    return out


def _cut_inside(frags: Sequence[Frag], at: int) -> bool:
    """True when byte offset ``at`` of the frags falls strictly inside one frag."""
    pos = 0
    for f in frags:
        if pos < at < pos + f._size:
            return True
        pos += f._size
        if pos >= at:
            return False
    return False


class _SharedInfo:
    """Kernel ``struct skb_shared_info``: head and frags, shared by clones.

    Holds one reference per frag descriptor in ``frags``."""

    __slots__ = ("__weakref__", "dataref", "frags", "head", "lock", "owner_id")

    def __init__(self, head: bytes, frags: list[Frag], owner_id: int) -> None:
        self.head = head
        self.frags = frags
        self.dataref = 1
        self.lock = threading.Lock()
        self.owner_id = owner_id

    def release(self) -> None:
        """Drop one ``dataref``; the last one releases every frag (``skb_release_data``)."""
        with self.lock:
            self.dataref -= 1
            if self.dataref:
                return
            frags, self.frags = self.frags, []
            self.head = b""
        each(lambda f: _frag_unref(f, self), frags)

    def __repr__(self) -> str:
        return f"<frags of SkBuff#{self.owner_id}>"


class SkBuff:
    """A socket buffer: a linear head plus up to ``MAX_SKB_FRAGS`` paged frags.

    Kernel counterpart: ``struct sk_buff``. Free it with :meth:`free` or use it as a
    context manager; an skb that is garbage-collected unfreed warns (``ResourceWarning``)
    and then releases its references.
    """

    __slots__ = ("__weakref__", "_created_at", "_freed", "_id", "_sh")

    def __init__(self, head: object = b"") -> None:
        self._id = next(_skb_ids)
        self._created_at = leaks.call_site() if leaks.enabled else ""
        self._sh = _SharedInfo(bytes(byte_view(head)), [], self._id)
        self._freed = False

    @classmethod
    def _from_shinfo(cls, sh: _SharedInfo) -> SkBuff:
        skb = cls.__new__(cls)
        skb._id = next(_skb_ids)
        skb._created_at = leaks.call_site() if leaks.enabled else ""
        skb._sh = sh
        skb._freed = False
        return skb

    def _new(self, head: bytes, frags: list[Frag]) -> SkBuff:
        """A fresh skb holding ``frags``; takes one reference per frag."""
        skb = SkBuff._from_shinfo(_SharedInfo(head, frags, 0))
        skb._sh.owner_id = skb._id
        for f in frags:
            f._shared = True
            _frag_ref(f, skb._sh)
        return skb

    # -- checks ----------------------------------------------------------------------
    def _live(self) -> _SharedInfo:
        if self._freed:
            raise SkbFreedError(f"{self!r} was already freed")
        return self._sh

    def _check_range(self, n: int, what: str) -> int:
        if type(n) is not int:
            n = as_index(n, what)
        if not 0 <= n <= len(self):
            raise InvalidRangeError(f"{what} {n} outside [0, {len(self)}] of {self!r}")
        return n

    def _unclone(self) -> _SharedInfo:
        """Kernel ``pskb_expand_head`` on a cloned skb (``skb_unclone``): give this skb
        a private shared info. Refs: takes one per frag; drops this skb's dataref."""
        sh = self._sh
        if sh.dataref == 1:
            return sh
        new = _SharedInfo(sh.head, list(sh.frags), self._id)
        for f in new.frags:
            _frag_ref(f, new)
        self._sh = new
        sh.release()
        return new

    # -- building ----------------------------------------------------------------------
    def add_frag(
        self,
        page: object,
        offset: int = 0,
        size: int | None = None,
        destructor: FragDestructor | None = None,
    ) -> int:
        """Append a paged fragment (a page and range, or a :class:`Frag`) and return its
        index. Kernel: ``skb_add_rx_frag`` (``skb_fill_page_desc`` and the length) +
        ``skb_frag_set_destructor`` + ``skb_frag_ref``.

        Refs: takes the skb's reference on the destructor (or keeps the page alive)."""
        sh = self._live()
        if isinstance(page, Frag):  # a descriptor already carries its page and destructor
            if not (type(offset) is int and offset == 0 and size is None and destructor is None):
                raise InvalidRangeError("add_frag(frag) takes no offset, size or destructor")
            frag = page._derive(page._offset, page._size)
            frag._shared = False
        else:
            frag = Frag(page, offset, size, destructor)
        if len(sh.frags) >= MAX_SKB_FRAGS:
            raise TooManyFragsError(f"{self!r} already holds {MAX_SKB_FRAGS} frags")
        d = frag._destructor
        if d is not None and d._dead:
            # ref() would refuse it too, but only after the unclone below changed the skb.
            raise DestructorError(f"add_frag with {d!r}, which has already been destroyed")
        sh = self._unclone()
        _frag_ref(frag, sh)
        sh.frags.append(frag)
        return len(sh.frags) - 1

    def fill_page_desc(self, i: int, page: object, offset: int, size: int) -> None:
        """Set frag ``i`` (``i == nr_frags`` appends) to a page, with no destructor.
        Kernel: ``__skb_fill_page_desc``, which resets the destructor to none.

        Refs: the skb holds the new page; the frag it replaces releases its reference."""
        sh = self._live()
        if type(i) is not int:
            i = as_index(i, "frag index")
        if not 0 <= i <= min(len(sh.frags), MAX_SKB_FRAGS - 1):
            if i == len(sh.frags) == MAX_SKB_FRAGS:
                raise TooManyFragsError(f"{self!r} already holds {MAX_SKB_FRAGS} frags")
            raise InvalidRangeError(f"frag index {i} outside [0, {len(sh.frags)}]")
        frag = Frag(page, offset, size)
        sh = self._unclone()
        if i == len(sh.frags):
            sh.frags.append(frag)
            return
        old, sh.frags[i] = sh.frags[i], frag
        _frag_unref(old, sh)

    def set_destructor(self, i: int, destructor: FragDestructor) -> None:
        """Attach ``destructor`` to frag ``i``. Kernel: ``skb_frag_set_destructor``;
        allowed only before the frag is referenced anywhere else.

        Refs: takes the skb's reference on ``destructor``."""
        sh = self._live()
        if type(i) is not int:
            i = as_index(i, "frag index")
        if not isinstance(destructor, FragDestructor):
            raise TypeError(f"destructor must be a FragDestructor, not {type(destructor).__name__}")
        if not 0 <= i < len(sh.frags):
            raise InvalidRangeError(f"frag index {i} outside [0, {len(sh.frags)})")
        frag = sh.frags[i]
        if frag._destructor is not None:
            raise FragSharedError(f"frag {i} of {self!r} already has a destructor")
        if sh.dataref > 1 or frag._shared:
            raise FragSharedError(
                f"frag {i} of {self!r} is already shared; set the destructor before "
                "cloning or copying the skb"
            )
        destructor.ref(holder=sh)
        sh.frags[i] = frag._derive(frag._offset, frag._size, destructor)

    def append_page(
        self, page: object, offset: int, size: int, destructor: FragDestructor | None = None
    ) -> int:
        """Append bytes of a page: extend the last frag when the bytes follow it on the
        same page object with the *same* destructor (kernel ``skb_can_coalesce`` with the
        series' rule), otherwise add a frag. Returns the frag index.

        Refs: none when extending (the last frag's reference covers it); else as
        :meth:`add_frag`."""
        sh = self._live()
        if sh.frags:
            last = sh.frags[-1]
            if (
                last._page is page
                and last._destructor is destructor
                and last._offset + last._size == offset
            ):
                size = Frag(page, offset, size, destructor)._size  # validates the arguments
                sh = self._unclone()
                last = sh.frags[-1]
                sh.frags[-1] = last._derive(last._offset, last._size + size)
                return len(sh.frags) - 1
        return self.add_frag(page, offset, size, destructor)

    # -- reading -------------------------------------------------------------------------
    @property
    def frags(self) -> tuple[Frag, ...]:
        return tuple(self._live().frags)

    @property
    def nr_frags(self) -> int:
        """Kernel ``skb_shinfo(skb)->nr_frags``."""
        return len(self._live().frags)

    @property
    def head_len(self) -> int:
        """Kernel ``skb_headlen``."""
        return len(self._live().head)

    @property
    def data_len(self) -> int:
        """Bytes in paged frags (kernel ``skb->data_len``)."""
        return sum(f._size for f in self._live().frags)

    def __len__(self) -> int:
        sh = self._live()
        return len(sh.head) + sum(f._size for f in sh.frags)

    def len(self) -> int:
        """Total bytes, head and frags (kernel ``skb->len``)."""
        return len(self)

    @property
    def cloned(self) -> bool:
        """Kernel ``skb_cloned``: the shared info is shared with another skb."""
        return self._live().dataref > 1

    @property
    def dataref(self) -> int:
        """How many skbs share this one's shared info (kernel ``skb_shinfo->dataref``)."""
        return self._live().dataref

    @property
    def freed(self) -> bool:
        return self._freed

    def tobytes(self) -> bytes:
        """All bytes, copied into one ``bytes`` (kernel ``skb_copy_bits``)."""
        sh = self._live()
        return b"".join([sh.head, *(f.view() for f in sh.frags)])

    def iovecs(self) -> list[memoryview]:
        """Memoryviews of the head (when not empty) and every frag, for ``sendmsg``."""
        sh = self._live()
        out = [memoryview(sh.head)] if sh.head else []
        out.extend(f.view() for f in sh.frags)
        return out

    # -- copies ------------------------------------------------------------------------
    def clone(self) -> SkBuff:
        """Kernel ``skb_clone``: a new skb sharing this one's head and frags.

        Refs: none on frags; the shared info counts one more skb (``dataref``)."""
        sh = self._live()
        with sh.lock:
            sh.dataref += 1
        for f in sh.frags:
            f._shared = True
        return SkBuff._from_shinfo(sh)

    def copy(self) -> SkBuff:
        """Kernel ``skb_copy``: a private, fully linear copy of every byte.

        Refs: none (the copy holds no frags)."""
        return SkBuff(self.tobytes())

    def pskb_copy(self) -> SkBuff:
        """Kernel ``pskb_copy``: private copy of the head; the frag descriptors are
        copied and shared.

        Refs: takes one per frag."""
        sh = self._live()
        return self._new(sh.head, list(sh.frags))

    # -- reshaping --------------------------------------------------------------------
    def pull(self, n: int) -> bytes:
        """Make the first ``n`` bytes linear and return them. Kernel:
        ``pskb_may_pull`` / ``__pskb_pull_tail``.

        Refs: unclones first when cloned (one per frag); drops one per frag consumed
        whole; a frag consumed in part keeps its reference."""
        sh = self._live()
        n = self._check_range(n, "pull length")
        if n <= len(sh.head):
            return sh.head[:n]
        sh = self._unclone()
        eat = n - len(sh.head)
        consumed = _frag_range(sh.frags, 0, eat)
        sh.head = b"".join([sh.head, *(f.view() for f in consumed)])
        self._drop_front(sh, eat)
        return sh.head[:n]

    def _drop_front(self, sh: _SharedInfo, eat: int) -> None:
        """Remove the first ``eat`` frag bytes: whole frags release their reference,
        a frag cut in part keeps it."""
        total = sum(f._size for f in sh.frags)
        old = sh.frags
        keep = _frag_range(old, eat, total)
        sh.frags = keep
        dropped = len(old) - len(keep)
        each(lambda f: _frag_unref(f, sh), old[:dropped])

    def _drop_back(self, sh: _SharedInfo, keep_bytes: int) -> None:
        """Keep only the first ``keep_bytes`` frag bytes; frags beyond are released."""
        old = sh.frags
        keep = _frag_range(old, 0, keep_bytes)
        sh.frags = keep
        each(lambda f: _frag_unref(f, sh), old[len(keep) :])

    def linearize(self) -> None:
        """Kernel ``skb_linearize``: copy every frag into the head.

        Refs: drops every frag's."""
        self.pull(len(self))

    def trim(self, length: int) -> None:
        """Keep the first ``length`` bytes. Kernel: ``pskb_trim``.

        Refs: unclones first when cloned; drops one per frag removed whole."""
        self._live()
        length = self._check_range(length, "trim length")
        if length == len(self):
            return
        sh = self._unclone()
        if length <= len(sh.head):
            sh.head = sh.head[:length]
            self._drop_back(sh, 0)
        else:
            self._drop_back(sh, length - len(sh.head))

    def trim_head(self, n: int) -> None:
        """Drop the first ``n`` bytes, as a partial ACK does on the retransmit queue.
        Kernel: ``tcp_trim_head`` / ``__pskb_trim_head``.

        Refs: unclones first when cloned; drops one per frag consumed whole."""
        self._live()
        n = self._check_range(n, "trim_head length")
        if n == 0:
            return
        sh = self._unclone()
        if n <= len(sh.head):
            sh.head = sh.head[n:]
            return
        eat = n - len(sh.head)
        sh.head = b""
        self._drop_front(sh, eat)

    def split(self, length: int) -> SkBuff:
        """Split at ``length``: this skb keeps the first ``length`` bytes and the returned
        one holds the rest. Kernel: ``skb_split``.

        Refs: unclones first when cloned; frags move without references, except a frag
        cut in two, which takes one for the new skb."""
        sh = self._live()
        length = self._check_range(length, "split length")
        if length < len(sh.head):
            rest = SkBuff(sh.head[length:])
            sh = self._unclone()
            sh.head = sh.head[:length]
            rest._sh.frags, sh.frags = sh.frags, []  # move: no reference changes hands
            return rest
        sh = self._unclone()
        at = length - len(sh.head)
        total = sum(f._size for f in sh.frags)
        rest = SkBuff()
        rest._sh.frags = _frag_range(sh.frags, at, total)  # moved with their references
        keep = _frag_range(sh.frags, 0, at)
        if _cut_inside(sh.frags, at):
            # The frag cut in two is now held twice: one more reference for the new skb.
            keep[-1]._shared = rest._sh.frags[0]._shared = True
            _frag_ref(rest._sh.frags[0], rest._sh)
        sh.frags = keep
        return rest

    def try_coalesce(self, other: SkBuff) -> bool:
        """Append ``other``'s data to this skb and free ``other``. Kernel:
        ``skb_try_coalesce`` followed by ``kfree_skb_partial``.

        Refused (False, nothing changed) when this skb is cloned, when ``other`` has
        linear bytes but this skb already has frags, when the frags would not fit, or —
        the series' rule — when the frags of the two carry different destructors.

        Refs: frags move without references, unless ``other`` is cloned, in which case
        each frag moved takes one (its clone keeps its own)."""
        if not isinstance(other, SkBuff):
            raise TypeError(f"try_coalesce takes an SkBuff, not {type(other).__name__}")
        sh = self._live()
        osh = other._live()
        if other is self:
            raise InvalidRangeError("an skb cannot coalesce with itself")
        if sh.dataref > 1 or (osh.head and sh.frags):
            return False
        if len(sh.frags) + len(osh.frags) > MAX_SKB_FRAGS:
            return False
        if osh.frags and len({f._destructor for f in itertools.chain(sh.frags, osh.frags)}) > 1:
            return False
        sh.head += osh.head
        if osh.dataref > 1:
            for f in osh.frags:
                f._shared = True
                _frag_ref(f, sh)
            sh.frags.extend(osh.frags)
        else:
            sh.frags.extend(osh.frags)
            osh.frags = []
        other.free()
        return True

    def orphan_frags(self) -> None:
        """Copy every frag that has a destructor into private memory and release the
        original. Kernel: ``skb_orphan_frags`` / ``skb_copy_ubufs``.

        Refs: unclones first when cloned; drops one per frag copied."""
        sh = self._live()
        if not any(f._destructor is not None for f in sh.frags):
            return
        sh = self._unclone()
        for i, f in enumerate(sh.frags):
            if f._destructor is not None:
                sh.frags[i] = Frag(bytes(f.view()))
                _frag_unref(f, sh)

    def segment(self, mss: int, header_len: int = 0) -> list[SkBuff]:
        """Cut into segments of at most ``mss`` payload bytes, each starting with a copy
        of the first ``header_len`` bytes (the protocol headers). Kernel: ``skb_segment``.
        This skb stays valid and owned by the caller.

        Refs: takes one per frag piece in each segment."""
        sh = self._live()
        if type(mss) is not int:
            mss = as_index(mss, "mss")
        if type(header_len) is not int:
            header_len = as_index(header_len, "header_len")
        if mss <= 0:
            raise InvalidRangeError(f"mss must be positive, not {mss}")
        if not 0 <= header_len <= len(sh.head):
            raise InvalidRangeError(f"header_len {header_len} outside the head of {self!r}")
        for f in sh.frags:
            f._shared = True
        header = sh.head[:header_len]
        head_payload = sh.head[header_len:]
        total = len(sh.head) + sum(f._size for f in sh.frags)
        segs: list[SkBuff] = []
        for start in range(header_len, total, mss):
            stop = min(start + mss, total)
            hlen = len(sh.head)
            lin = header + head_payload[start - header_len : stop - header_len]
            pieces = (
                _frag_range(sh.frags, max(start, hlen) - hlen, stop - hlen) if stop > hlen else []
            )
            segs.append(self._new(lin, pieces))
        return segs

    # -- freeing ----------------------------------------------------------------------
    def free(self) -> None:
        """Kernel ``kfree_skb``. Raises :class:`DoubleFreeError` the second time.

        Refs: drops this skb's dataref; the last skb of a shared info drops every frag's."""
        if self._freed:
            raise DoubleFreeError(f"{self!r} was already freed")
        self._freed = True
        self._sh.release()

    def __enter__(self) -> SkBuff:
        self._live()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._freed:
            self.free()

    def __del__(self) -> None:
        if getattr(self, "_freed", True):
            return
        where = self._created_at or "an unknown place (set PAGEFRAG_LEAK_DETECTION=simple)"
        try:
            warnings.warn(
                f"SkBuff#{self._id} created at {where} was never freed; releasing it now",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )
        finally:
            self._freed = True
            self._sh.release()

    def __repr__(self) -> str:
        if self._freed:
            return f"<SkBuff#{self._id} freed>"
        sh = self._sh
        size = len(sh.head) + sum(f._size for f in sh.frags)
        return (
            f"<SkBuff#{self._id} len={size} head={len(sh.head)} "
            f"frags={len(sh.frags)} dataref={sh.dataref}>"
        )
