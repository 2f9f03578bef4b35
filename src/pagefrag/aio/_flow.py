"""Write flow control of the zero-copy transport: the high- and low-water marks and the
protocol's ``pause_writing``/``resume_writing`` (the model is asyncio's
``_FlowControlMixin`` in ``Lib/asyncio/transports.py``).

Rule: this module decides when the protocol is paused or resumed and nothing else; what
counts as buffered is the transport's :meth:`get_write_buffer_size` (for the zero-copy
transport: unsent plus pinned bytes)."""

from __future__ import annotations

import asyncio

__all__ = ["DEFAULT_HIGH_WATER", "FlowControlMixin"]

DEFAULT_HIGH_WATER = 4 << 20
"""Unsent plus pinned bytes above which the protocol is paused. A zero-copy write stays
pinned until the peer ACKs it, so this is the in-flight window: far above asyncio's
64 KiB, which would stall every write on a round trip."""


class FlowControlMixin(asyncio.Transport):
    """Pause the protocol above the high-water mark until the buffered bytes fall to the
    low-water mark. The subclass provides ``_loop``, ``_protocol`` and
    :meth:`get_write_buffer_size`, and calls :meth:`_maybe_pause_protocol` after it
    buffers more, :meth:`_maybe_resume_protocol` after it buffers less."""

    _loop: asyncio.AbstractEventLoop
    _protocol: asyncio.BaseProtocol
    _writing_paused = False
    _high_water = DEFAULT_HIGH_WATER
    _low_water = DEFAULT_HIGH_WATER // 4

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def _maybe_pause_protocol(self) -> None:
        if not self._writing_paused and self.get_write_buffer_size() > self._high_water:
            self._writing_paused = True
            self._call_flow_control("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._writing_paused and self.get_write_buffer_size() <= self._low_water:
            self._writing_paused = False
            self._call_flow_control("resume_writing")

    def _call_flow_control(self, name: str) -> None:
        # As asyncio's _FlowControlMixin: the protocol's exception is reported and the
        # transport goes on. Raised here it would skip the close check (the transport
        # would never finish) or escape write() after the data was queued.
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report(f"protocol.{name}() failed", exc)

    def _report(self, message: str, exc: BaseException) -> None:
        """Hand a protocol's exception to the loop's exception handler."""
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )
