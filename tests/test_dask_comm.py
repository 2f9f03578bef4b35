"""Conformance of the ``pagefrag://`` Dask comm backend, modelled on the checks of
distributed's own ``comm/tests/test_comms.py`` (not shipped in its wheel: re-created here)
and run against the real backend through ``distributed.comm.connect``/``listen`` and
``distributed.comm.registry.get_backend("pagefrag")``. Where distributed's ``tcp://``
defines the behaviour (message shapes after a round trip, ``deserialize=False``, address
handling) the same input goes through ``tcp://`` in the same test and the results must
agree. Real sockets, loopback (IPv4 and IPv6) and two network namespaces joined by veth;
the core checks on both event loops (asyncio, uvloop) and both kernel bridges
(``msg_zerocopy``, io_uring ``uring``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import dask.config
import numpy as np
import pytest
from distributed.comm import connect, listen
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.comm.core import Comm, CommClosedError, Listener
from distributed.comm.registry import get_backend
from distributed.protocol import Serialize, Serialized, deserialize, dumps, serialize, to_serialize
from distributed.utils import get_ip
from helpers import LOOPS, run_on

from pagefrag.aio import UringTransport, ZeroCopyTransport
from pagefrag.dask import PagefragBackend, PagefragComm
from pagefrag.testing.netlab import RECEIVER_IP, NetLab
from pagefrag.uring import unsupported_reason

KEY = "distributed.comm.pagefrag"
MiB = 1 << 20
BRIDGES = ["msg_zerocopy", "uring"]
_NOISE = np.random.default_rng(14).bytes(4 * MiB)  # incompressible, the same in every call


# -- helpers -------------------------------------------------------------------------------
def _ipv6_missing() -> str | None:
    if not socket.has_ipv6:
        return "IPv6: this Python has no IPv6 support"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"IPv6: cannot bind to ::1 here ({exc})"
    return None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _crc(a: Any) -> int:
    return zlib.crc32(memoryview(a).cast("B"))


@contextlib.contextmanager
def _bridge(bridge: str) -> Iterator[None]:
    """Dask's config selecting the kernel bridge; the io_uring one is skipped, naming
    why, where it cannot run (e.g. ``PAGEFRAG_PURE_PYTHON=1``)."""
    if bridge == "uring":
        why = unsupported_reason()
        if why is not None:
            pytest.skip(f"io_uring bridge unavailable: {why}")
    with dask.config.set({f"{KEY}.backend": bridge}):
        yield


def _transport(comm: Comm) -> Any:
    assert isinstance(comm, PagefragComm)
    return comm._protocol.transport


async def _echo(comm: Comm) -> None:
    """Write back every message read, until the peer goes."""
    try:
        while True:
            await comm.write(await comm.read())
    except CommClosedError:
        pass
    finally:
        await comm.close()


@contextlib.asynccontextmanager
async def _served(
    addr: str, handler: Callable[[Comm], Awaitable[None]] = _echo, **kwargs: Any
) -> AsyncIterator[Listener]:
    async with listen(addr, handler, **kwargs) as listener:
        yield listener


async def _pair(addr: str, **connect_args: Any) -> tuple[Comm, Comm, Listener]:
    """(client comm, server comm, listener): both ends of one handshaken connection."""
    accepted: asyncio.Queue[Comm] = asyncio.Queue()

    async def keep(comm: Comm) -> None:
        await accepted.put(comm)

    listener = await listen(addr, keep)
    client = await connect(listener.contact_address, timeout=10, **connect_args)
    server = await asyncio.wait_for(accepted.get(), 10)
    return client, server, listener


def _assert_same(got: Any, want: Any, path: str = "msg") -> None:
    """Strict equality of two received messages: same types all the way down, equal
    values (numpy arrays by dtype, shape and content; Serialized by header and frames)."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert sorted(got, key=repr) == sorted(want, key=repr), path
        for k in want:
            _assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert np.array_equal(got, want), path
    elif isinstance(want, Serialized):
        assert got.header == want.header, path
        assert [bytes(f) for f in got.frames] == [bytes(f) for f in want.frames], path
    elif isinstance(want, bytes | bytearray | memoryview):
        assert bytes(got) == bytes(want), path
    else:
        assert got == want, path


