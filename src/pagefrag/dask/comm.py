"""``PagefragComm``: a ``distributed.comm.core.Comm`` over a pagefrag zero-copy transport
(:mod:`pagefrag.aio`), the counterpart of distributed's ``TCP`` comm.

Theory of operation. ``write(msg)`` serializes with Dask's ``to_frames`` (pickle-5
out-of-band buffers stay the caller's memory), frames the message
(:func:`~._framing.frame_message`: header and small frames joined in one copy, each large
frame by reference) and queues every piece on the transport in one synchronous step, so
concurrent writers never interleave. Each large frame is written with
``write_zerocopy``: the transport pins it (a reference on its memory) until the kernel
reports, across every retransmit, that it has released the pages; its write handle
fires then. With ``wait-for-release`` (the default) ``write()`` returns only once the
handles of the frames that are the caller's memory have fired, so the caller may free
*or overwrite* an array as soon as ``write()`` returns: the seed's hazard (a frag's
memory reused while the stack may still read it) cannot happen through Dask. Without it,
``write()`` returns once the pieces are queued (as distributed's ``TCP`` comm): freeing is
still safe (the pins keep the memory alive), overwriting is not.

Flow control: a write first waits while the transport's unsent plus pinned bytes are
above ``high-water``. Reading is a ``BufferedProtocol`` (:mod:`._protocol`): large frames
are received straight into their own buffers; reading pauses while more than
``read-high-water`` received bytes are unread.

``close()`` sends what is queued, waits for every completion (bounded by ``linger``:
past it the comm is closed with the pages still pinned, released when the kernel
reports them) and closes; ``abort()`` resets the connection at once and still releases
pages only on their completions. The transport owns both promises
(:class:`pagefrag.aio.ZeroCopyTransport`)."""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from typing import Any, ClassVar

import dask.config
from dask.utils import parse_bytes
from distributed.comm.core import Comm, CommClosedError
from distributed.comm.utils import from_frames, to_frames

from .._destructor import FragDestructor
from ..zerocopy.policy import DEFAULT_MIN_ZEROCOPY_SIZE
from ._config import TCP_PROBES, Settings
from ._framing import frame_message
from ._protocol import CommProtocol

__all__ = ["PagefragComm"]

logger = logging.getLogger("pagefrag.dask")


