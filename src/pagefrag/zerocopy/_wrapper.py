"""What both zero-copy socket wrappers (``ZeroCopySocket``, ``UringSocket``) share: the
wrapped socket, ``with``, and how they show themselves. No I/O, no references."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

__all__ = ["SocketWrapper"]

if TYPE_CHECKING:
    from typing import Self


class SocketWrapper:
    """The common surface of a zero-copy socket wrapper. Subclasses set ``_sock``,
    ``_closed``, ``_forked``, ``_close_timeout`` and ``_policy`` and define ``close``
    and ``_held`` (what the kernel still holds, for ``repr``)."""

    _sock: socket.socket
    _closed: bool
    _forked: bool
    _close_timeout: float | None
    _policy: Any

    def close(self, timeout: float | None = None) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _held(self) -> int:  # pragma: no cover (abstract)
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def close_timeout(self) -> float | None:
        """How long :meth:`close` waits by default (None: no bound)."""
        return self._close_timeout

    @property
    def socket(self) -> socket.socket:
        """The wrapped socket (for reads and options; send through this wrapper)."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "inherited by a child" if self._forked else ""
        state = state or f"outstanding={self._held()}"
        name = type(self).__name__
        return f"<{name} fd={self._sock.fileno()} {self._policy.mode.value} {state}>"
