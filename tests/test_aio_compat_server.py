"""pagefrag.aio beside asyncio: the arguments of ``start_server`` / ``open_connection`` and
the server's API (issue 11 item 4), the client-connected callback's exceptions (item 6),
TLS through the copying path; the same test body run against asyncio and pagefrag.aio,
on asyncio's loop and on uvloop (item 8)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOPS, STREAMS, Run

from pagefrag import Frag, FragDestructor, aio

HAS_IPV6 = socket.has_ipv6
try:
    socket.socket(socket.AF_INET6).bind(("::1", 0))
except OSError:
    HAS_IPV6 = False
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this host")


def only_pagefrag(streams: Any, **kwargs: Any) -> dict[str, Any]:
    """pagefrag's own keywords, given to pagefrag.aio only."""
    return kwargs if streams is aio else {}


async def echo(reader: asyncio.StreamReader, writer: Any) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def round_trip(streams: Any, host: str, port: int, **kwargs: Any) -> tuple[Any, Any]:
    """Connect, echo one message; (sockname, peername) of the client's side."""
    reader, writer = await streams.open_connection(host, port, **kwargs)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    names = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    writer.close()
    await writer.wait_closed()
    return names


async def closed(server: Any) -> None:
    server.close()
    await server.wait_closed()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- start_server: addresses -----------------------------------------------------------------
@needs_ipv6
def test_host_none_listens_on_ipv4_and_ipv6(streams: Any, run: Run) -> None:
    """host=None: every interface, an IPv4 socket and an IPv6 one with IPV6_V6ONLY."""

    async def main() -> None:
        server = await streams.start_server(
            echo, None, 0, **only_pagefrag(streams, zerocopy="always")
        )
        by_family = {s.family: s for s in server.sockets}
        assert set(by_family) == {socket.AF_INET, socket.AF_INET6}
        v6 = by_family[socket.AF_INET6]
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        _, peer4 = await round_trip(
            streams, "127.0.0.1", by_family[socket.AF_INET].getsockname()[1]
        )
        _, peer6 = await round_trip(streams, "::1", v6.getsockname()[1])
        assert peer4[0] == "127.0.0.1" and peer6[0] == "::1"
        await closed(server)

    run(main())


@needs_ipv6
def test_a_list_of_hosts_binds_each(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, ["127.0.0.1", "::1"], 0)
        names = sorted(s.getsockname()[0] for s in server.sockets)
        assert names == ["127.0.0.1", "::1"]
        for s in server.sockets:
            await round_trip(streams, s.getsockname()[0], s.getsockname()[1])
        await closed(server)

    run(main())


@needs_ipv6
def test_family_restricts_the_addresses(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, None, 0, family=socket.AF_INET6)
        assert {s.family for s in server.sockets} == {socket.AF_INET6}
        port = server.sockets[0].getsockname()[1]
        _, peer = await round_trip(streams, "::1", port, family=socket.AF_INET6)
        assert peer[0] == "::1"
        with pytest.raises(socket.gaierror):  # an IPv4 literal has no IPv6 address
            await streams.open_connection("127.0.0.1", port, family=socket.AF_INET6)
        await closed(server)

    run(main())


def test_sock_is_used_as_is_and_closed_with_the_server(streams: Any, run: Run) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    name = sock.getsockname()

    async def main() -> None:
        server = await streams.start_server(echo, sock=sock)
        assert [s.getsockname() for s in server.sockets] == [name]
        assert [s.fileno() for s in server.sockets] == [sock.fileno()]
        await round_trip(streams, *name)
        await closed(server)

    try:
        run(main())
        assert sock.fileno() == -1  # the server closed it, as asyncio's
    finally:
        sock.close()


