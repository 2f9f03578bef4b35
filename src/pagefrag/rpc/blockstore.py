"""A small block store over pagefrag.rpc: ``write(offset, data)``, ``read(offset, length)``.
The service of ``pagefrag repro`` and the tests. No duplicate-request cache: a
retransmitted write is applied again, as a stateless NFS-style server would."""

from __future__ import annotations

from typing import Any

from .._iov import Data
from .client import RpcClient
from .server import RpcServer

__all__ = ["BlockStore", "BlockStoreClient"]


class BlockStore:
    """The server side: ``size`` bytes of storage and the handlers that reach them."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.writes_applied = 0

    def _write(self, args: Any, payload: memoryview) -> int:
        (offset,) = args
        if not 0 <= offset <= len(self.data) - len(payload):
            raise ValueError(f"write of {len(payload)} bytes at {offset} outside the store")
        self.data[offset : offset + len(payload)] = payload
        self.writes_applied += 1
        return len(payload)

    def _read(self, args: Any, payload: memoryview) -> memoryview:
        offset, length = args
        if not 0 <= offset <= len(self.data) - length or length < 0:
            raise ValueError(f"read of {length} bytes at {offset} outside the store")
        # Out of band: the reply's bytes go out as a frag, not through the body.
        return memoryview(bytes(self.data[offset : offset + length]))

    def _stats(self, args: Any, payload: memoryview) -> int:
        return self.writes_applied

    def server(self, **kwargs: Any) -> RpcServer:
        return RpcServer({"write": self._write, "read": self._read, "stats": self._stats}, **kwargs)


class BlockStoreClient:
    def __init__(self, client: RpcClient) -> None:
        self.client = client

    async def write(self, offset: int, data: Data) -> int:
        result: int = await self.client.call("write", (offset,), payload=data)
        return result

    async def read(self, offset: int, length: int) -> bytes:
        result = await self.client.call("read", (offset, length))
        return bytes(result)

    async def writes_applied(self) -> int:
        result: int = await self.client.call("stats")
        return result
