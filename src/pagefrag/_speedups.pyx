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

import collections
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


# ---------------------------------------------------------------------------------------
# Pin and the send calls of a zero-copy socket: the twins of pagefrag._iov.Pin and of the
# hot half of pagefrag.zerocopy._sender (PySendPath), compared with them by the whole
# test suite (it runs once per implementation). A tracked send crosses into Python only
# when a batch of completions is due, on an error, or to fire a destructor.
# ---------------------------------------------------------------------------------------

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_SIMPLE, PyBUF_STRIDES, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from libc.errno cimport EINTR, errno
from libc.stdlib cimport free, malloc
from libc.string cimport strcmp

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t c_send "send" (int fd, const void *buf, size_t n, int flags)
    ssize_t c_sendmsg "sendmsg" (int fd, const msghdr *msg, int flags)
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int c_sendmmsg "sendmmsg" (int fd, mmsghdr *msgvec, unsigned int vlen, int flags)

cdef int _MSG_ZEROCOPY = 0x4000000
cdef list _NO_REFS = []  # shared, never appended to: a pin that holds none


cdef inline int _take_ref(object d, object holder) except -1:
    """One reference on ``d`` (a FragDestructor, else TypeError), as ``d.ref(holder=)``."""
    cdef FragDestructor fd
    if type(d) is FragDestructor:
        fd = <FragDestructor>d
        if fd._tlock is None and not fd._dead:
            fd._refcount += 1  # ref()'s hot path (one atomic step: see the module)
            return 0
    elif not isinstance(d, FragDestructor):
        raise TypeError(f"destructor must be a FragDestructor or None, not {type(d).__name__}")
    d.ref(holder=holder)
    return 0


cdef inline int _drop_ref(object d, object holder) except -1:
    """Drop one reference on ``d``, as ``d.unref(holder=)``; not the last one of a
    compiled destructor without a lock: in C (the last one fires: unref does it)."""
    cdef FragDestructor fd
    if type(d) is FragDestructor:
        fd = <FragDestructor>d
        if fd._tlock is None and fd._refcount > 1:
            fd._refcount -= 1  # unref()'s hot path (one atomic step: see the module)
            return 0
    d.unref(holder=holder)
    return 0


@cython.auto_pickle(False)
cdef class Unrefs:
    """References detached under a lock, waiting to be dropped after it is released:
    the compiled twin of ``pagefrag._iov.Unrefs`` (see there)."""

    cdef public object queue

    def __init__(self):
        self.queue = collections.deque()

    def extend(self, refs):
        """Queue references already detached. Refs: moves them to the queue."""
        if refs:
            self.queue.extend(refs)

    def detach(self, pins):
        """Detach every pin of ``pins`` (views released) and queue its references;
        returns how many pins. Refs: moves them from the pins to the queue."""
        cdef Pin p
        extend = self.queue.extend
        for pin in pins:
            if type(pin) is Pin:
                p = <Pin>pin
                refs = p.refs  # Pin.detach, in C: nothing runs between it and the queueing
                p.refs = p.views = p.owners = None
            else:
                refs = pin.detach()
            if refs:
                extend(refs)
        return len(pins)

    def run(self, holder):
        """Drop every queued reference. Refs: -1 on each."""
        queue = self.queue
        while queue:
            try:
                d = queue.popleft()
            except IndexError:  # another thread took the last one
                return
            _drop_ref(d, holder)


