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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from .. import aio
from .._destructor import FragDestructor
from .._skbuff import Frag, SkBuff
from ..errors import PageFragError
from ..zerocopy.socket import Data, pieces
from .record import (
    ERROR,
    REPLY,
    RecordError,
    RecordReader,
    buffer_frags,
    decode_message,
    encode_head,
    message_skb,
)

__all__ = ["RpcClient", "RpcError", "RpcTimeout", "RemoteError"]


class RpcError(PageFragError):
    """Base class of the RPC layer's errors."""


class RpcTimeout(RpcError, TimeoutError):
    """No reply after every retry."""


class RemoteError(RpcError):
    """The handler raised; the text says what."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: aio.ZeroCopyStreamWriter) -> None:
        self.reader = reader
        self.writer = writer
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
        max_record: int = 1 << 30,
    ) -> None:
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
                conn = _Connection(reader, writer)
                conn.task = asyncio.ensure_future(self._read_replies(conn))
                self._conn = conn
            return self._conn

    async def _read_replies(self, conn: _Connection) -> None:
        records = RecordReader(self.max_record)
        try:
            while data := await conn.reader.read(1 << 20):
                for record in records.feed(data):
                    msg = decode_message(record)
                    fut = self._pending.get(msg.xid)
                    if fut is None or fut.done():
                        continue  # a late reply to an answered call (a retransmission's)
                    if msg.kind == REPLY:
                        fut.set_result(msg.body)
                    elif msg.kind == ERROR:
                        fut.set_exception(RemoteError(msg.body))
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
    ) -> tuple[SkBuff, FragDestructor]:
        views, owners = pieces(payload) if payload is not None else ([], [])
        head, buffers = encode_head(xid, 0, (proc, args), sum(map(len, views)))
        d = FragDestructor(None, name=f"rpc xid {xid}")
        frags = buffer_frags(buffers, d)
        frags += [Frag(v, 0, len(v), o or d) for v, o in zip(views, owners, strict=True) if len(v)]
        try:
            skb = message_skb(head, frags)
        except BaseException:
            d.unref()
            raise
        return skb, d

    async def call(self, proc: str, args: Any = (), payload: Data | None = None) -> Any:
        """Call ``proc`` with ``args`` (pickled, protocol 5: numpy arrays and PickleBuffers
        go out of band, as frags) and a raw ``payload`` (bytes-like, list of buffers,
        ``SkBuff``). Returns the handler's result; raises :class:`RpcTimeout` after every
        retry and :class:`RemoteError` when the handler raised."""
        xid = next(self._xids)
        skb, d = self._request(xid, proc, args, payload)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[xid] = fut
        handles: list[FragDestructor] = []
        try:
            for _attempt in range(self.retries + 1):
                conn = await self.connection()
                try:
                    handles.append(conn.writer.write(skb))
                except ConnectionError:
                    self._abandon(conn)
                    continue
                self.transmissions += 1
                try:
                    result = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
                    break
                except TimeoutError:
                    self._abandon(conn)
            else:
                raise RpcTimeout(f"no reply to {proc!r} (xid {xid}) after {self.retries + 1} tries")
            if self.safe:
                # Every transmission, on every connection, released by the kernel.
                for handle in handles:
                    await handle
            return result
        finally:
            self._pending.pop(xid, None)
            skb.free()
            d.unref()

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
