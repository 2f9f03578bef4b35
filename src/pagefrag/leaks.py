"""Leak detection for destructors and socket buffers, modelled on Netty's
``ResourceLeakDetector``.

Levels (environment variable ``PAGEFRAG_LEAK_DETECTION`` or :func:`set_level`):

``disabled`` (default)
    Nothing is recorded. An skb collected without ``free()`` still warns and still
    releases its references: no leak is permanent.
``simple``
    Records where every destructor and skb was created (one stack frame). Live
    destructors are listed by :func:`report`.
``paranoid``
    Also records every reference taken on a destructor: which holder took it and the
    call stack that took it. :func:`report` names every holder still holding one.

This module only stores records; the objects it watches call into it. It imports
nothing from the rest of pagefrag.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Level",
    "HolderRecord",
    "LeakRecord",
    "set_level",
    "get_level",
    "report",
    "format_report",
]


class Level(enum.Enum):
    DISABLED = "disabled"
    SIMPLE = "simple"
    PARANOID = "paranoid"


@dataclass(frozen=True)
class HolderRecord:
    """One reference still held: by whom, and the stack that took it."""

    holder: str
    site: str
    stack: tuple[str, ...]


@dataclass(frozen=True)
class LeakRecord:
    """A destructor that has not fired yet."""

    destructor: str
    refcount: int
    created_at: str
    holders: tuple[HolderRecord, ...]


class Watched(Protocol):
    """What a watched destructor tells the detector about itself."""

    def _leak_record(self) -> LeakRecord | None: ...


def _level_from_env() -> Level:
    raw = os.environ.get("PAGEFRAG_LEAK_DETECTION", "disabled").strip().lower()
    try:
        return Level(raw or "disabled")
    except ValueError:
        return Level.DISABLED


_level = _level_from_env()
# Read on hot paths (every ref/unref): plain module globals, no lock.
enabled = _level is not Level.DISABLED
paranoid = _level is Level.PARANOID
_live: weakref.WeakSet[Watched] = weakref.WeakSet()
_live_lock = threading.Lock()
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def set_level(level: Level | str) -> None:
    """Switch leak detection on or off. Objects created while it was off stay
    unwatched; raising the level affects objects created from now on."""
    global _level, enabled, paranoid
    _level = Level(level) if isinstance(level, str) else level
    enabled = _level is not Level.DISABLED
    paranoid = _level is Level.PARANOID


def get_level() -> Level:
    return _level


def call_site() -> str:
    """``file:line in function`` of the nearest frame outside pagefrag itself."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(frame.f_code.co_filename).startswith(_PKG_DIR):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def call_stack(limit: int = 12) -> tuple[str, ...]:
    """The caller's stack, innermost last, without pagefrag's own frames."""
    frames = traceback.extract_stack(sys._getframe(1), limit=limit + 8)
    return tuple(
        f"{f.filename}:{f.lineno} in {f.name}"
        for f in frames
        if not os.path.dirname(os.path.abspath(f.filename)).startswith(_PKG_DIR)
    )[-limit:]


def watch(obj: Watched) -> None:
    with _live_lock:
        _live.add(obj)


def report() -> list[LeakRecord]:
    """Every watched destructor that has not fired, with its holders (``paranoid``)."""
    with _live_lock:
        watched = list(_live)
    records = [r for r in (w._leak_record() for w in watched) if r is not None]
    return sorted(records, key=lambda r: r.created_at)


def format_report(records: list[LeakRecord] | None = None) -> str:
    """A readable text of :func:`report`."""
    records = report() if records is None else records
    if not records:
        return "no live destructors"
    lines = []
    for r in records:
        lines.append(f"{r.destructor}: refcount {r.refcount}, created at {r.created_at}")
        for h in r.holders:
            lines.append(f"    held by {h.holder}, taken at {h.site}")
    return "\n".join(lines)
