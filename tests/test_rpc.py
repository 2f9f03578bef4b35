"""pagefrag.rpc: record marking, calls, pickle-5 payloads, retries, restarts, bad input,
and the seed's corruption reproduced both ways."""

from __future__ import annotations

import asyncio
import pickle
import struct
import zlib
from collections.abc import Awaitable
from typing import Any

import numpy as np
import pytest

from pagefrag import SkBuff
from pagefrag.rpc import (
    BlockStore,
    BlockStoreClient,
    RecordError,
    RecordReader,
    RemoteError,
    RpcClient,
    RpcServer,
    RpcTimeout,
)
from pagefrag.rpc.handshake import HELLO
from pagefrag.rpc.record import LAST_FRAGMENT, decode_message, encode_head
from pagefrag.testing.netlab import missing_tools


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def handlers() -> dict[str, Any]:
    async def slow(args: Any, payload: memoryview) -> str:
        await asyncio.sleep(args)
        return "late"

    def fail(args: Any, payload: memoryview) -> None:
        raise ValueError("no such block")

    return {
        "echo": lambda args, payload: args,
        "digest": lambda args, payload: (len(payload), zlib.crc32(payload)),
        "slow": slow,
        "fail": fail,
    }


# -- the sans-I/O codec -------------------------------------------------------------


def test_records_reassemble_from_any_split_and_fragments() -> None:
    head, bufs = encode_head(7, 0, ("echo", (1, 2)), payload_len=3)
    wire = head + b"".join(bytes(b.raw()) for b in bufs) + b"xyz"
    reader = RecordReader()
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i : i + 1])
    (record,) = got
    msg = decode_message(record)
    assert (msg.xid, msg.kind, msg.body, bytes(msg.payload)) == (7, 0, ("echo", (1, 2)), b"xyz")
    # The same record cut into two fragments (last-fragment bit on the second only).
    body = wire[4:]
    two = (
        struct.pack("!I", 10)
        + body[:10]
        + struct.pack("!I", LAST_FRAGMENT | (len(body) - 10))
        + body[10:]
    )
    (again,) = RecordReader().feed(two)
    assert again == record


def test_bad_markers_and_lengths_are_record_errors() -> None:
    with pytest.raises(RecordError):
        RecordReader(max_record=1000).feed(struct.pack("!I", LAST_FRAGMENT | 5000))
    head, _ = encode_head(1, 0, ("echo", ()), payload_len=10)
    body = head[4:] + b"short"  # the header promises 10 payload bytes, 5 come
    (record,) = RecordReader().feed(struct.pack("!I", LAST_FRAGMENT | len(body)) + body)
    with pytest.raises(RecordError):
        decode_message(record)


# -- calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20, 64 << 20])
def test_payloads_from_zero_bytes_to_64_mib(size: int) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)

    async def main() -> None:
        server = RpcServer(handlers(), zerocopy="always")
        host, port = await server.start()
        async with RpcClient(host, port, zerocopy="always", timeout=30) as client:
            assert await client.call("digest", payload=payload) == (size, zlib.crc32(payload))
        server.close()
        await server.wait_closed()

    run(main())


def test_numpy_arrays_round_trip_out_of_band_and_skb_payloads() -> None:
    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        async with RpcClient(host, port, zerocopy="always") as client:
            arrays = {"a": np.arange(300_000, dtype=np.float64), "b": np.eye(50, dtype=np.int32)}
            back = await client.call("echo", arrays)
            assert all(np.array_equal(back[k], v) for k, v in arrays.items())
            oob = await client.call("echo", pickle.PickleBuffer(bytearray(b"q" * 100_000)))
            assert bytes(oob) == b"q" * 100_000
            many = [np.full(1000 + i, i, dtype=np.uint8) for i in range(40)]  # > 17 frags
            back_many = await client.call("echo", many)
            assert all(np.array_equal(a, b) for a, b in zip(back_many, many, strict=True))
            skb = SkBuff(b"head:")
            skb.add_frag(bytearray(b"frag") * 1000)
            assert await client.call("digest", payload=skb) == (4005, zlib.crc32(skb.tobytes()))
            skb.free()
        server.close()
        await server.wait_closed()

    run(main())


def test_concurrent_calls_each_get_their_own_reply() -> None:
    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        async with RpcClient(host, port) as client:
            results = await asyncio.gather(*(client.call("echo", i) for i in range(200)))
            assert results == list(range(200))
        server.close()
        await server.wait_closed()

    run(main())


def test_timeout_retries_then_raises_and_remote_errors_surface() -> None:
    async def main() -> None:
        server = RpcServer(handlers())
        host, port = await server.start()
        async with RpcClient(host, port, timeout=0.2, retries=2) as client:
            with pytest.raises(RpcTimeout):
                await client.call("slow", 1.0)
            assert client.transmissions == 3 and client.reconnects == 3
            with pytest.raises(RemoteError, match="no such block"):
                await client.call("fail")
            with pytest.raises(RemoteError, match="no procedure"):
                await client.call("missing")
            assert await client.call("echo", "still fine") == "still fine"
        server.close()
        await server.wait_closed()

    run(main())


def test_server_restart_on_the_same_port() -> None:
    async def main() -> None:
        store = BlockStore(1 << 20)
        server = store.server()
        host, port = await server.start()
        async with RpcClient(host, port, timeout=0.5, retries=6) as client:
            bs = BlockStoreClient(client)
            await bs.write(0, b"before")
            server.close()
            await server.wait_closed()
            server = store.server()
            for _ in range(50):  # the port may linger a moment
                try:
                    await server.start(host, port)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            await bs.write(6, b"-after")
            assert await bs.read(0, 12) == b"before-after"
        server.close()
        await server.wait_closed()

    run(main())


def test_malformed_records_close_that_connection_and_the_server_survives() -> None:
    async def main() -> None:
        server = RpcServer(handlers(), max_record=1 << 20)
        host, port = await server.start()
        for garbage in (
            struct.pack("!I", LAST_FRAGMENT | (1 << 30)),  # a marker past the limit
            struct.pack("!I", LAST_FRAGMENT | 8) + b"\x00" * 8,  # a header too short
        ):
            reader, writer = await asyncio.open_connection(host, port)
            await reader.readexactly(HELLO.size)  # the server's hello comes first
            writer.write(garbage)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
            writer.close()
        assert server.bad_records == 2
        async with RpcClient(host, port) as client:
            assert await client.call("echo", 42) == 42
        server.close()
        await server.wait_closed()

    run(main())


def test_the_seeds_corruption_reproduced_unsafe_and_prevented_safe() -> None:
    why = missing_tools()
    if why:
        pytest.skip(why)
    from pagefrag.testing.repro import run_repro

    unsafe = run_repro(safe=False)
    assert unsafe.stall_dropped > 0, "the stall dropped nothing"
    assert unsafe.transmissions >= 3 and unsafe.writes_applied == 3
    assert unsafe.store_holds == "B", "the stale retransmission must carry the reused buffer"
    safe = run_repro(safe=True)
    assert safe.stall_dropped > 0, "the stall dropped nothing"
    assert safe.store_holds == "A" and safe.writes_applied == 3
    assert safe.first_call_seconds > unsafe.first_call_seconds  # it waited for the release
