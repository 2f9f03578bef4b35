"""RpcServer: dispatches calls to handlers and replies on the connection they came on.

A handler is ``handler(args, payload)`` (plain or ``async``): ``args`` is what the client
pickled (out-of-band buffers arrive as views into the received record, not copied),
``payload`` a memoryview of the raw payload. Its result is pickled back, out-of-band
buffers as zero-copy frags. An exception becomes an error reply. A malformed record
closes that connection, and only that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .. import aio
from .record import (
    CALL,
    ERROR,
    REPLY,
    RecordError,
    RecordReader,
    buffer_frags,
    decode_message,
    encode_head,
    message_skb,
)

__all__ = ["RpcServer", "Handler"]

log = logging.getLogger("pagefrag.rpc")
Handler = Callable[[Any, memoryview], Any]


class RpcServer:
    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        zerocopy: str = "auto",
        max_record: int = 1 << 30,
    ) -> None:
        self.handlers = dict(handlers)
        self.zerocopy = zerocopy
        self.max_record = max_record
        self._server: aio.ZeroCopyServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls_handled = 0
        self.bad_records = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await aio.start_server(self._serve, host, port, zerocopy=self.zerocopy)
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: aio.ZeroCopyStreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        records = RecordReader(self.max_record)
        try:
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
        msg = decode_message(record)
        if msg.kind != CALL or not isinstance(msg.body, tuple) or len(msg.body) != 2:
            raise RecordError("expected a call (proc, args)")
        proc, args = msg.body
        handler = self.handlers.get(proc)
        try:
            if handler is None:
                raise LookupError(f"no procedure {proc!r}")
            result = handler(args, msg.payload)
            if inspect.isawaitable(result):
                result = await result
            head, buffers = encode_head(msg.xid, REPLY, result)
        except Exception as exc:  # a handler's failure, or a result that cannot be pickled
            head, buffers = encode_head(msg.xid, ERROR, f"{type(exc).__name__}: {exc}")
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
