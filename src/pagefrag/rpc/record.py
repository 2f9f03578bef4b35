"""Record marking and the message codec of pagefrag.rpc. Sans-I/O: bytes in, messages out.

Framing follows ONC RPC record marking (RFC 5531 §11): every fragment starts with a
4-byte big-endian marker whose top bit says "last fragment of the record" and whose low
31 bits give the fragment's length. A message is one record:

    header  !IBxHIQ  xid, kind (0 call, 1 reply, 2 error reply), out-of-band buffer count,
                     body length, payload length
    lengths !Q each  of the out-of-band buffers
    body             the codec's bytes: (proc, args) for a call, the result for a reply
    buffers          the body's out-of-band buffers (numpy arrays, memoryviews), in order
    payload          the call's raw payload

so the body and the buffer lengths go in an skb's linear head and every out-of-band
buffer and payload piece can be a paged frag, sent without a copy. The body's encoding is
a :class:`~pagefrag.rpc.codec.Codec` (:class:`~pagefrag.rpc.codec.SafeCodec` unless
told otherwise); :func:`parse_message` checks the framing without decoding the body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .._destructor import FragDestructor
from .._skbuff import MAX_SKB_FRAGS, Frag, SkBuff
from ..errors import PageFragError
from .codec import Codec, SafeCodec

__all__ = [
    "CALL",
    "REPLY",
    "ERROR",
    "LAST_FRAGMENT",
    "Message",
    "RecordError",
    "RecordReader",
    "buffer_frags",
    "decode_message",
    "encode_head",
    "message_skb",
    "parse_message",
    "record_size",
]

CALL, REPLY, ERROR = 0, 1, 2
LAST_FRAGMENT = 0x80000000
MARKER = struct.Struct("!I")
HEADER = struct.Struct("!IBxHIQ")
LENGTH = struct.Struct("!Q")
DEFAULT_MAX_RECORD = 1 << 30
_SAFE = SafeCodec()


class RecordError(PageFragError, ValueError):
    """A malformed record or message: the connection that sent it cannot be trusted."""


@dataclass
class Message:
    xid: int
    kind: int
    body: Any  # (proc, args) for a call; the result, or an error text, for a reply
    payload: memoryview


@dataclass
class Frame:
    """A record whose framing checked out; ``body`` and ``buffers`` not decoded yet."""

    xid: int
    kind: int
    body: memoryview
    buffers: list[memoryview]
    payload: memoryview


def encode_head(
    xid: int, kind: int, body: Any, payload_len: int = 0, codec: Codec | None = None
) -> tuple[bytes, list[memoryview]]:
    """The linear part of a message (marker, header, lengths, encoded body) and the
    out-of-band buffers that follow it; the caller appends ``payload_len`` bytes of
    payload. One record, one fragment. ``codec``: :class:`SafeCodec` by default."""
    encoded, buffers = (codec or _SAFE).dumps(body)
    lengths = [b.nbytes for b in buffers]
    head_len = HEADER.size + LENGTH.size * len(buffers) + len(encoded)
    total = head_len + sum(lengths) + payload_len
    if total >= LAST_FRAGMENT:
        raise RecordError(f"a message of {total} bytes does not fit one record fragment")
    if len(buffers) > 0xFFFF:
        raise RecordError("too many out-of-band buffers")
    if len(encoded) > 0xFFFFFFFF:
        raise RecordError("a message body over 4 GiB")
    head = b"".join(
        [
            MARKER.pack(LAST_FRAGMENT | total),
            HEADER.pack(xid, kind, len(buffers), len(encoded), payload_len),
            *(LENGTH.pack(n) for n in lengths),
            encoded,
        ]
    )
    return head, buffers


def record_size(head: bytes) -> int:
    """The record length (what the peer's ``max_record`` limits) of a head from
    :func:`encode_head`."""
    (marker,) = MARKER.unpack_from(head)
    return int(marker & ~LAST_FRAGMENT)


def message_skb(head: bytes, frags: list[Frag]) -> SkBuff:
    """One message as one skb: ``head`` linear, ``frags`` paged. More pieces than an skb
    holds: the tail is copied into one private frag (as the kernel linearizes what does
    not fit). Refs: one per frag, as ``add_frag``."""
    frags = [f for f in frags if f.size]
    if len(frags) > MAX_SKB_FRAGS:
        tail = b"".join(f.view() for f in frags[MAX_SKB_FRAGS - 1 :])
        frags[MAX_SKB_FRAGS - 1 :] = [Frag(tail)]
    skb = SkBuff(head)
    try:
        for frag in frags:
            skb.add_frag(frag)
    except BaseException:
        skb.free()
        raise
    return skb


def buffer_frags(buffers: list[memoryview], destructor: FragDestructor | None = None) -> list[Frag]:
    """A body's out-of-band buffers as frags (empty ones left out)."""
    return [Frag(b, 0, b.nbytes, destructor) for b in buffers if b.nbytes]


def parse_message(record: bytearray) -> Frame:
    """Check one record's framing; the body, buffers and payload are views into it.
    Raises :class:`RecordError` when the lengths do not add up (the stream cannot be
    trusted any more)."""
    view = memoryview(record)
    if len(view) < HEADER.size:
        raise RecordError(f"a message needs {HEADER.size} bytes of header, got {len(view)}")
    xid, kind, nbuf, body_len, payload_len = HEADER.unpack_from(view)
    if kind not in (CALL, REPLY, ERROR):
        raise RecordError(f"unknown message kind {kind}")
    pos = HEADER.size
    if pos + LENGTH.size * nbuf > len(view):
        raise RecordError("buffer lengths past the end of the record")
    lengths = [LENGTH.unpack_from(view, pos + LENGTH.size * i)[0] for i in range(nbuf)]
    pos += LENGTH.size * nbuf
    if pos + body_len + sum(lengths) + payload_len != len(view):
        raise RecordError(
            f"the lengths in the header ({pos + body_len + sum(lengths) + payload_len}) "
            f"do not match the record ({len(view)})"
        )
    body = view[pos : pos + body_len]
    pos += body_len
    buffers = []
    for n in lengths:
        buffers.append(view[pos : pos + n])
        pos += n
    return Frame(xid, kind, body, buffers, view[pos:])


def decode_message(record: bytearray, codec: Codec | None = None) -> Message:
    """Parse one record and decode its body with ``codec`` (:class:`SafeCodec` by
    default). Raises :class:`RecordError` for bad framing and
    :class:`~pagefrag.errors.CodecError` for a body the codec refuses."""
    frame = parse_message(record)
    body = (codec or _SAFE).loads(frame.body, frame.buffers)
    return Message(frame.xid, frame.kind, body, frame.payload)


class RecordReader:
    """Feed bytes, get complete records. Raises :class:`RecordError` for a fragment
    longer than ``max_record`` (a bad marker) — nothing after it can be trusted."""

    def __init__(self, max_record: int = DEFAULT_MAX_RECORD) -> None:
        self.max_record = max_record
        self._buf = bytearray()
        self._record = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        self._buf += data
        out: list[bytearray] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= MARKER.size:
            (marker,) = MARKER.unpack_from(buf, pos)
            length = marker & ~LAST_FRAGMENT
            if len(self._record) + length > self.max_record:
                raise RecordError(
                    f"record fragment of {length} bytes exceeds the limit of {self.max_record}"
                )
            if len(buf) - pos - MARKER.size < length:
                break
            start = pos + MARKER.size
            self._record += buf[start : start + length]
            pos = start + length
            if marker & LAST_FRAGMENT:
                out.append(self._record)
                self._record = bytearray()
        del buf[:pos]
        return out
