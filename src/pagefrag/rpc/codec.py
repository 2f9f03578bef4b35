"""Message body codecs of pagefrag.rpc. Sans-I/O: objects in, ``(bytes, buffers)`` out.

Rule: a codec turns a body into inline bytes plus a list of out-of-band buffers (sent as
zero-copy frags after the inline bytes), and back. It knows nothing of records, sockets
or xids.

:class:`SafeCodec` (the default) is safe for untrusted peers: decoding builds only the
types listed below and those the application registers, never calls a constructor named
by the peer, never evaluates anything, and bounds nesting, element counts and sizes.
:class:`PickleCodec` is full pickle (protocol 5): whoever can send a body runs code in the
decoder, so the server and client refuse it without an ``authkey``.

The safe format, version 1. Every value is a one-byte tag and what the tag says follows;
integers are big-endian, ``u32``/``u64`` unsigned:

    N                              None
    T / F                          True / False
    i  i64                         int in [-2**63, 2**63)
    I  u32 n, n bytes              any other int, two's complement (n <= max_int_bytes)
    f  f64                         float
    c  f64 f64                     complex (real, imag)
    s  u32 n, n bytes              str, UTF-8
    b  u32 n, n bytes              bytes
    a  u32 n, n bytes              bytearray
    l / t  u32 n, n values         list / tuple
    S / z  u32 n, n values         set / frozenset (elements must be hashable)
    d  u32 n, n (key, value) pairs dict
    o  u32 k                       out-of-band buffer k (a memoryview into the record)
    n  u8 m, m ASCII bytes, u8 d, d x u64, u32 k
                                   NumPy array: dtype string (plain dtypes only, never
                                   object), shape, data in out-of-band buffer k
    r  u8 m, m bytes UTF-8, value  a registered type: its name and its encoded form

A body is exactly one value; trailing bytes are an error. Decoding raises only
:class:`~pagefrag.errors.CodecError`.
"""

from __future__ import annotations

import pickle
import re
import struct
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import CodecError

__all__ = ["Codec", "CodecError", "PickleCodec", "SafeCodec", "TypeRegistry", "get_codec"]

_I64 = struct.Struct("!q")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_F64 = struct.Struct("!d")
_C128 = struct.Struct("!dd")
_U8 = struct.Struct("!B")
# Plain dtypes only: byte order, kind, item size, an optional datetime unit. Never "O".
_DTYPE = re.compile(r"[<>|=][?biufcmMSUV][0-9]{1,6}(\[[0-9A-Za-z]{1,8}\])?")
_SEQ_TAGS = {b"l"[0]: list, b"t"[0]: tuple, b"S"[0]: set, b"z"[0]: frozenset}
_INLINE = {b"s"[0], b"b"[0], b"a"[0]}
# Hash flooding: int, float and complex hashes are not randomized (every k * (2**61 - 1)
# hashes to 0), tuples' and frozensets' derive from their elements', so a peer can send
# keys that all share one hash, and building the set or dict costs one comparison per
# earlier key with that hash: O(n**2). A container whose keys make more colliding pairs
# than this per key (plus the slack, for the few natural ones such as hash(-1) ==
# hash(-2)) is refused before it is built, which keeps that work linear.
_COLLIDING_PAIRS_PER_KEY = 8
_COLLIDING_PAIRS_SLACK = 64


class Codec:
    """What a codec does: ``dumps`` a body into inline bytes and out-of-band buffers,
    ``loads`` it back from views into a received record. ``wire_id`` is announced in the
    server's hello so a client with another codec fails clearly."""

    name = "codec"
    wire_id = 255

    def dumps(self, obj: Any) -> tuple[bytes, list[memoryview]]:
        raise NotImplementedError

    def loads(self, data: memoryview, buffers: Sequence[memoryview]) -> Any:
        raise NotImplementedError


def _flat(view: memoryview) -> memoryview:
    """A buffer as a flat byte view, copied only when not contiguous."""
    if view.c_contiguous:
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return memoryview(view.tobytes())


class PickleCodec(Codec):
    """Full pickle, protocol 5: numpy arrays and ``PickleBuffer`` go out of band. Decoding
    runs whatever code the sender names — use only between authenticated peers."""

    name = "pickle"
    wire_id = 1

    def dumps(self, obj: Any) -> tuple[bytes, list[memoryview]]:
        if isinstance(obj, memoryview):  # e.g. an out-of-band buffer sent back as it came
            obj = pickle.PickleBuffer(obj)
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        return data, [b.raw() for b in buffers]

    def loads(self, data: memoryview, buffers: Sequence[memoryview]) -> Any:
        try:
            return pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise CodecError(f"undecodable pickle body: {exc}") from None


