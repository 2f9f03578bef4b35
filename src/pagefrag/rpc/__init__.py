"""RPC whose calls complete only when their pages are released (the sunrpc use case of
the seed patch): ONC-style record marking, xids, retransmission by reconnecting, a
restricted self-describing codec (safe for untrusted peers) with out-of-band buffers as
zero-copy frags, and full pickle only between peers that share an HMAC key."""

from ..errors import AuthenticationError, BufferInUseError, CodecError, RecordTooLargeError
from .blockstore import BlockStore, BlockStoreClient
from .client import RemoteError, RpcClient, RpcError, RpcTimeout
from .codec import Codec, PickleCodec, SafeCodec, TypeRegistry
from .record import RecordError, RecordReader
from .server import RpcServer

__all__ = [
    "AuthenticationError",
    "BlockStore",
    "BlockStoreClient",
    "BufferInUseError",
    "Codec",
    "CodecError",
    "PickleCodec",
    "RecordError",
    "RecordReader",
    "RecordTooLargeError",
    "RemoteError",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "RpcTimeout",
    "SafeCodec",
    "TypeRegistry",
]
