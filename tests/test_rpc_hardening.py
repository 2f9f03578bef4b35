"""pagefrag.rpc off the happy path (issue 9): cancelled safe calls, hostile peers, the
safe codec, authenticated pickle, handlers that raise SystemExit, oversize requests.

The regression tests use only the API that existed before the fix where they can (new
names are looked up inside the tests), so they can be run against the old code."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagefrag.errors as errors
from pagefrag.rpc import BlockStoreClient, RemoteError, RpcClient, RpcError, RpcServer
from pagefrag.testing.netlab import RECEIVER_IP, NetLab, missing_tools

KEY = b"k" * 32
MAGIC = b"PFRPC/1\n"  # the server's hello; literal so this file imports on the old code
HELLO_SIZE = 20
LAST_FRAGMENT = 0x80000000


def run(coro: Awaitable[Any], limit: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, limit))


def handlers() -> dict[str, Any]:
    return {
        "echo": lambda args, payload: args,
        "size": lambda args, payload: len(payload),
        "object": lambda args, payload: object(),
    }


# -- item 4: a cancelled safe call waits for the kernel's release -------------------------


def _pattern(tag: bytes, size: int) -> bytearray:
    return bytearray((tag * (size // len(tag) + 1))[:size])


def _stalled_write_then_reuse(release_timeout: float | None, stall_for: float) -> dict[str, Any]:
    """A server whose side drops the connection's packets (no ACK, no reply) for
    ``stall_for`` s; the application bounds its safe write with ``asyncio.wait_for``,
    reuses its buffer as soon as the call gives control back, and we read block 0 once
    the stall is over. Returns what happened."""
    from pagefrag.testing.repro import block_store_in, stall, unstall

    size = 256 * 1024
    a, b = _pattern(b"A-block-", size), _pattern(b"B-block-", size)
    out: dict[str, Any] = {}
    with NetLab() as lab, block_store_in(lab) as port:

        async def main() -> None:
            loop = asyncio.get_running_loop()
            kwargs: dict[str, Any] = {"timeout": 60, "retries": 0, "zerocopy": "always"}
            if release_timeout is not None:
                kwargs["release_timeout"] = release_timeout
            client = RpcClient(RECEIVER_IP, port, **kwargs)
            conn = await client.connection()
            stall(lab, conn.local_port)

            async def lift() -> None:
                await asyncio.sleep(stall_for)
                out["stall_dropped"] = await loop.run_in_executor(None, unstall, lab)

            lifted = asyncio.ensure_future(lift())
            buf = bytearray(a)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(BlockStoreClient(client).write(0, buf), 0.3)
            except BaseException as exc:  # what the caller is told
                out["raised"] = exc
            out["returned_after"] = time.monotonic() - t0
            out["lifted_when_returned"] = lifted.done()
            if isinstance(out["raised"], errors.PageFragError) and hasattr(
                out["raised"], "released"
            ):
                await asyncio.wait_for(out["raised"].released, 30)  # the release handle
                out["released_after"] = time.monotonic() - t0
            buf[:] = b  # reuse: the caller was given control back
            await lifted
            async with RpcClient(RECEIVER_IP, port, timeout=5) as checker:
                check = BlockStoreClient(checker)
                deadline = time.monotonic() + 20
                while await check.writes_applied() < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                out["applied"] = await check.writes_applied()
                block = await check.read(0, size)
            out["holds"] = "A" if block == a else "B" if block == b else "other"
            await client.close()

        with lab.inside(lab.sender):
            asyncio.run(asyncio.wait_for(main(), 90))
    return out


@pytest.fixture
def netlab_tools() -> None:
    why = missing_tools()
    if why:
        pytest.skip(why)


@pytest.mark.usefixtures("netlab_tools")
def test_cancelled_safe_call_returns_only_after_release_and_reuse_never_corrupts() -> None:
    # Fails on the old code: wait_for returned after 0.3 s with the pages still pinned and
    # the stale TCP retransmission carried B into block 0.
    out = _stalled_write_then_reuse(release_timeout=None, stall_for=1.5)
    assert out["stall_dropped"] > 0, "the stall dropped nothing"
    assert isinstance(out["raised"], TimeoutError), out["raised"]  # wait_for's own error
    assert out["applied"] == 1
    assert out["holds"] == "A", "the reused buffer reached the server's block"
    assert out["lifted_when_returned"], "control came back while the kernel held the pages"


@pytest.mark.usefixtures("netlab_tools")
def test_cancelled_safe_call_past_release_timeout_raises_buffer_in_use_with_a_handle() -> None:
    out = _stalled_write_then_reuse(release_timeout=0.5, stall_for=2.5)
    assert out["stall_dropped"] > 0, "the stall dropped nothing"
    exc = out["raised"]
    assert isinstance(exc, errors.BufferInUseError), exc
    assert not isinstance(exc, TimeoutError)  # never mistaken for "the call just timed out"
    assert out["returned_after"] < 2.5 and not out["lifted_when_returned"]
    assert out["released_after"] >= 2.5  # the handle completed only after the stall
    assert out["holds"] == "A" and out["applied"] == 1


def test_safe_call_cancelled_on_loopback_still_completes_promptly() -> None:
    async def main() -> None:
        server = RpcServer({"slow": lambda args, payload: asyncio.sleep(args)})
        host, port = await server.start()
        async with RpcClient(host, port, zerocopy="always", timeout=30) as client:
            buf = bytearray(1 << 20)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call("slow", 5, payload=buf), 0.2)
            assert time.monotonic() - t0 < 4  # released at the ACK, not at the reply
        server.close()
        await server.wait_closed()

    run(main())


# -- item 15: the default codec is safe; pickle needs a key ------------------------------


class Exploit:
    """A pickle that creates a marker file when unpickled: code execution."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def _pickle_call(xid: int, body: Any) -> bytes:
    """A call record as the old wire format made it: header, pickle, no buffers."""
    pickled = pickle.dumps(body, protocol=5)
    header = struct.pack("!IBxHIQ", xid, 0, 0, len(pickled), 0)
    record = header + pickled
    return struct.pack("!I", LAST_FRAGMENT | len(record)) + record