def _as_sent(got: Any, sent: Any, path: str = "msg") -> None:
    """What came back carries the values that were sent (containers may change between
    list and tuple, bytes-likes arrive as bytes, Serialize arrives deserialized)."""
    if isinstance(sent, Serialize):
        sent = sent.data
    if isinstance(sent, Serialized):
        sent = deserialize(sent.header, sent.frames)
    if isinstance(sent, dict):
        assert isinstance(got, dict) and set(got) == set(sent), path
        for k in sent:
            _as_sent(got[k], sent[k], f"{path}[{k!r}]")
    elif isinstance(sent, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(sent), path
        for i, (g, s) in enumerate(zip(got, sent, strict=True)):
            _as_sent(g, s, f"{path}[{i}]")
    elif isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == sent.dtype, path
        assert np.array_equal(got, sent), path
    elif isinstance(sent, bytes | bytearray | memoryview):
        assert bytes(got) == bytes(sent), path
    else:
        assert got == sent, path


def _messages() -> dict[str, Any]:
    big = np.arange(MiB, dtype=np.float64)  # 8 MiB: a pickle-5 out-of-band frame
    return {
        "empty dict": {},
        "empty list": [],
        "none": None,
        "scalars": {"op": "ping", "n": -7, "f": 1.5, "s": "é ✓", "t": True, "z": None},
        "nested lists": {"a": [1, [2, [3, [4, {"b": [5, "six"]}]]]], "c": {"d": {"e": []}}},
        "bytes": {"x": b"abc", "e": b"", "big": _NOISE[: 3 * MiB]},
        "bytearray": {"x": bytearray(b"xyz" * 1000), "e": bytearray()},
        "memoryview": {"x": memoryview(b"0123456789")[2:8]},
        "numpy small": {"a": np.arange(10), "s": np.float32(2.5)},
        "numpy large": {"a": big, "strided": np.arange(10_000).reshape(100, 100)[:, ::3]},
        "serialize": {
            "arr": to_serialize(np.arange(1 << 18)),
            "obj": to_serialize({"k": [1, 2]}),
            "list": [to_serialize(123), to_serialize(b"q" * 100_000)],
            "ser": Serialized(*serialize(456)),
        },
        "many small frames": {"parts": [to_serialize(np.full(i % 7 + 1, i)) for i in range(400)]},
    }


async def _round_trip_all(addr: str) -> list[Any]:
    """Each message of :func:`_messages` to an echo server at ``addr`` and back, on one
    comm, plus a message the server sends first (both directions)."""
    out: list[Any] = []

    async def hello_then_echo(comm: Comm) -> None:
        await comm.write({"hello": to_serialize(np.arange(100_000))})
        await _echo(comm)

    async with _served(addr, hello_then_echo) as listener:
        comm = await connect(listener.contact_address, timeout=10)
        try:
            out.append(await comm.read())
            for msg in _messages().values():
                await comm.write(msg)
                out.append(await comm.read())
        finally:
            await comm.close()
    return out


# -- round trips -----------------------------------------------------------------------------
def test_many_small_frames_really_is_many_frames() -> None:
    """The shape's premise: it is serialized into hundreds of frames."""
    assert len(dumps(_messages()["many small frames"])) > 400


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("loop", LOOPS)
def test_round_trip_of_every_message_shape_agrees_with_tcp(loop: str, bridge: str) -> None:
    async def body() -> None:
        ours = await _round_trip_all("pagefrag://127.0.0.1:0")
        theirs = await _round_trip_all("tcp://127.0.0.1:0")
        sent = [{"hello": np.arange(100_000)}, *_messages().values()]
        for got, want, msg in zip(ours, theirs, sent, strict=True):
            _assert_same(got, want)
            _as_sent(got, msg)
        # The bridge asked for is the one that carried it.
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        kind = UringTransport if bridge == "uring" else ZeroCopyTransport
        for comm in (a, b):
            t = _transport(comm)
            assert isinstance(t, kind)
            assert bridge != "msg_zerocopy" or not isinstance(t, UringTransport)
        await a.close()
        await b.close()
        listener.stop()

    with _bridge(bridge):
        run_on(loop, body(), timeout=60)


def test_round_trip_over_ipv6_loopback() -> None:
    why = _ipv6_missing()
    if why is not None:
        pytest.skip(why)

    async def body() -> None:
        ours = await _round_trip_all("pagefrag://[::1]:0")
        theirs = await _round_trip_all("tcp://[::1]:0")
        for got, want in zip(ours, theirs, strict=True):
            _assert_same(got, want)
        a, b, listener = await _pair("pagefrag://[::1]:0")
        assert a.peer_address == b.local_address == listener.contact_address
        assert a.local_address == b.peer_address
        assert parse_host_port(parse_address(a.local_address)[1])[0] == "::1"
        await a.close()
        await b.close()
        listener.stop()

    run_on("asyncio", body(), timeout=60)


def test_a_listener_on_every_interface_serves_ipv4_and_ipv6_on_one_port() -> None:
    why = _ipv6_missing()
    if why is not None:
        pytest.skip(why)

    async def body() -> None:
        async with _served("pagefrag://:0") as listener:
            port = listener.get_host_port()[1]
            for host in ("127.0.0.1", "[::1]"):
                comm = await connect(f"pagefrag://{host}:{port}", timeout=10)
                await comm.write({"via": host})
                assert await asyncio.wait_for(comm.read(), 10) == {"via": host}
                await comm.close()

    run_on("asyncio", body(), timeout=30)


# -- closing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("loop", LOOPS)
def test_implicit_close_every_message_sent_is_read_first(loop: str, bridge: str) -> None:
    """The peer writes some messages and closes: each is read, in order, then reads
    raise CommClosedError and the comm is closed; writes then raise too."""
    n = 6

    async def write_then_close(comm: Comm) -> None:
        for i in range(n):
            payload = np.full(2 * MiB if i % 2 else 10, i, dtype=np.uint8)
            await comm.write({"i": i, "data": to_serialize(payload)})
        await comm.close()

    async def body() -> None:
        async with _served("pagefrag://127.0.0.1:0", write_then_close) as listener:
            comm = await connect(listener.contact_address, timeout=10)
            await asyncio.sleep(0.2)  # let the close arrive before the reads start
            for i in range(n):
                msg = await asyncio.wait_for(comm.read(), 10)
                assert msg["i"] == i
                assert msg["data"].nbytes == (2 * MiB if i % 2 else 10)
                assert (msg["data"] == i).all()
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(comm.read(), 10)
            assert comm.closed()
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(comm.read(), 10)
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(comm.write({"x": 1}), 10)

            # As distributed's check: a write to a peer that closed, then a read.
            comm = await connect(listener.contact_address, timeout=10)
            for _ in range(n):
                await asyncio.wait_for(comm.read(), 10)
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(comm.write({}), 10)
                await asyncio.wait_for(comm.read(), 10)
            await comm.close()

    with _bridge(bridge):
        run_on(loop, body(), timeout=60)


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("loop", LOOPS)
def test_explicit_close_ends_reads_in_flight_and_later_reads_and_writes(
    loop: str, bridge: str
) -> None:
    async def body() -> None:
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        a_read = asyncio.ensure_future(a.read())
        b_read = asyncio.ensure_future(b.read())
        await asyncio.sleep(0.05)
        assert not a.closed() and not b.closed()
        assert "closed" not in repr(a)
        await asyncio.wait_for(a.close(), 15)
        assert a.closed()
        assert "closed" in repr(a)
        for pending in (a_read, b_read):
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(pending, 10)
        for comm in (a, b):
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(comm.read(), 10)
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(comm.write({}), 10)
        assert b.closed()
        await asyncio.wait_for(b.close(), 15)
        await asyncio.wait_for(a.close(), 15)  # a second close is harmless
        listener.stop()

    with _bridge(bridge):
        run_on(loop, body(), timeout=60)


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("loop", LOOPS)
def test_abort_closes_at_once_and_the_peer_sees_it(loop: str, bridge: str) -> None:
    async def body() -> None:
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        await a.write({"before": to_serialize(np.ones(MiB))})
        got = await asyncio.wait_for(b.read(), 10)
        assert got["before"].sum() == MiB
        b_read = asyncio.ensure_future(b.read())
        a.abort()
        assert a.closed()
        assert "closed" in repr(a)
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(b_read, 10)
        with pytest.raises(CommClosedError):
            await a.read()
        with pytest.raises(CommClosedError):
            await a.write({})
        a.abort()  # again: harmless
        await asyncio.wait_for(b.close(), 15)
        listener.stop()

    with _bridge(bridge):
        run_on(loop, body(), timeout=60)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_comm_left_open_when_its_loop_closed_is_collected_quietly(loop: str) -> None:
    """A program that ends its event loop with comms still open (as many Dask programs
    and tests do): collecting those comms later must not raise from their finalizer
    (distributed's TCP comm does not either)."""
    kept: list[Comm] = []

    async def body() -> None:
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        await a.write({"x": to_serialize(np.ones(MiB))})
        assert (await asyncio.wait_for(b.read(), 10))["x"].nbytes == 8 * MiB
        kept.extend((a, b))
        listener.stop()

    run_on(loop, body(), timeout=30)
    assert len(kept) == 2 and not any(c.closed() for c in kept)
    caught: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, caught.append
    try:
        kept.clear()
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in caught] == []


