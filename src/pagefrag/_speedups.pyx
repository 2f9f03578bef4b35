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

API = 3  # what pagefrag._destructor.SPEEDUPS_API expects: raise both when contents change

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
        # Ctrl-C or SystemExit inside destroy or a callback is raised again once the
        # firing is complete (as asyncio's Handle does), never swallowed; any other
        # exception goes to sys.unraisablehook.
        interrupt = None
        if self._destroy is not None:
            try:
                self._destroy(self.data)
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupt = exc
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
                raised = self._run_callback(cb)
                if interrupt is None:
                    interrupt = raised
        if interrupt is not None:
            raise interrupt

    cdef _run_callback(self, cb):
        # Returns a KeyboardInterrupt or SystemExit ``cb`` raised, for the caller to raise.
        try:
            cb(self)
        except (KeyboardInterrupt, SystemExit) as exc:
            return exc
        except BaseException as exc:
            report_unraisable(exc, f"Exception ignored in done callback of {self!r}", cb)
        return None

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
        interrupt = self._run_callback(fn)
        if interrupt is not None:
            raise interrupt

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
from cpython.bytes cimport PyBytes_FromStringAndSize
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

cdef extern from "<sys/socket.h>" nogil:
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_LEN(size_t length)
    ssize_t c_recvmsg "recvmsg" (int fd, msghdr *msg, int flags)

from libc.errno cimport EAGAIN
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

cdef int _MSG_ZEROCOPY = 0x4000000
cdef int _MSG_ERRQUEUE_DONTWAIT = 0x2000 | 0x40  # MSG_ERRQUEUE | MSG_DONTWAIT
cdef int _SOL_IP = 0, _IP_RECVERR = 11, _SOL_IPV6 = 41, _IPV6_RECVERR = 25
cdef uint8_t _SO_EE_ORIGIN_ZEROCOPY = 5


