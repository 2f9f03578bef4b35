"""RpcServer: dispatches calls to handlers and replies on the connection they came on.

A handler is ``handler(args, payload)`` (plain or ``async``): ``args`` is what the client
sent, decoded by the server's codec (out-of-band buffers arrive as views into the
received record, not copied), ``payload`` a memoryview of the raw payload. Its result is
encoded back, out-of-band buffers as zero-copy frags. An exception — any, including
``SystemExit`` and ``KeyboardInterrupt`` — becomes an error reply for that call.

Every connection opens with the server's hello (codec, ``max_record``) and, when an
``authkey`` is set, the mutual HMAC challenge of :mod:`.handshake`; nothing is decoded
from a peer that failed it. The default codec, :class:`~.codec.SafeCodec`, is safe for
untrusted peers: a body it cannot decode gets an error reply and the connection goes
on. ``codec="pickle"`` runs whatever code a peer sends and is refused without an
``authkey``. A record that breaks the framing (bad marker, lengths that do not add up,
over ``max_record``) closes that connection, and only that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .. import aio
from ..errors import CodecError
from . import handshake
from .codec import Codec, PickleCodec, get_codec
from .record import (
    CALL,
    DEFAULT_MAX_RECORD,
    ERROR,
    REPLY,
    RecordError,
    RecordReader,
    buffer_frags,
    encode_head,
    message_skb,
    parse_message,
)

__all__ = ["RpcServer", "Handler"]

log = logging.getLogger("pagefrag.rpc")
Handler = Callable[[Any, memoryview], Any]


class RpcServer:
    """Serve ``handlers`` (name -> handler). ``codec``: ``"safe"`` (default), ``"pickle"``
    (needs ``authkey``) or a :class:`~.codec.Codec` such as ``SafeCodec(registry)``.
    ``authkey`` (bytes, >= 16): peers must answer the HMAC challenge first."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        zerocopy: str = "auto",
        max_record: int = DEFAULT_MAX_RECORD,
        codec: str | Codec = "safe",
        authkey: bytes | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        if not isinstance(max_record, int) or not 0 < max_record < 1 << 63:
            raise ValueError(f"max_record must be a positive int, not {max_record!r}")
        self.codec = get_codec(codec)
        self.authkey = handshake.check_key(authkey)
        if isinstance(self.codec, PickleCodec) and self.authkey is None:
            raise ValueError(
                "codec='pickle' lets any peer run code in this process: give an authkey"
            )
        self.handlers = dict(handlers)
        self.zerocopy = zerocopy
        self.max_record = max_record
        self.handshake_timeout = handshake_timeout
        self._server: aio.ZeroCopyServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls_handled = 0
        self.bad_records = 0
        self.auth_failures = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host`` (loopback unless told otherwise) and ``port`` (0: any)."""
        self._server = await aio.start_server(self._serve, host, port, zerocopy=self.zerocopy)
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    async def _greet(self, reader: asyncio.StreamReader, writer: aio.ZeroCopyStreamWriter) -> bool:
        """Send the hello; with a key, run the challenge. False: the peer failed it."""
        nonce = handshake.challenge() if self.authkey is not None else None
        greeting = handshake.hello(self.codec.wire_id, self.max_record, nonce)
        writer.write(greeting)
        if self.authkey is None:
            return True
        size = handshake.DIGEST_SIZE + handshake.NONCE_SIZE
        try:
            response = await asyncio.wait_for(reader.readexactly(size), self.handshake_timeout)
        except (TimeoutError, asyncio.IncompleteReadError):
            return False
        digest, theirs = response[: handshake.DIGEST_SIZE], response[handshake.DIGEST_SIZE :]
        if not handshake.verify(self.authkey, True, greeting, digest):
            return False
        writer.write(handshake.answer(self.authkey, False, theirs))
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: aio.ZeroCopyStreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        records = RecordReader(self.max_record)
        try:
            if not await self._greet(reader, writer):
                self.auth_failures += 1
                log.warning("closing %s: authentication failed", writer.get_extra_info("peername"))
                return
            while data := await reader.read(1 << 20):
                for record in records.feed(data):
                    await self._dispatch(record, writer)
        except RecordError as exc:
            self.bad_records += 1
            log.warning("closing %s: %s", writer.get_extra_info("peername"), exc)
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug or a reply that cannot be sent: drop this connection only
            log.exception("closing %s", writer.get_extra_info("peername"))
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _dispatch(self, record: bytearray, writer: aio.ZeroCopyStreamWriter) -> None:
        frame = parse_message(record)  # bad framing: RecordError closes the connection
        if frame.kind != CALL:
            raise RecordError(f"expected a call, got a message of kind {frame.kind}")
        try:
            try:
                body = self.codec.loads(frame.body, frame.buffers)
            except CodecError:
                self.bad_records += 1  # the framing held: answer and go on
                raise
            if not isinstance(body, tuple) or len(body) != 2 or not isinstance(body[0], str):
                raise CodecError("a call's body must be a tuple (proc name, args)")
            proc, args = body
            handler = self.handlers.get(proc)
            if handler is None:
                raise LookupError(f"no procedure {proc!r}")
            result = handler(args, frame.payload)
            if inspect.isawaitable(result):
                result = await result
            head, buffers = encode_head(frame.xid, REPLY, result, codec=self.codec)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the server is closing
            head, buffers = encode_head(
                frame.xid, ERROR, f"CancelledError: {exc}", codec=self.codec
            )
        except BaseException as exc:  # SystemExit too: one call's failure
            head, buffers = encode_head(
                frame.xid, ERROR, f"{type(exc).__name__}: {exc}", codec=self.codec
            )
        self.calls_handled += 1
        skb = message_skb(head, buffer_frags(buffers))
        writer.write(skb)
        skb.free()
        await writer.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