def test_reuse_port_lets_two_servers_share_a_port(streams: Any, run: Run) -> None:
    async def main() -> None:
        first = await streams.start_server(echo, "127.0.0.1", 0, reuse_port=True)
        port = first.sockets[0].getsockname()[1]
        second = await streams.start_server(echo, "127.0.0.1", port, reuse_port=True)
        assert second.sockets[0].getsockname()[1] == port
        for _ in range(4):
            await round_trip(streams, "127.0.0.1", port)
        with pytest.raises(OSError) as info:  # without SO_REUSEPORT: the port is taken
            await streams.start_server(echo, "127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
        await closed(first)
        await closed(second)

    run(main())


def test_reuse_address_is_on_by_default_and_can_be_refused(streams: Any, run: Run) -> None:
    async def main() -> None:
        on = await streams.start_server(echo, "127.0.0.1", 0)
        off = await streams.start_server(echo, "127.0.0.1", 0, reuse_address=False)
        assert on.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert not off.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        await closed(on)
        await closed(off)

    run(main())


def listen_backlog(port: int) -> int:
    """The backlog of the listening socket on ``port`` (``ss``: Send-Q of a listener)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return int(out[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_backlog_is_given_to_listen_default_100(streams: Any, run: Run) -> None:
    async def main() -> tuple[int, int]:
        default = await streams.start_server(echo, "127.0.0.1", 0)
        seven = await streams.start_server(echo, "127.0.0.1", 0, backlog=7)
        got = (
            listen_backlog(default.sockets[0].getsockname()[1]),
            listen_backlog(seven.sockets[0].getsockname()[1]),
        )
        await closed(default)
        await closed(seven)
        return got

    assert run(main()) == (100, 7)


def test_bad_combinations_raise_before_any_socket_is_made(streams: Any, run: Run) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    async def main() -> None:
        before = open_fds()
        with pytest.raises(ValueError, match="Neither host/port nor sock"):
            await streams.start_server(echo)
        with pytest.raises(ValueError, match="host/port and sock can not be specified"):
            await streams.start_server(echo, "127.0.0.1", 0, sock=sock)
        with pytest.raises(TypeError, match="ssl argument must be an SSLContext"):
            await streams.start_server(echo, "127.0.0.1", 0, ssl=True)
        with pytest.raises(ValueError, match="ssl_handshake_timeout is only meaningful"):
            await streams.start_server(echo, "127.0.0.1", 0, ssl_handshake_timeout=1.0)
        with pytest.raises(ValueError, match="server_hostname is only meaningful with ssl"):
            await streams.open_connection("127.0.0.1", 9, server_hostname="x")
        with pytest.raises(ValueError, match="ssl_shutdown_timeout is only meaningful"):
            await streams.open_connection("127.0.0.1", 9, ssl_shutdown_timeout=1.0)
        if streams is aio:  # pagefrag's keywords: checked before a socket is made
            with pytest.raises(ValueError, match="linger must be"):
                await streams.start_server(echo, "127.0.0.1", 0, linger=-1)
            with pytest.raises(ValueError, match="enobufs_timeout must be"):
                await streams.open_connection("127.0.0.1", 9, enobufs_timeout=-1)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with pytest.raises(ValueError, match="A Stream Socket was expected"):
                await streams.start_server(echo, sock=udp)
        finally:
            udp.close()
        assert open_fds() == before

    try:
        run(main())
        assert sock.fileno() >= 0  # refused, still the caller's
    finally:
        sock.close()


@needs_ipv6
def test_a_failed_bind_closes_the_sockets_made_before_it(streams: Any, run: Run) -> None:
    taken = socket.socket(socket.AF_INET6)
    taken.bind(("::1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def main() -> None:
        await closed(await streams.start_server(echo, "127.0.0.1", 0))  # the loop's own set-up
        before = open_fds()
        with pytest.raises(OSError) as info:
            await streams.start_server(echo, ["127.0.0.1", "::1"], port, reuse_address=False)
        assert info.value.errno == errno.EADDRINUSE
        assert open_fds() == before
        # The IPv4 address is free again: nothing kept it bound. (SO_REUSEADDR: a
        # connection of an earlier test in TIME_WAIT on that port does not count; a
        # socket left bound without it would.)
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        finally:
            probe.close()

    try:
        run(main())
    finally:
        taken.close()


def test_unknown_keyword_is_a_type_error(streams: Any, run: Run) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            await streams.open_connection("127.0.0.1", 9, bogus=1)
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            await streams.start_server(echo, "127.0.0.1", 0, bogus=1)

    run(main())


# -- the server object -----------------------------------------------------------------------
def test_start_serving_false_binds_then_serves_on_start_serving(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, "127.0.0.1", 0, start_serving=False)
        port = server.sockets[0].getsockname()[1]
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):  # bound, not listening yet (asyncio)
            await streams.open_connection("127.0.0.1", port)
        await server.start_serving()
        assert server.is_serving()
        await server.start_serving()  # again: nothing changes
        await round_trip(streams, "127.0.0.1", port)
        await closed(server)

    run(main())


def test_server_api_get_loop_repr_sockets_empty_after_close(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, "127.0.0.1", 0)
        assert server.get_loop() is asyncio.get_running_loop()
        assert server.is_serving()
        assert len(server.sockets) == 1 and "sockets=" in repr(server)
        port = server.sockets[0].getsockname()[1]
        server.close()
        assert not server.is_serving()
        assert len(server.sockets) == 0
        await server.wait_closed()
        server.close()  # twice: nothing more
        with pytest.raises(ConnectionRefusedError):
            await streams.open_connection("127.0.0.1", port)

    run(main())


def test_serve_forever_cancelled_closes_and_raises_when_closed(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, "127.0.0.1", 0, start_serving=False)
        port = server.sockets[0].getsockname()[1]
        task = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0.05)
        assert server.is_serving()  # serve_forever() starts serving
        await round_trip(streams, "127.0.0.1", port)
        with pytest.raises(RuntimeError, match="already being awaited"):
            await server.serve_forever()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving() and len(server.sockets) == 0
        with pytest.raises(RuntimeError, match=r"server .* is closed"):
            await server.serve_forever()
        with pytest.raises(ConnectionRefusedError):
            await streams.open_connection("127.0.0.1", port)

    run(main())


def test_async_with_closes_the_server(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, "127.0.0.1", 0)
        async with server as entered:
            assert entered is server
            await round_trip(streams, "127.0.0.1", server.sockets[0].getsockname()[1])
        assert not server.is_serving() and len(server.sockets) == 0

    run(main())


def test_wait_closed_before_close_waits_for_the_last_connection(streams: Any, run: Run) -> None:
    """asyncio 3.11: wait_closed() awaited before close() returns once the server is
    closed and its connections are gone; on a closed server it returns at once."""

    async def main() -> None:
        served: list[Any] = []

        async def hold(reader: asyncio.StreamReader, writer: Any) -> None:
            served.append(writer)
            await reader.read()
            writer.close()

        server = await streams.start_server(hold, "127.0.0.1", 0)
        _, writer = await streams.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        for _ in range(400):
            if served:
                break
            await asyncio.sleep(0.025)
        waiter = asyncio.create_task(server.wait_closed())
        await asyncio.sleep(0.1)
        server.close()
        await asyncio.sleep(0.2)
        assert not waiter.done(), "a connection is still open"
        await asyncio.wait_for(server.wait_closed(), 5)  # closed: returns at once
        writer.close()  # the handler reads EOF and closes its side
        await writer.wait_closed()
        await asyncio.wait_for(waiter, 10)

    run(main())


# -- open_connection -------------------------------------------------------------------------
def test_local_addr_binds_before_connecting(streams: Any, run: Run) -> None:
    async def main() -> None:
        server = await streams.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        local, _ = await round_trip(
            streams,
            "127.0.0.1",
            port,
            local_addr=("127.0.0.2", 0),
            **only_pagefrag(streams, zerocopy="always"),
        )
        assert local[0] == "127.0.0.2"
        with pytest.raises(OSError) as info:  # an address this host does not have
            await streams.open_connection("127.0.0.1", port, local_addr=("192.0.2.1", 0))
        assert info.value.errno == errno.EADDRNOTAVAIL
        await closed(server)

    run(main())


HAPPY_EYEBALLS = """
import asyncio, socket, sys, time
STREAMS, LOOP = sys.argv[1], sys.argv[2]
if STREAMS == "pagefrag":
    from pagefrag import aio as streams
else:
    streams = asyncio

async def echo(reader, writer):
    writer.write(await reader.readexactly(4))
    writer.close()

async def main():
    infos = socket.getaddrinfo("pf-two", None, type=socket.SOCK_STREAM)
    (fam1, *_, (first, *_)), (fam2, *_, (second, *_)) = infos[:2]
    # The first address answers no SYN: a listener with backlog 0 whose accept queue is
    # full drops them (a connect there hangs, as to a host that is down).
    hole = socket.socket(fam1)
    hole.bind((first, 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    filler = socket.create_connection((first, port), timeout=10)
    server = await streams.start_server(echo, second, port)
    start = time.monotonic()
    reader, writer = await streams.open_connection(
        "pf-two", port, happy_eyeballs_delay=0.25
    )
    elapsed = time.monotonic() - start
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    print(first, second, writer.get_extra_info("peername")[0], round(elapsed, 3))
    writer.close()
    server.close()
    filler.close()
    hole.close()

if LOOP == "uvloop":
    import uvloop
    uvloop.run(asyncio.wait_for(main(), 60))
else:
    asyncio.run(asyncio.wait_for(main(), 60))
"""


@needs_ipv6
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (a private /etc/hosts in a mount namespace)",
)
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("streams_name", list(STREAMS))
def test_happy_eyeballs_reaches_the_second_address_when_the_first_hangs(
    streams_name: str, loop: str, tmp_path: Path
) -> None:
    """A name with two addresses, the first never answering: with happy_eyeballs_delay
    the second attempt starts after the delay and wins (without it, the connect would
    wait for the first one's SYN retries). The name lives in a private /etc/hosts,
    bind-mounted in a mount namespace of the child process only."""
    if streams_name == "asyncio" and loop == "uvloop":
        pytest.skip("uvloop's create_connection has no happy_eyeballs_delay (TypeError)")
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 pf-two\n127.0.0.1 pf-two\n")
    script = tmp_path / "happy.py"
    script.write_text(textwrap.dedent(HAPPY_EYEBALLS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = (
        f"mount --bind {hosts} /etc/hosts && exec {sys.executable} {script} {streams_name} {loop}"
    )
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", command],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    first, second, peer, elapsed = out.stdout.split()
    assert {first, second} == {"::1", "127.0.0.1"}
    assert peer == second
    assert float(elapsed) < 20  # the first address would hang far longer


# -- TLS: the copying path -------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (``openssl req``: the
    ``cryptography`` package is not needed)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is missing (needed to make a test certificate)")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_ssl_round_trip_copies_each_write(
    streams: Any, run: Run, certificate: tuple[Path, Path]
) -> None:
    """ssl=: TLS both ends; a bytearray reused right after write() arrives as it was when
    written (write copied it); pagefrag's handles have fired by the time write returns."""
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> tuple[bytes, list[bool]]:
        fired: list[bool] = []

        async def upper(reader: asyncio.StreamReader, writer: Any) -> None:
            assert writer.get_extra_info("ssl_object") is not None
            data = await reader.readexactly(3 * 4096)
            handle = writer.write(data.upper())
            if streams is aio:
                fired.append(handle.done)
            await writer.drain()
            writer.close()

        server = await streams.start_server(upper, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await streams.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        assert writer.get_extra_info("ssl_object") is not None
        buf = bytearray(4096)
        for letter in b"abc":
            buf[:] = bytes([letter]) * 4096
            handle = writer.write(buf)
            if streams is aio:
                fired.append(handle.done)
        buf[:] = b"z" * 4096  # reused at once: the bytes written must not change
        await writer.drain()
        got = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await writer.wait_closed()
        await closed(server)
        return got, fired

    got, fired = run(main())
    assert got == b"A" * 4096 + b"B" * 4096 + b"C" * 4096
    assert all(fired) and len(fired) == (4 if streams is aio else 0)


def test_start_tls_upgrades_a_clear_connection(
    streams: Any, run: Run, certificate: tuple[Path, Path]
) -> None:
    """writer.start_tls() on both ends of a clear connection, as CPython's test_start_tls,
    then a bytearray reused right after write(). pagefrag: on either loop (uvloop's
    loop.start_tls refuses transports not its own), over the zero-copy transport, and
    each write's handle, write_zerocopy's too, has fired by the time it returns (TLS
    copied it)."""
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> tuple[bytes, bytes, list[bool], list[bool]]:
        fired: list[bool] = []
        below: list[bool] = []

        async def upgrade(reader: asyncio.StreamReader, writer: Any) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            await writer.start_tls(server_ctx)
            assert writer.get_extra_info("sslcontext") is server_ctx
            data = await reader.readexactly(2 * 4096)
            writer.write(data.upper())
            await writer.drain()
            writer.close()

        server = await streams.start_server(upgrade, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await streams.open_connection("127.0.0.1", port)
        writer.write(b"clear\n")
        clear = await asyncio.wait_for(reader.readline(), 30)
        await writer.start_tls(client_ctx, server_hostname="localhost")
        assert writer.get_extra_info("ssl_object") is not None
        below.append(writer.get_extra_info("zerocopy_socket") is not None)
        buf = bytearray(4096)
        # pagefrag's opt-in too (found in review: it raised AttributeError under TLS)
        writes = (writer.write, getattr(writer, "write_zerocopy", writer.write))
        for letter, write in zip(b"ab", writes, strict=True):
            buf[:] = bytes([letter]) * 4096
            handle = write(buf)
            fired.append(getattr(handle, "done", True))
        buf[:] = b"z" * 4096
        await writer.drain()
        got = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await writer.wait_closed()
        await closed(server)
        return clear, got, fired, below

    clear, got, fired, below = run(main())
    assert clear == b"clear\n"
    assert got == b"A" * 4096 + b"B" * 4096
    assert all(fired)
    assert below == [streams is aio]


# -- item 6: the client-connected callback raising --------------------------------------------
def eof_within(reader: asyncio.StreamReader, seconds: float) -> Any:
    async def read() -> bool:
        try:
            return await asyncio.wait_for(reader.read(), seconds) == b""
        except TimeoutError:
            return False

    return read()


def test_callback_coroutine_raising_is_reported_and_closes_at_once(streams: Any, run: Run) -> None:
    """asyncio: the exception of the callback's task goes to the loop's exception handler
    ("Unhandled exception in client_connected_cb", with the transport) and the
    connection is closed then, not when the writer is garbage-collected."""

    async def main() -> None:
        contexts: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, c: contexts.append(c))
        kept: list[Any] = []  # the writer stays referenced: only the close can end it
        boom = RuntimeError("boom")

        async def handler(reader: asyncio.StreamReader, writer: Any) -> None:
            kept.append(writer)
            await reader.readexactly(5)
            raise boom

        server = await streams.start_server(handler, "127.0.0.1", 0)
        reader, writer = await streams.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        writer.write(b"hello")
        assert await eof_within(reader, 10), "the server side was not closed"
        assert kept, "the handler ran"
        [context] = [c for c in contexts if c.get("exception") is boom]
        assert context["message"] == "Unhandled exception in client_connected_cb"
        assert context["transport"] is kept[0].transport
        writer.close()
        await writer.wait_closed()
        await closed(server)

    run(main())


def test_callback_raising_at_once_is_reported(streams: Any, run: Run) -> None:
    """A plain function raising: asyncio (both loops) reports it as an exception of the
    callback that ran connection_made, and leaves the connection open until the writer
    goes; pagefrag reports it as a task's ("Unhandled exception in client_connected_cb")
    and closes the connection at once."""

    async def main() -> tuple[list[dict[str, Any]], bool, Any]:
        contexts: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, c: contexts.append(c))
        kept: list[Any] = []
        boom = RuntimeError("boom")

        def handler(reader: asyncio.StreamReader, writer: Any) -> None:
            kept.append(writer)
            raise boom

        server = await streams.start_server(handler, "127.0.0.1", 0)
        reader, writer = await streams.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        eof = await eof_within(reader, 10 if streams is aio else 1)
        writer.close()
        await writer.wait_closed()
        for w in kept:
            w.close()
        await closed(server)
        return [c for c in contexts if c.get("exception") is boom], eof, kept

    contexts, eof, kept = run(main())
    assert len(contexts) == 1 and len(kept) == 1
    if streams is aio:
        assert contexts[0]["message"] == "Unhandled exception in client_connected_cb"
        assert contexts[0]["transport"] is kept[0].transport
        assert eof, "the connection was not closed at once"


def test_a_failed_tls_handshake_is_dropped_and_not_counted(
    streams: Any, run: Run, certificate: tuple[Path, Path]
) -> None:
    """A client that speaks no TLS: its connection is closed, the server goes on serving,
    and a wait_closed() awaited before close() is not held up by it."""
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async def hello(reader: asyncio.StreamReader, writer: Any) -> None:
            writer.write(b"hello")
            await writer.drain()
            writer.close()

        server = await streams.start_server(hello, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        waiter = asyncio.create_task(server.wait_closed())
        plain_reader, plain = await asyncio.open_connection("127.0.0.1", port)
        plain.write(b"GET / HTTP/1.0\r\n\r\n" * 4)
        with contextlib.suppress(ConnectionResetError):  # dropped: EOF or a reset, promptly
            await asyncio.wait_for(plain_reader.read(), 10)
        plain.close()
        reader, writer = await streams.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        assert await asyncio.wait_for(reader.read(), 10) == b"hello"
        writer.close()
        await writer.wait_closed()
        server.close()
        await asyncio.wait_for(waiter, 10)

    run(main())


def test_create_connection_over_tls_copies_and_fires_at_once(
    run: Run, certificate: tuple[Path, Path]
) -> None:
    """pagefrag only (asyncio has no module-level create_connection): ``ssl=`` gives a
    CopyingTransport whose handles have fired when write() returns, frag destructors
    included; the protocol hears the bytes of a plain asyncio TLS server."""
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> tuple[bytes, bool, bool, int]:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def collect(reader: asyncio.StreamReader, writer: Any) -> None:
            got.set_result(await reader.read())
            writer.close()

        server = await asyncio.start_server(collect, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await aio.create_connection(
            asyncio.Protocol, "localhost", port, ssl=client_ctx, family=socket.AF_INET
        )
        released: list[object] = []
        owner = FragDestructor(released.append, "page")
        buf = bytearray(b"x" * 1000)
        handle = transport.write(Frag(buf, destructor=owner))
        owner.unref()  # the caller's own reference: the write took and dropped its own
        handle_done, owner_fired = handle.done, bool(released)
        buf[:] = b"y" * 1000
        transport.close()
        data = await asyncio.wait_for(got, 10)
        await closed(server)
        return data, handle_done, owner_fired, transport.pinned_bytes

    data, handle_done, owner_fired, pinned = run(main())
    assert data == b"x" * 1000
    assert handle_done and owner_fired and pinned == 0
