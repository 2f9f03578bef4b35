"""The read side of the zero-copy transport: an edge-triggered ``recv`` loop, paused and
resumed by the protocol, whose protocol callbacks are guarded (the model is asyncio's
``_SelectorSocketTransport._read_ready``).

Rule: a socket error ends the connection through the transport's ``_force_close``; an
exception of the protocol's ``data_received`` or ``eof_received`` through its
``_fatal_error`` (reported to the loop's exception handler, then ``_force_close``).
Nothing here changes the transport's lifecycle state directly."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

__all__ = ["ReadingMixin"]

_READ_SIZE = 256 * 1024


class ReadingMixin(asyncio.Transport):
    """Reading for a transport that provides ``_loop``, ``_sock``, ``_protocol``,
    ``_force_close(exc)`` and ``_fatal_error(exc, message)``; the transport calls
    :meth:`_read_ready` when its socket becomes readable."""

    _loop: asyncio.AbstractEventLoop
    _sock: socket.socket
    _protocol: asyncio.BaseProtocol
    _force_close: Callable[[Exception | None], None]
    _fatal_error: Callable[[BaseException, str], None]
    _reading = True
    _read_scheduled = False

    def _read_ready(self) -> None:
        """Read until the socket is empty (the registration is edge-triggered), a bounded
        number of times per turn of the loop; more is scheduled, not waited for."""
        self._read_scheduled = False
        for _ in range(16):
            if not self._reading:
                return
            try:
                data = self._sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._force_close(exc)
                return
            callback = "data_received" if data else "eof_received"
            try:
                if not data:
                    self._reading = False
                    keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
                    if not keep_open:
                        self.close()
                    return
                self._protocol.data_received(data)  # type: ignore[attr-defined]
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # as asyncio's transports: the connection fails
                self._fatal_error(exc, f"Fatal error: protocol.{callback}() call failed.")
                return
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read_ready)

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self.is_closing():
            self._reading = True
            self._schedule_read()  # data may have arrived while paused: no new edge comes

    def is_reading(self) -> bool:
        return self._reading