class TypeRegistry:
    """Application types the safe codec may carry: ``register(cls, name, encode, decode)``
    where ``encode(obj)`` returns a value the safe codec carries (it may itself hold
    registered types) and ``decode(value)`` builds the object back. Only registered names
    are ever decoded; an exception in ``decode`` becomes a :class:`CodecError`."""

    def __init__(self) -> None:
        self._by_type: dict[type, tuple[bytes, Callable[[Any], Any]]] = {}
        self._by_name: dict[bytes, Callable[[Any], Any]] = {}

    def register(
        self,
        cls: type,
        name: str,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
    ) -> None:
        """Let ``cls`` (exactly that type) travel as ``name``. Raises ``TypeError`` or
        ``ValueError`` (a name or type registered twice) before changing anything."""
        if not isinstance(cls, type):
            raise TypeError(f"cls must be a type, not {type(cls).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not callable(encode) or not callable(decode):
            raise TypeError("encode and decode must be callable")
        raw = name.encode()
        if not 0 < len(raw) < 256:
            raise ValueError("a registered name takes 1 to 255 UTF-8 bytes")
        if raw in self._by_name or cls in self._by_type:
            raise ValueError(f"{cls.__name__} or the name {name!r} is already registered")
        self._by_type[cls] = (raw, encode)
        self._by_name[raw] = decode

    def encoder(self, cls: type) -> tuple[bytes, Callable[[Any], Any]] | None:
        return self._by_type.get(cls)

    def decoder(self, name: bytes) -> Callable[[Any], Any] | None:
        return self._by_name.get(name)


class SafeCodec(Codec):
    """The restricted, self-describing codec (see the module docstring for the format).
    Bounds: ``max_depth`` nested containers, ``max_items`` values per body,
    ``max_int_bytes`` per int; lengths never past the end of the body."""

    name = "safe"
    wire_id = 0

    def __init__(
        self,
        types: TypeRegistry | None = None,
        *,
        max_depth: int = 64,
        max_items: int = 1 << 20,
        max_int_bytes: int = 1024,
    ) -> None:
        if types is not None and not isinstance(types, TypeRegistry):
            raise TypeError(f"types must be a TypeRegistry, not {type(types).__name__}")
        for limit in (max_depth, max_items, max_int_bytes):
            if not isinstance(limit, int) or limit < 1:
                raise ValueError("codec limits must be positive ints")
        if max_depth > 500:
            raise ValueError("max_depth above 500 would hit Python's recursion limit")
        self.types = types if types is not None else TypeRegistry()
        self.max_depth = max_depth
        self.max_items = max_items
        self.max_int_bytes = max_int_bytes

    # -- encoding ---------------------------------------------------------------------
    def dumps(self, obj: Any) -> tuple[bytes, list[memoryview]]:
        """``obj`` as inline bytes and out-of-band buffers. Raises ``TypeError`` for a type
        it cannot carry, :class:`CodecError` past ``max_depth`` (a cycle). Refs: none; the
        buffers are views of ``obj``'s own memory (copied only when not contiguous)."""
        out = bytearray()
        buffers: list[memoryview] = []
        self._encode(obj, out, buffers, 0)
        return bytes(out), buffers

    def _encode(self, obj: Any, out: bytearray, bufs: list[memoryview], depth: int) -> None:
        if depth > self.max_depth:
            raise CodecError(f"nested deeper than {self.max_depth} (a cycle?)")
        t = type(obj)
        registered = self.types.encoder(t)
        if registered is not None:  # first: the application may override a subclass
            name, encode = registered
            out += b"r" + _U8.pack(len(name)) + name
            self._encode(encode(obj), out, bufs, depth + 1)
        elif obj is None:
            out += b"N"
        elif t is bool:
            out += b"T" if obj else b"F"
        elif isinstance(obj, int) and not isinstance(obj, bool):
            if -(1 << 63) <= obj < 1 << 63:
                out += b"i" + _I64.pack(obj)
            else:
                raw = int(obj).to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)
                if len(raw) > self.max_int_bytes:
                    raise CodecError(f"an int of {len(raw)} bytes exceeds max_int_bytes")
                out += b"I" + _U32.pack(len(raw)) + raw
        elif isinstance(obj, float):
            out += b"f" + _F64.pack(obj)
        elif isinstance(obj, complex):
            out += b"c" + _C128.pack(obj.real, obj.imag)
        elif isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"s" + _U32.pack(len(raw)) + raw
        elif isinstance(obj, bytes):
            out += b"b" + _U32.pack(len(obj)) + obj
        elif isinstance(obj, bytearray):
            out += b"a" + _U32.pack(len(obj)) + obj
        elif isinstance(obj, (list, tuple, set, frozenset)):
            tag = (
                b"l"
                if isinstance(obj, list)
                else b"t"
                if isinstance(obj, tuple)
                else b"z"
                if isinstance(obj, frozenset)
                else b"S"
            )
            out += tag + _U32.pack(len(obj))
            for item in obj:
                self._encode(item, out, bufs, depth + 1)
        elif isinstance(obj, dict):
            out += b"d" + _U32.pack(len(obj))
            for key, value in obj.items():
                self._encode(key, out, bufs, depth + 1)
                self._encode(value, out, bufs, depth + 1)
        elif isinstance(obj, (memoryview, pickle.PickleBuffer)):
            out += b"o" + _U32.pack(len(bufs))
            bufs.append(_flat(memoryview(obj)))
        elif _is_ndarray(obj):
            self._encode_array(obj, out, bufs)
        else:
            raise TypeError(
                f"the safe codec cannot carry {t.__module__}.{t.__qualname__}: register it "
                "in a TypeRegistry (or use codec='pickle' between authenticated peers)"
            )

    def _encode_array(self, arr: Any, out: bytearray, bufs: list[memoryview]) -> None:
        import numpy as np

        dt = arr.dtype
        if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise TypeError(f"the safe codec carries plain dtypes only, not {dt}")
        if not _DTYPE.fullmatch(dt.str):
            raise TypeError(f"the safe codec cannot carry the dtype {dt.str!r}")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        raw = dt.str.encode("ascii")
        out += b"n" + _U8.pack(len(raw)) + raw + _U8.pack(arr.ndim)
        out += b"".join(_U64.pack(n) for n in arr.shape)
        out += _U32.pack(len(bufs))
        bufs.append(memoryview(arr.reshape(-1).view(np.uint8)))

    # -- decoding ---------------------------------------------------------------------
    def loads(self, data: memoryview, buffers: Sequence[memoryview]) -> Any:
        """The value in ``data``; out-of-band buffers and arrays are views into
        ``buffers``, not copies. Raises :class:`CodecError` and nothing else for any input.
        Refs: none."""
        state = _Decoding(memoryview(data).cast("B"), buffers, self.max_items)
        try:
            value = self._decode(state, 0)
        except CodecError:
            raise
        except RecursionError:
            raise CodecError("nested too deeply for this interpreter") from None
        if state.pos != len(state.data):
            raise CodecError(f"{len(state.data) - state.pos} bytes after the body's value")
        return value

    def _decode(self, st: _Decoding, depth: int) -> Any:
        if depth > self.max_depth:
            raise CodecError(f"nested deeper than {self.max_depth}")
        st.items += 1
        if st.items > st.max_items:
            raise CodecError(f"more than {st.max_items} values in one body")
        tag = st.take(1)[0]
        if tag == 0x4E:  # N
            return None
        if tag == 0x54:  # T
            return True
        if tag == 0x46:  # F
            return False
        if tag == 0x69:  # i
            return _I64.unpack(st.take(8))[0]
        if tag == 0x49:  # I
            n = st.u32()
            if n > self.max_int_bytes:
                raise CodecError(f"an int of {n} bytes exceeds max_int_bytes")
            return int.from_bytes(st.take(n), "big", signed=True)
        if tag == 0x66:  # f
            return _F64.unpack(st.take(8))[0]
        if tag == 0x63:  # c
            re_, im = _C128.unpack(st.take(16))
            return complex(re_, im)
        if tag in _INLINE:
            raw = st.take(st.u32())
            if tag == 0x73:  # s
                try:
                    return str(raw, "utf-8", "surrogatepass")
                except UnicodeDecodeError as exc:
                    raise CodecError(f"a str that is not UTF-8: {exc.reason}") from None
            return bytes(raw) if tag == 0x62 else bytearray(raw)
        if tag in _SEQ_TAGS:
            n = st.count()
            items = [self._decode(st, depth + 1) for _ in range(n)]
            kind = _SEQ_TAGS[tag]
            if kind is list or kind is tuple:
                return items if kind is list else tuple(items)
            _check_hashes(items, "set element")
            try:
                return kind(items)
            except (TypeError, ValueError) as exc:
                raise CodecError(f"bad set element: {exc}") from None
        if tag == 0x64:  # d
            n = st.count(2)
            keys = []
            values = []
            for _ in range(n):
                keys.append(self._decode(st, depth + 1))
                values.append(self._decode(st, depth + 1))
            _check_hashes(keys, "dict key")
            try:
                return dict(zip(keys, values, strict=True))
            except (TypeError, ValueError) as exc:
                raise CodecError(f"bad dict key: {exc}") from None
        if tag == 0x6F:  # o
            return st.buffer(st.u32())
        if tag == 0x6E:  # n
            return self._decode_array(st)
        if tag == 0x72:  # r
            name = bytes(st.take(st.take(1)[0]))
            decode = self.types.decoder(name)
            if decode is None:
                raise CodecError(f"unknown registered type {name!r}")
            value = self._decode(st, depth + 1)
            try:
                return decode(value)
            except Exception as exc:
                raise CodecError(f"decoding registered type {name!r} failed: {exc!r}") from None
        raise CodecError(f"unknown tag 0x{tag:02x} at byte {st.pos - 1}")

    def _decode_array(self, st: _Decoding) -> Any:
        raw = bytes(st.take(st.take(1)[0]))
        ndim = st.take(1)[0]
        shape = [_U64.unpack(st.take(8))[0] for _ in range(ndim)]
        buf = st.buffer(st.u32())
        try:
            dtype_str = raw.decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("a dtype that is not ASCII") from None
        if not _DTYPE.fullmatch(dtype_str):
            raise CodecError(f"dtype {dtype_str!r} is not a plain dtype")
        try:
            import numpy as np
        except ImportError:
            raise CodecError("a NumPy array arrived but numpy is not installed") from None
        try:
            dt = np.dtype(dtype_str)
        except Exception:
            raise CodecError(f"dtype {dtype_str!r} is not a valid dtype") from None
        if dt.hasobject or dt.itemsize == 0:
            raise CodecError(f"dtype {dtype_str!r} cannot be carried")
        count = 1
        for n in shape:
            count *= n
        if count * dt.itemsize != buf.nbytes:
            raise CodecError(
                f"an array of shape {tuple(shape)} and dtype {dtype_str} needs "
                f"{count * dt.itemsize} bytes, its buffer has {buf.nbytes}"
            )
        try:
            return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)
        except Exception as exc:
            raise CodecError(f"cannot build the array: {exc}") from None


