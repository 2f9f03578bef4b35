"""The corruption the seed patch prevents, reproduced between two network namespaces.

1. The client writes block A at offset 0 from its buffer (zero-copy forced on).
2. An nftables rule at the server's side drops every packet of that connection: no reply.
3. The client times out, connects again and sends the same xid; the reply arrives on the
   new connection.
4. The application reuses the same buffer for different data B and writes it elsewhere.
5. The stall is lifted: the first connection's TCP retransmits call 1 — from the pages of
   the buffer, which now hold B. The server (no duplicate-request cache) applies it.

With ``safe=False`` step 4 happens before step 5 and the store ends with B at offset 0:
corruption. With ``safe=True`` call 1 cannot complete until the first connection's pages
are released, which needs step 5; the buffer is reused only then and the store holds A.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..rpc.blockstore import BlockStore, BlockStoreClient
from ..rpc.client import RpcClient
from .netlab import RECEIVER_IP, NetLab

__all__ = ["ReproResult", "block_store_in", "run_repro", "stall", "unstall"]

OFFSET_B = 1 << 20


@dataclass
class ReproResult:
    safe: bool
    block_size: int
    first_call_seconds: float  # how long the write of A took to complete
    transmissions: int
    reconnects: int
    writes_applied: int
    store_holds: str  # "A", "B" or "other"
    stall_dropped: int = 0  # packets the stall dropped: a stall that dropped none proves nothing

    @property
    def corrupted(self) -> bool:
        return self.store_holds != "A"


def _pattern(tag: bytes, size: int) -> bytearray:
    return bytearray((tag * (size // len(tag) + 1))[:size])


@contextlib.contextmanager
def block_store_in(lab: NetLab, size: int = 4 << 20) -> Iterator[int]:
    """Serve a :class:`BlockStore` of ``size`` bytes at ``RECEIVER_IP`` inside
    ``lab.receiver``, from a thread with its own event loop; yields the port."""
    ready = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        server = BlockStore(size).server(zerocopy="always")
        _, port = await server.start(RECEIVER_IP, 0)
        stop = asyncio.Event()
        box.update(port=port, stop=stop, loop=asyncio.get_running_loop())
        ready.set()
        await stop.wait()
        server.close()
        await server.wait_closed()

    def server_thread() -> None:
        with lab.inside(lab.receiver):
            asyncio.run(serve())

    thread = threading.Thread(target=server_thread, daemon=True)
    thread.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the RPC server did not start")
        yield int(box["port"])  # type: ignore[call-overload]
    finally:
        srv_loop = box.get("loop")
        stop = box.get("stop")
        if isinstance(srv_loop, asyncio.AbstractEventLoop) and isinstance(stop, asyncio.Event):
            srv_loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def stall(lab: NetLab, client_port: int) -> None:
    """Drop every packet of the connection from ``client_port`` at the server's side
    (a counted rule: :func:`unstall` says how many it dropped)."""
    lab.ns(
        lab.receiver,
        "nft",
        f"add table inet pagefrag_stall; add chain inet pagefrag_stall pre "
        f"{{ type filter hook prerouting priority -300; }}; add rule inet "
        f"pagefrag_stall pre tcp sport {client_port} counter drop",
    )


def unstall(lab: NetLab) -> int:
    """Lift the stall; returns how many packets it dropped."""
    raw = lab.ns(lab.receiver, "nft", "-j", "list", "table", "inet", "pagefrag_stall")
    dropped = sum(
        int(expr["counter"]["packets"])
        for item in json.loads(raw)["nftables"]
        for expr in item.get("rule", {}).get("expr", [])
        if "counter" in expr
    )
    lab.ns(lab.receiver, "nft", "delete table inet pagefrag_stall")
    return dropped


def run_repro(
    safe: bool, *, block_size: int = 256 * 1024, timeout: float = 0.4, stall_for: float = 1.5
) -> ReproResult:
    """Run the scenario once (root: it builds namespaces and nftables rules)."""
    a, b = _pattern(b"A-block-", block_size), _pattern(b"B-block-", block_size)
    with NetLab() as lab, block_store_in(lab) as port:

        async def client_main() -> ReproResult:
            loop = asyncio.get_running_loop()
            client = RpcClient(
                RECEIVER_IP, port, timeout=timeout, retries=8, safe=safe, zerocopy="always"
            )
            store = BlockStoreClient(client)
            conn = await client.connection()
            stall(lab, conn.local_port)

            async def lift() -> int:
                await asyncio.sleep(stall_for)
                return await loop.run_in_executor(None, unstall, lab)

            lifted = asyncio.ensure_future(lift())
            buf = bytearray(a)  # the application's one buffer, filled with A
            t0 = time.monotonic()
            await store.write(0, buf)
            first = time.monotonic() - t0
            buf[:] = b  # reuse it: safe only if the stack is done with it
            await store.write(OFFSET_B, buf)
            await lifted
            await client.close()  # waits for the abandoned connection to drain
            transmissions, reconnects = client.transmissions, client.reconnects
            # Let the server apply the stale retransmission, then look at block 0.
            async with RpcClient(RECEIVER_IP, port, timeout=5) as checker:
                check = BlockStoreClient(checker)
                deadline = time.monotonic() + 15
                while await check.writes_applied() < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                applied = await check.writes_applied()
                block = await check.read(0, block_size)
            holds = "A" if block == a else "B" if block == b else "other"
            return ReproResult(
                safe, block_size, first, transmissions, reconnects, applied, holds, lifted.result()
            )

        with lab.inside(lab.sender):
            return asyncio.run(asyncio.wait_for(client_main(), 60))
