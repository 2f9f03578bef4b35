"""pagefrag:// off the happy path: what a review found, each a test that failed on the
code before its fix. A peer's last messages under Dask's server loop, a peer claiming
frames that cannot be allocated, resets before the accept, a listener stopped or its
start cancelled at the wrong moment, a read waiting while close() lingers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from typing import Any

import dask
import numpy as np
import pytest
from helpers import Run, comm_across

pytest.importorskip("distributed")
from distributed.comm import CommClosedError, connect, listen
from distributed.core import Server
from distributed.core import connect as core_connect

from pagefrag.dask import PagefragListener
from pagefrag.testing.netlab import NetLab

SCHEMES = ["tcp", "pagefrag"]


def test_a_server_handles_every_message_a_peer_sent_before_closing(run: Run) -> None:
    """distributed's Server loop stops at comm.closed() after each message: closed()
    must not turn true at the peer's FIN while its messages are still unread (it did:
    the second message was never handled)."""

    async def scheme_run(scheme: str) -> list[tuple[str, int]]:
        seen: list[tuple[str, int]] = []

        async def a(x: int) -> None:
            await asyncio.sleep(0.3)  # slow: the FIN arrives meanwhile
            seen.append(("a", x))

        async def b(x: int) -> None:
            seen.append(("b", x))

        server = Server({"a": a, "b": b})
        await server.listen(f"{scheme}://127.0.0.1:0")
        try:
            comm = await core_connect(server.address)
            await comm.write({"op": "a", "x": 1, "reply": False})
            await comm.write({"op": "b", "x": 2, "reply": False})
            await comm.close()
            deadline = time.monotonic() + 10
            while len(seen) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            server.stop()
        return seen

    async def main() -> dict[str, list[tuple[str, int]]]:
        return {scheme: await scheme_run(scheme) for scheme in SCHEMES}

    seen = run(main(), timeout=60)
    assert seen["pagefrag"] == seen["tcp"] == [("a", 1), ("b", 2)]


def test_a_frame_that_cannot_be_allocated_ends_that_connection_only(run: Run) -> None:
    """A header within max-message-size claiming a frame no memory can hold: the
    allocation's MemoryError ends that connection (no 'Fatal error' report to the loop,
    as it was), and the listener serves the next client."""

    async def main() -> tuple[list[Any], bytes | str]:
        reported: list[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: reported.append(ctx))

        async def handle(comm: Any) -> None:
            await comm.write(await comm.read())
            await comm.close()

        async with listen("pagefrag://127.0.0.1:0", handle) as listener:
            host, port = listener.get_host_port()
            # A raw peer, no handshake: the listener's handshake read gets the claim.
            raw = socket.create_connection((host, port))
            raw.setblocking(False)
            try:
                raw.sendall(struct.pack("<QQ", 1, 1 << 56) + b"x" * 1000)
                loop = asyncio.get_running_loop()
                try:
                    while True:  # the server's handshake message, then the end
                        got: bytes | str = await asyncio.wait_for(loop.sock_recv(raw, 1 << 16), 10)
                        if not got:
                            break
                except ConnectionResetError:
                    got = "reset"
            finally:
                raw.close()
            comm = await connect(listener.contact_address, timeout=10)
            await comm.write({"ping": 1})
            assert await asyncio.wait_for(comm.read(), 10) == {"ping": 1}
            await comm.close()
        return reported, got

    with dask.config.set({"distributed.comm.pagefrag.max-message-size": 1 << 62}):
        reported, end = run(main(), timeout=60)
    assert end in (b"", "reset")  # the connection was ended (within the 10 s bound)
    assert not [r for r in reported if "Fatal error" in r.get("message", "")], reported


def test_a_connection_reset_before_its_accept_reports_nothing(run: Run) -> None:
    """Peers that connect and reset while queued for accept: as asyncio's transports,
    the connection just ends (peername None), with no report to the loop's exception
    handler (there was one, with a traceback, per such peer)."""

    async def main() -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        loop = asyncio.get_running_loop()
        for scheme in SCHEMES:
            errors: list[Any] = []
            loop.set_exception_handler(lambda _l, ctx, errors=errors: errors.append(ctx))

            async def handle(comm: Any) -> None:
                await comm.close()

            async with listen(f"{scheme}://127.0.0.1:0", handle) as listener:
                host, port = listener.get_host_port()
                for _ in range(5):
                    s = socket.socket()
                    s.connect((host, port))  # blocking: done before the loop accepts
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()  # RST while still in the accept queue
                await asyncio.sleep(0.5)
                comm = await connect(listener.contact_address, timeout=10)  # still serving
                await comm.close()
            out[scheme] = errors
        return out

    errors = run(main(), timeout=60)
    assert errors == {"tcp": [], "pagefrag": []}


def _listening_sockets() -> list[Any]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=int(fd))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                found.append(s.getsockname())
        except OSError:
            pass
        finally:
            s.detach()
    return found


def test_a_listener_start_cancelled_at_any_point_leaves_nothing_listening(run: Run) -> None:
    """start() on every interface binds IPv4, then IPv6 on the same port; cancelled
    between the two it left the IPv4 server listening, watched by the loop, owned by
    nobody."""
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")

    async def handler(comm: Any) -> None:
        await comm.close()

    async def attempt(turns: int) -> list[Any] | None:
        listener = PagefragListener("pagefrag://:0", handler)
        task = asyncio.ensure_future(listener.start())
        for _ in range(turns):
            await asyncio.sleep(0)
        if task.done():
            listener.stop()
            return None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return _listening_sockets()

    async def main() -> list[Any]:
        before = _listening_sockets()
        left = []
        for turns in range(8):
            found = await attempt(turns)
            if found is not None:
                left.extend(s for s in found if s not in before)
        return left

    assert run(main(), timeout=60) == []


def test_a_listener_stopped_before_the_handshake_starts_hands_out_no_comm(run: Run) -> None:
    """stop() and abort_handshaking_comms() (as distributed's Server stops listening) in
    the loop turn between an accept and the first step of its handshake: the comm was
    not among the handshaking ones yet, and went on to the handler of a stopped
    listener."""

    async def main() -> tuple[list[Any], Any]:
        handled: list[Any] = []

        async def handler(comm: Any) -> None:
            handled.append(comm)
            await comm.close()

        listener = PagefragListener("pagefrag://127.0.0.1:0", handler)
        await listener.start()
        accepted = listener._accepted

        def accepted_then_stopped(protocol: Any) -> None:
            accepted(protocol)  # the comm made, its handshake task created
            listener.stop()
            listener.abort_handshaking_comms()

        listener._accepted = accepted_then_stopped  # type: ignore[method-assign]
        try:
            outcome: Any = await asyncio.wait_for(connect(listener.contact_address, 2), 10)
            await outcome.close()
        except (TimeoutError, OSError) as exc:
            outcome = exc
        await asyncio.sleep(0.3)
        return handled, outcome

    handled, outcome = run(main(), timeout=60)
    assert handled == []
    assert isinstance(outcome, OSError), outcome


def test_a_read_waiting_while_close_lingers_fails_at_once(lab: NetLab, run: Run) -> None:
    """close() may wait up to linger for the kernel's completions; a read waiting on the
    comm meanwhile fails at once with CommClosedError (as on tcp://, whose close fails a
    pending read), not when the linger is over."""
    config = {
        "distributed.comm.pagefrag.zerocopy": "always",
        "distributed.comm.pagefrag.wait-for-release": False,
        "distributed.comm.pagefrag.linger": "3s",
    }

    async def main() -> tuple[float, float]:
        async with comm_across(lab) as comm:
            lab.add_loss(100)
            await asyncio.wait_for(comm.write({"a": np.ones(1 << 20)}), 30)
            reading = asyncio.ensure_future(comm.read())
            await asyncio.sleep(0.1)
            start = time.monotonic()
            closing = asyncio.ensure_future(comm.close())
            with contextlib.suppress(CommClosedError):
                await asyncio.wait_for(reading, 30)
            read_done = time.monotonic() - start
            await asyncio.wait_for(closing, 30)
            return read_done, time.monotonic() - start

    with dask.config.set(config):
        read_done, close_done = run(main(), timeout=120)
    assert close_done >= 2.5, close_done  # close() did linger: the read's wait was real
    assert read_done < 1.0, read_done