def read_errqueue(object fileno, object received):
    """Read the socket's error queue until it is empty (``recvmsg(MSG_ERRQUEUE |
    MSG_DONTWAIT)``), appending to the deque ``received``, as each message is read and
    in C, ``(lo, hi, copied)`` for a zero-copy completion or the raw ``struct
    sock_extended_err`` (``bytes``, offender included) of any other message. Returns how
    many messages were read. The compiled twin of the pure error queue's
    ``received.extend(map(sock.recvmsg, ...))``; the caller parses what it appended.

    Refs: none."""
    cdef char control[256]
    cdef msghdr msg
    cdef cmsghdr *cm
    cdef ssize_t r
    cdef Py_ssize_t count = 0, size
    cdef uint32_t ee_errno, ee_info, ee_data
    cdef uint8_t ee_origin, ee_code
    cdef unsigned char *data
    cdef int fd = fileno()
    while True:
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = NULL
        msg.msg_iovlen = 0
        msg.msg_control = control
        msg.msg_controllen = sizeof(control)
        msg.msg_flags = 0
        with nogil:
            r = c_recvmsg(fd, &msg, _MSG_ERRQUEUE_DONTWAIT)
        if r < 0:
            if errno == EAGAIN:
                return count
            if errno != EINTR:
                PyErr_SetFromErrno(OSError)
            PyErr_CheckSignals()
            continue
        count += 1
        cm = CMSG_FIRSTHDR(&msg)
        while cm != NULL:
            if ((cm.cmsg_level == _SOL_IP and cm.cmsg_type == _IP_RECVERR)
                    or (cm.cmsg_level == _SOL_IPV6 and cm.cmsg_type == _IPV6_RECVERR)) \
                    and cm.cmsg_len >= CMSG_LEN(16):
                data = CMSG_DATA(cm)
                size = cm.cmsg_len - CMSG_LEN(0)
                memcpy(&ee_errno, data, 4)
                ee_origin = data[4]
                ee_code = data[6]
                memcpy(&ee_info, data + 8, 4)
                memcpy(&ee_data, data + 12, 4)
                if ee_origin == _SO_EE_ORIGIN_ZEROCOPY and ee_errno == 0:
                    received.append((ee_info, ee_data, bool(ee_code & 1)))
                else:
                    received.append(PyBytes_FromStringAndSize(<char *>data, size))
            cm = CMSG_NXTHDR(&msg, cm)
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
        interrupt = None
        while queue:
            try:
                d = queue.popleft()
            except IndexError:  # another thread took the last one
                break
            try:
                _drop_ref(d, holder)
            except (KeyboardInterrupt, SystemExit) as exc:  # raised after the last
                if interrupt is None:
                    interrupt = exc
        if interrupt is not None:
            raise interrupt


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
        interrupt = None
        for d in refs or ():
            try:
                _drop_ref(d, holder)
            except (KeyboardInterrupt, SystemExit) as exc:  # raised after the last
                if interrupt is None:
                    interrupt = exc
        if interrupt is not None:
            raise interrupt

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
        if not self._raw(views):
            # CPython's socket methods (a timeout waits for writability; any buffer),
            # the call and the filing still one C step, as in the pure twin.
            if len(views) == 1:
                sent = map(self.sock.send, views, (flags,))
            else:
                sent = map(self.sock.sendmsg, (views,), ((),), (flags,))
            self._filings.extend(zip(sent, self._ids, (pin,)))
            return self._filings[-1][0]
        n = _call(self._fileno, views, flags)
        self._filings.append((n, next(self._ids), pin))
        return n

    cdef bint _all_raw(self, list messages) except -1:
        for views in messages:
            if not self._raw(views):
                return False
        return True

    cdef bint _raw(self, views) except -1:
        """Whether ``views`` may be sent by the system call itself: memoryviews, on a
        socket without a timeout (with one, CPython's methods wait for writability)."""
        timeout = self._gettimeout()
        if timeout is not None and timeout != 0.0:
            return False
        for v in views:
            if type(v) is not memoryview:
                return False
        return True

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
        messages = [p.views for p in pins]
        if not self._all_raw(messages):
            k = 0  # one call each, as the pure twin
            for pin in pins:
                try:
                    self.file(pin, flags)
                except OSError:
                    if not k:
                        raise
                    break  # as sendmmsg: the error of a later datagram is not reported
                k += 1
            return k
        k = _call_many(self._fileno, messages, flags, lens)
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
        if not self._all_raw(messages):
            k = 0  # one call each, as the pure twin
            for views in messages:
                try:
                    if len(views) == 1:
                        n = self.sock.send(views[0], flags)
                    else:
                        n = self.sock.sendmsg(views, (), flags)
                except OSError:
                    if not k:
                        raise
                    break
                self.copied_sends += 1
                self.copied_bytes += n
                k += 1
            return k
        k = _call_many(self._fileno, messages, flags, lens)
        self.copied_sends += k
        for i in range(k):
            self.copied_bytes += lens[i]
        return k

    cpdef bint flat_copies(self, list items) except -1:
        """Whether every item is a plain buffer (bytes, bytearray, a 1-D byte memoryview)
        the policy copies without asking, on a socket :meth:`copied_flat` serves.

        Refs: none."""
        cdef Py_buffer buf
        cdef type kind
        timeout = self._gettimeout()
        if timeout is not None and timeout != 0.0:
            return False
        copy_below = self.policy.copy_below
        for item in items:
            kind = type(item)
            if kind is not bytes and kind is not bytearray and kind is not memoryview:
                return False
            PyObject_GetBuffer(item, &buf, PyBUF_FORMAT | PyBUF_STRIDES)
            try:
                if not _plain_bytes(&buf) or not buf.len < copy_below:
                    return False
            finally:
                PyBuffer_Release(&buf)
        return True

    cpdef Py_ssize_t copied_flat(self, list items, Py_ssize_t start, int flags) except -2:
        """Datagrams ``items[start:start + 1024]`` (what :meth:`flat_copies` accepted)
        copied in one ``sendmmsg`` read straight from their buffers; returns how many the
        kernel took (OSError when none).

        Refs: none."""
        cdef Py_ssize_t count = min(len(items) - start, 1024), i, k = 0, got = 0, r
        cdef mmsghdr *msgs
        cdef iovec *iov
        cdef Py_buffer *bufs
        cdef int fd = self._fileno()
        if count <= 0:
            return 0
        msgs = <mmsghdr *>malloc(count * (sizeof(mmsghdr) + sizeof(iovec) + sizeof(Py_buffer)))
        if msgs == NULL:
            raise MemoryError()
        iov = <iovec *>(msgs + count)
        bufs = <Py_buffer *>(iov + count)
        try:
            for i in range(count):
                PyObject_GetBuffer(items[start + i], &bufs[i], PyBUF_SIMPLE)
                got += 1
                iov[i].iov_base = bufs[i].buf
                iov[i].iov_len = bufs[i].len
                msgs[i].msg_hdr.msg_name = NULL
                msgs[i].msg_hdr.msg_namelen = 0
                msgs[i].msg_hdr.msg_iov = &iov[i]
                msgs[i].msg_hdr.msg_iovlen = 1
                msgs[i].msg_hdr.msg_control = NULL
                msgs[i].msg_hdr.msg_controllen = 0
                msgs[i].msg_hdr.msg_flags = 0
                msgs[i].msg_len = 0
            while True:
                with nogil:
                    r = c_sendmmsg(fd, msgs, <unsigned int>count, flags)
                if r >= 0:
                    break
                if errno != EINTR:
                    PyErr_SetFromErrno(OSError)
                PyErr_CheckSignals()
            for i in range(r):
                self.copied_bytes += msgs[i].msg_len
            self.copied_sends += r
            return r
        finally:
            for i in range(got):
                PyBuffer_Release(&bufs[i])
            free(msgs)

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
# ======================================================================================
# CompletionTracker (issue 12): the compiled twin of
# pagefrag.zerocopy.tracker.PyCompletionTracker (the reference, compared with this one
# step by step by tests/test_speedups_tracker.py). Self-contained: nothing above uses it.
# ======================================================================================

