"""What both zero-copy socket wrappers (``ZeroCopySocket``, ``UringSocket``) share: the
wrapped socket, ``with``, how they show themselves, and fork (a child's copies made
inert). No I/O, no references."""

from __future__ import annotations

import os
import socket
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

__all__ = ["SocketWrapper"]

if TYPE_CHECKING:
    from typing import Self

# Every wrapper not yet closed: a forked child makes its copies inert.
_LIVE: weakref.WeakSet[SocketWrapper] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for wrapper in list(_LIVE):
        wrapper._inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SocketWrapper:
    """The common surface of a zero-copy socket wrapper. Subclasses set ``_sock``,
    ``_closed``, ``_forked``, ``_close_timeout`` and ``_policy`` and define ``close``,
    ``_held`` (what the kernel still holds, for ``repr``) and ``_inherited`` (a forked
    child's copy made inert); they call ``_watch_fork`` when made and ``_unwatch_fork``
    when closed."""

    _sock: socket.socket
    _closed: bool
    _forked: bool
    _close_timeout: float | None
    _policy: Any

    def close(self, timeout: float | None = None) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _held(self) -> int:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _inherited(self) -> None:  # pragma: no cover (abstract)
        """In a forked child: make this copy inert."""
        raise NotImplementedError

    def _watch_fork(self) -> None:
        _LIVE.add(self)

    def _unwatch_fork(self) -> None:
        _LIVE.discard(self)

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
