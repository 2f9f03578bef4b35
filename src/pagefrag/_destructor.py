"""FragDestructor: the shared, reference-counted destructor of paged fragments.

Kernel counterpart: ``struct skb_frag_destructor`` with ``skb_frag_destructor_ref`` and
``skb_frag_destructor_unref`` from "net: add support for per-paged-fragment destructors".
The count starts at one, the creator's reference; every holder of a page of the
operation adds one; ``destroy(data)`` runs when the count reaches zero, exactly once, in
the thread that dropped the last reference.

Leak detection (``pagefrag.leaks``) costs the disabled level one ``is None`` test per
ref/unref; when enabled, the destructor's one slot ``_track`` holds the
:class:`leaks.Track` that mirrors the count (and, at paranoid, the holders), and every
reference taken or dropped is told to it, so a destructor collected before it fired can
still be reported. All leak bookkeeping lives in ``leaks``.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex, TypeVar

from . import leaks
from ._buffers import as_timeout
from ._unraisable import await_done, report_unraisable
from .errors import DestructorError

__all__ = ["FragDestructor", "PyFragDestructor", "each", "implementation", "report_unraisable"]

DoneCallback = Callable[["FragDestructor"], object]
_INTERRUPTS = (KeyboardInterrupt, SystemExit)
T = TypeVar("T")


def each(fn: Callable[[T], object], items: Iterable[T]) -> None:
    """``fn(item)`` for every item, also when one raises ``KeyboardInterrupt`` or
    ``SystemExit`` (a destructor raises them again after firing, or a signal lands):
    the first is raised once every item had its turn, so a loop that drops references
    already detached never leaves some to nobody. Any other exception stops at once."""
    interrupt: BaseException | None = None
    for item in items:
        try:
            fn(item)
        except _INTERRUPTS as exc:
            if interrupt is None:
                interrupt = exc
    if interrupt is not None:
        raise interrupt


class FragDestructor:
    """A destructor shared by the pages of one higher-level operation.

    Kernel counterpart: ``struct skb_frag_destructor``. Created holding one reference,
    the creator's; the creator drops it with :meth:`unref` once every page is handed
    over. Awaitable (``await d``) from any event loop, whichever thread fires it.
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_dead",
        "_destroy",
        "_done",
        "_event",
        "_lock",
        "_refcount",
        "_track",
        "data",
        "name",
    )

    def __init__(
        self,
        destroy: Callable[[Any], object] | None = None,
        data: Any = None,
        *,
        name: str | None = None,
    ) -> None:
        if destroy is not None and not callable(destroy):
            raise TypeError(f"destroy must be callable or None, not {type(destroy).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self._destroy = destroy
        self.data = data
        self.name = name
        self._lock = threading.Lock()
        self._refcount = 1
        self._dead = False  # count reached zero: no ref() may succeed any more
        self._done = False  # destroy(data) has returned (or raised)
        self._event: threading.Event | None = None
        self._callbacks: list[DoneCallback] = []
        self._track: leaks.Track | None = None
        if leaks.enabled:
            label = f"<FragDestructor{f' {name!r}' if name else ''} at {id(self):#x}>"
            self._track = leaks.track(self, label)

    # -- references ---------------------------------------------------------------
    def ref(self, *, holder: object | None = None) -> None:
        """Take one more reference. Kernel: ``skb_frag_destructor_ref``.

        ``holder`` names who holds it, for leak reports. Raises
        :class:`DestructorError` (and changes nothing) once the destructor has fired.
        Refs: +1."""
        track = self._track
        if track is None:  # leak detection off: the hot path
            with self._lock:
                if self._dead:
                    raise DestructorError(f"ref() on {self!r}, which has already been destroyed")
                self._refcount += 1
            return
        # Recorded before taking the lock: nothing that can run the garbage collector (and
        # with it a finalizer that wants this lock) runs while it is held; hold() only files.
        entry = track.record(holder)
        with self._lock:
            if self._dead:
                raise DestructorError(f"ref() on {self!r}, which has already been destroyed")
            self._refcount += 1
            track.hold(entry)

    def unref(self, *, holder: object | None = None) -> None:
        """Drop one reference; the last one runs ``destroy(data)`` in this thread.
        Kernel: ``skb_frag_destructor_unref``.

        Raises :class:`DestructorError` (and changes nothing) when no reference is
        left. Refs: -1."""
        with self._lock:
            if self._refcount <= 0:
                raise DestructorError(f"unref() on {self!r} with no reference left")
            self._refcount -= 1
            track = self._track
            if track is not None:  # one test when leak detection is off
                track.forget(holder)  # allocates nothing the collector tracks
                if not self._refcount:
                    track.close()  # fires now: no leak
            if self._refcount:
                return
            self._dead = True
        self._fire()

    def _fire(self) -> None:
        # Ctrl-C or SystemExit inside destroy or a callback is raised again once the
        # firing is complete (as asyncio's Handle does), never swallowed; any other
        # exception goes to sys.unraisablehook.
        interrupt: BaseException | None = None
        if self._destroy is not None:
            try:
                self._destroy(self.data)
            except _INTERRUPTS as exc:
                interrupt = exc
            except BaseException as exc:
                report_unraisable(exc, f"Exception ignored in destroy of {self!r}", self._destroy)
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
            if self._event is not None:
                self._event.set()
        for cb in callbacks:
            raised = self._run_callback(cb)
            if interrupt is None:
                interrupt = raised
        if interrupt is not None:
            raise interrupt

    def _run_callback(self, cb: DoneCallback) -> BaseException | None:
        """Run ``cb(self)``; returns a KeyboardInterrupt or SystemExit it raised (for
        the caller to raise again), reports any other exception."""
        try:
            cb(self)
        except _INTERRUPTS as exc:
            return exc
        except BaseException as exc:
            report_unraisable(exc, f"Exception ignored in done callback of {self!r}", cb)
        return None

    # -- state --------------------------------------------------------------------
    @property
    def refcount(self) -> int:
        """References currently held (kernel: ``atomic_read(&destroy->ref)``)."""
        return self._refcount

    @property
    def done(self) -> bool:
        """True once ``destroy(data)`` has run."""
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the destructor has fired; False if ``timeout`` ran out first.

        Refs: none."""
        timeout = as_timeout(timeout)
        with self._lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def add_done_callback(self, fn: DoneCallback) -> None:
        """Call ``fn(self)`` after ``destroy`` ran, in the thread that fired it; at
        once (in this thread) when it already has. ``fn`` must be callable (TypeError
        at once, not when it fires).

        Refs: none."""
        if not callable(fn):
            raise TypeError(f"a done callback must be callable, not {type(fn).__name__}")
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        interrupt = self._run_callback(fn)
        if interrupt is not None:
            raise interrupt

    def remove_done_callback(self, fn: DoneCallback) -> bool:
        """Forget a callback that has not run yet; True if it was found."""
        with self._lock:
            try:
                self._callbacks.remove(fn)
            except ValueError:
                return False
            return True

    def __await__(self) -> Generator[Any, None, None]:
        return await_done(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        """Refused, as the compiled class refuses it: a copy would share the lock and
        the callbacks but count on its own, and ``destroy`` would run twice."""
        raise TypeError(f"cannot pickle or copy {type(self).__qualname__!r} object")

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        state = "done" if self._done else f"refcount={self._refcount}"
        return f"<FragDestructor{label} {state} at {id(self):#x}>"


# The pure-Python class above is the reference implementation; the compiled one
# (pagefrag._speedups, Cython) has the same API and guarantees and is checked against it
# step by step (tests/test_speedups.py). The choice is made here, once, at import: every
# module imports FragDestructor from here and so gets the same class, which keeps
# ``isinstance(x, FragDestructor)`` and the ``type(d) is FragDestructor`` fast path true.
PyFragDestructor = FragDestructor

SPEEDUPS_API = 3
"""The version of the compiled core's contents this source expects (its ``API``): a
build left from older sources (an editable checkout not rebuilt) is not used."""


def _compiled() -> Any:
    """The compiled core, or None (with one warning when one exists but cannot serve)."""
    try:
        from . import _speedups
    except ImportError as exc:
        if exc.name != f"{__package__}._speedups":  # built, but it does not load
            warnings.warn(
                f"pagefrag: the compiled core does not load ({exc}); using the pure-Python core",
                RuntimeWarning,
                stacklevel=3,
            )
        return None  # not built (no compiler at install): the pure core
    if getattr(_speedups, "API", None) != SPEEDUPS_API:
        warnings.warn(
            "pagefrag: the compiled core was built from other sources (rebuild it: "
            "pip install -e .); using the pure-Python core",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _speedups


implementation = "python"
if not TYPE_CHECKING and os.environ.get("PAGEFRAG_PURE_PYTHON", "") in ("", "0"):
    _core = _compiled()
    if _core is not None:
        FragDestructor = _core.FragDestructor
        implementation = "compiled"