def set_tcp_timeout(sock: socket.socket, timeout: int) -> None:
    """Keepalive probes and ``TCP_USER_TIMEOUT`` from ``distributed.comm.timeouts.tcp``
    (``timeout`` seconds, checked by :func:`~._config.settings`), as distributed's ``TCP``
    comm sets them: a dead peer is noticed, and its pins are released (TCP gives up,
    the completions come) within that bound."""
    idle = max(2, timeout // 4)
    interval = max(1, (timeout - idle) // TCP_PROBES)
    idle = timeout - interval * TCP_PROBES
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout * 1000)


def _close_dangling(transport: asyncio.Transport, name: str) -> None:
    if transport.is_closing():
        return
    loop = getattr(transport, "_loop", None)
    if loop is not None and loop.is_closed():
        # Nothing runs on a closed loop: the pages the kernel may hold stay pinned
        # (never handed back early); the socket goes with the transport.
        logger.warning("Dangling comm %s: its event loop is closed", name)
        return
    logger.warning("Closing dangling comm %s", name)
    transport.close()  # sends what is queued; pages released on completions


class PagefragComm(Comm):
    """An established ``pagefrag://`` connection (Dask's ``Comm``). Kernel:
    ``sendmsg(MSG_ZEROCOPY)`` or io_uring ``SEND_ZC`` for large frames, ``recv_into``.

    Refs: each large frame written is pinned (a reference on its memory and the
    transport's destructor) until the kernel releases it; small frames are copied and
    hold nothing of the caller's."""

    max_shard_size: ClassVar[int] = parse_bytes(dask.config.get("distributed.comm.shard"))

    def __init__(
        self,
        protocol: CommProtocol,
        local_addr: str,
        peer_addr: str,
        settings: Settings,
        deserialize: bool = True,
    ) -> None:
        self._closed = self._aborted = False
        super().__init__(deserialize=deserialize)
        assert protocol.transport is not None
        self._protocol = protocol
        self._transport: asyncio.Transport | None = protocol.transport
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        self._settings = settings
        self._copy_below = (
            DEFAULT_MIN_ZEROCOPY_SIZE
            if settings.min_zerocopy_size is None
            else settings.min_zerocopy_size
        )
        self.bytes_written = 0
        self.bytes_read = 0
        sock = protocol.transport.get_extra_info("socket")
        if sock is not None:
            try:
                set_tcp_timeout(sock, settings.tcp_timeout)
            except OSError:
                logger.exception("Could not set the TCP timeouts of %s", peer_addr)
        self._finalizer = weakref.finalize(self, _close_dangling, protocol.transport, repr(self))
        self._finalizer.atexit = False

    # -- Comm ------------------------------------------------------------------------------
    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    def closed(self) -> bool:
        """True after ``close()``/``abort()``, or once the connection has ended and every
        message received before the end has been read (Dask's server loop stops at
        ``closed()``: a message the peer sent before closing is still handled)."""
        p = self._protocol
        return self._closed or ((p.done or p.eof) and not p.reader.messages)

    async def read(self, deserializers: Any = None) -> Any:
        """The next message, deserialized as Dask's ``from_frames`` does (unless the
        comm was made with ``deserialize=False``). ``CommClosedError`` once the
        connection has ended and every message received before was read. Kernel:
        ``recv_into``. Refs: none (each frame is a buffer of its own)."""
        if self._closed:  # closed here; a peer's close still lets what it sent be read
            raise CommClosedError(f"in {self}: closed")
        try:
            frames = await self._protocol.next_message()
        except BaseException:
            # As distributed's TCP comm: a read interrupted part-way leaves the stream
            # at an unknown position; the only safe thing is to abort.
            self.abort()
            raise
        if frames is None:
            exc = self._protocol.exc
            raise CommClosedError(f"in {self}: {exc or 'the connection was closed'}") from exc
        # The wire bytes, header included, as bytes_written counts them on the other end.
        self.bytes_read += 8 * (len(frames) + 1) + sum(f.nbytes for f in frames)
        try:
            return await from_frames(  # type: ignore[no-untyped-call]
                frames,
                deserialize=self.deserialize,
                deserializers=deserializers,
                allow_offload=self.allow_offload,
            )
        except EOFError:
            self.abort()
            raise CommClosedError("aborted stream on truncated data") from None

    async def write(self, msg: Any, serializers: Any = None, on_error: str = "message") -> int:
        """Serialize and send ``msg``; return the bytes written (header included).
        With ``wait-for-release`` (the default), return only once the kernel has
        released every frame that is the caller's memory: the caller may then free or
        change it. ``CommClosedError`` if the comm is closed, or if bytes were dropped
        unsent before ``write()`` returned, or our own ``abort()`` came meanwhile (as
        TCP's comm, not when the connection ends after they all went out). A write of
        small frames only (copied, nothing to wait for) returns once queued, as TCP's
        does: its bytes may still be dropped later. Kernel: ``sendmsg(MSG_ZEROCOPY)`` /
        io_uring ``SEND_ZC``.

        Refs: a pin on each large frame until the kernel releases it."""
        transport = self._transport
        if transport is None or self.closed():
            raise CommClosedError(f"in {self}: closed")
        frames = await to_frames(  # type: ignore[no-untyped-call]
            msg,
            allow_offload=self.allow_offload,
            serializers=serializers,
            on_error=on_error,
            context={
                "sender": self.local_info,
                "recipient": self.remote_info,
                **self.handshake_options,
            },
            frame_split_size=self.max_shard_size,
        )
        pieces, total = frame_message(frames, self._copy_below)
        try:
            await self._protocol.writable()
            if self.closed() or transport.is_closing():
                raise CommClosedError(f"in {self}: closed")
            dropped = transport.dropped_bytes  # type: ignore[attr-defined]
            lent: list[FragDestructor] = []
            # One synchronous step: a concurrent writer's pieces cannot come between.
            for data, theirs in pieces:
                if theirs:
                    lent.append(transport.write_zerocopy(data))  # type: ignore[attr-defined]
                else:
                    transport.write(data)  # ours: its pin keeps it alive; no need to wait
            if self._settings.wait_for_release:
                for handle in lent:
                    if not handle.done:
                        await handle
        except CommClosedError:
            raise
        except BaseException:
            # Interrupted part-way: what reached the stream is unknown, so, as
            # distributed's TCP comm, abort. Pages still pinned stay pinned until the
            # kernel releases them.
            self.abort()
            raise
        # As TCP's comm: the write failed if some of its bytes never reached the kernel.
        # The connection ending after they all did (the peer read them and closed, its
        # FIN often arriving with the ACK that releases the pages) is no failure.
        # Our own abort() meanwhile reset the connection: what was in flight may be lost.
        if transport.dropped_bytes != dropped or self._aborted:  # type: ignore[attr-defined]
            raise CommClosedError(f"in {self}: the connection ended during the write")
        self.bytes_written += total
        return total

    async def close(self) -> None:
        """Send what is queued, wait for the kernel's completions (at most ``linger``
        seconds: past it the pages stay pinned until released) and close. Kernel:
        ``shutdown``, ``close``. Refs: dropped as the completions arrive."""
        transport, self._transport = self._transport, None
        self._closed = True
        if transport is None:
            return
        self._finalizer.detach()
        self._protocol.stop()
        transport.close()
        lost = self._protocol.lost
        if lost is not None:
            await asyncio.shield(lost)

    def abort(self) -> None:
        """Reset the connection at once; what was never sent is dropped, and the pages
        the kernel holds are released only when it reports them. Kernel:
        ``connect(AF_UNSPEC)``. Refs: dropped as the completions arrive."""
        transport, self._transport = self._transport, None
        self._closed = True
        if transport is not None:
            self._aborted = True  # (not after a close(): its writes went out whole)
            self._finalizer.detach()
            self._protocol.stop()
            transport.abort()

    # -- what a worker's memory is made of -------------------------------------------------
    @property
    def pinned_bytes(self) -> int:
        """Bytes the kernel has not released yet (large frames in flight)."""
        t = self._protocol.transport
        return int(getattr(t, "pinned_bytes", 0)) if t is not None else 0

    @property
    def unsent_bytes(self) -> int:
        """Bytes queued and not yet taken by the kernel (pinned by the queue)."""
        t = self._protocol.transport
        if t is None:
            return 0
        return max(0, t.get_write_buffer_size() - self.pinned_bytes)

    def stats(self) -> dict[str, Any]:
        """Bytes written and read, unsent and pinned now, the zero-copy counters."""
        t = self._protocol.transport
        return {
            "bytes_written": self.bytes_written,
            "bytes_read": self.bytes_read,
            "unsent_bytes": self.unsent_bytes,
            "pinned_bytes": self.pinned_bytes,
            "zerocopy": getattr(t, "zerocopy_stats", None),
        }

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__}{' (closed)' if self._closed else ''} {self.name or ''} "
            f"local={self._local_addr} remote={self._peer_addr} "
            f"unsent={self.unsent_bytes} pinned={self.pinned_bytes}>"
        )
