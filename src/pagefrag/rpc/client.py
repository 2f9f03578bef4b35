"""RpcClient: calls that complete only when their pages are released — the sunrpc case.

Each call's request is one :class:`SkBuff`: marker, header and pickle in the linear head;
the pickle's out-of-band buffers and the payload as paged frags that share the call's
:class:`FragDestructor`. Retransmission follows sunrpc: when no reply comes within
``timeout`` the client gives up on that connection, connects again and sends the same xid
again, up to ``retries`` times; a reply on any connection answers the call.

Abandoned connections are *drained*, never aborted: they are closed gracefully in the
background, so the kernel finishes (or keeps retransmitting) what it holds and then
releases the pages. With ``safe=True`` (the default) a call completes only when its reply
has arrived **and** every transmission of it, on every connection, has been released by
the kernel — the fix the seed patch was written for. ``safe=False`` completes on the reply
alone: a caller that then reuses its buffer can have the stale retransmission of an
abandoned connection carry the new bytes (see ``pagefrag repro``). It is unsafe and exists
to show the difference.

A safe call never lets its caller believe the buffer is free while the kernel may still
read it: however it ends — reply, error, :class:`RpcTimeout`, or cancellation (e.g. by
``asyncio.wait_for``) — it waits, shielded from further cancellation, until every
transmission is released, for at most ``release_timeout`` seconds; past that it raises
:class:`~pagefrag.errors.BufferInUseError`, whose ``released`` future completes when the
pages are free. A cancelled call re-raises ``CancelledError`` only after the release.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from .. import aio
from .._destructor import FragDestructor
from .._iov import Data, IoVec
from .._skbuff import Frag, SkBuff
from ..errors import (
    AuthenticationError,
    BufferInUseError,
    CodecError,
    PageFragError,
    RecordTooLargeError,
)
from . import handshake
from .codec import Codec, PickleCodec, get_codec
from .record import (
    DEFAULT_MAX_RECORD,
    ERROR,
    REPLY,
    RecordError,
    RecordReader,
    buffer_frags,
    encode_head,
    message_skb,
    parse_message,
    record_size,
)

__all__ = ["RpcClient", "RpcError", "RpcTimeout", "RemoteError"]


class RpcError(PageFragError):
    """Base class of the RPC layer's errors."""


class RpcTimeout(RpcError, TimeoutError):
    """No reply after every retry."""


class RemoteError(RpcError):
    """The handler raised; the text says what."""


class _Connection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: aio.ZeroCopyStreamWriter, max_record: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_record = max_record  # the largest record the server accepts (its hello)
        self.task: asyncio.Task[None] | None = None

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])


class RpcClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        safe: bool = True,
        zerocopy: str = "auto",
        max_record: int = DEFAULT_MAX_RECORD,
        codec: str | Codec = "safe",
        authkey: bytes | None = None,
        release_timeout: float = 30.0,
    ) -> None:
        """``codec`` must match the server's (``"safe"`` by default; ``"pickle"`` needs
        ``authkey``, the server's shared key). ``release_timeout``: how long a safe call
        that ended waits for the kernel to release its pages before it raises
        :class:`~pagefrag.errors.BufferInUseError`."""
        if not release_timeout > 0:
            raise ValueError(f"release_timeout must be positive, not {release_timeout!r}")
        self.codec = get_codec(codec)
        self.authkey = handshake.check_key(authkey)
        if isinstance(self.codec, PickleCodec) and self.authkey is None:
            raise ValueError("codec='pickle' runs whatever code the server sends: give an authkey")
        self.release_timeout = release_timeout
        self.host, self.port = host, port
        self.timeout, self.retries, self.safe = timeout, retries, safe
        self.zerocopy = zerocopy
        self.max_record = max_record
        self._xids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self.transmissions = 0
        self.reconnects = 0

    # -- connections -------------------------------------------------------------------
    async def connection(self) -> _Connection:
        """The current connection, opened if there is none."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None or self._conn.writer.is_closing():
                reader, writer = await aio.open_connection(
                    self.host, self.port, zerocopy=self.zerocopy
                )
                try:
                    limit = await asyncio.wait_for(self._greeted(reader, writer), self.timeout)
                except BaseException as exc:
                    writer.abort()
                    if isinstance(exc, TimeoutError):
                        raise RpcTimeout(
                            f"no greeting from {self.host}:{self.port} in {self.timeout} s"
                        ) from None
                    raise
                conn = _Connection(reader, writer, limit)
                conn.task = asyncio.ensure_future(self._read_replies(conn))
                self._conn = conn
            return self._conn

    async def _greeted(self, reader: asyncio.StreamReader, writer: aio.ZeroCopyStreamWriter) -> int:
        """Read the server's hello, answer its challenge, check its answer to ours.
        Returns the server's ``max_record``."""
        try:
            greeting = await reader.readexactly(handshake.HELLO.size)
            codec_id, flags, limit = handshake.parse_hello(greeting)
            if codec_id != self.codec.wire_id:
                raise RpcError(
                    f"the server speaks codec {codec_id}, this client {self.codec.name!r} "
                    f"({self.codec.wire_id})"
                )
            wants_auth = bool(flags & handshake.AUTHENTICATE)
            if wants_auth != (self.authkey is not None):
                raise AuthenticationError(
                    "the server requires an authkey"
                    if wants_auth
                    else "the server does not authenticate, and this client has an authkey"
                )
            if self.authkey is not None:
                greeting += await reader.readexactly(handshake.NONCE_SIZE)
                ours = handshake.challenge()
                writer.write(handshake.answer(self.authkey, True, greeting) + ours)
                digest = await reader.readexactly(handshake.DIGEST_SIZE)
                if not handshake.verify(self.authkey, False, ours, digest):
                    raise AuthenticationError("the server's answer to our challenge is wrong")
        except asyncio.IncompleteReadError:
            raise AuthenticationError(
                "the server closed the connection during the opening (wrong authkey?)"
            ) from None
        return limit

    async def _read_replies(self, conn: _Connection) -> None:
        records = RecordReader(self.max_record)
        try:
            while data := await conn.reader.read(1 << 20):
                for record in records.feed(data):
                    frame = parse_message(record)
                    fut = self._pending.get(frame.xid)
                    if fut is None or fut.done():
                        continue  # a late reply to an answered call (a retransmission's)
                    try:
                        body = self.codec.loads(frame.body, frame.buffers)
                    except CodecError as exc:
                        fut.set_exception(exc)
                        continue
                    if frame.kind == REPLY:
                        fut.set_result(body)
                    elif frame.kind == ERROR:
                        fut.set_exception(RemoteError(body))
        except (RecordError, ConnectionError, OSError):
            pass
        finally:
            if not conn.writer.is_closing():
                conn.writer.close()

    def _abandon(self, conn: _Connection) -> None:
        """Sunrpc's reconnect: stop using ``conn``, drain it in the background."""
        if self._conn is conn:
            self._conn = None
            self.reconnects += 1

        async def drain() -> None:
            conn.writer.close()  # flushes: its pages are released only after the kernel's
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.wait_closed()

        task = asyncio.ensure_future(drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    # -- calls -------------------------------------------------------------------------
    def _request(
        self, xid: int, proc: str, args: Any, payload: Data | None
    ) -> tuple[SkBuff, FragDestructor, int]:
        iov = IoVec.of(payload) if payload is not None else IoVec([], [])
        views, owners = iov.views, iov.owners
        head, buffers = encode_head(
            xid, 0, (proc, args), sum(v.nbytes for v in views), codec=self.codec
        )
        d = FragDestructor(None, name=f"rpc xid {xid}")
        frags = buffer_frags(buffers, d)
        frags += [Frag(v, 0, len(v), o or d) for v, o in zip(views, owners, strict=True) if len(v)]
        try:
            skb = message_skb(head, frags)
        except BaseException:
            d.unref()
            raise
        return skb, d, record_size(head)

    async def call(self, proc: str, args: Any = (), payload: Data | None = None) -> Any:
        """Call ``proc`` with ``args`` (encoded by the codec: numpy arrays and memoryviews
        go out of band, as frags) and a raw ``payload`` (bytes-like, list of buffers,
        ``SkBuff``). Returns the handler's result; raises :class:`RpcTimeout` after every
        retry, :class:`RemoteError` when the handler raised,
        :class:`~pagefrag.errors.RecordTooLargeError` at once when the request exceeds the
        server's ``max_record``. With ``safe=True`` it returns or raises only once the
        kernel released every transmission (see the module docstring), also when
        cancelled. Refs: the request's frags take a reference on ``payload``'s
        destructors for as long as the kernel holds them."""
        if not isinstance(proc, str):
            raise TypeError(f"proc must be a str, not {type(proc).__name__}")
        xid = next(self._xids)
        skb, d, size = self._request(xid, proc, args, payload)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[xid] = fut
        handles: list[FragDestructor] = []
        try:
            for _attempt in range(self.retries + 1):
                conn = await self.connection()
                if size > conn.max_record:
                    raise RecordTooLargeError(
                        f"a {proc!r} request of {size} bytes exceeds the server's limit of "
                        f"{conn.max_record}",
                        size,
                        conn.max_record,
                    )
                if conn.writer.is_closing():
                    # A write would be ignored (as asyncio's): try a new connection now,
                    # not after a timeout.
                    self._abandon(conn)
                    continue
                handles.append(conn.writer.write(skb))
                self.transmissions += 1
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
                except TimeoutError:
                    self._abandon(conn)
            raise RpcTimeout(f"no reply to {proc!r} (xid {xid}) after {self.retries + 1} tries")
        finally:
            self._pending.pop(xid, None)
            skb.free()
            d.unref()
            if self.safe:
                # However the call ends, its pages must be free before the caller is told.
                await self._released(handles, f"{proc!r} (xid {xid})")

    async def _released(self, handles: list[FragDestructor], what: str) -> None:
        """Wait, shielded from cancellation and for at most ``release_timeout``, until
        every transmission in ``handles`` is released. A cancellation that arrives
        meanwhile is re-raised afterwards."""
        pending = [h for h in handles if not h.done]
        if not pending:
            return

        async def all_released() -> None:
            for handle in pending:
                await handle

        waiter = asyncio.ensure_future(all_released())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.release_timeout
        cancelled = False
        while not waiter.done() and (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            except asyncio.CancelledError:
                cancelled = True  # the buffer is not free: keep waiting, then re-raise
        if not waiter.done():
            raise BufferInUseError(
                f"call {what}: the kernel still holds its pages after {self.release_timeout} s;"
                " the buffer is not free until `released` completes",
                released=waiter,
            )
        if cancelled:
            raise asyncio.CancelledError

    async def close(self) -> None:
        """Close the connection and wait for the abandoned ones to drain."""
        if self._conn is not None:
            self._abandon(self._conn)
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def __aenter__(self) -> RpcClient:
        await self.connection()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
