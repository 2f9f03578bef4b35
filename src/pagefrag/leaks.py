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

How it is used (Netty's ``ResourceLeakDetector.track`` / ``ResourceLeakTracker``; the
kernel's ``lib/ref_tracker.c`` does the same for ``netdev`` references): an object that
counts references asks :func:`track` for a :class:`Track` when it is created (``None``
when detection is disabled: its hot paths then test one ``is None``) and tells it every
reference taken (:meth:`Track.record` before taking its own lock, :meth:`Track.hold` under
it), every reference dropped (:meth:`Track.forget`, under it) and when it fired
(:meth:`Track.close`). The detector lists tracked objects for :func:`report` and reports
one collected before its track was closed. It imports nothing from the rest of pagefrag.
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
from typing import Any

__all__ = [
    "Level",
    "HolderRecord",
    "LeakRecord",
    "Track",
    "track",
    "snapshot",
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


Entry = tuple[int, HolderRecord]
"""One reference recorded at ``paranoid``: the ``id`` of its holder and its record."""


class Track:
    """What the detector keeps about one tracked object, apart from the object itself, so
    that one collected before it fired can still be reported. Netty:
    ``ResourceLeakTracker``; kernel: a ``ref_tracker_dir`` with one ``ref_tracker`` per
    reference (``lib/ref_tracker.c``).

    It mirrors the object's count: it starts at one (the creator's reference) and the
    object calls :meth:`hold` and :meth:`forget` under its own lock, in the order of its
    own count changes, so the mirror and the holders match the count at every moment.
    Those two allocate nothing the garbage collector tracks: a collection (and with it a
    finalizer that wants the object's lock) cannot start while that lock is held."""

    __slots__ = ("closed", "created_at", "label", "records", "refcount")

    def __init__(self, label: str, created_at: str, with_holders: bool) -> None:
        self.label = label
        self.created_at = created_at
        self.refcount = 1
        self.closed = False
        # One entry per reference held, oldest first, at paranoid only.
        self.records: list[Entry] | None = [] if with_holders else None

    def record(self, holder: object | None) -> Entry | None:
        """Who takes a reference and the stack taking it (``None`` below ``paranoid``):
        built here, before the object takes its lock, and filed by :meth:`hold`. Netty:
        ``ResourceLeakTracker.record(hint)``; kernel: the stack ``ref_tracker_alloc``
        saves. ``holder`` ``None`` is the creator.

        Refs: none (only describes one)."""
        if self.records is None:
            return None
        return (
            id(holder),
            HolderRecord(
                holder="creator" if holder is None else repr(holder),
                site=call_site(),
                stack=call_stack(),
            ),
        )

    def hold(self, entry: Entry | None) -> None:
        """A reference was taken: count it and file ``entry`` (from :meth:`record`).
        Called under the object's lock. Kernel: ``ref_tracker_alloc``.

        Refs: none (mirrors the object's +1)."""
        self.refcount += 1
        if entry is not None:
            self.records.append(entry)  # type: ignore[union-attr]

    def forget(self, holder: object | None) -> None:
        """A reference was dropped: uncount it and forget ``holder``'s oldest record, or
        the oldest record of all when ``holder`` has none. Called under the object's
        lock; allocates nothing the collector tracks. Kernel: ``ref_tracker_free``.

        Refs: none (mirrors the object's -1)."""
        self.refcount -= 1
        records = self.records
        if records is None:
            return
        holder_id = id(holder)
        for i in range(len(records)):
            if records[i][0] == holder_id:
                del records[i]
                return
        if records:
            del records[0]

    def close(self) -> None:
        """The object fired (its count reached zero): nothing leaked, whenever it is
        collected. Netty: ``ResourceLeakTracker.close()``; kernel:
        ``ref_tracker_dir_exit`` finding no tracker left.

        Refs: none."""
        self.closed = True

    def holders(self) -> tuple[HolderRecord, ...]:
        """The references recorded now, oldest first (empty below ``paranoid``).

        Refs: none."""
        # list() of a list is one atomic step under the GIL: a snapshot without the
        # object's lock, which a report from inside a finalizer might find held.
        return tuple(r for _, r in list(self.records or ()))

    def snapshot(
        self, name: str, kind: str = KIND_LIVE, created_at: str | None = None
    ) -> LeakRecord | None:
        """A :class:`LeakRecord` of the tracked object as it is now, named ``name``;
        ``None`` once closed. Kernel: one entry of ``ref_tracker_dir_print``.

        Refs: none."""
        if self.closed:
            return None
        refcount = self.refcount
        created = self.created_at if created_at is None else created_at
        return LeakRecord(name, refcount, created, self.holders(), kind)


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
# Tracked object -> its track (the object weakly: the dictionary keeps nothing alive).
_live: weakref.WeakKeyDictionary[Any, Track] = weakref.WeakKeyDictionary()
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


def track(obj: object, label: str) -> Track | None:
    """Start tracking ``obj`` (weak-referenceable, hashed by identity) for its creator,
    who holds its first reference; ``None`` when detection is disabled. ``label`` names
    it in reports once it is gone. While it lives it is listed by :func:`report` until
    its track is closed; collected before that, it is reported (a ``ResourceWarning``
    and a record in :func:`collected`). Netty: ``ResourceLeakDetector.track(obj)``;
    kernel: ``ref_tracker_dir_init``.

    Refs: none (the creator's reference is recorded, not taken)."""
    if not enabled:
        return None
    t = Track(label, call_site(), paranoid)
    entry = t.record(None)
    if entry is not None:
        # Filed under id 0, which no holder has: the creator's record is forgotten only
        # as the oldest, by an unnamed drop that matches no other record.
        t.records.append((0, entry[1]))  # type: ignore[union-attr]
    with _live_lock:
        _live[obj] = t
    # The finalizer holds the track, never the object: it cannot keep it alive.
    weakref.finalize(obj, _collected_unfired, t).atexit = False
    return t


def _collected_unfired(track: Track) -> None:
    if track.closed:
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


def snapshot(
    obj: object, kind: str = KIND_LIVE, created_at: str | None = None
) -> LeakRecord | None:
    """The record of a tracked ``obj`` as it is now (named by its ``repr``); ``None`` if
    it is not tracked or its track is closed. ``created_at`` replaces the creation site
    (a pool buffer is reported where it was acquired).

    Refs: none."""
    t = _live.get(obj)
    return None if t is None else t.snapshot(repr(obj), kind, created_at)


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
    """Every tracked destructor that has not fired, with its holders (``paranoid``)."""
    with _live_lock:
        tracked = list(_live.items())
    records = [r for r in (t.snapshot(repr(obj)) for obj, t in tracked) if r is not None]
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
