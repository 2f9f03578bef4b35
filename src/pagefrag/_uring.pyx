# cython: language_level=3, embedsignature=True, binding=False
"""The io_uring ring of pagefrag (Cython, on the raw system calls; no liburing).

Kernel counterpart: ``io_uring_setup(2)``, ``io_uring_enter(2)``, ``io_uring_register(2)``
and the zero-copy sends ``IORING_OP_SEND_ZC`` / ``IORING_OP_SENDMSG_ZC`` (Linux 6.0).
A zero-copy request yields two completions with the same ``user_data``: the *result*
(bytes taken or ``-errno``; ``IORING_CQE_F_MORE`` set when a notification will follow)
and the *notification* (``IORING_CQE_F_NOTIF``) once the kernel has dropped its last
reference to the pages. With ``IORING_SEND_ZC_REPORT_USAGE`` the notification's ``res``
has ``IORING_NOTIF_USAGE_ZC_COPIED`` set when the kernel copied after all.

Theory of operation. Every request holds one :class:`~pagefrag._iov.Pin` (its views and
one reference per destructor, taken by the caller in the core) in the ring's table under
its ``user_data``. The pin is released when the notification is reaped — or at the result
when no notification will come (no ``F_MORE``: the kernel never took the pages; and the
copying ``IORING_OP_SEND``, whose pages are copied before its result). Nothing else
releases a pin: an interrupted wait, a timeout, a closed socket leave it in the table.

Concurrency (CPython with a GIL): every change to the rings and the table is made here in
C while holding the GIL, with no Python code in between, so it is atomic with respect to
other threads; only the waits (``io_uring_enter`` with ``GETEVENTS``) release the GIL,
and they neither submit nor reap. Pins are released (destructors run) after the ring
state is final, from a list, in the thread that reaped them.

Fork: the ring's memory is mapped ``MADV_DONTFORK``; the child's copy of a :class:`Ring`
is marked inert by ``pagefrag.uring`` (at fork) and refuses everything.
"""

from libc.stdint cimport uint64_t, uint32_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.errno cimport EAGAIN, EBADF, EBUSY, EINTR, ENOBUFS, ENOMEM, EOPNOTSUPP, ETIME
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.memoryview cimport PyMemoryView_FromObject

cimport cython

import errno as _errno
import os as _os
import time as _time
import weakref as _weakref

from pagefrag._iov import Pin as _Pin
from pagefrag._unraisable import report_unraisable

API = 1  # what pagefrag.uring expects