async def _raw_exchange(host: str, port: int, send: bytes, timeout: float = 10) -> bytes:
    """Connect, send ``send`` at once, return everything the server sent until it closed
    or went quiet (the hello, if any, left in)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(send)
    await writer.drain()
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 1.0)
        except TimeoutError:
            if got:
                break
            continue
        if not chunk:
            break
        got += chunk
    writer.close()
    return got


def test_a_pickle_exploit_sent_to_a_default_server_does_not_run_and_gets_an_error(
    tmp_path: pathlib.Path,
) -> None:
    # Fails on the old code: the server unpickled the body and created the marker file.
    marker = tmp_path / "pwned"

    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        got = await _raw_exchange(host, port, _pickle_call(7, ("echo", Exploit(marker))))
        assert not marker.exists(), "the server ran the client's code"
        if got.startswith(MAGIC):
            got = got[HELLO_SIZE:]
        from pagefrag.rpc.record import ERROR, RecordReader, decode_message

        (record,) = RecordReader().feed(got)
        msg = decode_message(record)
        assert (msg.xid, msg.kind) == (7, ERROR)
        assert "CodecError" in msg.body
        async with RpcClient(host, port) as client:  # the server goes on
            assert await client.call("echo", [1, "two"]) == [1, "two"]
        server.close()
        await server.wait_closed()

    run(main())
    assert not marker.exists()


def test_pickle_codec_without_a_key_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="authkey"):
        RpcServer(handlers(), codec="pickle")
    with pytest.raises(ValueError, match="authkey"):
        RpcClient("127.0.0.1", 1, codec="pickle")
    with pytest.raises(ValueError, match="codec"):
        RpcServer(handlers(), codec="marshal")
    with pytest.raises(TypeError):
        RpcServer(handlers(), codec="pickle", authkey="a string key of 32 characters...")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16 bytes"):
        RpcServer(handlers(), codec="pickle", authkey=b"short")


def test_pickle_server_refuses_an_unauthenticated_or_wrong_key_peer_before_unpickling(
    tmp_path: pathlib.Path,
) -> None:
    marker = tmp_path / "pwned"
    from pagefrag.rpc.handshake import HELLO, NONCE_SIZE, answer

    async def main() -> None:
        server = RpcServer(handlers(), codec="pickle", authkey=KEY)
        host, port = await server.start()
        exploit = _pickle_call(1, ("echo", Exploit(marker)))
        # No handshake at all: the exploit's bytes are taken as the answer and fail.
        got = await _raw_exchange(host, port, exploit)
        assert got.startswith(MAGIC) and len(got) == HELLO.size + NONCE_SIZE  # hello only
        # A peer that answers with the wrong key, then sends the exploit.
        reader, writer = await asyncio.open_connection(host, port)
        greeting = await reader.readexactly(HELLO.size + NONCE_SIZE)
        writer.write(answer(b"w" * 32, True, greeting) + os.urandom(NONCE_SIZE) + exploit)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
        writer.close()
        assert not marker.exists()
        assert server.auth_failures == 2 and server.calls_handled == 0
        # The client API: a wrong key and no key are refused.
        with pytest.raises(errors.AuthenticationError):
            await RpcClient(host, port, codec="pickle", authkey=b"w" * 32).call("echo", 1)
        with pytest.raises(RpcError, match="codec"):
            await RpcClient(host, port).call("echo", 1)  # safe codec, no key: a clear error
        assert not marker.exists()
        # The right key: full pickle, any type.
        async with RpcClient(host, port, codec="pickle", authkey=KEY) as client:
            assert await client.call("echo", Fraction(1, 3)) == Fraction(1, 3)
            arr = np.arange(100_000, dtype=np.float32)
            assert np.array_equal(await client.call("echo", arr), arr)
        assert server.calls_handled == 2
        server.close()
        await server.wait_closed()

    run(main())


def test_a_client_with_a_key_refuses_a_server_that_does_not_authenticate() -> None:
    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        with pytest.raises(errors.AuthenticationError):
            await RpcClient(host, port, authkey=KEY).call("echo", 1)
        # The safe codec can be authenticated too.
        keyed = RpcServer(handlers(), authkey=KEY)
        khost, kport = await keyed.start()
        async with RpcClient(khost, kport, authkey=KEY) as client:
            assert await client.call("echo", (1, 2)) == (1, 2)
        with pytest.raises(errors.AuthenticationError, match="requires an authkey"):
            await RpcClient(khost, kport).call("echo", 1)
        with pytest.raises(RpcError, match="codec"):
            await RpcClient(host, port, codec="pickle", authkey=KEY).call("echo", 1)
        for s in (server, keyed):
            s.close()
            await s.wait_closed()

    run(main())


def test_servers_bind_to_loopback_unless_given_a_host() -> None:
    async def main() -> None:
        server = RpcServer(handlers())
        host, _ = await server.start()
        assert host == "127.0.0.1"
        server.close()
        await server.wait_closed()

    run(main())


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


def _registry() -> Any:
    from pagefrag.rpc import TypeRegistry

    types = TypeRegistry()
    types.register(Point, "test.Point", lambda p: (p.x, p.y), lambda v: Point(*v))
    types.register(
        Fraction, "fraction", lambda f: (f.numerator, f.denominator), lambda v: Fraction(*v)
    )
    return types


EVERY_TYPE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**200),
    1.5,
    float("inf"),
    -0.0,
    complex(1, -2),
    "",
    "héllo \U0001f600",
    b"",
    b"\x00\xff",
    bytearray(b"mutable"),
    [],
    [1, [2, [3]]],
    (),
    (1, "a", None),
    set(),
    {1, "b", (2, 3)},
    frozenset({b"x"}),
    {},
    {"k": [1, 2], 3: {"nested": (4,)}, (1, 2): None},
]


def test_every_supported_type_round_trips_through_the_safe_codec() -> None:
    from pagefrag.rpc import SafeCodec

    codec = SafeCodec(_registry())
    for value in [*EVERY_TYPE, Point(1, 2), [Fraction(1, 3), {Point(3, 4): "p"}]]:
        data, buffers = codec.dumps(value)
        back = codec.loads(memoryview(data), buffers)
        assert back == value and type(back) is type(value), value
    arrays = [
        np.arange(10, dtype=np.int64),
        np.eye(3, dtype=np.float32),
        np.zeros((2, 0, 3), dtype=np.uint8),
        np.array(7, dtype=np.int16),
        np.arange(12, dtype=">i4").reshape(3, 4).T,  # not contiguous, big-endian
        np.array([True, False]),
        np.array(["ab", "c"]),
        np.array([1, 2], dtype="datetime64[ns]"),
        np.array([1 + 2j], dtype=np.complex128),
    ]
    data, buffers = codec.dumps(arrays)
    back = codec.loads(memoryview(data), [memoryview(bytes(b)) for b in buffers])
    for x, y in zip(arrays, back, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    oob = memoryview(bytearray(b"out of band"))
    data, buffers = codec.dumps({"buf": oob, "pb": pickle.PickleBuffer(b"pb")})
    assert [bytes(b) for b in buffers] == [b"out of band", b"pb"]
    assert b"out of band" not in data  # carried as a frag, not inline
    back = codec.loads(memoryview(data), buffers)
    assert bytes(back["buf"]) == b"out of band" and bytes(back["pb"]) == b"pb"


def test_every_supported_type_round_trips_over_the_wire_with_registered_types() -> None:
    from pagefrag.rpc import SafeCodec

    async def main() -> None:
        server = RpcServer(handlers(), codec=SafeCodec(_registry()))
        host, port = await server.start()
        async with RpcClient(host, port, codec=SafeCodec(_registry()), zerocopy="always") as c:
            for value in [*EVERY_TYPE, Point(5, 6), {"f": Fraction(2, 7)}]:
                assert await c.call("echo", value) == value
            arrays = {"a": np.arange(300_000, dtype=np.float64), "b": np.eye(50)}
            back = await c.call("echo", arrays)
            assert all(np.array_equal(back[k], v) for k, v in arrays.items())
        async with RpcClient(host, port) as plain:  # no registry: a clear error, no guess
            with pytest.raises(TypeError, match="register"):
                await plain.call("echo", Point(1, 1))
            with pytest.raises(RemoteError, match="TypeError"):  # a result it cannot carry
                await plain.call("object")
        server.close()
        await server.wait_closed()

    run(main())


def test_unsupported_types_and_object_arrays_are_refused_when_encoding() -> None:
    from pagefrag.rpc import SafeCodec

    codec = SafeCodec()
    for bad in (
        object(),
        Point(1, 2),
        np.array([object()]),
        np.zeros(2, dtype="i4,f8"),
        {1: {2: print}},
    ):
        with pytest.raises(TypeError):
            codec.dumps(bad)
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(errors.CodecError, match="deeper"):
        codec.dumps(cyclic)


HOSTILE: list[tuple[bytes, str]] = [
    (b"", "truncated"),
    (b"l" + struct.pack("!I", 0xFFFFFFFF), "count"),
    (b"s" + struct.pack("!I", 0xFFFFFFF0) + b"abc", "truncated"),
    (b"b" + struct.pack("!I", 10) + b"abc", "truncated"),
    (b"I" + struct.pack("!I", 1 << 20), "max_int_bytes"),
    (b"l\x00\x00\x00\x01" * 100 + b"N", "deeper"),
    (b"i\x00\x00", "truncated"),
    (b"NN", "after"),
    (b"X", "unknown tag"),
    (b"\x80\x05", "unknown tag"),  # a pickle
    (b"o" + struct.pack("!I", 3), "out-of-band"),
    (b"S" + struct.pack("!I", 1) + b"l\x00\x00\x00\x00", "set element"),
    (b"d" + struct.pack("!I", 1) + b"l\x00\x00\x00\x00N", "dict key"),
    (b"d" + struct.pack("!I", 1) + b"o\x00\x00\x00\x00N", "dict key"),  # a writable view
    (b"S" + struct.pack("!I", 1) + b"o\x00\x00\x00\x00", "set element"),
    (b"s\x00\x00\x00\x01\xff", "UTF-8"),
    (b"r\x04evil" + b"N", "unknown registered"),
    (b"n\x03|O8\x01" + struct.pack("!QI", 1, 0), "plain dtype"),
    (b"n\x03<f8\x01" + struct.pack("!QI", 1 << 40, 0), "needs"),
    (b"n\x0b<f8,<i4,|O8\x00" + struct.pack("!I", 0), "plain dtype"),
]


@pytest.mark.parametrize(
    ("data", "why"), HOSTILE, ids=[h[1] + str(i) for i, h in enumerate(HOSTILE)]
)
def test_malformed_and_hostile_bodies_raise_codec_errors(data: bytes, why: str) -> None:
    from pagefrag.rpc import SafeCodec

    with pytest.raises(errors.CodecError, match=why):
        # Writable, as the server's views into a received record are.
        SafeCodec(max_items=10_000).loads(memoryview(data), [memoryview(bytearray(b"12345678"))])


def test_element_count_limit_bounds_work_per_body() -> None:
    from pagefrag.rpc import SafeCodec

    data, _ = SafeCodec().dumps([None] * 1000)
    with pytest.raises(errors.CodecError, match="values"):
        SafeCodec(max_items=500).loads(memoryview(data), [])
    assert SafeCodec(max_items=1001).loads(memoryview(data), []) == [None] * 1000


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)
        | st.frozensets(st.integers() | st.text(max_size=4), max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_hypothesis_round_trip(value: Any) -> None:
    from pagefrag.rpc import SafeCodec

    codec = SafeCodec()
    data, buffers = codec.dumps(value)
    assert codec.loads(memoryview(data), buffers) == value


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.lists(st.binary(max_size=64), max_size=3))
def test_hypothesis_fuzz_random_bytes_raise_only_codec_errors(
    data: bytes, bufs: list[bytes]
) -> None:
    from pagefrag.rpc import SafeCodec

    with contextlib.suppress(errors.CodecError):  # anything else fails the test
        SafeCodec(_registry()).loads(memoryview(data), [memoryview(bytearray(b)) for b in bufs])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values, st.data())
def test_hypothesis_fuzz_mutated_valid_bodies_raise_only_codec_errors(
    value: Any, data: st.DataObject
) -> None:
    from pagefrag.rpc import SafeCodec

    codec = SafeCodec(_registry())
    encoded, buffers = codec.dumps([value, np.arange(4, dtype=np.int32), Point(1, 2)])
    raw = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(errors.CodecError):  # anything else fails the test
        codec.loads(memoryview(bytes(raw)), buffers)


def test_a_hostile_body_gets_an_error_reply_and_the_connection_goes_on() -> None:
    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        deep = b"t\x00\x00\x00\x01" * 10_000 + b"N"
        header = struct.pack("!IBxHIQ", 9, 0, 0, len(deep), 0)
        record = struct.pack("!I", LAST_FRAGMENT | (len(header) + len(deep))) + header + deep
        got = await _raw_exchange(host, port, record)
        from pagefrag.rpc.record import ERROR, RecordReader, decode_message

        (reply,) = RecordReader().feed(got[HELLO_SIZE:])
        msg = decode_message(reply)
        assert msg.kind == ERROR and "deeper" in msg.body
        assert server.bad_records == 1
        server.close()
        await server.wait_closed()

    run(main())


# -- item 16: SystemExit / KeyboardInterrupt in a handler --------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pagefrag.rpc import RpcServer

    def leave(args, payload):
        raise SystemExit(3)

    def interrupt(args, payload):
        raise KeyboardInterrupt

    async def leave_async(args, payload):
        await asyncio.sleep(0)
        raise SystemExit("async")

    async def main():
        server = RpcServer({"leave": leave, "interrupt": interrupt,
                            "leave_async": leave_async, "echo": lambda a, p: a})
        _, port = await server.start()
        print(port, flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
    """
)


