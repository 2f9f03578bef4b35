"""The wire format of ``pagefrag://`` messages, sans I/O (the model is h11: bytes in,
events out; no socket, no event loop): :func:`frame_message` turns Dask's frames into
the pieces a write hands to the transport, :class:`MessageReader` turns received bytes
back into frames.

A message is a little-endian ``u64`` frame count ``n``, ``n`` ``u64`` frame lengths, then
the frames back to back. The header and every frame below the copy threshold are joined
into one ``bytes`` (one copy, one piece: small messages cost one send); each larger frame
is its own piece, sent by reference (zero-copy), its memory the caller's.

The reader never trusts the header: a count or a total above its bounds raises
:class:`FramingError` before anything is allocated. Each frame is received into a buffer
of its own (so one numpy array kept alive does not keep a whole message alive), large
frames straight from the kernel (``recv_into`` the frame's remaining bytes), small ones
through a scratch buffer and one copy."""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "DIRECT_READ_MIN",
    "FRAME_COST",
    "FramingError",
    "MessageReader",
    "frame_message",
    "frame_nbytes",
]

_U64 = struct.Struct("<Q")
DIRECT_READ_MIN = 64 * 1024
"""A frame with at least this many bytes still to come is received straight into its own
buffer; below it, through the scratch buffer."""
_SCRATCH = 256 * 1024
FRAME_COST = 256
"""What a received frame costs in memory beyond its bytes (its buffer and view objects),
charged with its bytes wherever received data is bounded: a message of many empty frames
is not free."""
_EMPTY = memoryview(bytearray(0))  # every empty frame: nothing to write into, nothing held
_local = threading.local()


def _shared_scratch() -> memoryview:
    """This thread's scratch buffer, shared by its readers: a receive into it is parsed
    out of it before the next receive (get_buffer, recv_into, buffer_updated in one
    synchronous step), so idle connections cost no scratch memory of their own."""
    scratch: memoryview | None = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = memoryview(bytearray(_SCRATCH))
    return scratch


Piece = tuple[Any, bool]
"""A piece of a framed message and whether it is the caller's memory (``True``: a frame
sent by reference, the caller must not change it until it is released) or the joined
copy made here (``False``)."""


class FramingError(ValueError):
    """Received bytes that are not a ``pagefrag://`` message within the reader's bounds
    (too many frames, a message too large): the connection cannot be trusted further."""


def frame_nbytes(frame: Any) -> int:
    """The byte length of a frame (``bytes``, ``bytearray``, a memoryview of any format,
    anything with the buffer protocol). ``TypeError`` for what has none."""
    if type(frame) is bytes:
        return len(frame)
    return memoryview(frame).nbytes


def frame_message(frames: Sequence[Any], copy_below: float) -> tuple[list[Piece], int]:
    """The pieces of the message of ``frames`` and its total length (header included).

    The header and each run of frames shorter than ``copy_below`` are joined into one
    ``bytes`` (copied); a frame of ``copy_below`` bytes or more is a piece of its own,
    a byte-format memoryview of the caller's memory. ``TypeError`` for a frame without
    the buffer protocol (nothing is returned, nothing kept)."""
    sizes = [frame_nbytes(f) for f in frames]
    pieces: list[Piece] = []
    joined: list[Any] = [_U64.pack(len(frames)), *(_U64.pack(n) for n in sizes)]
    total = 8 * (len(frames) + 1)
    for frame, n in zip(frames, sizes, strict=True):
        total += n
        if n < copy_below:
            if n:
                joined.append(frame)
            continue
        pieces.append((b"".join(joined), False))
        joined = []
        view = memoryview(frame)
        pieces.append((view if view.format == "B" and view.ndim == 1 else view.cast("B"), True))
    if joined:
        pieces.append((b"".join(joined), False))
    return [p for p in pieces if p[1] or len(p[0])], total


def _bytearray_view(n: int) -> memoryview:
    return memoryview(bytearray(n))