cdef extern from *:
    """
    #include <errno.h>
    #include <string.h>
    #include <stdlib.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/mman.h>
    #include <sys/socket.h>
    #include <sys/syscall.h>
    #include <sys/uio.h>
    #include <linux/io_uring.h>

    typedef struct {
        int fd;
        unsigned *sq_head, *sq_tail, *sq_mask, *sq_flags, *sq_array, sq_entries;
        unsigned *cq_head, *cq_tail, *cq_mask, *cq_overflow, cq_entries;
        struct io_uring_sqe *sqes;
        struct io_uring_cqe *cqes;
        void *sq_ptr, *cq_ptr;
        size_t sq_sz, cq_sz, sqes_sz;
        unsigned sqe_tail;   /* SQEs prepared; *sq_tail: published to the kernel */
        unsigned features;
    } pf_ring;

    typedef struct {
        struct msghdr msg;
        struct iovec iov[];
    } pf_msg;

    static long pf_sys_setup(unsigned entries, struct io_uring_params *p) {
        long r = syscall(__NR_io_uring_setup, entries, p);
        return r < 0 ? -errno : r;
    }
    static long pf_sys_enter(int fd, unsigned to_submit, unsigned min_complete,
                             unsigned flags, void *arg, size_t argsz) {
        long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
        return r < 0 ? -errno : r;
    }
    static long pf_sys_register(int fd, unsigned op, void *arg, unsigned nr) {
        long r = syscall(__NR_io_uring_register, fd, op, arg, nr);
        return r < 0 ? -errno : r;
    }

    static void pf_ring_unmap(pf_ring *r) {
        if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_sz);
        if (r->cq_ptr && r->cq_ptr != MAP_FAILED && r->cq_ptr != r->sq_ptr)
            munmap(r->cq_ptr, r->cq_sz);
        if (r->sq_ptr && r->sq_ptr != MAP_FAILED) munmap(r->sq_ptr, r->sq_sz);
        r->sqes = NULL; r->cq_ptr = r->sq_ptr = NULL;
    }

    /* 0, or -errno. The mappings are MADV_DONTFORK: a child never shares them. */
    static int pf_ring_init(pf_ring *r, unsigned entries, unsigned cq_entries) {
        struct io_uring_params p;
        unsigned i;
        long fd;
        memset(r, 0, sizeof *r);
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_CLAMP;
        if (cq_entries) { p.flags |= IORING_SETUP_CQSIZE; p.cq_entries = cq_entries; }
        fd = pf_sys_setup(entries, &p);
        if (fd < 0) return (int)fd;
        r->fd = (int)fd;
        r->features = p.features;
        r->sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
        r->cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
        if (p.features & IORING_FEAT_SINGLE_MMAP) {
            if (r->cq_sz > r->sq_sz) r->sq_sz = r->cq_sz;
            r->cq_sz = r->sq_sz;
        }
        r->sq_ptr = mmap(0, r->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         r->fd, IORING_OFF_SQ_RING);
        if (r->sq_ptr == MAP_FAILED) goto fail;
        if (p.features & IORING_FEAT_SINGLE_MMAP) r->cq_ptr = r->sq_ptr;
        else {
            r->cq_ptr = mmap(0, r->cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                             r->fd, IORING_OFF_CQ_RING);
            if (r->cq_ptr == MAP_FAILED) goto fail;
        }
        r->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
        r->sqes = mmap(0, r->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       r->fd, IORING_OFF_SQES);
        if (r->sqes == MAP_FAILED) goto fail;
        madvise(r->sq_ptr, r->sq_sz, MADV_DONTFORK);
        if (r->cq_ptr != r->sq_ptr) madvise(r->cq_ptr, r->cq_sz, MADV_DONTFORK);
        madvise(r->sqes, r->sqes_sz, MADV_DONTFORK);
        r->sq_head = (unsigned *)((char *)r->sq_ptr + p.sq_off.head);
        r->sq_tail = (unsigned *)((char *)r->sq_ptr + p.sq_off.tail);
        r->sq_mask = (unsigned *)((char *)r->sq_ptr + p.sq_off.ring_mask);
        r->sq_flags = (unsigned *)((char *)r->sq_ptr + p.sq_off.flags);
        r->sq_array = (unsigned *)((char *)r->sq_ptr + p.sq_off.array);
        r->sq_entries = p.sq_entries;
        r->cq_head = (unsigned *)((char *)r->cq_ptr + p.cq_off.head);
        r->cq_tail = (unsigned *)((char *)r->cq_ptr + p.cq_off.tail);
        r->cq_mask = (unsigned *)((char *)r->cq_ptr + p.cq_off.ring_mask);
        r->cq_overflow = (unsigned *)((char *)r->cq_ptr + p.cq_off.overflow);
        r->cqes = (struct io_uring_cqe *)((char *)r->cq_ptr + p.cq_off.cqes);
        r->cq_entries = p.cq_entries;
        /* SQE i always sits in slot i: the array is the identity, set once. */
        for (i = 0; i < r->sq_entries; i++) r->sq_array[i] = i;
        r->sqe_tail = *r->sq_tail;
        return 0;
    fail:
        {
            int err = errno;
            pf_ring_unmap(r);
            close(r->fd);
            r->fd = -1;
            return -err;
        }
    }

    static void pf_ring_exit(pf_ring *r) {
        pf_ring_unmap(r);
        if (r->fd >= 0) close(r->fd);
        r->fd = -1;
    }

    static unsigned pf_sq_ready(pf_ring *r) {  /* published, not yet taken by the kernel */
        return *r->sq_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    }
    static void pf_publish(pf_ring *r) {
        __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE);
    }

    /* A zeroed SQE, or NULL when every slot is prepared or not yet taken by the kernel. */
    static struct io_uring_sqe *pf_get_sqe(pf_ring *r) {
        unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        struct io_uring_sqe *sqe;
        if (r->sqe_tail - head >= r->sq_entries) return NULL;
        sqe = &r->sqes[r->sqe_tail & *r->sq_mask];
        memset(sqe, 0, sizeof *sqe);
        return sqe;
    }
    static void pf_commit_sqe(pf_ring *r) { r->sqe_tail++; }
    static unsigned pf_sq_free(pf_ring *r) {
        return r->sq_entries - (r->sqe_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE));
    }

    static void pf_prep_send(struct io_uring_sqe *sqe, int op, int fd, const void *addr,
                             unsigned len, int msg_flags, uint64_t ud, unsigned zc_flags,
                             int buf_index, unsigned sqe_flags) {
        sqe->opcode = (unsigned char)op;
        sqe->fd = fd;
        sqe->addr = (uint64_t)(uintptr_t)addr;
        sqe->len = len;
        sqe->msg_flags = (unsigned)msg_flags;
        sqe->user_data = ud;
        sqe->ioprio = (unsigned short)zc_flags;
        sqe->flags = (unsigned char)sqe_flags;
        if (buf_index >= 0) {
            sqe->ioprio |= IORING_RECVSEND_FIXED_BUF;
            sqe->buf_index = (unsigned short)buf_index;
        }
    }
    static void pf_prep_cancel(struct io_uring_sqe *sqe, int fd, uint64_t target,
                               uint64_t ud) {
        sqe->opcode = IORING_OP_ASYNC_CANCEL;
        sqe->user_data = ud;
        if (fd >= 0) {
            sqe->fd = fd;
            sqe->cancel_flags = IORING_ASYNC_CANCEL_FD | IORING_ASYNC_CANCEL_ALL;
        } else {
            sqe->fd = -1;
            sqe->addr = target;
        }
    }

    /* The next CQE (copied out), or 0 when the CQ ring is empty. */
    static int pf_peek(pf_ring *r, uint64_t *ud, int32_t *res, uint32_t *flags) {
        unsigned head = *r->cq_head;
        struct io_uring_cqe *cqe;
        if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) return 0;
        cqe = &r->cqes[head & *r->cq_mask];
        *ud = cqe->user_data; *res = cqe->res; *flags = cqe->flags;
        __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
        return 1;
    }
    static int pf_cq_overflowed(pf_ring *r) {
        return (__atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW) != 0;
    }

    /* Wait (GIL released by the caller) for at least one CQE, at most timeout_ns. */
    static long pf_wait(int fd, long long timeout_ns) {
        struct __kernel_timespec ts;
        struct io_uring_getevents_arg arg;
        memset(&arg, 0, sizeof arg);
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        arg.ts = (uint64_t)(uintptr_t)&ts;
        return pf_sys_enter(fd, 0, 1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG,
                            &arg, sizeof arg);
    }

    /* 1 if the kernel supports opcode op (IORING_REGISTER_PROBE), 0 if not, -errno. */
    static int pf_probe_op(int fd, int op) {
        size_t sz = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
        struct io_uring_probe *probe = calloc(1, sz);
        long r;
        int ok;
        if (!probe) return -ENOMEM;
        r = pf_sys_register(fd, IORING_REGISTER_PROBE, probe, 256);
        if (r < 0) { free(probe); return (int)r; }
        ok = op <= probe->last_op && (probe->ops[op].flags & IO_URING_OP_SUPPORTED);
        free(probe);
        return ok;
    }

    static long pf_register_sparse(int fd, unsigned nr) {
        struct io_uring_rsrc_register reg;
        memset(&reg, 0, sizeof reg);
        reg.nr = nr;
        reg.flags = IORING_RSRC_REGISTER_SPARSE;
        return pf_sys_register(fd, IORING_REGISTER_BUFFERS2, &reg, sizeof reg);
    }
    /* Fill (or, with base NULL, empty) fixed-buffer slot `slot`. */
    static long pf_update_buffer(int fd, unsigned slot, void *base, size_t len) {
        struct iovec iov;
        struct io_uring_rsrc_update2 up;
        iov.iov_base = base; iov.iov_len = base ? len : 0;
        memset(&up, 0, sizeof up);
        up.offset = slot;
        up.data = (uint64_t)(uintptr_t)&iov;
        up.nr = 1;
        return pf_sys_register(fd, IORING_REGISTER_BUFFERS_UPDATE, &up, sizeof up);
    }
    static long pf_register_eventfd(int fd, int efd) {
        return pf_sys_register(fd, IORING_REGISTER_EVENTFD, &efd, 1);
    }
    static long pf_unregister_eventfd(int fd) {
        return pf_sys_register(fd, IORING_UNREGISTER_EVENTFD, NULL, 0);
    }

    static pf_msg *pf_msg_new(Py_ssize_t n) {
        pf_msg *m = calloc(1, sizeof(pf_msg) + (size_t)n * sizeof(struct iovec));
        if (m) { m->msg.msg_iov = m->iov; m->msg.msg_iovlen = (size_t)n; }
        return m;
    }
    """
    ctypedef struct pf_ring:
        int fd
        unsigned sq_entries
        unsigned cq_entries
        unsigned features
        unsigned *cq_overflow

    struct io_uring_sqe:
        pass

    struct iovec:
        void *iov_base
        size_t iov_len

    ctypedef struct pf_msg:
        iovec iov[1]

    int close_fd "close"(int fd) nogil
    long pf_sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags,
                      void *arg, size_t argsz) nogil
    int pf_ring_init(pf_ring *r, unsigned entries, unsigned cq_entries) nogil
    void pf_ring_exit(pf_ring *r) nogil
    unsigned pf_sq_ready(pf_ring *r) nogil
    void pf_publish(pf_ring *r) nogil
    io_uring_sqe *pf_get_sqe(pf_ring *r) nogil
    void pf_commit_sqe(pf_ring *r) nogil
    unsigned pf_sq_free(pf_ring *r) nogil
    void pf_prep_send(io_uring_sqe *sqe, int op, int fd, const void *addr, unsigned len,
                      int msg_flags, uint64_t ud, unsigned zc_flags, int buf_index,
                      unsigned sqe_flags) nogil
    void pf_prep_cancel(io_uring_sqe *sqe, int fd, uint64_t target, uint64_t ud) nogil
    int pf_peek(pf_ring *r, uint64_t *ud, int32_t *res, uint32_t *flags) nogil
    int pf_cq_overflowed(pf_ring *r) nogil
    long pf_wait(int fd, long long timeout_ns) nogil
    int pf_probe_op(int fd, int op) nogil
    long pf_register_sparse(int fd, unsigned nr) nogil
    long pf_update_buffer(int fd, unsigned slot, void *base, size_t len) nogil
    long pf_register_eventfd(int fd, int efd) nogil
    long pf_unregister_eventfd(int fd) nogil
    pf_msg *pf_msg_new(Py_ssize_t n) nogil

    int IORING_OP_SEND, IORING_OP_SENDMSG, IORING_OP_SEND_ZC, IORING_OP_SENDMSG_ZC
    unsigned IORING_SEND_ZC_REPORT_USAGE, IORING_NOTIF_USAGE_ZC_COPIED
    unsigned IORING_CQE_F_MORE, IORING_CQE_F_NOTIF, IORING_ENTER_GETEVENTS
    unsigned IORING_FEAT_NODROP, IORING_FEAT_EXT_ARG, IOSQE_IO_LINK
    int MSG_NOSIGNAL