def test_systemexit_and_keyboardinterrupt_in_a_handler_become_remote_errors() -> None:
    # Fails on the old code: the first SystemExit ended the server process; the next
    # call was refused.
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        async def main() -> None:
            async with RpcClient("127.0.0.1", port, timeout=5, retries=1) as client:
                for proc_name, kind in (
                    ("leave", "SystemExit"),
                    ("interrupt", "KeyboardInterrupt"),
                    ("leave_async", "SystemExit"),
                ):
                    with pytest.raises(RemoteError, match=kind):
                        await client.call(proc_name)
                    assert await client.call("echo", proc_name) == proc_name

        run(main(), 60)
        assert proc.poll() is None, "the server process exited"
    finally:
        proc.kill()
        proc.wait(10)


# -- item 17: a request over the server's max_record fails at once -----------------------


def test_oversize_request_raises_record_too_large_at_once_and_the_connection_stays_usable() -> None:
    # Fails on the old code: RpcTimeout after timeout x tries (3 x 5 s).
    async def main() -> None:
        server = RpcServer(handlers(), max_record=64 * 1024)
        host, port = await server.start()
        async with RpcClient(host, port, timeout=5, retries=2) as client:
            t0 = time.monotonic()
            with pytest.raises(Exception) as info:
                await client.call("size", payload=bytearray(1 << 20))
            assert time.monotonic() - t0 < 2, "it waited for the call timeout"
            exc = info.value
            assert isinstance(exc, errors.RecordTooLargeError), repr(exc)
            assert isinstance(exc, ValueError) and exc.limit == 64 * 1024
            assert exc.size > 1 << 20
            assert client.transmissions == 0 and client.reconnects == 0  # nothing sent
            assert await client.call("size", payload=bytearray(60_000)) == 60_000
            with pytest.raises(errors.RecordTooLargeError):
                await client.call("echo", np.zeros(100_000))  # out-of-band buffers count
            assert await client.call("echo", "ok") == "ok"
            assert client.reconnects == 0
        assert server.bad_records == 0
        server.close()
        await server.wait_closed()

    run(main())


