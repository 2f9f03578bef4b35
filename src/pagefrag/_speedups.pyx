# cython: language_level=3, embedsignature=True, binding=False
"""The compiled core of pagefrag (Cython): :class:`FragDestructor`.

The pure-Python class in ``pagefrag._destructor`` is the reference implementation; this
one has the same API and the same guarantees (exactly-once firing in the thread that
dropped the last reference, destroy exceptions to ``sys.unraisablehook``, done callbacks,
``wait``, awaitable from any loop) and is compared with it step by step by
``tests/test_speedups.py``. ``pagefrag._destructor`` picks one of the two at import.

Thread safety without a lock (CPython with a GIL): a thread switch, and a signal handler,
happen only at bytecode boundaries or inside code that calls back into Python. A
read-modify-write done here in C with no Python call and no allocation of a
garbage-collected object in between (an allocation can start a collection, which runs
finalizers, which are Python code) is therefore atomic with respect to other threads and
to signal handlers. ref/unref without leak tracking are such steps. Where Python code
must run inside the step (``leaks.Track``'s hold/forget, at an enabled leak level) a
lock is taken, as in the pure-Python class; destroy and the callbacks run after the state
they depend on is final.
"""

import threading

from pagefrag import leaks
from pagefrag._buffers import as_timeout
from pagefrag._unraisable import await_done, report_unraisable
from pagefrag.errors import DestructorError

# leaks.enabled read straight from the module's dict (set_level rebinds it there): one
# dict lookup per creation instead of a module attribute lookup (measured: ~12 % of
# create+ref+unref+fire).
cdef dict _leaks_globals = leaks.__dict__

cimport cython


