"""Behaviour that distributed's own comm tests (``distributed/comm/tests/test_comms.py``,
run against ``pagefrag://`` by ``tools/upstream_dask_comm_tests.py``) expect of a comm,
re-created here as checks of our own, each on the real kernel and both event loops.

- A peer that reads a whole message and closes at once (upstream's
  ``check_listener_deserialize``: the listener's handler reads one message, then closes)
  is no failure of the write that sent it: ``write()`` returns the byte count, as
  distributed's TCP comm does. A write whose bytes a reset dropped still raises
  ``CommClosedError``."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from typing import Any

import dask.config
import pytest

pytest.importorskip("distributed")
np = pytest.importorskip("numpy")

from distributed.comm.core import CommClosedError  # noqa: E402
from distributed.comm.utils import from_frames  # noqa: E402
from distributed.protocol import to_serialize  # noqa: E402

from pagefrag.dask import PagefragComm, PagefragConnector  # noqa: E402


@pytest.fixture
def always_zerocopy() -> Iterator[None]:
    # Loopback copies at delivery, so `auto` copies here and a write's frames are
    # released at once; `always` keeps them pinned until the kernel delivers them, as
    # on a real NIC (released on the peer's ACK).
    with dask.config.set({"distributed.comm.pagefrag.zerocopy": "always"}):
        yield


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("the comm closed mid-message")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_message(sock: socket.socket) -> list[bytes]:
    """One pagefrag:// message (u64 count, u64 lengths, frames), read with a plain
    blocking socket."""
    (count,) = struct.unpack("<Q", _recv_exactly(sock, 8))
    sizes = struct.unpack(f"<{count}Q", _recv_exactly(sock, 8 * count))
    return [_recv_exactly(sock, n) for n in sizes]


async def _connect(srv: socket.socket) -> tuple[PagefragComm, socket.socket]:
    port = srv.getsockname()[1]
    comm = await PagefragConnector().connect(f"127.0.0.1:{port}")
    srv.settimeout(30)
    peer, _ = srv.accept()  # already established in the kernel: returns at once
    peer.settimeout(30)
    return comm, peer


def _comm_socket(comm: PagefragComm) -> Any:
    transport = comm._protocol.transport
    assert transport is not None
    return transport.get_extra_info("socket")


def test_write_returns_when_the_peer_reads_the_message_and_closes(
    run: Any, always_zerocopy: None
) -> None:
    # The order that made upstream's test_tcp_deserialize fail on uvloop, made certain:
    # the whole message is in the kernel's send queue, pinned (the peer's small window
    # holds most of it back); the peer then reads it all and closes while the loop does
    # not run, so the release and the FIN are seen together and the write's wait ends
    # with the connection already closing. Every byte was delivered and released: the
    # write must return its byte count (it raised CommClosedError before the fix).
    arr = np.arange(1 << 20, dtype="u1")

    async def main() -> tuple[int, int, Any, bool]:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 15)
            comm, peer = await _connect(srv)
            with peer:
                # Room for the whole message in one sendmsg: nothing waits for the loop.
                _comm_socket(comm).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
                write = asyncio.ensure_future(comm.write({"op": "x", "data": to_serialize(arr)}))
                pinned = 0
                for _ in range(100):  # bounded: until the write waits for its release
                    await asyncio.sleep(0)
                    pinned = comm.pinned_bytes
                    if write.done() or (pinned and comm.unsent_bytes == 0):
                        break
                frames = _recv_message(peer)  # blocking: the loop does not run meanwhile
                peer.close()
                n = await asyncio.wait_for(write, 30)
            msg = await from_frames(frames)
            closed = comm.closed()
            await comm.close()
            return n, pinned, msg, closed

    n, pinned, msg, closed = run(main())
    assert pinned >= arr.nbytes  # the write was waiting for the kernel's release
    assert n > arr.nbytes
    assert msg["op"] == "x"
    np.testing.assert_array_equal(msg["data"], arr)
    assert closed  # the peer's close is still seen: the next read or write fails


def test_write_still_fails_when_a_reset_drops_its_bytes(run: Any, always_zerocopy: None) -> None:
    # The other side of the rule above: the peer reads nothing and resets; most of an
    # 8 MiB frame was never delivered, so the write raises CommClosedError.
    arr = np.ones(8 << 20, dtype="u1")

    async def main() -> tuple[BaseException | int, int]:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            comm, peer = await _connect(srv)
            write = asyncio.ensure_future(comm.write({"data": to_serialize(arr)}))
            pinned = 0
            for _ in range(200):  # bounded: until the kernel holds part of the frame
                await asyncio.sleep(0.01)
                pinned = comm.pinned_bytes
                if write.done() or pinned:
                    break
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # RST: what was not delivered is lost
            try:
                result: BaseException | int = await asyncio.wait_for(write, 30)
            except CommClosedError as exc:
                result = exc
            await comm.close()
            return result, pinned

    result, pinned = run(main())
    assert pinned > 0  # the write was waiting for the kernel when the reset came
    assert isinstance(result, CommClosedError), result