@cython.freelist(64)
@cython.auto_pickle(False)
cdef class Pin:
    """What one holder keeps alive: views (so Python cannot free or resize their memory)
    and one reference per destructor. The compiled twin of ``pagefrag._iov.Pin`` (see
    there for the contract); ``views`` and ``refs`` are None once released."""

    cdef public object views
    cdef public object owners
    cdef public object refs

    def __init__(self, views, owners=None):
        self.views = views
        self.owners = owners
        self.refs = _NO_REFS

    def take(self, holder, extra=None):
        """One reference on every owner and on ``extra``, all or nothing. Kernel:
        ``skb_frag_destructor_ref`` per frag.

        Refs: +1 on every owner and on ``extra``."""
        cdef list refs = []
        self.refs = refs
        try:
            for d in self.owners or ():
                if d is not None:
                    _take_ref(d, holder)
                    refs.append(d)
            if extra is not None:  # last: trim() keeps it whatever the kernel took
                _take_ref(extra, holder)
                refs.append(extra)
        except BaseException:
            self.release(holder)
            raise

    def trim(self, Py_ssize_t n):
        """Keep only the first ``n`` bytes; returns the references of the pieces past
        them, for the caller to drop outside its locks.

        Refs: moves those of the pieces not covered out of the pin."""
        cdef Py_ssize_t pos = 0, size
        views, refs = self.views, self.refs
        if views is None or not refs:
            return []
        taken = iter(refs)
        owners = self.owners or [None] * len(views)
        if len(owners) != len(views):
            raise ValueError("a pin's owners must match its views")
        kept_views, kept_owners, kept_refs, dropped = [], [], [], []
        for view, owner in zip(views, owners):
            size = len(view)
            if pos < n:
                kept_views.append(view if pos + size <= n else view[: n - pos])
                kept_owners.append(owner)
                if owner is not None:
                    kept_refs.append(next(taken))
            elif owner is not None:
                dropped.append(next(taken))
            pos += size
        kept_refs.extend(taken)  # the extra one
        self.views, self.owners, self.refs = kept_views, kept_owners, kept_refs
        return dropped

    def detach(self):
        """Release the views and hand over the references (for the caller to drop once
        its locks are released).

        Refs: moves them out of the pin."""
        refs = self.refs
        self.refs = self.views = self.owners = None
        return refs or []

    def release(self, holder):
        """Release the views and drop every reference now.

        Refs: -1 on each held."""
        refs = self.refs
        self.refs = self.views = self.owners = None
        for d in refs or ():
            _drop_ref(d, holder)

    @property
    def released(self):
        return self.refs is None

    def __repr__(self):
        if self.refs is None:
            return "<Pin released>"
        nbytes = sum(map(len, self.views or ()))
        return f"<Pin {nbytes} bytes, {len(self.refs)} refs>"


cdef inline bint _plain_bytes(Py_buffer *b) noexcept:
    """One C-contiguous run of unsigned bytes (what byte_view would not have to cast)."""
    return (
        b.ndim <= 1
        and b.itemsize == 1
        and (b.format == NULL or strcmp(b.format, "B") == 0)
        and PyBuffer_IsContiguous(b, b'C')
    )


cdef Py_ssize_t _send_one(int fd, const void *buf, size_t n, int flags) except -2:
    """send() with the GIL released, retried on EINTR after the signal handlers ran (as
    CPython's socket methods do); OSError (BlockingIOError, ...) from errno."""
    cdef Py_ssize_t r
    while True:
        with nogil:
            r = c_send(fd, buf, n, flags)
        if r >= 0:
            return r
        if errno != EINTR:
            PyErr_SetFromErrno(OSError)  # raises
        PyErr_CheckSignals()  # raises a handler's exception: nothing was sent


cdef Py_ssize_t _call(object fileno, object views, int flags) except -2:
    """send()/sendmsg() of ``views`` (memoryviews) with the GIL released, retried on
    EINTR after the signal handlers ran (as CPython's socket methods do). Returns the
    bytes taken; raises OSError (BlockingIOError, ...) from errno."""
    cdef Py_ssize_t count = len(views), i, r
    cdef int fd = fileno()
    cdef Py_buffer *b
    cdef iovec one
    cdef iovec *iov = &one
    cdef msghdr msg
    if count > 1:
        iov = <iovec *>malloc(count * sizeof(iovec))
        if iov == NULL:
            raise MemoryError()
    try:
        for i in range(count):
            if type(views[i]) is not memoryview:
                raise TypeError("a pin's views are memoryviews")
            b = PyMemoryView_GET_BUFFER(views[i])
            iov[i].iov_base = b.buf
            iov[i].iov_len = b.len
        if count == 1:
            return _send_one(fd, one.iov_base, one.iov_len, flags)
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = count
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        while True:
            with nogil:
                r = c_sendmsg(fd, &msg, flags)
            if r >= 0:
                return r
            if errno != EINTR:
                PyErr_SetFromErrno(OSError)  # raises: BlockingIOError, ...
            PyErr_CheckSignals()  # raises a handler's exception: nothing was sent
    finally:
        if iov != &one:
            free(iov)


