"""The read side of the zero-copy transport: an edge-triggered receive loop, paused and
resumed by the protocol, whose protocol callbacks are guarded (the model is asyncio's
``_SelectorSocketTransport._read_ready``).

Two read paths, chosen per protocol when it is set (at set-up and by
:meth:`ReadingMixin.set_protocol`), never per read: a ``Protocol`` gets each ``recv``
as ``data_received(bytes)``; an ``asyncio.BufferedProtocol`` is asked for a buffer
(``get_buffer(-1)``), the kernel copies straight into it (``recv_into``) and
``buffer_updated(nbytes)`` says how much (asyncio's ``_read_ready__get_buffer``).

Rule: a socket error ends the connection through the transport's ``_force_close``; an
exception of a protocol callback through its ``_fatal_error`` (reported to the loop's
exception handler, then ``_force_close``), with asyncio's messages. Nothing here changes
the transport's lifecycle state directly."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

__all__ = ["ReadingMixin"]

_READ_SIZE = 256 * 1024
_READS_PER_TURN = 16


class ReadingMixin(asyncio.Transport):
    """Reading for a transport that provides ``_loop``, ``_sock``, ``_force_close(exc)``
    and ``_fatal_error(exc, message)`` and sets its protocol with :meth:`set_protocol`;
    the transport calls ``_read_ready()`` when its socket becomes readable."""

    _loop: asyncio.AbstractEventLoop
    _sock: socket.socket
    _protocol: asyncio.BaseProtocol
    _force_close: Callable[[Exception | None], None]
    _fatal_error: Callable[[BaseException, str], None]
    _read_ready: Callable[[], None]  # the read path of the protocol's kind
    _buffered = False  # the protocol is a BufferedProtocol
    _reading = True
    _read_scheduled = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to ``protocol`` from now on (reading switches to its kind:
        ``data_received`` or ``get_buffer``/``buffer_updated``), as asyncio's
        transports. Refs: none."""
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._read_ready = self._read_into if self._buffered else self._read_data

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def _read_data(self) -> None:
        """Read until the socket is empty (the registration is edge-triggered), a bounded
        number of times per turn of the loop; more is scheduled, not waited for."""
        self._read_scheduled = False
        for _ in range(_READS_PER_TURN):
            if not self._reading:
                return
            try:
                data = self._sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._force_close(exc)
                return
            if not data:
                self._on_eof()
                return
            try:
                self._protocol.data_received(data)  # type: ignore[attr-defined]
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # as asyncio's transports: the connection fails
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
                return
            if self._buffered:  # set_protocol() switched kinds: go on with the new one
                break
        self._schedule_read()

    def _read_into(self) -> None:
        """:meth:`_read_data` for a ``BufferedProtocol``: each read goes straight into the
        buffer the protocol gives."""
        self._read_scheduled = False
        for _ in range(_READS_PER_TURN):
            if not self._reading:
                return
            protocol = self._protocol
            try:
                buf = protocol.get_buffer(-1)  # type: ignore[attr-defined]
                if not len(buf):
                    raise RuntimeError("get_buffer() returned an empty buffer")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
                return
            try:
                nbytes = self._sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._force_close(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # a buffer recv_into cannot write to
                self._fatal_error(exc, "Fatal read error on socket transport")
                return
            if not nbytes:
                self._on_eof()
                return
            try:
                protocol.buffer_updated(nbytes)  # type: ignore[attr-defined]
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            if not self._buffered:  # set_protocol() switched kinds
                break
        self._schedule_read()

    def _on_eof(self) -> None:
        self._reading = False
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _read_later(self) -> None:
        self._read_ready()  # the path of the protocol set by then

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read_later)

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self.is_closing():
            self._reading = True
            self._schedule_read()  # data may have arrived while paused: no new edge comes

    def is_reading(self) -> bool:
        return self._reading
