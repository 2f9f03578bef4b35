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

At ``simple`` and ``paranoid``, a destructor garbage-collected while it still counts
references (its ``destroy`` can never run now) is reported as Netty reports a buffer
"not released before it's garbage-collected": a ``ResourceWarning`` naming where it was
created (and, at ``paranoid``, the holders still recorded), and a record kept for
:func:`collected`. A ``PoolBuffer`` dropped without ``release()`` is recorded there too.
Python hides ``ResourceWarning`` unless asked (``-W default``, ``python -X dev``):
:func:`collected` is the place to look.

This module only stores records; the objects it watches call into it. It imports
nothing from the rest of pagefrag.
"""

from __future__ import annotations

import collections
import enum
import os
import sys
import threading
import traceback
import warnings
import weakref
from dataclasses import dataclass
from types import CodeType
from typing import Protocol

__all__ = [
    "Level",
    "HolderRecord",
    "LeakRecord",
    "set_level",
    "get_level",
    "report",
    "collected",
    "clear_collected",
    "format_report",
    "KIND_LIVE",
    "KIND_COLLECTED",
    "KIND_POOL_BUFFER",
]

KIND_LIVE = "live"
KIND_COLLECTED = "FragDestructor garbage-collected before it fired"
KIND_POOL_BUFFER = "PoolBuffer garbage-collected without release()"

COLLECTED_KEPT = 1000
"""How many records :func:`collected` keeps (the oldest are forgotten first)."""


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
    """A destructor that has not fired yet (``kind`` :data:`KIND_LIVE`, from
    :func:`report`), or one of :func:`collected`: a destructor collected before it fired
    (:data:`KIND_COLLECTED`) or a pool buffer dropped without ``release()``
    (:data:`KIND_POOL_BUFFER`; ``created_at`` is where it was acquired). ``refcount`` and
    ``holders`` are as they were at that moment."""

    destructor: str
    refcount: int
    created_at: str
    holders: tuple[HolderRecord, ...]
    kind: str = KIND_LIVE


class Track:
    """What the detector keeps about one watched destructor, apart from the destructor
    itself, so that one collected before it fired can still be reported. The destructor
    updates ``refcount`` and ``records`` under its own lock."""

    __slots__ = ("created_at", "label", "records", "refcount")

    def __init__(self, label: str, created_at: str, with_holders: bool) -> None:
        self.label = label
        self.created_at = created_at
        self.refcount = 1
        # (id(holder), record) per reference held, at paranoid only.
        self.records: list[tuple[int, HolderRecord]] | None = [] if with_holders else None

    def holders(self) -> tuple[HolderRecord, ...]:
        return tuple(r for _, r in self.records or ())


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
# Appended to from finalizers (any thread, inside the garbage collector): a deque's
# append is atomic and takes no lock that the interrupted code could hold.
_collected: collections.deque[LeakRecord] = collections.deque(maxlen=COLLECTED_KEPT)
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def set_level(level: Level | str) -> None:
    """Switch leak detection on or off. Objects created while it was off stay
    unwatched; raising the level affects objects created from now on."""
    global _level, enabled, paranoid
    if not isinstance(level, (Level, str)):
        raise TypeError(f"level must be a Level or its name, not {type(level).__name__}")
    _level = Level(level) if isinstance(level, str) else level
    enabled = _level is not Level.DISABLED
    paranoid = _level is Level.PARANOID


def get_level() -> Level:
    return _level


# co_filename -> whether it is one of pagefrag's own files (site() runs on every
# BufferPool.acquire, not only with leak detection on: keep it cheap).
_in_pkg: dict[str, bool] = {}


def _is_pkg_file(filename: str) -> bool:
    inside = _in_pkg.get(filename)
    if inside is None:
        inside = _in_pkg[filename] = os.path.dirname(filename).startswith(_PKG_DIR)
    return inside


Site = tuple[CodeType, int] | None
"""A call site not yet formatted (:func:`site`): cheap to take, formatted on report."""


def site() -> Site:
    """The code and line of the nearest frame outside pagefrag itself, to be formatted by
    :func:`format_site` only if it is ever reported."""
    frame = sys._getframe(1)
    while frame is not None and _is_pkg_file(frame.f_code.co_filename):
        frame = frame.f_back  # type: ignore[assignment]
    return None if frame is None else (frame.f_code, frame.f_lineno)


def format_site(where: Site) -> str:
    """``file:line in function`` of a :func:`site`."""
    if where is None:
        return "<unknown>"
    code, line = where
    return f"{code.co_filename}:{line} in {code.co_name}"


def call_site() -> str:
    """``file:line in function`` of the nearest frame outside pagefrag itself."""
    frame = sys._getframe(1)
    while frame is not None and _is_pkg_file(frame.f_code.co_filename):
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


def watch(obj: Watched, track: Track) -> None:
    """List ``obj`` in :func:`report` while it lives, and report it if it is collected
    while ``track`` still counts references."""
    with _live_lock:
        _live.add(obj)
    # The finalizer holds the track, never the object: it cannot keep it alive.
    weakref.finalize(obj, _collected_unfired, track).atexit = False


def _collected_unfired(track: Track) -> None:
    if track.refcount <= 0:
        return  # fired: nothing leaked
    rec = LeakRecord(track.label, track.refcount, track.created_at, track.holders(), KIND_COLLECTED)
    note_collected(rec)
    lines = [
        f"LEAK: {track.label} created at {track.created_at} was garbage-collected holding "
        f"{track.refcount} reference(s); its destroy will never run"
    ]
    lines.extend(f"    still held by {h.holder}, taken at {h.site}" for h in rec.holders)
    # stacklevel 1: a finalizer has no caller worth naming; the site is in the text.
    warnings.warn("\n".join(lines), ResourceWarning, stacklevel=1)


def note_collected(record: LeakRecord) -> None:
    """Keep ``record`` for :func:`collected` (called by the objects watched)."""
    _collected.append(record)


def collected() -> list[LeakRecord]:
    """What was garbage-collected still holding references, oldest first: destructors
    collected before they fired, pool buffers dropped without ``release()``. Kept until
    :func:`clear_collected` (at most :data:`COLLECTED_KEPT`)."""
    return list(_collected)


def clear_collected() -> None:
    """Forget the records of :func:`collected`."""
    _collected.clear()


def report() -> list[LeakRecord]:
    """Every watched destructor that has not fired, with its holders (``paranoid``)."""
    with _live_lock:
        watched = list(_live)
    records = [r for r in (w._leak_record() for w in watched) if r is not None]
    return sorted(records, key=lambda r: r.created_at)


def format_report(records: list[LeakRecord] | None = None) -> str:
    """A readable text of ``records``; by default of :func:`report` followed by
    :func:`collected`."""
    if records is None:
        records = report() + collected()
    if not records:
        return "no live destructors"
    lines = []
    for r in records:
        where = "acquired" if r.kind == KIND_POOL_BUFFER else "created"
        note = "" if r.kind == KIND_LIVE else f" [{r.kind}]"
        lines.append(f"{r.destructor}: refcount {r.refcount}, {where} at {r.created_at}{note}")
        for h in r.holders:
            lines.append(f"    held by {h.holder}, taken at {h.site}")
    return "\n".join(lines)