cdef Py_ssize_t _call_many(object fileno, list messages, int flags, Py_ssize_t *lens) except -2:
    """One sendmmsg() of ``messages`` (each a list of memoryviews: one datagram), with
    the GIL released, retried on EINTR; ``lens[i]`` gets the bytes of datagram ``i``.
    Returns how many datagrams the kernel took (the first k); raises OSError when it
    took none."""
    cdef Py_ssize_t count = len(messages), pieces = 0, i, j, k, r
    cdef int fd = fileno()
    cdef mmsghdr *msgs
    cdef iovec *iov
    cdef Py_buffer *b
    for i in range(count):
        pieces += len(<list>messages[i])
    msgs = <mmsghdr *>malloc(count * sizeof(mmsghdr) + pieces * sizeof(iovec) + 1)
    if msgs == NULL:
        raise MemoryError()
    iov = <iovec *>(msgs + count)
    try:
        k = 0
        for i in range(count):
            views = <list>messages[i]
            msgs[i].msg_hdr.msg_name = NULL
            msgs[i].msg_hdr.msg_namelen = 0
            msgs[i].msg_hdr.msg_iov = iov + k
            msgs[i].msg_hdr.msg_iovlen = len(views)
            msgs[i].msg_hdr.msg_control = NULL
            msgs[i].msg_hdr.msg_controllen = 0
            msgs[i].msg_hdr.msg_flags = 0
            msgs[i].msg_len = 0
            for j in range(len(views)):
                if type(views[j]) is not memoryview:
                    raise TypeError("a pin's views are memoryviews")
                b = PyMemoryView_GET_BUFFER(views[j])
                iov[k].iov_base = b.buf
                iov[k].iov_len = b.len
                k += 1
        while True:
            with nogil:
                r = c_sendmmsg(fd, msgs, <unsigned int>count, flags)
            if r >= 0:
                for i in range(r):
                    lens[i] = msgs[i].msg_len
                return r
            if errno != EINTR:
                PyErr_SetFromErrno(OSError)
            PyErr_CheckSignals()
    finally:
        free(msgs)