SEND_ZC_SUPPORTED_OPS = ("IORING_OP_SEND_ZC", "IORING_OP_SENDMSG_ZC")
MAX_FIXED_BUFFERS = 16384  # IORING_MAX_REG_BUFFERS
cdef uint64_t _INTERNAL = 1ULL << 63  # user_data of requests the ring makes itself (cancels)
cdef long long _SLICE_NS = 50 * 1000 * 1000  # a wait re-checks its request this often
# Rings with requests in flight: never collected, since their table holds the pins of
# pages the kernel may still read (the table, its requests and their channels form a
# cycle the garbage collector could otherwise break).
cdef set _BUSY = set()
# Every ring of this process: a forked child makes its copies inert (their memory is
# not mapped there: MADV_DONTFORK).
_RINGS = _weakref.WeakSet()


def _after_fork_in_child():
    for ring in list(_RINGS):
        (<Ring>ring).after_fork_in_child()
    _BUSY.clear()  # the parent's requests: never the child's to release


_os.register_at_fork(after_in_child=_after_fork_in_child)


@cython.freelist(256)
@cython.final
cdef class Request:
    """One send request in the ring's table: what it pins until the kernel is done."""

    cdef readonly Channel channel
    cdef object pin  # released on the notification (or the result, without F_MORE)
    cdef object view  # (a flat send) the export that keeps its memory in place ...
    cdef object ref  # ... and the one destructor reference it holds, or None
    cdef object on_release  # called with the request once the ring has released it
    cdef pf_msg *msg  # SENDMSG's header: kept until the result
    cdef readonly Py_ssize_t nbytes
    cdef readonly long long result
    cdef readonly bint done_result  # the result CQE was reaped
    cdef readonly bint more  # ... and said a notification follows
    cdef bint notified
    cdef readonly bint zerocopy
    cdef readonly bint finished  # out of the table: nothing held any more
    cdef readonly uint64_t user_data
    # the SQE to be: set by Ring._request, written by Ring._file
    cdef int op, slot, msg_flags
    cdef unsigned zc_flags, sqe_flags
    cdef const void *addr
    cdef size_t length

    def __dealloc__(self):
        if self.msg is not NULL:
            free(self.msg)


