"""The lifecycle of a :class:`ZeroCopyTransport`: its states and the one table of the
transitions between them.

Rule 1: every change of a transport's lifecycle state goes through :func:`transition`
and so through :data:`TRANSITIONS`; nothing else assigns a state.
Rule 2: this module knows nothing of sockets, queues or the event loop: the transport
decides *when* an event happens, the table decides *what state* follows.

Theory of operation (the model is h11's ``_state.py``). A transport is ``OPEN`` until
``close()``, ``abort()`` or a failure of its connection; then it is ``CLOSING``: nothing
more is accepted, what is queued is sent (close) or dropped (abort, failure), and the
kernel's completions are awaited. ``connection_lost`` is reported once, when the
transport leaves ``CLOSING``: to ``LOST`` when the kernel holds no page any more (the
socket is closed), or to ``LINGERING`` when the linger bound ran out first (the socket
stays open and watched, its pages pinned, until the kernel releases the last of them:
then ``LOST``). ``is_closing()`` is true in every state but ``OPEN``.

::

    state      event           next state   what the transport does
    ---------  --------------  -----------  ---------------------------------------------
    OPEN       CLOSE           CLOSING      send the queue, then wait for completions
    OPEN       FORCE_CLOSE     CLOSING      drop the queue, reset, wait for completions
    CLOSING    FORCE_CLOSE     CLOSING      (abort or failure during close) same
    CLOSING    RELEASED        LOST         close the socket, report connection_lost
    CLOSING    LINGER_EXPIRED  LINGERING    report connection_lost, keep the pins
    LINGERING  RELEASED        LOST         close the socket (the loss was reported)

An event not in the table for the current state changes nothing and is ignored (for
example ``close()`` on a closing transport, ``abort()`` after the loss):
:func:`transition` returns None and the caller does nothing more.
"""

from __future__ import annotations

import enum

__all__ = ["REPORTED", "TRANSITIONS", "Event", "State", "transition"]


class State(enum.Enum):
    OPEN = "open"
    """Reading and accepting writes."""
    CLOSING = "closing"
    """close(), abort() or a failure: no more writes; waiting for the completions."""
    LINGERING = "lingering"
    """connection_lost reported past the linger bound; the kernel still holds pages."""
    LOST = "lost"
    """connection_lost reported; every page released, the socket closed."""


class Event(enum.Enum):
    CLOSE = "close"
    """close(): finish sending, then close."""
    FORCE_CLOSE = "force_close"
    """abort() or a failure of the connection (the one teardown path)."""
    RELEASED = "released"
    """Nothing queued and the kernel holds no page any more."""
    LINGER_EXPIRED = "linger_expired"
    """The linger bound ran out with pages still held by the kernel."""


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.OPEN: {Event.CLOSE: State.CLOSING, Event.FORCE_CLOSE: State.CLOSING},
    State.CLOSING: {
        Event.FORCE_CLOSE: State.CLOSING,
        Event.RELEASED: State.LOST,
        Event.LINGER_EXPIRED: State.LINGERING,
    },
    State.LINGERING: {Event.RELEASED: State.LOST},
    State.LOST: {},
}

REPORTED = (State.LINGERING, State.LOST)
"""The states in which connection_lost has been scheduled."""


def transition(state: State, event: Event) -> State | None:
    """The state ``event`` leads to from ``state``, or None if the table has no such
    transition (the event is ignored)."""
    return TRANSITIONS[state].get(event)