class MessageReader:
    """Received bytes in, whole messages out (each a list of writable memoryviews, one
    buffer per frame). Drive it as an ``asyncio.BufferedProtocol`` is driven: receive into
    :meth:`get_buffer`, then report the count to :meth:`buffer_updated`; completed
    messages wait in :attr:`messages` (each with its cost: its bytes on the wire plus
    :data:`FRAME_COST` per frame) until taken.

    ``max_frames``, ``max_bytes``: the bounds of one message (header included);
    ``allocate(n)``: a writable byte memoryview of ``n`` bytes for a large frame (e.g.
    ``distributed.protocol.utils.host_array``)."""

    def __init__(
        self,
        max_frames: int,
        max_bytes: int,
        allocate: Callable[[int], memoryview] = _bytearray_view,
    ) -> None:
        if max_frames < 1 or max_bytes < 8:
            raise ValueError(f"bad bounds: max_frames={max_frames!r}, max_bytes={max_bytes!r}")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._allocate = allocate
        self._scratch = _shared_scratch()
        self._direct = False  # the last get_buffer() was the current frame's own memory
        self.messages: deque[tuple[list[memoryview], int]] = deque()
        self.message_bytes = 0  # the cost of every message completed so far
        self._start()

    def _start(self) -> None:
        # Reading the 8-byte frame count, then the lengths, then the frames: one
        # "current target" (a buffer and how much of it is filled) at a time.
        self._target = memoryview(bytearray(8))
        self._filled = 0
        self._stage = 0  # 0 count, 1 lengths, 2 frames
        self._sizes: list[int] = []
        self._frames: list[memoryview] = []
        self._nbytes = 0

    @property
    def idle(self) -> bool:
        """True between messages (no partial message received)."""
        return self._stage == 0 and self._filled == 0

    def get_buffer(self) -> memoryview:
        """Where the next receive goes: the rest of the current large frame, or the
        scratch buffer."""
        left = len(self._target) - self._filled
        self._direct = self._stage == 2 and left >= DIRECT_READ_MIN
        if self._direct:
            return self._target[self._filled :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the last :meth:`get_buffer`. Raises
        :class:`FramingError` for a header out of bounds (the reader is then unusable)."""
        if self._direct:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._next_target()
            return
        data = self._scratch[:nbytes]
        pos = 0
        while pos < nbytes:
            take = min(len(self._target) - self._filled, nbytes - pos)
            self._target[self._filled : self._filled + take] = data[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == len(self._target):
                self._next_target()

    def _next_target(self) -> None:
        """The current target is full: decode it and move on (possibly through several
        empty frames, or to the end of the message)."""
        if self._stage == 0:
            (count,) = _U64.unpack(self._target)
            if not 0 <= count <= self.max_frames:
                raise FramingError(f"a message of {count} frames (at most {self.max_frames})")
            self._stage = 1
            self._nbytes = 8 * (count + 1)
            self._target = memoryview(bytearray(8 * count))
            self._filled = 0
            if count:
                return
        elif self._stage == 1:
            self._sizes = [n for (n,) in _U64.iter_unpack(self._target)]
            self._nbytes += sum(self._sizes)
            if self._nbytes > self.max_bytes:
                raise FramingError(f"a message of {self._nbytes} bytes (at most {self.max_bytes})")
            self._stage = 2
        else:
            self._frames.append(self._target)
        # The next frame, skipping empty ones; or the message is complete.
        while len(self._frames) < len(self._sizes):
            n = self._sizes[len(self._frames)]
            if n == 0:
                self._frames.append(_EMPTY)
                continue
            self._target = self._allocate(n) if n >= DIRECT_READ_MIN else _bytearray_view(n)
            self._filled = 0
            return
        cost = self._nbytes + FRAME_COST * len(self._frames)
        self.messages.append((self._frames, cost))
        self.message_bytes += cost
        self._start()
