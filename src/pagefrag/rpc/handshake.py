"""The connection opening of pagefrag.rpc. Sans-I/O: bytes in, bytes and verdicts out.

Rule: everything a peer learns before the first record lives here — the server's hello
(which codec it speaks, the largest record it accepts) and the optional mutual HMAC
challenge. Nothing here decodes a message body.

    server -> client  hello: !8sBBHQ  magic, codec id, flags (1: authenticate), 0,
                              max_record; then, with flag 1, a 32-byte random challenge
    client -> server  HMAC-SHA256(key, "pagefrag-rpc client" + hello + challenge),
                      then the client's own 32-byte challenge
    server -> client  HMAC-SHA256(key, "pagefrag-rpc server" + client challenge)

Either side that gets a wrong digest closes the connection; the server never decodes a
record from a peer that did not answer, so with ``codec="pickle"`` nothing is unpickled
before authentication. The two roles use different prefixes, so a digest cannot be
reflected back. The scheme is the one of ``multiprocessing.connection`` (challenge,
digest, constant-time compare), mutual, with SHA-256 and 32-byte nonces.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from ..errors import AuthenticationError

__all__ = [
    "AUTHENTICATE",
    "DIGEST_SIZE",
    "HELLO",
    "NONCE_SIZE",
    "answer",
    "challenge",
    "check_key",
    "hello",
    "parse_hello",
    "verify",
]

MAGIC = b"PFRPC/1\n"
HELLO = struct.Struct("!8sBBHQ")
AUTHENTICATE = 1
NONCE_SIZE = 32
DIGEST_SIZE = hashlib.sha256().digest_size
CLIENT, SERVER = b"pagefrag-rpc client", b"pagefrag-rpc server"


def check_key(authkey: object) -> bytes | None:
    """``authkey`` as given (bytes, at least 16 of them) or None; anything else raises."""
    if authkey is None:
        return None
    if not isinstance(authkey, (bytes, bytearray)):
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
    if len(authkey) < 16:
        raise ValueError("authkey must hold at least 16 bytes (use os.urandom(32))")
    return bytes(authkey)


def challenge() -> bytes:
    return os.urandom(NONCE_SIZE)


def hello(codec_id: int, max_record: int, nonce: bytes | None) -> bytes:
    flags = AUTHENTICATE if nonce is not None else 0
    return HELLO.pack(MAGIC, codec_id, flags, 0, max_record) + (nonce or b"")


def parse_hello(data: bytes) -> tuple[int, int, int]:
    """``(codec_id, flags, max_record)`` of a hello's fixed part."""
    magic, codec_id, flags, _, max_record = HELLO.unpack(data)
    if magic != MAGIC:
        raise AuthenticationError(f"not a pagefrag.rpc server (greeting {magic!r})")
    return codec_id, flags, max_record


def answer(key: bytes, role_is_client: bool, message: bytes) -> bytes:
    return hmac.new(key, (CLIENT if role_is_client else SERVER) + message, "sha256").digest()


def verify(key: bytes, role_is_client: bool, message: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(answer(key, role_is_client, message), digest)