# -- connecting ------------------------------------------------------------------------------
def test_connect_timeout_to_a_port_nobody_listens_on() -> None:
    async def body() -> None:
        # Bound but not listening: connects are refused, and nobody else can take it.
        with socket.socket() as closed_port:
            closed_port.bind(("127.0.0.1", 0))
            port = closed_port.getsockname()[1]
            t0 = time.monotonic()
            with pytest.raises(OSError, match="Timed out trying to connect"):
                await connect(f"pagefrag://127.0.0.1:{port}", timeout=0.5)
            dt = time.monotonic() - t0
        assert 0.4 <= dt <= 10, dt

    run_on("asyncio", body(), timeout=30)


def test_a_stopped_listener_refuses_new_comms_and_keeps_established_ones() -> None:
    async def body() -> None:
        listener = await listen("pagefrag://127.0.0.1:0", _echo)
        addr = listener.contact_address
        comm = await connect(addr, timeout=10)
        listener.stop()
        t0 = time.monotonic()
        with pytest.raises(OSError):
            await connect(addr, timeout=0.5)
        assert time.monotonic() - t0 <= 10
        await comm.write({"still": "here"})
        assert await asyncio.wait_for(comm.read(), 10) == {"still": "here"}
        await comm.close()

    run_on("asyncio", body(), timeout=30)