class _Decoding:
    """The cursor of one ``loads``: every read is checked against the end."""

    def __init__(self, data: memoryview, buffers: Sequence[memoryview], max_items: int) -> None:
        self.data = data
        self.buffers = buffers
        self.pos = 0
        self.items = 0
        self.max_items = max_items

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise CodecError(
                f"truncated: {n} bytes needed at byte {self.pos}, body is {len(self.data)}"
            )
        view = self.data[self.pos : end]
        self.pos = end
        return view

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def count(self, per_item: int = 1) -> int:
        """An element count, refused when the body cannot possibly hold that many values
        (each takes at least one byte) or it exceeds the per-body limit."""
        n = self.u32()
        if n * per_item > len(self.data) - self.pos:
            raise CodecError(f"a count of {n} past the end of the body")
        if self.items + n * per_item > self.max_items:
            raise CodecError(f"more than {self.max_items} values in one body")
        return n

    def buffer(self, k: int) -> memoryview:
        if k >= len(self.buffers):
            raise CodecError(f"out-of-band buffer {k} of {len(self.buffers)}")
        return self.buffers[k]


def _check_hashes(keys: list[Any], what: str) -> None:
    """Refuse, before a set or dict is built from ``keys``, keys that are unhashable or
    whose hash values collide in more than ``_COLLIDING_PAIRS_PER_KEY`` pairs per key.
    str and bytes are skipped: their hashes are randomized per process."""
    try:
        hashes = [hash(k) for k in keys if type(k) is not str and type(k) is not bytes]
    except (TypeError, ValueError) as exc:  # unhashable (a writable memoryview: ValueError)
        raise CodecError(f"bad {what}: {exc}") from None
    except Exception as exc:  # a registered type's __hash__
        raise CodecError(f"bad {what}: hashing it raised {exc!r}") from None
    if len(set(hashes)) == len(hashes):
        return
    # Counting is itself linear: distinct 64-bit hash values meet in these int keys only
    # when congruent modulo 2**61 - 1, at most 9 of them.
    pairs = sum(c * (c - 1) // 2 for c in Counter(hashes).values())
    if pairs > _COLLIDING_PAIRS_PER_KEY * len(hashes) + _COLLIDING_PAIRS_SLACK:
        raise CodecError(
            f"{len(keys)} {what}s whose hash values collide in {pairs} pairs (hash flooding?)"
        )


def _is_ndarray(obj: Any) -> bool:
    np = sys.modules.get("numpy")  # numpy is optional: an array exists only if it is loaded
    return np is not None and isinstance(obj, np.ndarray)


def get_codec(codec: str | Codec) -> Codec:
    """``"safe"`` (default), ``"pickle"``, or a :class:`Codec` instance."""
    if isinstance(codec, Codec):
        return codec
    if codec == "safe":
        return SafeCodec()
    if codec == "pickle":
        return PickleCodec()
    raise ValueError(f"codec must be 'safe', 'pickle' or a Codec, not {codec!r}")
