"""RPC whose calls complete only when their pages are released (the sunrpc use case of
the seed patch): ONC-style record marking, xids, retransmission by reconnecting, pickle
protocol 5 with out-of-band buffers as zero-copy frags."""

from .blockstore import BlockStore, BlockStoreClient
from .client import RemoteError, RpcClient, RpcError, RpcTimeout
from .record import RecordError, RecordReader
from .server import RpcServer

__all__ = [
    "BlockStore",
    "BlockStoreClient",
    "RecordError",
    "RecordReader",
    "RemoteError",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "RpcTimeout",
]
