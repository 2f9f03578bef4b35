"""The memory the benchmark sends from: one page-aligned 256 MiB buffer per process,
allocated once, cut into slices that the runners cycle through.

Why: a buffer sent again and again stays in the CPU caches, so copying it is cheap and
zero-copy looks useless; real programs send different memory each time. Each send
takes the next slice (a memoryview) of the working set, wrapping to the start when the
next slice would not fit. ``hot`` reuses the first slice for every send (the old
benchmark). The C anchor (benchmarks/zc_anchor.c) cycles the same way over its own
buffer of the same size and alignment.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

WORKSET_BYTES = 256 << 20
PAGE = 4096
HOT = "hot"
COLD = "256MiB"
WORKSETS = (COLD, HOT)


@dataclass(frozen=True)
class Work:
    """What one cell sends: ``views`` cycled in order, each ``size`` bytes, spanning
    ``workset`` bytes of distinct memory."""

    views: list[memoryview]
    size: int
    workset: int
    name: str


_buffer: memoryview | None = None
_cache: dict[tuple[int, str], Work] = {}


def _aligned() -> memoryview:
    """The process's working-set buffer (allocated and written on first use), its
    first byte on a page boundary as the C anchor's."""
    global _buffer
    if _buffer is None:
        # bytearray * n writes every page: real memory, not the shared zero page.
        raw = bytearray(b"\x5a") * (WORKSET_BYTES + PAGE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
        pad = -address % PAGE
        _buffer = memoryview(raw)[pad : pad + WORKSET_BYTES]
    return _buffer


def work(size: int, name: str) -> Work:
    """The slices for sends of ``size`` bytes from working set ``name`` (:data:`COLD`
    or :data:`HOT`); made once per process and size."""
    if name not in WORKSETS:
        raise ValueError(f"working set must be one of {WORKSETS}, not {name!r}")
    if not 0 < size <= WORKSET_BYTES:
        raise ValueError(f"size must be between 1 and {WORKSET_BYTES}, not {size}")
    key = (size, name)
    if key not in _cache:
        buf = _aligned()
        if name == HOT:
            _cache[key] = Work([buf[:size]], size, size, name)
        else:
            views = [buf[i : i + size] for i in range(0, WORKSET_BYTES - size + 1, size)]
            _cache[key] = Work(views, size, WORKSET_BYTES, name)
    return _cache[key]