def test_many_listeners_each_serving() -> None:
    async def body() -> None:
        listeners = [await listen(f"pagefrag://{h}:0", _echo) for h in ["127.0.0.1"] * 8 + [""] * 2]
        try:
            assert len({x.listen_address for x in listeners}) == len(listeners)
            assert len({x.contact_address for x in listeners}) == len(listeners)

            async def one(i: int, listener: Listener) -> None:
                comm = await connect(listener.contact_address, timeout=10)
                await comm.write({"i": i})
                assert await asyncio.wait_for(comm.read(), 10) == {"i": i}
                await comm.close()

            await asyncio.gather(*(one(i, x) for i, x in enumerate(listeners)))
        finally:
            for x in listeners:
                x.stop()

    run_on("asyncio", body(), timeout=30)


def test_many_concurrent_comms_round_trip_at_once() -> None:
    n, rounds = 50, 4

    async def body() -> None:
        async with _served("pagefrag://127.0.0.1:0") as listener:

            async def one(i: int) -> None:
                comm = await connect(listener.contact_address, timeout=20)
                try:
                    for r in range(rounds):
                        arr = np.full(64 * 1024 if r % 2 else 100, i * rounds + r, dtype=np.int32)
                        await comm.write({"i": i, "r": r, "a": to_serialize(arr)})
                        got = await asyncio.wait_for(comm.read(), 20)
                        assert got["i"] == i and got["r"] == r
                        assert np.array_equal(got["a"], arr)
                finally:
                    await comm.close()

            await asyncio.gather(*(one(i) for i in range(n)))

    run_on("asyncio", body(), timeout=60)


def test_the_handshake_fills_both_sides() -> None:
    async def body() -> None:
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        for comm in (a, b):
            assert comm.local_info["address"] == comm.local_address
            assert comm.remote_info["address"] == comm.peer_address
            for key in ("compression", "python", "pickle-protocol"):
                assert key in comm.local_info and key in comm.remote_info
            assert set(comm.handshake_options) >= {"compression", "pickle-protocol"}
        assert a.local_info["address"] == b.remote_info["address"]
        assert b.local_info["address"] == a.remote_info["address"]
        assert a.handshake_options == b.handshake_options
        await a.close()
        await b.close()
        listener.stop()

    run_on("uvloop" if "uvloop" in LOOPS else "asyncio", body(), timeout=30)


# -- deserialize -----------------------------------------------------------------------------
async def _received(scheme: str, msg: Any, *, listener_side: bool) -> Any:
    """``msg`` as received with ``deserialize=False`` on the listener's side (sent by the
    client) or on the connector's side (sent by the server)."""
    got: asyncio.Queue[Any] = asyncio.Queue()
    done = asyncio.Event()

    async def server(comm: Comm) -> None:
        try:
            if listener_side:
                await got.put(await comm.read())
            else:
                await comm.write(msg)
                await asyncio.wait_for(done.wait(), 10)
        finally:
            await comm.close()

    async with _served(f"{scheme}://127.0.0.1:0", server, deserialize=not listener_side) as lis:
        comm = await connect(lis.contact_address, timeout=10, deserialize=listener_side)
        try:
            if listener_side:
                await comm.write(msg)
                out = await asyncio.wait_for(got.get(), 10)
            else:
                out = await asyncio.wait_for(comm.read(), 10)
                done.set()
        finally:
            await comm.close()
    return out