@cython.freelist(32)
@cython.auto_pickle(False)
cdef class FragDestructor:
    """A destructor shared by the pages of one higher-level operation.

    Kernel counterpart: ``struct skb_frag_destructor``. Created holding one reference,
    the creator's; the creator drops it with :meth:`unref` once every page is handed
    over. Awaitable (``await d``) from any event loop, whichever thread fires it.
    """

    cdef object _destroy
    cdef public object data
    cdef public object name
    cdef Py_ssize_t _refcount
    cdef readonly bint _dead  # count reached zero: no ref() may succeed any more
    cdef bint _done  # destroy(data) has returned (or raised)
    cdef object _event  # threading.Event, made by the first wait() that blocks
    cdef list _cbs  # None until the first callback is added, and again once fired
    # threading.Lock: made at creation when leak tracking is on (_track set), or on
    # demand by the _lock property; once it exists, ref/unref take it.
    cdef object _tlock
    cdef readonly object _track
    cdef object __weakref__

    def __init__(self, destroy=None, data=None, *, name=None):
        if destroy is not None and not callable(destroy):
            raise TypeError(f"destroy must be callable or None, not {type(destroy).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self._destroy = destroy
        self.data = data
        self.name = name
        self._refcount = 1
        if _leaks_globals["enabled"]:
            self._tlock = threading.Lock()
            label = f"<FragDestructor{f' {name!r}' if name else ''} at {id(self):#x}>"
            self._track = leaks.track(self, label)

    # -- references ---------------------------------------------------------------
    def ref(self, *, holder=None):
        """Take one more reference. Kernel: ``skb_frag_destructor_ref``.

        ``holder`` names who holds it, for leak reports. Raises
        :class:`DestructorError` (and changes nothing) once the destructor has fired.
        Refs: +1."""
        lock = self._tlock
        if lock is None:
            # Leak detection off: the hot path. The test and the increment are one
            # atomic step under the GIL (no Python code between them: see the module).
            if self._dead:
                raise DestructorError(f"ref() on {self!r}, which has already been destroyed")
            self._refcount += 1
            return
        track = self._track
        # Recorded before taking the lock: nothing that can run the garbage collector (and
        # with it a finalizer that wants this lock) runs while it is held; hold() only files.
        entry = track.record(holder) if track is not None else None
        with lock:
            if self._dead:
                raise DestructorError(f"ref() on {self!r}, which has already been destroyed")
            self._refcount += 1
            if track is not None:
                track.hold(entry)

    def unref(self, *, holder=None):
        """Drop one reference; the last one runs ``destroy(data)`` in this thread.
        Kernel: ``skb_frag_destructor_unref``.

        Raises :class:`DestructorError` (and changes nothing) when no reference is
        left. Refs: -1."""
        lock = self._tlock
        if lock is None:
            # One atomic step under the GIL, as in ref(): exactly one thread sees zero.
            if self._refcount <= 0:
                raise DestructorError(f"unref() on {self!r} with no reference left")
            self._refcount -= 1
            if self._refcount:
                return
            self._dead = True
        else:
            # Track.forget/close are Python code (a thread switch may happen inside):
            # the lock keeps the mirror in step with the count.
            with lock:
                if self._refcount <= 0:
                    raise DestructorError(f"unref() on {self!r} with no reference left")
                self._refcount -= 1
                track = self._track
                if track is not None:
                    track.forget(holder)
                    if not self._refcount:
                        track.close()  # fires now: no leak
                if self._refcount:
                    return
                self._dead = True
        self._fire()

    cdef _fire(self):
        if self._destroy is not None:
            try:
                self._destroy(self.data)
            except BaseException as exc:
                report_unraisable(exc, f"Exception ignored in destroy of {self!r}", self._destroy)
        # One atomic step (no allocation, no Python code): a callback added or an event
        # made before it is run or set below; one added after it sees _done.
        self._done = True
        callbacks = self._cbs
        self._cbs = None
        event = self._event
        if event is not None:
            event.set()
        if callbacks is not None:
            # Detached: nobody else can reach this list any more.
            for cb in callbacks:
                self._run_callback(cb)

    cdef _run_callback(self, cb):
        try:
            cb(self)
        except BaseException as exc:
            report_unraisable(exc, f"Exception ignored in done callback of {self!r}", cb)

    # -- state --------------------------------------------------------------------
    @property
    def refcount(self):
        """References currently held (kernel: ``atomic_read(&destroy->ref)``)."""
        return self._refcount

    @property
    def done(self):
        """True once ``destroy(data)`` has run."""
        return self._done

    @property
    def _lock(self):
        # The pure class's lock, for pool.py's finalizer (which must not drop a reference
        # from inside this destructor's locked section) and tests that hold it. Without
        # leak tracking there is none until asked for: then it is made, and from then on
        # ref/unref take it, so whoever holds it excludes them as in the pure class.
        lock = self._tlock
        if lock is None:
            lock = threading.Lock()  # Python code: test again before filing it
            if self._tlock is None:
                self._tlock = lock
            lock = self._tlock
        return lock

    @property
    def _callbacks(self):
        # A copy of the callbacks not run yet, as the pure class's list (for tests).
        return list(self._cbs) if self._cbs is not None else []

    def wait(self, timeout=None):
        """Block until the destructor has fired; False if ``timeout`` ran out first.

        Refs: none."""
        timeout = as_timeout(timeout)
        if self._done:
            return True
        event = self._event
        if event is None:
            event = threading.Event()  # Python code: another thread may fire meanwhile
            if self._event is None:
                self._event = event  # one step with the test: _fire sets it or...
            else:
                event = self._event
        if self._done:  # ...it fired before the event was filed
            return True
        return event.wait(timeout)

    def add_done_callback(self, fn):
        """Call ``fn(self)`` after ``destroy`` ran, in the thread that fired it; at
        once (in this thread) when it already has. ``fn`` must be callable (TypeError
        at once, not when it fires).

        Refs: none."""
        cdef list new
        if not callable(fn):
            raise TypeError(f"a done callback must be callable, not {type(fn).__name__}")
        while not self._done:
            callbacks = self._cbs
            if callbacks is not None:
                # The test of _done, the read and the append are one atomic step
                # (growing a list allocates no collected object).
                (<list>callbacks).append(fn)
                return
            new = [fn]  # may start a collection (Python code): test again
            if self._cbs is None and not self._done:
                self._cbs = new
                return
        self._run_callback(fn)

    def remove_done_callback(self, fn):
        """Forget a callback that has not run yet; True if it was found."""
        cdef Py_ssize_t j
        # list.remove's order and test (identity, then ==), but ``==`` may run Python
        # code, during which other threads may change the list: the search runs on a
        # snapshot (a shift cannot make it skip one), and the object found is deleted by
        # identity, the find and the delete one atomic step. Removed meanwhile by
        # another thread: search again.
        while True:
            callbacks = self._cbs
            if callbacks is None:
                return False
            for cb in list(<list>callbacks):
                if cb is fn or cb == fn:
                    break
            else:
                return False
            callbacks = self._cbs
            if callbacks is None:
                return False
            for j in range(len(<list>callbacks)):
                if (<list>callbacks)[j] is cb:
                    del (<list>callbacks)[j]
                    return True

    def __await__(self):
        return await_done(self)

    def __repr__(self):
        label = f" {self.name!r}" if self.name else ""
        state = "done" if self._done else f"refcount={self._refcount}"
        return f"<FragDestructor{label} {state} at {id(self):#x}>"