import collections as _tr_collections
import itertools as _tr_itertools

from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.number cimport PyNumber_Index
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdlib cimport free as _tr_free, malloc as _tr_malloc
from libc.string cimport memset as _tr_memset

cdef unsigned long long _TR_U32 = 0xFFFFFFFF
cdef long long _TR_HALF = 1 << 31
cdef long long _TR_MAX_EARLY = 1024  # as the pure class: "from the future" at most
cdef Py_ssize_t _TR_FIRST_CAP = 64  # ring slots to begin with (a power of two)
# The token of an id the kernel gave a send call that failed (this class's own: it never
# leaves the tracker), and the mark of a ring slot that holds no pending call.
cdef object _TR_USED = object()
cdef object _TR_EMPTY = object()


cdef inline long long _tr_index(object n) except? -1:
    # An integer (C conversion alone would truncate a float): what is not an int must
    # have __index__, as for the pure class's ``operator.index``.
    if type(n) is int:
        return n
    return PyNumber_Index(n)


@cython.final
@cython.auto_pickle(False)
@cython.boundscheck(False)  # every ring index is masked to the ring's size
cdef class CompletionTracker:
    """Which zero-copy send calls are still pinned, and what each one holds.

    The compiled twin of :class:`pagefrag.zerocopy.tracker.PyCompletionTracker`: the same
    API, the same results and counters, the same concurrency contract (only
    ``filings.extend``/``append`` may run concurrently with the other methods; the last
    filing always stays in :attr:`filings`). See that class for the theory of operation.

    What differs is inside. The pending calls live in a ring indexed by id from the
    oldest one still pending (ids are dense and increasing): filing one is a store at the
    end, completing one a store of the empty mark, with the counters C integers. The ring
    spans every id from the oldest pending call to the newest filed one (16 bytes per id
    of that span); it never shrinks, as a dict does not. Ids are C ``long long`` (a socket
    would need 2**63 send calls to overflow them); compared with the kernel's modulo 2**32
    as in the pure class. With integer ids and byte counts no method runs Python code (a
    signal handler runs only between bytecodes, so no KeyboardInterrupt can land between
    the removal of a pending call and the return of its token; a finalizer a collection
    runs meanwhile cannot raise into it either), and ``complete`` makes its
    result list before it empties any slot (a MemoryError leaves the calls pending).
    Byte counts and ids must be integers (``__index__``; a float is a TypeError, where the
    pure class would take a float filed by hand).
    """

    cdef readonly object filings  # collections.deque of (nbytes, sid, token)
    cdef readonly object ids  # itertools.count: the next sid
    cdef readonly dict early  # sid -> copied, completed before being filed
    cdef public long long peak_pinned_bytes
    cdef public long long completions
    cdef public long long copied_completions
    cdef public long long duplicates
    cdef public long long ids_used_by_failed_sends
    cdef public long long filed_calls
    cdef public long long filed_bytes
    cdef long long _absorbed  # every filing with a smaller sid has been taken in
    cdef long long _pinned
    cdef long long _failed
    cdef bint _has_failed
    cdef object _popleft  # filings.popleft, bound once
    cdef object _append  # filings.append
    # The ring: slot (_head + k) & (_cap - 1) is sid _base + k for k < _len, holding its
    # token (its byte count in _nbytes) or _TR_EMPTY; every slot outside the window is
    # _TR_EMPTY. _base + _len <= _absorbed, and the slot at _head is pending when _len.
    cdef list _tokens
    cdef long long *_nbytes
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _head
    cdef Py_ssize_t _len
    cdef long long _base
    cdef Py_ssize_t _npending
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._nbytes = <long long *>_tr_malloc(_TR_FIRST_CAP * sizeof(long long))
        if self._nbytes is NULL:
            raise MemoryError()
        _tr_memset(self._nbytes, 0, _TR_FIRST_CAP * sizeof(long long))
        self._cap = _TR_FIRST_CAP
        self._tokens = [_TR_EMPTY] * _TR_FIRST_CAP

    def __dealloc__(self):
        _tr_free(self._nbytes)

    def __init__(self, first_id=0):
        cdef Py_ssize_t k
        first = first_id & 0xFFFFFFFF  # (the pure class's TypeError for a non-int)
        self.filings = _tr_collections.deque()
        self._popleft = self.filings.popleft
        self._append = self.filings.append
        self.ids = _tr_itertools.count(first)
        self.early = {}
        self._absorbed = first
        self._pinned = 0
        self._has_failed = False
        self._failed = 0
        self.peak_pinned_bytes = 0
        self.completions = 0
        self.copied_completions = 0
        self.duplicates = 0
        self.ids_used_by_failed_sends = 0
        self.filed_calls = 0
        self.filed_bytes = 0
        for k in range(self._cap):  # (__init__ called again: nothing pending any more)
            self._tokens[k] = _TR_EMPTY
        self._head = 0
        self._len = 0
        self._base = first
        self._npending = 0

    @classmethod
    def __class_getitem__(cls, item):
        # CompletionTracker[Pin] at run time, as for the pure Generic class.
        return _tr_generic_alias(cls, item)

    # -- the ring ---------------------------------------------------------------------
    @cython.wraparound(False)
    cdef int _grow(self, Py_ssize_t need) except -1:
        """Make room for ``need`` slots in order from index 0 (allocating first: on
        failure nothing has changed)."""
        cdef Py_ssize_t cap = self._cap, k, j, mask = self._cap - 1
        cdef long long *nb
        cdef list tokens
        while cap < need:
            if cap > (1 << 40):
                raise MemoryError("completion tracker: too many ids pending")
            cap *= 2
        nb = <long long *>_tr_malloc(cap * sizeof(long long))
        if nb is NULL:
            raise MemoryError()
        try:
            tokens = [_TR_EMPTY] * cap
        except BaseException:
            _tr_free(nb)
            raise
        _tr_memset(nb, 0, cap * sizeof(long long))
        for k in range(self._len):
            j = (self._head + k) & mask
            tokens[k] = self._tokens[j]
            nb[k] = self._nbytes[j]
        _tr_free(self._nbytes)
        self._nbytes = nb
        self._tokens = tokens
        self._cap = cap
        self._head = 0
        return 0

    @cython.wraparound(False)
    cdef int _push(self, long long sid, object token, long long nbytes) except -1:
        """File ``sid`` (>= every sid filed) as pending."""
        cdef long long need
        cdef Py_ssize_t j
        if self._npending == 0:
            self._len = 0
            self._base = sid
        need = sid - self._base + 1  # the window up to sid (a skipped id: an empty slot)
        if need > self._cap:
            self._grow(need)
        j = (self._head + <Py_ssize_t>need - 1) & (self._cap - 1)
        self._tokens[j] = token
        self._nbytes[j] = nbytes
        self._len = <Py_ssize_t>need
        self._npending += 1
        return 0

    cdef inline long long _next(self) except? -1:
        filings = self.filings
        if filings:
            return <long long>filings[-1][1] + 1
        return self._absorbed

    # -- the API ------------------------------------------------------------------------
    @property
    def next_id(self):
        """The id the kernel will give the next successful zero-copy send call."""
        return <unsigned long long>self._next() & _TR_U32

    @property
    def outstanding(self):
        """Zero-copy send calls whose completion has not been taken in."""
        return self._npending + self._next() - self._absorbed

    @property
    def has_pending(self):
        """Whether any zero-copy send call has not completed (the cheap test of
        :attr:`outstanding`)."""
        return self._npending > 0 or self._next() > self._absorbed

    @property
    def pinned_bytes(self):
        """Bytes of the calls still outstanding."""
        cdef Py_ssize_t k
        cdef long long total = self._pinned
        filings = self.filings
        for k in range(len(filings) - 1, -1, -1):  # by index: appends may run meanwhile
            entry = filings[k]
            if <long long>entry[1] < self._absorbed:
                break
            total += <long long>entry[0]
        return total

    def sent(self, token, nbytes):
        """Record one send call the kernel accepted with ``MSG_ZEROCOPY``; returns its id."""
        cdef long long n = _tr_index(nbytes)  # a TypeError before anything is filed
        sid = self._file(nbytes, token)
        return <unsigned long long>(<long long>sid) & _TR_U32

    cdef object _file(self, object nbytes, object token):
        """File ``(nbytes, the next id, token)``; returns the id. The tuple is made
        before the id is drawn: an allocation that starts a collection (finalizers:
        another thread may file meanwhile) comes before."""
        entry = PyTuple_New(3)
        Py_INCREF(nbytes)
        PyTuple_SET_ITEM(entry, 0, nbytes)
        Py_INCREF(token)
        PyTuple_SET_ITEM(entry, 2, token)
        sid = next(self.ids)
        Py_INCREF(sid)
        PyTuple_SET_ITEM(entry, 1, sid)
        self._append(entry)
        return sid

    def absorb(self):
        """Take in what was filed since the last call. Returns the tokens of filings
        whose completion had already come (:attr:`early`): they are released now."""
        released = self._absorb()
        return [] if released is None else released

    cdef list _absorb(self):
        """absorb(), returning None when nothing is released (no list made)."""
        cdef list released = None
        cdef long long sid, nbytes
        cdef dict early = self.early
        filings = self.filings
        while filings:
            entry = filings[0]
            nbytes_o, sid_o, token = entry
            sid = _tr_index(sid_o)
            if sid >= self._absorbed:
                nbytes = _tr_index(nbytes_o)
                if early and sid_o in early:
                    copied = early.pop(sid_o)
                    if token is not _TR_USED:
                        if released is None:
                            released = []
                        released.append(token)
                        self.completions += 1
                        if copied:
                            self.copied_completions += 1
                else:
                    self._push(sid, token, nbytes)
                    self._pinned += nbytes
                    if self._pinned > self.peak_pinned_bytes:
                        self.peak_pinned_bytes = self._pinned
                self._absorbed = sid + 1
                if token is not _TR_USED:
                    self.filed_calls += 1
                    self.filed_bytes += nbytes
            if len(filings) == 1:
                break  # the last filing stays: its filer may still read it back
            self._popleft()
        if early:
            # Never filed (a call made behind the tracker's back): forget them, or every
            # later filing would pay for a look.
            stale = [s for s in early if s < self._absorbed]
            for s in stale:
                del early[s]
            self.duplicates += len(stale)
        return released

    @cython.wraparound(False)
    def complete(self, lo, hi, copied=False):
        """Release the send calls in ``[lo, hi]`` (inclusive, wrapping at 2**32) and
        return their tokens. Ids already completed (or before the first) are counted as
        duplicates and otherwise ignored; ids not filed yet (ahead of the filings, within
        half the id space) are remembered until they are."""
        cdef unsigned long long ulo32, span
        cdef long long nxt, ulo, uhi, start, sid, width, found = 0, done = 0
        cdef long long first, last
        cdef Py_ssize_t mask, j, k, n, pos
        cdef bint is_copied
        cdef list tokens, released, out
        # Every argument converted before anything changes.
        ulo32 = PyLong_AsUnsignedLongLongMask(lo) & _TR_U32
        span = (PyLong_AsUnsignedLongLongMask(hi) - ulo32) & _TR_U32
        is_copied = copied
        released = self._absorb()
        nxt = self._absorbed
        ulo = nxt + (<long long>(((ulo32 - <unsigned long long>nxt) & _TR_U32) ^ _TR_HALF) - _TR_HALF)
        uhi = ulo + <long long>span
        if uhi >= nxt:  # ahead: read before the call that used it was filed
            start = ulo if ulo > nxt else nxt
            if uhi - start < _TR_MAX_EARLY:
                for sid in range(start, uhi + 1):
                    self.early[sid] = is_copied
            else:
                self.duplicates += uhi - start + 1
            uhi = start - 1
        if ulo > uhi:
            return [] if released is None else released
        width = uhi - ulo + 1
        n = 0 if released is None else len(released)
        if self._len:
            first = ulo if ulo > self._base else self._base
            last = self._base + self._len - 1
            if uhi < last:
                last = uhi
            mask = self._cap - 1
            tokens = self._tokens
            # Two passes: count, make the list, then move the tokens into it. The
            # second pass cannot fail (the list is made; a slot's old token is held by
            # the list when it is emptied): no token leaves the ring without being returned.
            for sid in range(first, last + 1):
                if tokens[(self._head + <Py_ssize_t>(sid - self._base)) & mask] is not _TR_EMPTY:
                    found += 1
            out = PyList_New(n + found)
            for k in range(n):
                token = released[k]
                Py_INCREF(token)
                PyList_SET_ITEM(out, k, token)
            pos = n
            for sid in range(first, last + 1):
                j = (self._head + <Py_ssize_t>(sid - self._base)) & mask
                token = tokens[j]
                if token is _TR_EMPTY:
                    continue
                Py_INCREF(token)
                PyList_SET_ITEM(out, pos, token)
                pos += 1
                tokens[j] = _TR_EMPTY
                self._npending -= 1
                self._pinned -= self._nbytes[j]
                if token is not _TR_USED:
                    done += 1
            self._trim()
        else:
            out = [] if released is None else released
        self.duplicates += width - found
        self.completions += done
        if is_copied:
            self.copied_completions += done
        return out

    @cython.wraparound(False)
    cdef inline void _trim(self):
        """Drop the completed ids at the front of the window."""
        cdef Py_ssize_t mask = self._cap - 1
        if self._npending == 0:
            self._len = 0
            return
        tokens = self._tokens
        while (<list>tokens)[self._head] is _TR_EMPTY:
            self._head = (self._head + 1) & mask
            self._base += 1
            self._len -= 1

    @cython.wraparound(False)
    def pending_tokens(self):
        """Tokens of every send call still pinned (for keeping them alive)."""
        cdef Py_ssize_t k, mask = self._cap - 1
        cdef list tokens = []
        for k in range(self._len):
            token = self._tokens[(self._head + k) & mask]
            if token is not _TR_EMPTY and token is not _TR_USED:
                tokens.append(token)
        for entry in list(self.filings):
            if entry[1] >= self._absorbed and entry[2] is not _TR_USED:
                tokens.append(entry[2])
        return tokens

    def failed_send(self):
        """A zero-copy send call failed. The kernel may still have used an id for it: a
        UDP datagram dropped on the transmit path (``EPERM`` from a netfilter drop,
        ``ENOBUFS`` from a full queue with ``IP_RECVERR``) returns an error *after* its
        notification took the id, and that notification is already queued when the call
        returns. Returns that id; read the error queue (its completion, if any, lands in
        :attr:`early`), then call :meth:`settle_failed`."""
        self._failed = self._next()
        self._has_failed = True
        return <unsigned long long>self._failed & _TR_U32

    def settle_failed(self, sid):
        """Resolve :meth:`failed_send`: True if the kernel used the id (its completion
        was read): the id is then consumed here as the kernel did; False otherwise."""
        cdef bint had = self._has_failed
        cdef long long failed = self._failed
        self._has_failed = False
        if (
            not had
            or <unsigned long long>failed & _TR_U32 != PyLong_AsUnsignedLongLongMask(sid) & _TR_U32
            or failed != self._next()
        ):
            raise RuntimeError("settle_failed must directly follow failed_send")
        if failed not in self.early:
            return False
        self._file(0, _TR_USED)  # an already-completed placeholder
        self.ids_used_by_failed_sends += 1
        return True


from types import GenericAlias as _tr_generic_alias