@cython.final
cdef class Channel:
    """One socket's sends on a ring: its counters, and whose references its pins hold.

    Kernel counterpart: none (the per-socket state of ``ZeroCopySocket``'s tracker);
    the kernel keeps a ring's requests, not a socket's."""

    cdef readonly Ring ring
    cdef readonly int fd
    cdef readonly bint stream
    cdef readonly object holder
    cdef readonly Py_ssize_t outstanding  # zero-copy requests not yet notified
    cdef readonly Py_ssize_t in_flight  # requests whose result is not reaped yet
    cdef readonly Py_ssize_t pinned_bytes, peak_pinned_bytes
    cdef readonly long long sends, zerocopy_sends, bytes_sent
    cdef readonly long long completions, copied_completions
    cdef long long fresh_zc, fresh_copied  # notified since take_fresh()
    cdef readonly object last_request
    cdef public object on_result  # called with each Request whose result was reaped

    def __init__(self, Ring ring not None, int fd, bint stream, holder=None):
        ring._check()
        self.ring = ring
        self.fd = fd
        self.stream = stream
        self.holder = self if holder is None else holder

    def take_fresh(self):
        """(zero-copy, copied) notifications since the last call, for the policy."""
        result = (self.fresh_zc, self.fresh_copied)
        self.fresh_zc = self.fresh_copied = 0
        return result

    def submit_one(self, pin, views, bint zerocopy, int msg_flags, bint link=False):
        """Prepare one send of ``views`` (a list of byte memoryviews) holding ``pin``
        (anything with ``release(holder)``) and return its :class:`Request` (not yet
        submitted: :meth:`Ring.submit`). Zero-copy: ``SEND_ZC`` (from a fixed buffer
        when the memory lies in one) or ``SENDMSG_ZC``; otherwise the copying
        ``SEND``/``SENDMSG``. ``link``: the next request of this batch runs only if this
        one sends everything.

        Refs: ``pin`` is the request's from the call on: released here if it fails,
        else when the kernel is done with the pages. Never release it after calling
        (an interrupt raised as this returns does not mean it failed)."""
        try:
            return self.ring._prepare(self, pin, views, zerocopy, msg_flags, link)
        except BaseException:
            if pin is not None:
                pin.release(self.holder)
            raise

    cdef object _pinned(self, list views, owners, destructor):
        """A pin of ``views`` for a request: one reference on each owner (``owners[i]``
        of ``views[i]``, or None) and on ``destructor``, all or none. A copying request
        holds them too, until its result: io_uring copies when it sends, which may be
        after the call that asked (the socket full). With the compiled core no bytecode
        runs in here, so no interrupt lands between the references and the filing."""
        pin = _Pin(views[:], None if owners is None else list(owners))
        pin.take(self.holder, destructor)
        return pin

    def submit_iov(self, list views, owners, destructor, bint zerocopy, int msg_flags,
                   on_release=None):
        """One request of ``views`` (byte memoryviews; ``owners[i]``, the destructor of
        ``views[i]``, or None), pinned, filed and handed to the kernel in this one call;
        returns it. ``on_release(request)`` is called once the ring has released it.
        Kernel: ``SEND_ZC``/``SENDMSG_ZC`` (or the copying ``SEND``/``SENDMSG``).

        Refs: zero-copy: +1 on every owner and on ``destructor``, dropped when the
        kernel is done with the pages (at once if this raises)."""
        cdef Request req
        pin = self._pinned(views, owners, destructor)
        try:
            req = self.ring._request(self, pin, views, zerocopy, msg_flags, False)
            req.on_release = on_release
            self.ring._reserve(1)
            self.ring._file(req)
        except BaseException:
            pin.release(self.holder)  # not filed: the kernel never saw these pages
            raise
        self.ring._submit()  # in the same call: never left filed and not handed over
        return req

    def file_linked(self, list filed, list views, list owners, list destructors,
                    bint zerocopy, int msg_flags):
        """Datagrams ``views[i]`` (each a list of byte memoryviews, ``owners[i]`` their
        destructors), each pinned with ``destructors[i]``, as one linked batch
        (``IOSQE_IO_LINK``: issued in order, the first that fails cancels the rest),
        filed in one step, all or none; their requests are appended to ``filed`` as they
        are filed (so the caller has them even if an interrupt is raised as this
        returns), for :meth:`Ring.submit`. Kernel: ``SEND_ZC``/``SENDMSG_ZC`` (or
        ``SEND``/``SENDMSG``).

        Refs: zero-copy: +1 on every owner and destructor of each datagram, dropped when
        the kernel is done with its pages (at once if this raises)."""
        cdef Ring ring = self.ring
        cdef Py_ssize_t i, n = len(views)
        cdef list reqs = [], pins = []
        if len(owners) != n or len(destructors) != n:
            raise ValueError("one list of owners and one destructor per datagram")
        try:
            for i in range(n):
                pins.append(self._pinned(views[i], owners[i], destructors[i]))
            for i in range(n):
                reqs.append(ring._request(self, pins[i], views[i], zerocopy, msg_flags,
                                          i + 1 < n))
            ring._reserve(n)
        except BaseException:
            for pin in pins:  # none was filed
                pin.release(self.holder)
            raise
        # Filed in one step: _file runs no Python code and cannot fail once room is
        # reserved but for a dict that cannot grow (then the pins stay with the ring).
        for i in range(n):
            ring._file(reqs[i])
            filed.append(reqs[i])  # (no tracked allocation: still one step)

    cdef Request _flat(self, data, destructor, bint zerocopy, int msg_flags, bint link):
        """A request (not filed yet) for one flat buffer. It keeps a memoryview export
        (the memory can be neither freed nor resized) and one reference on
        ``destructor``, taken here, before the kernel can see the pages (a copying
        request too: io_uring may copy after the call that asked)."""
        cdef Request req
        view = PyMemoryView_FromObject(data)
        req = self.ring._request(self, None, [view], zerocopy, msg_flags, link)
        req.view = view
        if destructor is not None:
            destructor.ref(holder=self.holder)
            req.ref = destructor
        return req

    cdef int _unfiled(self, list reqs, Py_ssize_t start) except -1:
        """Drop the references of requests that were never filed."""
        cdef Request req
        for req in reqs[start:]:
            ref, req.ref = req.ref, None
            if ref is not None:
                ref.unref(holder=self.holder)
        return 0

    def send_flat(self, data, destructor, bint zerocopy, int msg_flags):
        """One send of one flat buffer (bytes, bytearray, contiguous memoryview) in one
        C call: pin, prepare, submit, wait for the result (the GIL released while it
        waits); returns the result (bytes taken, or ``-errno`` for the caller to raise
        or retry). An interrupt while waiting leaves the request and its pin in the
        ring. Kernel: ``IORING_OP_SEND_ZC`` (fixed buffer when registered) or ``SEND``.

        Refs: +1 on ``destructor`` for a zero-copy send, dropped on its notification."""
        cdef Request req = self._flat(data, destructor, zerocopy, msg_flags, False)
        try:
            self.ring._reserve(1)
            self.ring._file(req)
        except BaseException:
            self._unfiled([req], 0)
            raise
        self.ring._wait_for(req, None)
        return req.result

    def send_flat_batch(self, list items, list destructors, Py_ssize_t start,
                        Py_ssize_t count, Py_ssize_t zc_min, int msg_flags):
        """Datagrams ``items[start:start+count]`` (flat buffers) as one linked batch,
        one ``io_uring_enter``; waits for every result. Returns ``(sent, result)``: how
        many were sent before the first that failed, and that one's result (0 if none
        failed). An item of at least ``zc_min`` bytes goes zero-copy (``zc_min < 0``:
        none), the others copied. ``destructors[i]`` (or None) is held by a zero-copy
        ``items[i]``'s request.

        Refs: +1 on each destructor of a zero-copy send, dropped on its notification."""
        cdef Py_ssize_t i, end = start + count, sent = 0
        cdef Request req
        cdef list reqs = []
        cdef Ring ring = self.ring
        if start < 0 or count < 0 or end > len(items) or end > len(destructors):
            raise IndexError("batch out of range")
        cdef Py_ssize_t filed = 0
        try:
            for i in range(start, end):
                item = items[i]
                reqs.append(self._flat(item, destructors[i], 0 <= zc_min <= len(item),
                                       msg_flags, i + 1 < end))
            # Filed in one step (no Python code: see _file): no other thread can submit
            # half of this linked batch.
            ring._reserve(len(reqs))
            for req in reqs:
                ring._file(req)
                filed += 1
        except BaseException:
            self._unfiled(reqs, filed)
            del reqs[filed:]
            if filed:
                ring._submit()  # what was filed is handed over, never left behind
            raise
        try:
            ring._submit()
            for req in reqs:
                ring._wait_for(req, None)
        except BaseException as exc:
            # An interrupt (or error) while waiting: learn exactly what went, so the
            # caller's items_sent is true, then raise it.
            sent = ring.settle(reqs)
            try:
                exc.items_sent = getattr(exc, "items_sent", 0) + sent
            except AttributeError:
                pass
            raise
        return ring.outcome(reqs)

    def wait_result(self, Request req not None, deadline):
        """Reap until ``req``'s result is in; ``deadline`` (monotonic seconds, or None)
        bounds it: False when it passed first. Kernel: ``io_uring_enter(GETEVENTS)``.

        Refs: drops those of every request completed meanwhile (destructors may run)."""
        return self.ring._wait_for(req, deadline)

    def wait_all(self, deadline):
        """Reap until no request of this channel holds pages; False if ``deadline``
        passed first. Refs: as :meth:`wait_result`."""
        return self.ring._wait_channel(self, deadline, False)

    def wait_idle(self, deadline):
        """Reap until no request of this channel awaits its result (the stream may take
        the next one); False if ``deadline`` passed first. Refs: as :meth:`wait_result`."""
        return self.ring._wait_channel(self, deadline, True)

    def pending_pins(self):
        """What each of this channel's requests in the ring still holds: one
        ``(pin, view, reference)`` per request (a flat send holds a view and at most one
        reference, any other a pin)."""
        cdef Request req
        held = []
        for r in self.ring._table.values():
            req = <Request>r
            if req.channel is self:
                held.append((req.pin, req.view, req.ref))
        return held