def test_deserialize_off_gives_what_tcp_gives() -> None:
    big = _NOISE
    msg = {
        "op": "update",
        "x": b"abc",
        "big": big,
        "to_ser": [to_serialize(123), to_serialize(np.arange(100_000))],
        "ser": Serialized(*serialize(456)),
        "ser_big": Serialized(*serialize(big)),
        "arr": np.arange(10),
    }

    async def body() -> None:
        for listener_side in (True, False):
            ours = await _received("pagefrag", msg, listener_side=listener_side)
            theirs = await _received("tcp", msg, listener_side=listener_side)
            _assert_same(ours, theirs)
            # and what that is: Serialized (header and frames) where Dask serialized
            assert isinstance(ours["ser"], Serialized)
            assert deserialize(ours["ser"].header, ours["ser"].frames) == 456
            assert deserialize(ours["ser_big"].header, ours["ser_big"].frames) == big
            first, second = ours["to_ser"]
            assert isinstance(first, Serialized) and isinstance(second, Serialized)
            assert deserialize(first.header, first.frames) == 123
            assert np.array_equal(deserialize(second.header, second.frames), np.arange(100_000))
            assert ours["op"] == "update" and ours["x"] == b"abc" and ours["big"] == big
        # deserialize on (the default) on both sides: the objects themselves
        ours = await _received("pagefrag", msg, listener_side=False)
        ours_on = await _round_trip_one("pagefrag", msg)
        theirs_on = await _round_trip_one("tcp", msg)
        _assert_same(ours_on, theirs_on)
        _as_sent(ours_on, msg)
        assert not isinstance(ours_on["ser"], Serialized)
        assert isinstance(ours["ser"], Serialized)

    run_on("asyncio", body(), timeout=60)


async def _round_trip_one(scheme: str, msg: Any) -> Any:
    async with _served(f"{scheme}://127.0.0.1:0") as listener:
        comm = await connect(listener.contact_address, timeout=10)
        await comm.write(msg)
        out = await asyncio.wait_for(comm.read(), 10)
        await comm.close()
    return out


async def _serialization_errors(scheme: str) -> list[str]:
    """What an unpicklable object does to each end, and that the comm goes on."""
    seen = []
    a, b, listener = await _pair(f"{scheme}://127.0.0.1:0")
    try:
        await a.write({"x": to_serialize(threading.Lock())})  # on_error="message"
        with pytest.raises(TypeError, match="Could not serialize object of type lock"):
            await asyncio.wait_for(b.read(), 10)  # the reader gets the error
        with pytest.raises(TypeError, match="Could not serialize"):
            await a.write({"x": to_serialize(threading.Lock())}, on_error="raise")
        seen.append(f"closed: {a.closed()} {b.closed()}")
        await a.write({"after": 1})
        seen.append(repr(await asyncio.wait_for(b.read(), 10)))
    finally:
        await a.close()
        await b.close()
        listener.stop()
    return seen


def test_serialization_errors_behave_as_tcp() -> None:
    async def body() -> None:
        ours = await _serialization_errors("pagefrag")
        assert ours == await _serialization_errors("tcp")
        assert ours == ["closed: False False", "{'after': 1}"]

    run_on("asyncio", body(), timeout=30)


def _raise_eoferror() -> None:
    raise EOFError


class _EOFWhenLoaded:
    def __reduce__(self) -> tuple[Any, ...]:
        return _raise_eoferror, ()


def test_eoferror_when_deserializing_closes_the_comm() -> None:
    """As distributed's TCP comm: a truncated-looking payload (EOFError while loading)
    means the stream cannot be trusted: the read raises CommClosedError and the comm is
    closed, and the peer's read ends too."""

    async def body() -> None:
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        await a.write({"data": to_serialize(_EOFWhenLoaded())})
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(b.read(), 10)
        assert b.closed()
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(a.read(), 10)
        await a.close()
        listener.stop()

    run_on("asyncio", body(), timeout=30)


# -- repr, stats -----------------------------------------------------------------------------
@pytest.mark.parametrize("bridge", BRIDGES)
def test_repr_and_stats_show_addresses_and_pinned_and_unsent_bytes(bridge: str) -> None:
    size = 64 * MiB

    async def body() -> None:
        config = {f"{KEY}.wait-for-release": False, f"{KEY}.zerocopy": "always"}
        with dask.config.set(config):
            a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        for x, y in ((a, b), (b, a)):
            r = repr(x)
            assert x.local_address in r and y.local_address in r
            assert "closed" not in r
            assert "unsent=0 pinned=0" in r
        arr = np.ones(size, dtype=np.uint8)
        # the handshake counts too
        written, read = a.stats()["bytes_written"], b.stats()["bytes_read"]  # type: ignore[attr-defined]
        assert written > 0 and read == written
        n = await a.write({"a": to_serialize(arr)})
        assert n > size
        # The peer has not read yet (same loop) and the kernel cannot hold 64 MiB: the
        # rest is still the caller's memory, counted as unsent or pinned.
        held = a.unsent_bytes + a.pinned_bytes  # type: ignore[attr-defined]
        assert held > size // 2
        assert f"unsent={a.unsent_bytes} pinned={a.pinned_bytes}" in repr(a)  # type: ignore[attr-defined]
        st = a.stats()  # type: ignore[attr-defined]
        assert st["bytes_written"] == written + n
        assert st["unsent_bytes"] + st["pinned_bytes"] == held
        got = await asyncio.wait_for(b.read(), 30)
        assert got["a"].nbytes == size and got["a"].all()
        assert b.stats()["bytes_read"] == read + n  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while a.pinned_bytes + a.unsent_bytes and time.monotonic() < deadline:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        assert "unsent=0 pinned=0" in repr(a)
        zs = a.stats()["zerocopy"]  # type: ignore[attr-defined]
        assert zs.zerocopy_sends >= 1 and zs.completions == zs.zerocopy_sends
        assert zs.bytes_sent == written + n
        await a.close()
        await b.close()
        for x, y in ((a, b), (b, a)):
            r = repr(x)
            assert "closed" in r and x.local_address in r and y.local_address in r
        listener.stop()

    with _bridge(bridge):
        run_on("asyncio", body(), timeout=60)


