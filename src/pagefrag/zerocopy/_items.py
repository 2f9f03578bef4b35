"""The input of ``send_many``, checked once for both zero-copy backends."""

from __future__ import annotations

from collections.abc import Sequence

from .._destructor import FragDestructor
from .._iov import Data, IoVec, check_destructor
from ._syscalls import IOV_MAX

__all__ = ["batch_destructors", "datagram_iovecs", "stream_iovec"]


def batch_destructors(
    items: Sequence[Data], destructors: Sequence[FragDestructor | None] | None
) -> tuple[list[Data], list[FragDestructor | None]]:
    """``items`` and ``destructors`` as lists of the same length, checked: TypeError or
    ValueError before anything is sent."""
    if isinstance(items, (bytes, bytearray, memoryview)):
        raise TypeError("send_many takes a sequence of items, not one buffer: use send()")
    listed = list(items)
    if destructors is None:
        return listed, [None] * len(listed)
    ds = list(destructors)
    if len(ds) != len(listed):
        raise ValueError(f"{len(ds)} destructors for {len(listed)} items")
    for d in ds:
        if d is not None and type(d) is not FragDestructor:
            check_destructor(d)
    return listed, ds


def stream_iovec(items: list[Data], ds: list[FragDestructor | None]) -> IoVec:
    """All the items' bytes, in order, as one iovec; ``ds[i]`` owns the pieces of
    ``items[i]`` (such an item must be plain memory: ValueError)."""
    views: list[memoryview] = []
    owners: list[FragDestructor | None] = []
    for item, d in zip(items, ds, strict=True):
        iov = IoVec.of(item)
        if d is not None:
            if any(iov.owners):
                raise ValueError(
                    "on a stream, an item with destructors of its own (Frag, SkBuff, "
                    "PoolBuffer) cannot carry another: send it with sendall()"
                )
            iov.owners = [d] * len(iov.views)
        views += iov.views
        owners += iov.owners
    return IoVec(views, owners)


def datagram_iovecs(items: list[Data]) -> list[IoVec]:
    """One iovec per datagram; ValueError for one of more pieces than a call takes."""
    iovs = [IoVec.of(item) for item in items]
    for iov in iovs:
        if len(iov.views) > IOV_MAX:
            raise ValueError(
                f"a datagram of {len(iov.views)} pieces: one sendmsg takes at most {IOV_MAX}"
            )
    return iovs