cdef class SendPath:
    """The hot send calls of one zero-copy socket: the compiled twin of
    ``pagefrag.zerocopy._sender.PySendPath`` (see there for the contract); the
    socket's ``Sender`` derives from whichever is in use."""

    cdef public object sock
    cdef public object policy
    cdef public object eq
    cdef public object tracker
    cdef public bint blocked
    cdef public Py_ssize_t batch
    cdef public Py_ssize_t since_poll
    cdef public Py_ssize_t copied_sends
    cdef public Py_ssize_t copied_bytes
    cdef object _filings
    cdef object _ids
    cdef object _fileno
    cdef object _gettimeout
    cdef object _lock
    cdef object _acquire
    cdef object _release

    def __init__(self, sock, policy, eq, Py_ssize_t batch, lock):
        self.lock = lock
        self.blocked = False
        self.sock = sock
        self.policy = policy
        self.eq = eq
        self.tracker = eq.tracker
        self.batch = batch
        self.since_poll = self.copied_sends = self.copied_bytes = 0
        self._filings = self.tracker.filings
        self._ids = self.tracker.ids
        self._fileno = sock.fileno
        self._gettimeout = sock.gettimeout

    @property
    def lock(self):
        return self._lock

    @lock.setter
    def lock(self, lock):
        self._lock = lock
        self._acquire = lock.acquire
        self._release = lock.release

    cpdef Py_ssize_t send_copied(self, data) except -2:
        """One copying ``send`` of the buffer ``data`` under the send lock, reading no
        completions; -1 (nothing sent) when the socket is blocked or has a socket error
        queued.

        Refs: none."""
        cdef Py_buffer buf
        cdef Py_ssize_t n
        timeout = self._gettimeout()
        self._acquire()
        try:
            if self.blocked or self.eq.errors:
                return -1
            if timeout is None or timeout == 0.0:
                PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
                try:
                    n = _send_one(self._fileno(), buf.buf, buf.len, 0)
                finally:
                    PyBuffer_Release(&buf)
            else:
                n = self.sock.send(data)  # CPython waits for writability within the timeout
            self.copied_sends += 1
            self.copied_bytes += n
            self.since_poll += 1  # the next call that polls reads what is due
            return n
        finally:
            self._release()

    cpdef Py_ssize_t send(self, data, destructor) except -2:
        """:meth:`send_flat` under the send lock, unless the socket is blocked (closed
        or forked) or has a socket error queued; -1 when it does not send.

        Refs: as :meth:`send_flat`."""
        self._acquire()
        try:
            if self.blocked or self.eq.errors:
                return -1
            return self.send_flat(data, destructor)
        finally:
            self._release()

    cpdef Py_ssize_t file(self, pin, int flags) except -2:
        """The zero-copy system call of ``pin.views`` and the filing of the pin under its
        id, with no bytecode between the kernel's return and the record (no signal
        handler can run there). Returns the bytes the kernel took.

        Refs: none (the pin holds them)."""
        views = pin.views
        n = _call(self._fileno, views, flags)
        self._filings.append((n, next(self._ids), pin))
        return n

    cpdef Py_ssize_t file_many(self, list pins, int flags) except -2:
        """The datagrams of ``pins`` (at most 1024) in one ``sendmmsg``, and the filing of
        each one the kernel took under its id (each takes one, as a ``sendmsg`` would),
        with no bytecode between the kernel's return and the records. Returns how many
        it took, the first k; OSError when it took none.

        Refs: none (the pins hold them)."""
        cdef Py_ssize_t count = len(pins), i, k
        cdef Py_ssize_t lens[1024]
        if count > 1024:
            raise ValueError("file_many sends at most 1024 datagrams per call")
        k = _call_many(self._fileno, [p.views for p in pins], flags, lens)
        filings = self._filings
        ids = self._ids
        for i in range(k):
            filings.append((lens[i], next(ids), pins[i]))
        return k

    cpdef Py_ssize_t copied_many(self, list messages, int flags) except -2:
        """The datagrams of ``messages`` (lists of memoryviews, at most 1024) copied, in
        one ``sendmmsg``; returns how many the kernel took; OSError when none.

        Refs: none."""
        cdef Py_ssize_t count = len(messages), i, k
        cdef Py_ssize_t lens[1024]
        if count > 1024:
            raise ValueError("copied_many sends at most 1024 datagrams per call")
        k = _call_many(self._fileno, messages, flags, lens)
        self.copied_sends += k
        for i in range(k):
            self.copied_bytes += lens[i]
        return k

    cpdef Py_ssize_t send_flat(self, data, destructor) except -2:
        """One send call of ``data`` when it is one plain buffer (bytes, bytearray, a 1-D
        byte memoryview) that the policy sends without asking (copied below
        ``copy_below``, zero-copy from ``zerocopy_from``) on a socket without a timeout;
        -1 for anything else (the caller takes the general path). Kernel:
        ``send(MSG_ZEROCOPY)``.

        Refs: +1 on ``destructor`` for a zero-copy call; none for a copied one."""
        cdef Py_buffer buf
        cdef Py_ssize_t nbytes, n = -1
        cdef bint zerocopy = False
        cdef type kind = type(data)
        if kind is not bytes and kind is not bytearray and kind is not memoryview:
            return -1
        timeout = self._gettimeout()
        if timeout is not None and timeout != 0.0:
            return -1  # CPython's send waits for writability within the timeout
        PyObject_GetBuffer(data, &buf, PyBUF_FORMAT | PyBUF_STRIDES)
        try:
            if not _plain_bytes(&buf):
                return -1
            nbytes = buf.len
            policy = self.policy
            if nbytes < policy.copy_below:  # copied: holds nothing, not even the destructor
                n = _send_one(self._fileno(), buf.buf, nbytes, 0)
                self.copied_sends += 1
                self.copied_bytes += n
            elif nbytes and nbytes >= policy.zerocopy_from:
                zerocopy = True
            else:
                return -1  # the policy must be asked (a probe may be due)
        finally:
            PyBuffer_Release(&buf)
        if zerocopy:
            pin = Pin.__new__(Pin)
            # The pin's view holds the buffer: it cannot be resized while pinned.
            pin.views = [PyMemoryView_FromObject(data)]
            pin.owners = None
            pin.refs = _NO_REFS
            try:
                if destructor is not None:
                    _take_ref(destructor, self.eq)
                    pin.refs = [destructor]
                n = _call(self._fileno, pin.views, _MSG_ZEROCOPY)
                self._filings.append((n, next(self._ids), pin))
            except BaseException as exc:
                return self.unfiled(pin, exc, nbytes, 0, None, None)
            if n < nbytes and pin.refs:
                self.eq.trim(pin, n)  # a partial stream send: keep only what was taken
        return self._sent(n)

    cdef Py_ssize_t _sent(self, Py_ssize_t n) except -2:
        """After a send call: read a batch of completions when one is due."""
        self.since_poll += 1
        if self.since_poll >= self.batch or self.tracker.early:
            self.poll()
        return n