def test_a_handler_raising_cancelled_error_is_a_remote_error_not_a_dropped_connection() -> None:
    async def cancelled(args: Any, payload: memoryview) -> None:
        raise asyncio.CancelledError("the handler's own")

    async def main() -> None:
        server = RpcServer({**handlers(), "cancelled": cancelled})
        host, port = await server.start()
        async with RpcClient(host, port, timeout=5, retries=0) as client:
            with pytest.raises(RemoteError, match="CancelledError"):
                await client.call("cancelled")
            assert await client.call("echo", 1) == 1
            assert client.reconnects == 0
        server.close()
        await server.wait_closed()

    run(main())


# -- hash flooding: colliding set elements and dict keys ---------------------------------

M61 = 2**61 - 1  # int hashes are reduced modulo this prime: every k * M61 hashes to 0


def _complex_key(k: int) -> bytes:
    # hash(complex(x, y)) == hash(x) + 1000003 * hash(y): 0 for every k >= 2.
    return b"c" + struct.pack("!dd", 1000003.0 * k, -float(k))


def _int_key(k: int) -> bytes:
    raw = (k * M61).to_bytes(((k * M61).bit_length() + 8) // 8, "big", signed=True)
    return b"I" + struct.pack("!I", len(raw)) + raw


def _tuple_key(k: int) -> bytes:  # (k * M61, 1): a tuple's hash derives from its elements'
    return b"t" + struct.pack("!I", 2) + _int_key(k) + b"i" + struct.pack("!q", 1)


def _frozenset_key(k: int) -> bytes:
    return b"z" + struct.pack("!I", 1) + _complex_key(k)


def _flood(container: bytes, key: Any, n: int) -> bytes:
    """A set/frozenset (``S``/``z``) or dict (``d``, values None) of ``n`` keys that all
    share one hash value, encoded by hand (building it would itself take O(n^2))."""
    body = bytearray(container + struct.pack("!I", n))
    for k in range(2, n + 2):
        body += key(k)
        if container == b"d":
            body += b"N"
    return bytes(body)


FLOODS = [
    (b"S", _complex_key),
    (b"d", _complex_key),
    (b"S", _int_key),
    (b"d", _int_key),
    (b"z", _tuple_key),
    (b"d", _frozenset_key),
]


@pytest.mark.parametrize(
    ("container", "key"), FLOODS, ids=[f"{c.decode()}-{k.__name__}" for c, k in FLOODS]
)
def test_colliding_keys_are_refused_in_linear_time(container: bytes, key: Any) -> None:
    # Fails on the old code: no CodecError — the body decoded, after seconds of O(n^2)
    # insertion (20,000 colliding complex keys: ~7 s).
    from pagefrag.rpc import SafeCodec

    data = _flood(container, key, 20_000)
    values = [SafeCodec().loads(memoryview(_flood(container, key, n)), []) for n in (2, 8)]
    assert [len(v) for v in values] == [2, 8]  # a few collisions are fine
    t0 = time.monotonic()
    with pytest.raises(errors.CodecError, match="hash"):
        SafeCodec().loads(memoryview(data), [])
    assert time.monotonic() - t0 < 2
    nested = b"l" + struct.pack("!I", 2) + b"N" + data  # anywhere in the body
    with pytest.raises(errors.CodecError, match="hash"):
        SafeCodec().loads(memoryview(nested), [])


def test_legitimate_sets_and_dicts_with_a_few_hash_collisions_still_round_trip() -> None:
    from pagefrag.rpc import SafeCodec

    codec = SafeCodec(_registry())
    assert hash(-1) == hash(-2) and hash((-1, -1)) == hash((-2, -2))
    grid = [(a, b, c, d) for a in (-2, -1, 0) for b in (-2, -1) for c in (-2, -1) for d in (-2, -1)]
    for value in [
        {-1, -2, -1.5, -2.5, complex(-1, 0.5)},
        {-1: "a", -2: "b", -1.0 + 1j: "c", M61: "d", 2 * M61: "e", 3 * M61: "f"},
        frozenset({(-1,), (-2,), (-1, -2), (-2, -1), frozenset({-1}), frozenset({-2})}),
        {k: sum(k) for k in grid},  # 16 4-tuples over {-1, -2} share one hash
        set(grid),
        {f"k{i}": i for i in range(10_000)},
        {i: str(i) for i in range(-5_000, 5_000)},
        {i * 0.5 for i in range(10_000)},
        {Point(i, -i): i for i in range(1000)},
    ]:
        data, buffers = codec.dumps(value)
        assert codec.loads(memoryview(data), buffers) == value


def test_a_hash_flood_gets_an_error_reply_and_does_not_stall_other_connections() -> None:
    # Fails on the old code: the server decoded the body in its event loop for ~30 s;
    # the other connection's call waited that long.
    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        body = b"t" + struct.pack("!I", 2) + b"s\x00\x00\x00\x04echo"
        body += _flood(b"S", _complex_key, 40_000)
        header = struct.pack("!IBxHIQ", 11, 0, 0, len(body), 0)
        record = struct.pack("!I", LAST_FRAGMENT | (len(header) + len(body))) + header + body
        async with RpcClient(host, port, timeout=60, retries=0) as client:
            assert await client.call("echo", "warm") == "warm"
            t0 = time.monotonic()
            hostile = asyncio.create_task(_raw_exchange(host, port, record, timeout=60))
            await asyncio.sleep(0.5)  # the record arrives: a blocked loop also delays this
            assert await client.call("echo", "honest") == "honest"
            assert time.monotonic() - t0 < 6, "the flood blocked the server's loop"
            got = await hostile
            assert time.monotonic() - t0 < 10
        from pagefrag.rpc.record import ERROR, RecordReader, decode_message

        (reply,) = RecordReader().feed(got[HELLO_SIZE:])
        msg = decode_message(reply)
        assert (msg.xid, msg.kind) == (11, ERROR)
        assert "CodecError" in msg.body and "hash" in msg.body
        assert server.bad_records == 1
        server.close()
        await server.wait_closed()

    run(main())