def test_bytes_read_on_one_end_are_the_bytes_written_on_the_other() -> None:
    """stats() counts the same bytes on both ends: what write() returned (header
    included) is what the peer's reads count."""

    async def body() -> None:
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        returned = 0
        for msg in _messages().values():
            returned += await a.write(msg)
            await b.write(await asyncio.wait_for(b.read(), 10))
            await asyncio.wait_for(a.read(), 10)
        sa, sb = a.stats(), b.stats()  # type: ignore[attr-defined]
        assert sa["bytes_written"] > returned > 0
        assert sa["bytes_written"] == sb["bytes_read"]
        assert sb["bytes_written"] == sa["bytes_read"]
        await a.close()
        await b.close()
        listener.stop()

    run_on("asyncio", body(), timeout=30)


@pytest.mark.parametrize("bridge", ["msg_zerocopy", "uring"])
def test_unsent_plus_pinned_never_exceeds_what_was_written(bridge: str) -> None:
    """What repr/stats report as held (unsent + pinned) is memory the caller handed
    over: it can never be more than the bytes written."""
    size = 64 * MiB

    async def body() -> None:
        config = {f"{KEY}.wait-for-release": False, f"{KEY}.zerocopy": "always"}
        with dask.config.set(config):
            a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        try:
            n = await a.write({"a": to_serialize(np.ones(size, dtype=np.uint8))})
            reading = asyncio.ensure_future(b.read())
            worst = 0
            while not reading.done():
                worst = max(worst, a.unsent_bytes + a.pinned_bytes)  # type: ignore[attr-defined]
                await asyncio.sleep(0.001)
            await asyncio.wait_for(reading, 30)
            assert size // 2 < worst <= n
        finally:
            await a.close()
            await b.close()
            listener.stop()

    with _bridge(bridge):
        run_on("asyncio", body(), timeout=60)


# -- addresses -------------------------------------------------------------------------------
def test_the_entry_point_gives_the_pagefrag_backend() -> None:
    assert isinstance(get_backend("pagefrag"), PagefragBackend)


@pytest.mark.parametrize(
    "loc",
    ["127.0.0.1:123", "localhost:456", "0.0.0.0:456", "[::1]:123", "[::]:5", "127.0.0.2:789"],
)
def test_address_handling_agrees_with_tcp(loc: str) -> None:
    ours, tcp = get_backend("pagefrag"), get_backend("tcp")
    for method in ("get_address_host", "get_address_host_port", "resolve_address"):
        assert getattr(ours, method)(loc) == getattr(tcp, method)(loc), method
    assert ours.get_address_host(loc) == parse_host_port(loc)[0]
    if loc.startswith("127.") or loc.startswith("[::1]") or loc.startswith("localhost"):
        assert ours.get_local_address_for(loc) == tcp.get_local_address_for(loc)


def test_address_handling_values_and_bad_addresses() -> None:
    ours = get_backend("pagefrag")
    assert ours.get_address_host_port("[::1]:123") == ("::1", 123)
    assert ours.resolve_address("localhost:456") == "127.0.0.1:456"
    assert ours.get_local_address_for("127.0.0.1:80") == "127.0.0.1"
    if _ipv6_missing() is None:
        assert ours.get_local_address_for("[::1]:80") == "[::1]"
    for bad in ("localhost", "::1", "[::1]", "::1:123"):
        for backend in (ours, get_backend("tcp")):
            with pytest.raises(ValueError):
                backend.get_address_host_port(bad)


@pytest.mark.parametrize("loc", [":0", "0.0.0.0:0", "127.0.0.1:0", "[::1]:0"])
def test_listen_and_contact_addresses_agree_with_tcp(loc: str) -> None:
    if "::1" in loc and _ipv6_missing() is not None:
        pytest.skip(str(_ipv6_missing()))

    def without_port(addr: str) -> tuple[str, str]:
        scheme, rest = parse_address(addr)
        host, port = parse_host_port(rest)
        assert 1023 < port < 65536
        return scheme, host

    async def body() -> None:
        hosts = {}
        for scheme in ("pagefrag", "tcp"):
            async with _served(f"{scheme}://{loc}") as listener:
                hosts[scheme] = [
                    without_port(listener.listen_address),
                    without_port(listener.contact_address),
                ]
        ours = hosts["pagefrag"]
        assert [h for _, h in ours] == [h for _, h in hosts["tcp"]]
        assert {s for s, _ in ours} == {"pagefrag"}
        if loc in (":0", "0.0.0.0:0"):
            assert ours == [("pagefrag", "0.0.0.0"), ("pagefrag", get_ip())]
        else:
            host = parse_host_port(loc)[0]
            assert ours == [("pagefrag", host), ("pagefrag", host)]

    run_on("asyncio", body(), timeout=30)


