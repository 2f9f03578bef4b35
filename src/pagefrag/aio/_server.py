"""The server :func:`.streams.start_server` returns: listening sockets whose accepted
connections become zero-copy streams, with the API and the semantics of asyncio 3.11's
``Server`` (the model is ``asyncio/base_events.py``).

Rule: this module accepts and counts connections; what a connection becomes is the
``on_accept`` callback's (:mod:`.streams`), which calls :meth:`ZeroCopyServer._attach`
for each connection set up and arranges :meth:`ZeroCopyServer._detach` at its loss.

Theory of operation. The sockets are bound (not listening) when the server is made;
serving starts (``listen(backlog)``, the loop watching each socket) at once or with
:meth:`start_serving` / :meth:`serve_forever`, as asyncio's ``start_serving=``. ``close()``
stops accepting and closes the listening sockets (``sockets`` is empty from then on);
connections already accepted go on. ``wait_closed()``, as asyncio 3.11's, returns at once
on a closed server; awaited before ``close()``, it returns once the server is closed and
its last connection is lost.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from asyncio import trsock
from collections.abc import Callable

__all__ = ["ACCEPT_RETRY_DELAY", "ZeroCopyServer"]

ACCEPT_RETRY_DELAY = 1.0
"""Seconds the server stops accepting after running out of descriptors or memory (as
asyncio's ``constants.ACCEPT_RETRY_DELAY``)."""
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_PEER_GONE = (errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED)


class ZeroCopyServer(asyncio.AbstractServer):
    """What :func:`start_server` returns: listening sockets accepting zero-copy streams.
    Kernel: ``listen()`` / ``accept()``. Refs: none (each connection's are its transport's)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        on_accept: Callable[[socket.socket, ZeroCopyServer], None],
        backlog: int = 100,
    ) -> None:
        self._loop = loop
        self._sockets: list[socket.socket] | None = sockets
        self._on_accept = on_accept
        self._backlog = backlog
        self._serving = False
        self._active_count = 0
        self._waiters: list[asyncio.Future[None]] | None = []
        self._serving_forever_fut: asyncio.Future[None] | None = None
        self._retries: dict[socket.socket, asyncio.TimerHandle] = {}
        self._handshakes: set[asyncio.Task[None]] = set()  # TLS connections being set up

    def __repr__(self) -> str:
        return f"<{type(self).__name__} sockets={self.sockets!r}>"

    # -- connections -----------------------------------------------------------------------
    def _attach(self) -> None:
        self._active_count += 1

    def _detach(self) -> None:
        self._active_count -= 1
        if self._active_count == 0 and self._sockets is None:
            self._wakeup()

    def _wakeup(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    # -- accepting -------------------------------------------------------------------------
    def _start_serving(self) -> None:
        if self._serving or self._sockets is None:
            return
        self._serving = True
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        loop = self._loop
        for _ in range(64):  # bounded: other callbacks get their turn
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # The listener stays readable while the connection waits in the
                    # backlog: stop watching it and try again later (as asyncio does).
                    loop.call_exception_handler(
                        {
                            "message": "socket.accept() out of system resource",
                            "exception": exc,
                            "socket": listener,
                        }
                    )
                    loop.remove_reader(listener.fileno())
                    self._retries[listener] = loop.call_later(
                        ACCEPT_RETRY_DELAY, self._resume, listener
                    )
                else:
                    loop.call_exception_handler(
                        {"message": "socket.accept() failed", "exception": exc, "socket": listener}
                    )
                return
            try:
                self._on_accept(conn, self)  # closes or aborts the connection when it fails
            except (SystemExit, KeyboardInterrupt):
                raise
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    loop.call_exception_handler(
                        {"message": "setting up an accepted connection failed", "exception": exc}
                    )
                # else: reset by the peer while queued for accept; as asyncio, no report.
            except BaseException as exc:
                loop.call_exception_handler(
                    {"message": "setting up an accepted connection failed", "exception": exc}
                )

    def _resume(self, listener: socket.socket) -> None:
        self._retries.pop(listener, None)
        if self._serving and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    # -- asyncio.AbstractServer ------------------------------------------------------------
    @property
    def sockets(self) -> tuple[trsock.TransportSocket, ...]:
        """The listening sockets, wrapped as asyncio wraps them (``TransportSocket``: no
        ``close()`` or ``accept()`` behind the server's back); empty once the server is
        closed. Kernel: none. Refs: none."""
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(s) for s in self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server runs on, as asyncio's. Kernel: none. Refs: none."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether the server accepts (listening and watched), as asyncio's. Kernel:
        none. Refs: none."""
        return self._serving

    def close(self) -> None:
        """Stop accepting and close the listening sockets; accepted connections go on.
        Kernel: ``close()`` of each listening socket. Refs: none."""
        sockets, self._sockets = self._sockets, None
        if sockets is None:
            return
        for timer in self._retries.values():
            timer.cancel()
        self._retries.clear()
        for sock in sockets:
            if sock.fileno() >= 0:
                if self._serving:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        self._serving = False
        fut, self._serving_forever_fut = self._serving_forever_fut, None
        if fut is not None and not fut.done():
            fut.cancel()
        if self._active_count == 0:
            self._wakeup()

    async def start_serving(self) -> None:
        """Listen and accept (no-op if already serving), as asyncio's. Kernel:
        ``listen(backlog)``. Refs: none."""
        self._start_serving()
        await asyncio.sleep(0)  # as asyncio: let the loop take the new readers

    async def serve_forever(self) -> None:
        """Serve until cancelled; cancelling closes the server and waits for it, as
        asyncio's. RuntimeError on a closed server or a second caller. Refs: none."""
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None

    async def wait_closed(self) -> None:
        """asyncio 3.11's semantics: at once on a closed server; otherwise once it is
        closed and its last connection lost. Refs: none."""
        if self._sockets is None or self._waiters is None:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    async def __aenter__(self) -> ZeroCopyServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()