@cython.final
cdef class Ring:
    """An io_uring instance: submission and completion rings, the table of requests in
    flight, and the fixed (registered) buffers. Kernel: ``io_uring_setup``.

    ``entries``: submission slots; ``cq_entries``: completion slots (0: twice that). A
    full completion ring loses nothing (``IORING_FEAT_NODROP``: the kernel keeps the
    overflow and hands it over when there is room)."""

    cdef object __weakref__
    cdef pf_ring r
    cdef bint opened
    cdef readonly bint forked
    cdef dict _table
    cdef list _releases
    cdef uint64_t _next_ud
    cdef readonly long long overflow_flushes
    cdef Py_ssize_t waiters  # threads inside io_uring_enter with the GIL released
    # fixed buffers: sorted by start address
    cdef Py_ssize_t nfixed
    cdef Py_ssize_t fixed_cap
    cdef size_t *fixed_lo
    cdef size_t *fixed_hi
    cdef int *fixed_slot
    cdef object _fixed_views  # slot -> memoryview kept exported while registered
    cdef list _free_slots
    cdef bint sparse

    def __cinit__(self):
        self.r.fd = -1

    def __init__(self, unsigned entries=256, unsigned cq_entries=0):
        cdef int rc
        if entries == 0:
            raise ValueError("a ring needs at least one submission entry")
        rc = pf_ring_init(&self.r, entries, cq_entries)
        if rc < 0:
            raise OSError(-rc, f"io_uring_setup: {_errno.errorcode.get(-rc, -rc)}")
        self.opened = True
        _RINGS.add(self)
        self._table = {}
        self._releases = []
        self._next_ud = 1
        self._fixed_views = {}
        self._free_slots = []
        if not (self.r.features & IORING_FEAT_NODROP) or not (self.r.features & IORING_FEAT_EXT_ARG):
            self._teardown()
            raise OSError(EOPNOTSUPP, "io_uring without NODROP/EXT_ARG (Linux < 5.11)")
        rc = pf_probe_op(self.r.fd, IORING_OP_SEND_ZC)
        if rc <= 0 or pf_probe_op(self.r.fd, IORING_OP_SENDMSG_ZC) <= 0:
            self._teardown()
            raise OSError(EOPNOTSUPP, "io_uring without SEND_ZC (Linux < 6.0)")

    def __dealloc__(self):
        # Only a ring with nothing in flight is ever collected (_BUSY keeps the others).
        # A forked child's copy has nothing mapped: it only closes its descriptor.
        if self.opened and not self.forked:
            pf_ring_exit(&self.r)
        elif self.forked and self.r.fd >= 0:
            close_fd(self.r.fd)
        free(self.fixed_lo)
        free(self.fixed_hi)
        free(self.fixed_slot)

    cdef _teardown(self):
        pf_ring_exit(&self.r)
        self.opened = False

    cdef int _check(self) except -1:
        if self.forked:
            raise OSError(EBADF, "this io_uring belongs to the parent process")
        if not self.opened:
            raise OSError(EBADF, "the io_uring is closed")
        return 0

    def fileno(self):
        """The ring's descriptor (readable when completions are ready: an event loop
        watches it)."""
        self._check()
        return self.r.fd

    @property
    def closed(self):
        return not self.opened

    @property
    def sq_entries(self):
        return self.r.sq_entries

    @property
    def cq_entries(self):
        return self.r.cq_entries

    @property
    def in_flight(self):
        """Requests in the table: a result or a notification still to come."""
        return len(self._table)

    @property
    def cq_overflow(self):
        """Completions the kernel had to keep aside because the ring was full (they are
        delivered later, none is lost)."""
        return self.r.cq_overflow[0] if self.opened and not self.forked else 0

    def after_fork_in_child(self):
        """The child's copy: never touch the parent's ring (its memory is not mapped
        here) and never release the parent's pins."""
        self.forked = True
        self._table = {}
        self._releases = []

    def close(self):
        """Close the ring. Refuses (``OSError(EBUSY)``) while requests are in flight:
        their pages would never be reported released. Kernel: ``close()``."""
        if self.forked:
            if self.r.fd >= 0:
                close_fd(self.r.fd)
                self.r.fd = -1
            self.opened = False
            return
        if not self.opened:
            return
        self.reap()
        if self._table:
            raise OSError(EBUSY, f"{len(self._table)} requests still in flight")
        if self.waiters:
            raise OSError(EBUSY, f"{self.waiters} threads are waiting on the ring")
        self._teardown()

    # -- fixed buffers ---------------------------------------------------------------
    def register_buffer(self, view):
        """Register ``view`` (a writable, contiguous buffer) as a fixed buffer and
        return its slot; sends of memory inside it then use it
        (``IORING_RECVSEND_FIXED_BUF``): its pages were pinned once, here. Kernel:
        ``IORING_REGISTER_BUFFERS2`` (sparse) + ``IORING_REGISTER_BUFFERS_UPDATE``.

        Refs: none (the ring keeps an export of ``view`` until unregistered)."""
        cdef Py_buffer b
        cdef long rc
        cdef Py_ssize_t i, slot
        self._check()
        mv = memoryview(view)
        if not mv.contiguous or mv.nbytes == 0:
            raise ValueError("a fixed buffer must be contiguous and not empty")
        if mv.readonly:
            raise ValueError("io_uring registers writable memory only")
        if not self.sparse:
            if self.fixed_lo is NULL:
                self.fixed_lo = <size_t *>malloc(MAX_FIXED_BUFFERS * sizeof(size_t))
            if self.fixed_hi is NULL:
                self.fixed_hi = <size_t *>malloc(MAX_FIXED_BUFFERS * sizeof(size_t))
            if self.fixed_slot is NULL:
                self.fixed_slot = <int *>malloc(MAX_FIXED_BUFFERS * sizeof(int))
            if not self.fixed_lo or not self.fixed_hi or not self.fixed_slot:
                raise MemoryError()
            rc = pf_register_sparse(self.r.fd, MAX_FIXED_BUFFERS)
            if rc < 0:
                raise OSError(-rc, "IORING_REGISTER_BUFFERS2")
            self.sparse = True
            self._free_slots = list(range(MAX_FIXED_BUFFERS - 1, -1, -1))
        if not self._free_slots:
            raise OSError(ENOBUFS, f"all {MAX_FIXED_BUFFERS} fixed buffers are in use")
        PyObject_GetBuffer(mv, &b, PyBUF_SIMPLE)
        try:
            slot = self._free_slots[-1]
            rc = pf_update_buffer(self.r.fd, <unsigned>slot, b.buf, <size_t>b.len)
            if rc < 0:
                raise OSError(-rc, f"io_uring buffer registration: {_errno.errorcode.get(-rc, -rc)}")
            self._free_slots.pop()
            lo = <size_t>b.buf
            i = self.nfixed
            while i > 0 and self.fixed_lo[i - 1] > lo:
                self.fixed_lo[i] = self.fixed_lo[i - 1]
                self.fixed_hi[i] = self.fixed_hi[i - 1]
                self.fixed_slot[i] = self.fixed_slot[i - 1]
                i -= 1
            self.fixed_lo[i] = lo
            self.fixed_hi[i] = lo + <size_t>b.len
            self.fixed_slot[i] = <int>slot
            self.nfixed += 1
            self._fixed_views[slot] = mv
        finally:
            PyBuffer_Release(&b)
        return slot

    def unregister_buffer(self, Py_ssize_t slot):
        """Empty fixed-buffer ``slot`` (requests already using it keep it until they
        finish, in the kernel). Kernel: ``IORING_REGISTER_BUFFERS_UPDATE``.

        Refs: none."""
        cdef Py_ssize_t i, j
        cdef long rc
        if self.forked or not self.opened:
            return
        if slot not in self._fixed_views:
            raise ValueError(f"fixed buffer slot {slot} is not registered")
        rc = pf_update_buffer(self.r.fd, <unsigned>slot, NULL, 0)
        if rc < 0:
            raise OSError(-rc, "IORING_REGISTER_BUFFERS_UPDATE")
        for i in range(self.nfixed):
            if self.fixed_slot[i] == slot:
                for j in range(i, self.nfixed - 1):
                    self.fixed_lo[j] = self.fixed_lo[j + 1]
                    self.fixed_hi[j] = self.fixed_hi[j + 1]
                    self.fixed_slot[j] = self.fixed_slot[j + 1]
                self.nfixed -= 1
                break
        del self._fixed_views[slot]
        self._free_slots.append(slot)

    @property
    def fixed_buffers(self):
        return self.nfixed

    cdef inline int _fixed_index(self, size_t lo, size_t n) noexcept:
        """The slot of the fixed buffer holding [lo, lo+n), or -1."""
        cdef Py_ssize_t a = 0, b = self.nfixed, m
        while a < b:
            m = (a + b) // 2
            if self.fixed_lo[m] <= lo:
                a = m + 1
            else:
                b = m
        if a > 0 and lo + n <= self.fixed_hi[a - 1]:
            return self.fixed_slot[a - 1]
        return -1

    def fixed_index(self, view):
        """The fixed-buffer slot ``view``'s memory lies in, or -1."""
        cdef Py_buffer b
        PyObject_GetBuffer(view, &b, PyBUF_SIMPLE)
        try:
            return self._fixed_index(<size_t>b.buf, <size_t>b.len)
        finally:
            PyBuffer_Release(&b)

    def register_eventfd(self, int efd):
        """Signal ``efd`` whenever a completion is posted. Kernel:
        ``IORING_REGISTER_EVENTFD``."""
        self._check()
        cdef long rc = pf_register_eventfd(self.r.fd, efd)
        if rc < 0:
            raise OSError(-rc, "IORING_REGISTER_EVENTFD")

    def unregister_eventfd(self):
        self._check()
        cdef long rc = pf_unregister_eventfd(self.r.fd)
        if rc < 0:
            raise OSError(-rc, "IORING_UNREGISTER_EVENTFD")

    # -- submission ------------------------------------------------------------------
    cdef io_uring_sqe *_sqe(self) except NULL:
        cdef io_uring_sqe *sqe = pf_get_sqe(&self.r)
        if sqe is NULL:
            self._submit()  # hand the prepared ones over: their slots free up
            sqe = pf_get_sqe(&self.r)
            if sqe is NULL:
                raise OSError(EBUSY, "io_uring submission ring is full")
        return sqe

    cdef Request _request(self, Channel ch, pin, list views, bint zerocopy, int msg_flags,
                          bint link):
        """A request for ``views``, not filed yet: its memory's addresses, its opcode,
        its fixed buffer. May run Python code (allocations): nothing is shared yet."""
        cdef Py_buffer b
        cdef Py_ssize_t n = len(views), i, total = 0
        cdef pf_msg *msg = NULL
        cdef Request req
        self._check()
        if n == 0:
            raise ValueError("nothing to send")
        req = Request.__new__(Request)
        req.channel = ch
        req.pin = pin
        req.zerocopy = zerocopy
        req.zc_flags = IORING_SEND_ZC_REPORT_USAGE if zerocopy else 0
        req.sqe_flags = IOSQE_IO_LINK if link else 0
        req.msg_flags = msg_flags | MSG_NOSIGNAL
        req.slot = -1
        if n == 1:
            # Our own export is released at once: the caller's view keeps the memory
            # exported (not resizable, not freed) until the request lets it go.
            PyObject_GetBuffer(views[0], &b, PyBUF_SIMPLE)
            req.addr = b.buf
            req.length = <size_t>b.len
            PyBuffer_Release(&b)
            if req.length > 0xFFFFFFFF:
                raise ValueError("one send takes at most 4 GiB")
            total = <Py_ssize_t>req.length
            req.op = IORING_OP_SEND_ZC if zerocopy else IORING_OP_SEND
            if zerocopy:
                req.slot = self._fixed_index(<size_t>req.addr, req.length)
        else:
            msg = pf_msg_new(n)
            if msg is NULL:
                raise MemoryError()
            req.msg = msg  # freed with the request, whatever happens next
            for i in range(n):
                PyObject_GetBuffer(views[i], &b, PyBUF_SIMPLE)
                msg.iov[i].iov_base = b.buf
                msg.iov[i].iov_len = <size_t>b.len
                total += b.len
                PyBuffer_Release(&b)
            req.addr = msg
            req.length = 1
            req.op = IORING_OP_SENDMSG_ZC if zerocopy else IORING_OP_SENDMSG
        req.nbytes = total
        return req

    cdef int _reserve(self, Py_ssize_t n) except -1:
        """Make room for ``n`` SQEs (submitting what is prepared), before filing a batch
        in one step."""
        if n > self.r.sq_entries:
            raise ValueError(f"a batch of {n} requests on a ring of {self.r.sq_entries}")
        if pf_sq_free(&self.r) < <unsigned>n:
            self._submit()
            if pf_sq_free(&self.r) < <unsigned>n:
                raise OSError(EBUSY, "io_uring submission ring is full")
        return 0

    cdef int _file(self, Request req) except -1:
        """File ``req`` in the table and commit its SQE: no Python code runs in here (no
        allocation of a tracked object), so the request is in the table exactly when its
        SQE is committed, and a batch filed in a loop of these is atomic for other
        threads (none can hand half a linked batch to the kernel). Room reserved."""
        cdef Channel ch = req.channel
        cdef io_uring_sqe *sqe = pf_get_sqe(&self.r)
        cdef uint64_t ud = self._next_ud
        if sqe is NULL:
            raise OSError(EBUSY, "io_uring submission ring is full")
        self._next_ud += 1
        req.user_data = ud
        if not self._table:
            _BUSY.add(self)
        self._table[ud] = req
        pf_prep_send(sqe, req.op, ch.fd, req.addr, <unsigned>req.length, req.msg_flags, ud,
                     req.zc_flags, req.slot, req.sqe_flags)
        pf_commit_sqe(&self.r)
        ch.in_flight += 1
        ch.sends += 1
        if req.zerocopy:
            ch.zerocopy_sends += 1
            ch.outstanding += 1
            ch.pinned_bytes += req.nbytes
            if ch.pinned_bytes > ch.peak_pinned_bytes:
                ch.peak_pinned_bytes = ch.pinned_bytes
        ch.last_request = req
        return 0

    cdef Request _prepare(self, Channel ch, pin, list views, bint zerocopy, int msg_flags,
                          bint link):
        cdef Request req = self._request(ch, pin, views, zerocopy, msg_flags, link)
        self._reserve(1)
        self._file(req)
        return req

    def cancel(self, Channel ch=None, Request req=None):
        """Ask the kernel to cancel ``ch``'s requests (or ``req``) that have not run yet
        (a send waiting for room). Their results come back as ``-ECANCELED`` (or with
        the bytes sent so far); pages already handed over are still reported by
        notifications. Kernel: ``IORING_OP_ASYNC_CANCEL``.

        Refs: none here (results and notifications release as usual)."""
        cdef io_uring_sqe *sqe
        self._check()
        sqe = self._sqe()
        if req is not None:
            pf_prep_cancel(sqe, -1, req.user_data, _INTERNAL)
        elif ch is not None:
            pf_prep_cancel(sqe, ch.fd, 0, _INTERNAL)
        else:
            raise TypeError("cancel() needs a channel or a request")
        pf_commit_sqe(&self.r)
        self._submit()

    cdef int _submit(self) except -1:
        """Hand every prepared SQE to the kernel. Never raises an interrupt: a signal's
        handler runs once this returns (what was filed is always handed over)."""
        cdef long rc
        cdef unsigned todo
        pf_publish(&self.r)
        todo = pf_sq_ready(&self.r)
        while todo:
            rc = pf_sys_enter(self.r.fd, todo, 0, 0, NULL, 0)
            if rc == -EINTR:
                continue  # (a submission without GETEVENTS does not wait)
            if rc == -EBUSY or rc == -EAGAIN:
                # Completions are backed up (overflow) or the kernel is short of memory:
                # take what is there, then hand the rest over again.
                self._reap_raw()
                if self._flush_overflow() == 0 and rc == -EAGAIN:
                    self.waiters += 1
                    with nogil:
                        pf_wait(self.r.fd, 1000000)
                    self.waiters -= 1
                todo = pf_sq_ready(&self.r)
                continue
            if rc < 0:
                raise OSError(-rc, f"io_uring_enter: {_errno.errorcode.get(-rc, -rc)}")
            todo = pf_sq_ready(&self.r)
        return 0

    def submit(self):
        """Hand every prepared request to the kernel (one ``io_uring_enter`` for all),
        then reap what is ready. Kernel: ``io_uring_enter``.

        Refs: drops those of every request completed (destructors may run here)."""
        self._check()
        self._submit()
        self.reap()

    # -- completions -----------------------------------------------------------------
    cdef int _flush_overflow(self) except -1:
        """Make the kernel move completions it kept aside into the ring."""
        cdef long rc
        if not pf_cq_overflowed(&self.r):
            return 0
        rc = pf_sys_enter(self.r.fd, 0, 0, IORING_ENTER_GETEVENTS, NULL, 0)
        self.overflow_flushes += 1
        if rc < 0 and rc != -EINTR and rc != -EBUSY:
            raise OSError(-rc, "io_uring_enter (overflow flush)")
        return 1

    cdef Py_ssize_t _reap_raw(self) except -1:
        """Take every CQE into the table's state; pins to release go to _releases."""
        cdef uint64_t ud
        cdef int32_t res
        cdef uint32_t flags
        cdef Py_ssize_t count = 0
        cdef Request req
        cdef Channel ch
        while True:
            while pf_peek(&self.r, &ud, &res, &flags):
                count += 1
                if ud & _INTERNAL:
                    continue
                obj = self._table.get(ud)
                if obj is None:
                    continue
                req = <Request>obj
                ch = req.channel
                if flags & IORING_CQE_F_NOTIF:
                    req.notified = True
                    ch.completions += 1
                    if <uint32_t>res & IORING_NOTIF_USAGE_ZC_COPIED:
                        ch.copied_completions += 1
                        ch.fresh_copied += 1
                    else:
                        ch.fresh_zc += 1
                    if req.done_result:
                        self._finish(req)
                    continue
                req.done_result = True
                req.result = res
                req.more = (flags & IORING_CQE_F_MORE) != 0
                ch.in_flight -= 1
                if req.zerocopy and not req.more:
                    # Refused before it ran (or cancelled in its link): no notification
                    # comes, so it was no zero-copy send (as a failed MSG_ZEROCOPY call).
                    ch.zerocopy_sends -= 1
                elif req.zerocopy and req.nbytes > res:
                    # A partial send: the stack holds only the bytes it took; the rest
                    # goes (and is counted) in a later request.
                    ch.pinned_bytes -= req.nbytes - (res if res > 0 else 0)
                    req.nbytes = res if res > 0 else 0
                if ch.on_result is not None:
                    self._releases.append((1, ch.on_result, req))
                if res > 0:
                    ch.bytes_sent += res
                if req.msg is not NULL:
                    free(req.msg)
                    req.msg = NULL
                if not req.more or req.notified:
                    self._finish(req)
            if not self._flush_overflow():
                return count

    cdef inline void _finish(self, Request req):
        cdef Channel ch = req.channel
        req.finished = True
        self._table.pop(req.user_data, None)
        if not self._table:
            _BUSY.discard(self)
        if req.zerocopy:
            ch.outstanding -= 1
            ch.pinned_bytes -= req.nbytes
        if req.pin is not None:
            self._releases.append((0, req.pin, ch.holder))
            req.pin = None
        req.view = None  # the kernel is done with the memory
        if req.ref is not None:
            self._releases.append((2, req.ref, ch.holder))
            req.ref = None
        if req.on_release is not None:
            self._releases.append((1, req.on_release, req))
            req.on_release = None

    cdef int _release_all(self) except -1:
        """Release the pins reaped (destructors run here) and call the channels'
        ``on_result``, every one also when one raises an interrupt (raised after the
        last); another exception from ``on_result`` goes to ``sys.unraisablehook``."""
        cdef list todo
        interrupt = None
        while self._releases:
            todo = self._releases
            self._releases = []
            for kind, obj, arg in todo:
                try:
                    if kind == 0:
                        obj.release(arg)
                    elif kind == 2:
                        obj.unref(holder=arg)
                    else:
                        obj(arg)
                except Exception as exc:
                    try:
                        report_unraisable(exc, "Exception in an io_uring ring callback", obj)
                    except BaseException as late:  # an interrupt while reporting
                        if interrupt is None:
                            interrupt = late
                except BaseException as exc:  # an interrupt: raised after the last
                    if interrupt is None:
                        interrupt = exc
        if interrupt is not None:
            raise interrupt
        return 0

    def reap(self):
        """Take every completion that is ready; returns how many CQEs were read.

        Refs: drops those of every request completed (destructors may run here)."""
        cdef Py_ssize_t n
        if self.forked:
            self._check()  # EBADF: the parent's
        if not self.opened:
            return 0
        n = self._reap_raw()
        self._release_all()
        return n

    cdef bint _wait_once(self, deadline) except -1:
        """One bounded wait for any completion; False if the deadline has passed."""
        cdef long long ns = _SLICE_NS
        cdef long rc
        if deadline is not None:
            left = deadline - _time.monotonic()
            if left <= 0:
                return False
            if left * 1e9 < ns:
                ns = <long long>(left * 1e9) + 1
        self.waiters += 1  # close() refuses while the kernel may still read the rings
        with nogil:
            rc = pf_wait(self.r.fd, ns)
        self.waiters -= 1
        # Every slice, not only on EINTR: a signal whose C handler ran in another thread,
        # or between two slices, interrupts no wait; its Python handler must still run.
        PyErr_CheckSignals()
        if rc < 0 and rc != -EINTR and rc != -ETIME and rc != -EBUSY:
            raise OSError(-rc, "io_uring_enter (wait)")
        return True

    cdef object _wait_for(self, Request req, deadline):
        self._check()
        if req.done_result:  # (a batch's later requests: reaped with the first)
            self._reap_raw()
            self._release_all()
            return True
        self._submit()
        while True:
            self._check()  # (a signal handler that ran in the wait may have closed it)
            self._reap_raw()
            self._release_all()
            if req.done_result:
                return True
            if not self._wait_once(deadline):
                return False

    cdef object _wait_channel(self, Channel ch, deadline, bint results_only):
        self._check()
        self._submit()
        while True:
            self._check()
            self._reap_raw()
            self._release_all()
            if ch.in_flight == 0 and (results_only or ch.outstanding == 0):
                return True
            if not self._wait_once(deadline):
                return False

    def wait(self, timeout=None):
        """Wait up to ``timeout`` seconds for a completion and reap; returns how many
        CQEs were read. Refs: as :meth:`reap`."""
        self._check()
        self._submit()
        n = self.reap()
        if n:
            return n
        self._wait_once(None if timeout is None else _time.monotonic() + timeout)
        return self.reap()

    def settle(self, list reqs):
        """After an interrupt: cancel the requests of ``reqs`` (one linked batch) whose
        result is not in, wait for every result — a second interrupt meanwhile is raised
        only once all are in — and return how many were sent before the first that
        failed. Kernel: ``IORING_OP_ASYNC_CANCEL``.

        Refs: drops those of every request completed meanwhile."""
        cdef Request req
        cdef Py_ssize_t sent = 0
        interrupt = None
        for req in reqs:
            if not req.done_result:
                self.cancel(req=req)
        for req in reqs:
            while not req.done_result:
                try:
                    self._wait_for(req, None)
                except (KeyboardInterrupt, SystemExit) as exc:
                    if interrupt is None:
                        interrupt = exc
        for req in reqs:
            if req.result < 0:
                break
            sent += 1
        if interrupt is not None:
            try:
                interrupt.items_sent = getattr(interrupt, "items_sent", 0) + sent
            except AttributeError:
                pass
            raise interrupt
        return sent

    def outcome(self, list reqs):
        """``(sent, result, refused)`` of a linked batch whose results are in: how many
        were sent before the first that failed, that one's result (0: none failed), and
        the index of the first zero-copy request refused for pinned memory (``ENOMEM``,
        ``ENOBUFS``: charged when the kernel prepares it, so it cancels its whole
        link), or -1."""
        cdef Request req
        cdef Py_ssize_t sent = -1, refused = -1, k = 0
        cdef long long first = 0
        for req in reqs:
            if req.result < 0:
                if sent < 0:
                    sent, first = k, req.result
                if refused < 0 and req.zerocopy and (req.result == -ENOMEM or req.result == -ENOBUFS):
                    refused = k
            k += 1
        return (k if sent < 0 else sent), first, refused

    def pending_pins(self):
        """What each request in the table still holds, as :meth:`Channel.pending_pins`."""
        cdef Request req
        held = []
        for r in self._table.values():
            req = <Request>r
            held.append((req.pin, req.view, req.ref))
        return held