# -- large frames ----------------------------------------------------------------------------
def test_large_frames_of_256_mib_round_trip_intact() -> None:
    """Four distinct 64 MiB arrays in one message, to the server and back."""
    n, size = 4, 64 * MiB

    async def body() -> None:
        arrays = [np.arange(size // 8, dtype=np.uint64) * (2 * i + 3) + i for i in range(n)]
        want = [_crc(a) for a in arrays]
        assert len(set(want)) == n
        async with _served("pagefrag://127.0.0.1:0") as listener:
            comm = await connect(listener.contact_address, timeout=10)
            written = await comm.write({"arrays": [to_serialize(a) for a in arrays]})
            assert written >= n * size
            got = (await asyncio.wait_for(comm.read(), 60))["arrays"]
            await comm.close()
        assert [a.nbytes for a in got] == [size] * n
        assert [_crc(a) for a in got] == want
        del arrays, got

    run_on("asyncio", body(), timeout=90)


# -- settings --------------------------------------------------------------------------------
def test_high_water_settings_reach_the_transport_and_hold_writers_back() -> None:
    """``high-water`` sets the transport's write limits on both ends; with a reader
    that stops reading (``read-high-water``), a writer is held back at it."""
    size = 16 * MiB

    async def body() -> None:
        config = {
            f"{KEY}.high-water": "1 MiB",
            f"{KEY}.read-high-water": "1 MiB",
            f"{KEY}.wait-for-release": False,
        }
        with dask.config.set(config):
            a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        for comm in (a, b):
            assert _transport(comm).get_write_buffer_limits() == (MiB // 4, MiB)
        # A fixed, small receive buffer (no autotuning up to tcp_rmem's 32 MiB): what the
        # kernel holds for a reader that stopped is far below one message.
        sock = _transport(b).get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        msgs = [{"i": i, "a": to_serialize(np.full(size, i, dtype=np.uint8))} for i in range(3)]
        await asyncio.wait_for(a.write(msgs[0]), 20)
        await asyncio.wait_for(a.write(msgs[1]), 20)
        third = asyncio.ensure_future(a.write(msgs[2]))
        await asyncio.sleep(1.0)
        assert not third.done(), "the writer was not held back at high-water"
        assert a.unsent_bytes + a.pinned_bytes > MiB  # type: ignore[attr-defined]
        for i in range(3):
            got = await asyncio.wait_for(b.read(), 20)
            assert got["i"] == i and got["a"].nbytes == size and (got["a"] == i).all()
        await asyncio.wait_for(third, 20)
        await a.close()
        await b.close()
        listener.stop()

        # the default (64 MiB) holds nothing back here
        a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        assert _transport(a).get_write_buffer_limits() == (16 * MiB, 64 * MiB)
        await a.close()
        await b.close()
        listener.stop()

    run_on("asyncio", body(), timeout=60)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("high-water", "lots"),
        ("high-water", -1),
        ("read-high-water", "1 parsec"),
        ("backend", "carrier-pigeon"),
        ("max-frames", 0),
        ("linger", "forever"),
    ],
)
def test_a_bad_setting_raises_naming_its_key_before_any_socket(name: str, value: Any) -> None:
    async def body() -> None:
        accepted: list[Comm] = []

        async def keep(comm: Comm) -> None:
            accepted.append(comm)

        async with _served("pagefrag://127.0.0.1:0", keep) as listener:
            await asyncio.sleep(0)
            before = _open_fds()
            with dask.config.set({f"{KEY}.{name}": value}):
                with pytest.raises(ValueError, match=f"{KEY}.{name}"):
                    await connect(listener.contact_address, timeout=5)
                with pytest.raises(ValueError, match=f"{KEY}.{name}"):
                    await listen("pagefrag://127.0.0.1:0", keep)
            assert _open_fds() == before
            await asyncio.sleep(0.1)
            assert accepted == []

    run_on("asyncio", body(), timeout=30)


# -- a malicious peer ------------------------------------------------------------------------
MALICIOUS = {
    "2**40 frames": struct.pack("<Q", 1 << 40),
    # unchecked, its 1 GiB of frame lengths would be allocated (and awaited)
    "2**27 frames": struct.pack("<Q", 1 << 27),
    "one frame of 2**40 bytes": struct.pack("<QQ", 1, 1 << 40),
    "frames summing to 2**40 bytes": struct.pack("<QQQQ", 3, 1 << 38, 1 << 39, 1 << 38),
}


@pytest.mark.parametrize("header", list(MALICIOUS))
def test_a_malicious_header_closes_the_comm_and_allocates_nothing(header: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as srv:
            srv.setblocking(False)
            connector = get_backend("pagefrag").get_connector()
            comm = await connector.connect(f"127.0.0.1:{srv.getsockname()[1]}")
            conn, _ = await asyncio.wait_for(loop.sock_accept(srv), 10)
            with conn:
                rss = _rss()
                await loop.sock_sendall(conn, MALICIOUS[header] + b"\0" * 100_000)
                with pytest.raises(CommClosedError):
                    await asyncio.wait_for(comm.read(), 10)
                assert comm.closed()
                assert _rss() - rss < 64 * MiB
                # and the peer was cut off
                conn.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    assert await loop.run_in_executor(None, conn.recv, 1 << 16) == b""

    run_on("asyncio", body(), timeout=30)


def test_a_malicious_client_is_cut_off_and_the_listener_keeps_serving() -> None:
    async def body() -> None:
        handled: list[Comm] = []

        async def handler(comm: Comm) -> None:
            handled.append(comm)
            await _echo(comm)

        async with _served("pagefrag://127.0.0.1:0", handler) as listener:
            host, port = listener.get_host_port()
            rss = _rss()
            for bad in MALICIOUS.values():
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(bad)
                await writer.drain()
                with contextlib.suppress(ConnectionResetError):
                    # the server's handshake, then the end: nothing else is sent
                    while await asyncio.wait_for(reader.read(1 << 16), 10):
                        pass
                writer.close()
            assert _rss() - rss < 64 * MiB
            assert handled == []
            comm = await connect(listener.contact_address, timeout=10)
            await comm.write({"good": to_serialize(np.arange(100_000))})
            got = await asyncio.wait_for(comm.read(), 10)
            assert np.array_equal(got["good"], np.arange(100_000))
            await comm.close()
            assert len(handled) == 1

    run_on("asyncio", body(), timeout=30)


def test_max_message_size_setting_bounds_what_a_peer_may_send() -> None:
    async def body() -> None:
        with dask.config.set({f"{KEY}.max-message-size": "1 MiB"}):
            a, b, listener = await _pair("pagefrag://127.0.0.1:0")
        await a.write({"ok": b"x" * 1000})
        assert (await asyncio.wait_for(b.read(), 10))["ok"] == b"x" * 1000
        await a.write({"too big": to_serialize(np.zeros(2 * MiB, dtype=np.uint8))})
        with pytest.raises(CommClosedError, match="at most 1048576"):
            await asyncio.wait_for(b.read(), 10)
        a.abort()
        listener.stop()

    run_on("asyncio", body(), timeout=30)


# -- across network namespaces ---------------------------------------------------------------
def test_across_two_namespaces_round_trip_close_and_a_64_mib_frame(lab: NetLab) -> None:
    """Server in the receiver's namespace, client in the sender's, joined by veth."""
    size = 64 * MiB

    async def body() -> None:
        with lab.inside(lab.receiver):
            listener = await listen(f"pagefrag://{RECEIVER_IP}:0", _echo)
        try:
            assert parse_host_port(parse_address(listener.contact_address)[1])[0] == RECEIVER_IP
            with lab.inside(lab.sender):
                comm = await connect(listener.contact_address, timeout=10)
            assert parse_host_port(parse_address(comm.local_address)[1])[0] == "198.18.0.1"
            for msg in _messages().values():
                await comm.write(msg)
                _as_sent(await asyncio.wait_for(comm.read(), 20), msg)
            big = np.arange(size // 8, dtype=np.uint64) * 7 + 1
            await comm.write({"big": to_serialize(big)})
            got = await asyncio.wait_for(comm.read(), 60)
            assert got["big"].nbytes == size and _crc(got["big"]) == _crc(big)
            await asyncio.wait_for(comm.close(), 20)
            assert comm.closed()
            with pytest.raises(CommClosedError):
                await comm.read()
            # a second comm, and the listener stopped under it
            with lab.inside(lab.sender):
                comm = await connect(listener.contact_address, timeout=10)
            await comm.write({"x": 1})
            assert await asyncio.wait_for(comm.read(), 10) == {"x": 1}
            listener.stop()
            await comm.write({"y": 2})  # an established comm outlives the listener
            assert await asyncio.wait_for(comm.read(), 10) == {"y": 2}
            comm.abort()
            assert comm.closed()
        finally:
            listener.stop()

    run_on("asyncio", body(), timeout=90)
