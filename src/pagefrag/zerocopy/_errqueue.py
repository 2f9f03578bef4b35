"""ErrorQueue: the reading side of a zero-copy socket — its ``MSG_ERRQUEUE``.

It reads the socket's error queue, hands each completion to the sans-I/O
:class:`CompletionTracker` and :class:`ZeroCopyPolicy`, releases the pins of the calls
completed (it is their holder: the socket pins every zero-copy call in its name), and
keeps the messages that are socket errors (ICMP errors, a pending ``sk_err``) for the
socket to raise. Kernel counterpart: ``sock_recv_errqueue`` and the
``SO_EE_ORIGIN_ZEROCOPY`` notifications of ``Documentation/networking/msg_zerocopy.rst``.

Its lock is the socket's *completion lock*: it covers the reads and the tracker's
bookkeeping, and is never held while a destructor runs or a sender waits in the kernel.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._destructor import implementation
from .._iov import Pin, Unrefs, unref_all
from ..errors import CompletionTimeoutError, QueuedSocketError, SendBufferError
from ._deadline import deadline_after, remaining_until
from ._syscalls import (
    ERRQUEUE_ANCBUF,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    RECVERR_CMSGS,
    wait_writable,
)
from .policy import ZeroCopyPolicy
from .tracker import CompletionTracker, ErrQueueMessage, completion_range, parse_extended_err

__all__ = ["ErrorQueue", "queued_error"]

read_errqueue: Callable[[Callable[[], int], collections.deque[Any]], int] | None = None
if not TYPE_CHECKING and implementation == "compiled":
    from .._speedups import read_errqueue

# Arguments of the error-queue reads: map(recvmsg, ...) reads until EAGAIN, in C.
_RECV_ARGS = (
    itertools.repeat(0),
    itertools.repeat(ERRQUEUE_ANCBUF),
    itertools.repeat(MSG_ERRQUEUE | MSG_DONTWAIT),
)


def queued_error(msg: ErrQueueMessage) -> QueuedSocketError:
    """The exception a socket error read from the error queue raises."""
    exc = QueuedSocketError(msg.errno, f"{os.strerror(msg.errno)} (from the error queue)")
    exc.report = msg
    return exc


class ErrorQueue:
    """The error queue of one zero-copy socket, with its completion lock; the holder of
    the pins of its zero-copy calls. Pins are detached under the lock into
    :attr:`unrefs` and their references dropped after it is released (a destructor may
    run anything)."""

    def __init__(
        self, sock: socket.socket, tracker: CompletionTracker[Pin], policy: ZeroCopyPolicy
    ) -> None:
        self.sock = sock
        self.tracker = tracker
        self.policy = policy
        self.unrefs = Unrefs()
        self.lock = threading.Lock()
        self.errors: collections.deque[ErrQueueMessage] = collections.deque()
        self._received: collections.deque[Any] = collections.deque()
        self._twin: socket.socket | None = None

    def drain(self, blocking: bool = True) -> int:
        """Read the queue and release what completed; returns how many calls. Not
        ``blocking``: return 0 at once when another thread is reading it.

        Refs: drops those of every call completed (destructors may fire here)."""
        lock = self.lock
        if not blocking and lock.locked():
            return 0
        # "with", not acquire() then try: an interrupt landing between the two would
        # leave the lock held for good (every later flush/close would hang).
        with lock:
            n = self.drain_locked()
        self.unrefs.run(self)
        return n

    def poll(self, timeout: float | None) -> int:
        """:meth:`drain`; with a timeout, wait up to it for the first completion when
        none is ready, then raise a socket error read meanwhile."""
        n = self.drain()
        if not n and timeout != 0 and self.tracker.has_pending:
            deadline = deadline_after(timeout)
            while not n and self.tracker.has_pending:
                remaining = remaining_until(deadline)
                if remaining is not None and remaining <= 0:
                    break
                self.wait(remaining)
                n = self.drain()
        if self.errors:
            self.raise_queued()
        return n

    def flush(self, deadline: float | None) -> None:
        """Drain until no call is outstanding; :class:`CompletionTimeoutError` (pins
        kept, nothing fired) at the deadline."""
        tracker = self.tracker
        while True:
            self.drain()
            if not tracker.has_pending:
                return
            remaining = remaining_until(deadline)
            if remaining is not None and remaining <= 0:
                raise CompletionTimeoutError(
                    f"the kernel still holds {tracker.outstanding} sends "
                    f"({tracker.pinned_bytes} bytes); their buffers stay pinned",
                    tracker.outstanding,
                    tracker.pinned_bytes,
                )
            self.wait(remaining)

    def make_room(self, limit: float, timeout: float) -> None:
        """After ENOBUFS: release what completed, or wait a little for completions
        (they free optmem and locked pages); :class:`SendBufferError` past ``limit``."""
        if self.drain():
            return
        remaining = limit - time.monotonic()
        if remaining <= 0:
            raise SendBufferError(
                errno.ENOBUFS,
                f"ENOBUFS for {timeout:g}s with {self.tracker.outstanding} sends "
                "outstanding (net.core.optmem_max or RLIMIT_MEMLOCK too small)",
            )
        self.wait(min(remaining, 0.05))

    def drain_locked(self) -> int:
        """The lock is held. Messages are appended to ``_received`` by C code as they
        are read, and each is removed only after it was processed: an interrupt cannot
        lose a completion (processing one twice is harmless: the tracker counts the
        second as a duplicate)."""
        tracker = self.tracker
        released = self._release(tracker.absorb())
        received = self._received
        sock = self.sock
        if read_errqueue is not None:
            # The compiled reader: recvmsg in C, completions parsed as they are read.
            read_errqueue(sock.fileno, received)
        else:
            # A socket with a timeout would wait for *data* before an error-queue read:
            # read through a twin descriptor without one (changing the timeout of the
            # shared socket would disturb a concurrent sender).
            reader = sock if not sock.gettimeout() else self._timeoutless()
            with contextlib.suppress(BlockingIOError, InterruptedError):  # until empty
                received.extend(map(reader.recvmsg, *_RECV_ARGS))
        while received:
            item = received[0]
            if type(item) is bytes:  # the compiled reader's socket error
                self.errors.append(parse_extended_err(item))  # type: ignore[arg-type]
            elif len(item) == 3:  # the compiled reader's completion
                released += self._completed(*item)
            else:  # a recvmsg result: its control messages
                for level, kind, payload in item[1]:
                    if (level, kind) in RECVERR_CMSGS:
                        done = completion_range(payload)
                        if done is None:  # a socket error (ICMP, local): for the caller
                            self.errors.append(parse_extended_err(payload))  # type: ignore[arg-type]
                        else:
                            released += self._completed(*done)
            received.popleft()
        return released + self._release(tracker.absorb())

    def absorb(self) -> CompletionTracker[Pin]:
        """Take in every filing (completions read before their filing are applied);
        returns the tracker, exact.

        Refs: drops those of calls completed before their filing."""
        with self.lock:
            self._release(self.tracker.absorb())
        self.unrefs.run(self)
        return self.tracker

    def trim(self, pin: Pin, n: int) -> None:
        """A partial send of ``n`` bytes: the pin keeps only what the kernel took (under
        the lock: its completion may be racing); the references of the rest are dropped
        after it."""
        with self.lock:
            dropped = pin.trim(n)
        unref_all(dropped, self)

    def settle_failed_send(self) -> None:
        """Did the failed call use an id? Its notification, if any, is already queued
        (the kernel dropped the datagram inside the call): read the queue and see.
        The send lock is held, so no other call can take the id meanwhile."""
        tracker = self.tracker
        with self.lock:
            sid = tracker.failed_send()
            try:
                self.drain_locked()
            finally:
                tracker.settle_failed(sid)
                self._release(tracker.absorb())
        self.unrefs.run(self)

    def _timeoutless(self) -> socket.socket:
        if self._twin is None:
            twin = socket.socket(fileno=os.dup(self.sock.fileno()))
            # The original has a timeout, so its description is O_NONBLOCK already:
            # a timeout of 0 on the twin keeps it so and makes Python call at once.
            twin.settimeout(0.0)
            self._twin = twin
        return self._twin

    def _completed(self, lo: int, hi: int, copied: bool) -> int:
        pins = self.tracker.complete(lo, hi, copied)
        self.policy.on_completion(copied, len(pins), time.monotonic())
        return self.unrefs.detach(pins)

    def _release(self, pins: list[Pin]) -> int:
        return self.unrefs.detach(pins)

    def wait(self, timeout: float | None) -> None:
        """Sleep until the error queue has something (POLLERR), at most ``timeout``."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000) + 1)
        poller = select.poll()  # one per wait: a poll object refuses concurrent use
        poller.register(self.sock.fileno(), 0)  # POLLERR/POLLHUP are always reported
        events = poller.poll(ms)
        if events and not events[0][1] & select.POLLERR:
            # POLLHUP without POLLERR (a closed connection) would wake us at once,
            # forever: sleep a little instead of spinning.
            time.sleep(min(0.01, timeout if timeout is not None else 0.01))
        elif events and not self.errors:
            self.take_socket_error()  # a pending socket error also raises POLLERR

    def wait_writable(self, deadline: float | None) -> None:
        """``sendall`` with a deadline: wait until the socket is writable; a socket error
        meanwhile is raised, completions are released. ``TimeoutError`` at the deadline."""
        remaining = remaining_until(deadline)
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"sendall did not finish in time ({self.tracker.outstanding} pinned)"
            )
        if wait_writable(self.sock, remaining):  # POLLERR: a socket error, or completions
            self.drain()
            self.raise_queued()

    def take_socket_error(self) -> bool:
        """Queue a pending socket error (``sk_err``: a reset, TCP giving up); True if
        there was one."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.errors.append(ErrQueueMessage(err, 0, 0, 0, 0, 0))
        return bool(err)

    def raise_queued(self) -> None:
        """Raise the oldest socket error queued, if any (:class:`QueuedSocketError`)."""
        if self.errors:
            try:
                msg = self.errors.popleft()
            except IndexError:  # another thread raised it
                return
            raise queued_error(msg)

    def close(self) -> None:
        self.errors.clear()
        if self._twin is not None:
            self._twin.close()

    def __repr__(self) -> str:
        return f"<error queue of ZeroCopySocket fd={self.sock.fileno()}>"

    def after_fork(self) -> None:
        """A fresh lock in a forked child (a parent thread may have held it)."""
        self.lock = threading.Lock()
