"""When to ask the kernel for zero-copy: the ``auto`` / ``always`` / ``never`` policy.

Sans-I/O: the socket asks :meth:`ZeroCopyPolicy.use_zerocopy` before each send call and
reports every completion. In ``auto`` mode small sends are copied (zero-copy costs more
than it saves below roughly 10 KB: page pinning and a notification per call), and when
completions keep saying COPIED — the kernel copied anyway, as it does for local delivery
over loopback or into another namespace — the policy stops asking for zero-copy and probes
again now and then, so ``auto`` is never much slower than a plain ``send``.

Rule 1: everything that decides a transition lives in this file, and every transition is
in :data:`TRANSITIONS`, the one table below; the code reads it and keeps no other state
than the counters named here. Rule 2: the policy knows no socket, and it is told the
time: every event carries ``now`` (monotonic seconds; the socket passes it on every
call). For other callers ``use_zerocopy`` still accepts ``now=None`` and then reads
``time.monotonic()`` itself, only in ``COPYING``, the one state where a send may make a
probe due.

States (:class:`State`). ``ALWAYS`` and ``NEVER`` are the fixed modes; ``auto`` runs the
three others and starts in ``ZEROCOPY``, or in ``COPYING`` when the destination is known
to copy (``KNOWN_COPYING``, told once at set-up by :mod:`.destinations`: delivered
locally, or learned by an earlier socket to it).

- ``ZEROCOPY``: sends of at least ``min_size`` ask for zero-copy.
- ``COPYING``: completions kept saying COPIED: sends are copied, and every send of at least
  ``min_size`` counts towards the next probe.
- ``PROBING``: one send went zero-copy to see whether the kernel still copies; sends are
  copied until a completion answers.

Events (:class:`Event`). A send of less than ``min_size`` is no event (copied in ``auto``);
the streak counts completed calls that said COPIED, one after another.

- ``KNOWN_COPYING``: before any send, the destination is known to copy
  (:meth:`ZeroCopyPolicy.known_copying`); the probe clock is the destination's.
- ``SEND``: a send asks, no probe due.
- ``PROBE_DUE``: a send asks in ``COPYING`` and ``probe_every`` sends or ``probe_interval``
  seconds have passed since the last probe (or since entering ``COPYING``).
- ``PROBE_FAILED``: the probe never reached the kernel as a zero-copy call (refused:
  ``EAGAIN``, a destructor that fired; or sent copied after ``ENOBUFS``), so no
  completion will answer it (:meth:`ZeroCopyPolicy.unsent`). The next probe is due
  ``probe_interval`` after this one began.
- ``COPIED``: a completion said COPIED, the streak stays below ``copied_streak``.
- ``COPIED_STREAK``: a completion said COPIED and the streak reached ``copied_streak``.
- ``NOT_COPIED``: a completion said the pages went zero-copy for real.

Transitions (state, event -> next state; ``-`` cannot happen)::

    state    KNOWN_COPYING SEND     PROBE_DUE PROBE_FAILED COPIED   COPIED_STREAK NOT_COPIED
    ZEROCOPY COPYING       ZEROCOPY -         -            ZEROCOPY COPYING       ZEROCOPY
    COPYING  -             COPYING  PROBING   -            COPYING  COPYING       ZEROCOPY
    PROBING  -             PROBING  -         COPYING      COPYING  COPYING       ZEROCOPY
    ALWAYS   -             ALWAYS   -         -            ALWAYS   -             ALWAYS
    NEVER    -             NEVER    -         -            NEVER    -             NEVER

What a send is told (``use_zerocopy``): ``ALWAYS`` yes; ``NEVER`` and ``PROBING`` no;
``ZEROCOPY`` yes from ``min_size``; ``COPYING`` yes only on ``PROBE_DUE``.

Side effects, in the same places: entering ``PROBING`` restarts the probe count and clock;
``ZEROCOPY`` → ``COPYING`` starts the probe clock (at the event's time: for
``KNOWN_COPYING`` the destination's clock, so a probe may be due at once); every
completion event but a ``COPIED`` that stays in its state resets the streak. The fixed
modes keep no streak (completions change nothing, hence no ``COPIED_STREAK``). Every
state change recomputes the socket's hot-path thresholds ``copy_below`` (shorter sends
are copied without asking) and ``zerocopy_from`` (longer ones go zero-copy without
asking), and tells ``on_change``
(if set: the destination cache learns from it) the new state and the probe clock --
state changes only, never a send.

The mode is configuration, not an event: setting ``always`` or ``never`` parks the ``auto``
machine (the socket sets ``never`` once when ``SO_ZEROCOPY`` is refused); setting ``auto``
again resumes it where it was.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Final

__all__ = [
    "DEFAULT_MIN_ZEROCOPY_SIZE",
    "TRANSITIONS",
    "Event",
    "Mode",
    "State",
    "ZeroCopyPolicy",
]

DEFAULT_MIN_ZEROCOPY_SIZE = 16 * 1024
"""Below this, ``auto`` copies. The kernel documentation puts the break-even near 10 KB
per call on a real NIC; measured here over veth (where delivery copies anyway) a bare
MSG_ZEROCOPY loop reaches ``socket.send`` at 32 KiB (8 KiB: 0.48 vs 1.01 GB/s, 16 KiB:
0.65 vs 1.06, 32 KiB: 0.95 vs 0.92). 16 KiB sits between; on copying paths ``auto``
stops asking for zero-copy anyway."""


class Mode(enum.Enum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


class State(enum.Enum):
    """Where the policy is (see the module docstring)."""

    # Members are singletons compared by identity: hash them so too, which keeps the
    # lookups in TRANSITIONS in C (Enum.__hash__ is a Python function).
    __hash__ = object.__hash__

    ZEROCOPY = "zerocopy"
    COPYING = "copying"
    PROBING = "probing"
    ALWAYS = "always"
    NEVER = "never"


class Event(enum.Enum):
    """What the policy is told (see the module docstring)."""

    __hash__ = object.__hash__  # as State's

    KNOWN_COPYING = "known copying"
    SEND = "send"
    PROBE_DUE = "probe due"
    PROBE_FAILED = "probe failed"
    COPIED = "copied"
    COPIED_STREAK = "copied streak"
    NOT_COPIED = "not copied"


_ZEROCOPY: Final = State.ZEROCOPY
_COPYING: Final = State.COPYING
_PROBING: Final = State.PROBING
_ALWAYS: Final = State.ALWAYS
_NEVER: Final = State.NEVER
_KNOWN_COPYING: Final = Event.KNOWN_COPYING
_SEND: Final = Event.SEND
_PROBE_DUE: Final = Event.PROBE_DUE
_PROBE_FAILED: Final = Event.PROBE_FAILED
_COPIED: Final = Event.COPIED
_COPIED_STREAK: Final = Event.COPIED_STREAK
_NOT_COPIED: Final = Event.NOT_COPIED

TRANSITIONS: Final[dict[State, dict[Event, State]]] = {
    _ZEROCOPY: {
        _KNOWN_COPYING: _COPYING,
        _SEND: _ZEROCOPY,
        _COPIED: _ZEROCOPY,
        _COPIED_STREAK: _COPYING,
        _NOT_COPIED: _ZEROCOPY,
    },
    _COPYING: {
        _SEND: _COPYING,
        _PROBE_DUE: _PROBING,
        _COPIED: _COPYING,
        _COPIED_STREAK: _COPYING,
        _NOT_COPIED: _ZEROCOPY,
    },
    _PROBING: {
        _SEND: _PROBING,
        _PROBE_FAILED: _COPYING,
        _COPIED: _COPYING,
        _COPIED_STREAK: _COPYING,
        _NOT_COPIED: _ZEROCOPY,
    },
    _ALWAYS: {_SEND: _ALWAYS, _COPIED: _ALWAYS, _NOT_COPIED: _ALWAYS},
    _NEVER: {_SEND: _NEVER, _COPIED: _NEVER, _NOT_COPIED: _NEVER},
}
"""state, event -> next state: the table of the module docstring. A pair missing from it
cannot happen; :meth:`ZeroCopyPolicy._fire` raises ``RuntimeError`` if it ever did."""

_FIXED: Final = {Mode.ALWAYS: _ALWAYS, Mode.NEVER: _NEVER}
_INF: Final = float("inf")


class ZeroCopyPolicy:
    """Decides, send by send, whether to pass ``MSG_ZEROCOPY``.

    A state machine over :class:`State`; its transitions are :data:`TRANSITIONS`. No
    kernel counterpart: the kernel takes ``MSG_ZEROCOPY`` as asked and reports through
    ``SO_EE_CODE_ZEROCOPY_COPIED`` when it copied anyway; this reads those reports."""

    copy_below: float
    """Sends shorter than this are copied without asking (recomputed on each state change)."""
    zerocopy_from: float
    """Sends of at least this go zero-copy without asking (recomputed likewise)."""
    on_change: Callable[[State, float], None] | None
    """Told ``(new state, probe clock)`` on every transition that changes the state."""

    def __init__(
        self,
        mode: Mode | str = Mode.AUTO,
        min_size: int = DEFAULT_MIN_ZEROCOPY_SIZE,
        *,
        copied_streak: int = 8,
        probe_every: int = 1024,
        probe_interval: float = 2.0,
    ) -> None:
        if min_size < 0:
            raise ValueError("min_zerocopy_size must not be negative")
        self._min_size = min_size
        self.copied_streak = copied_streak
        self.probe_every = probe_every
        self.probe_interval = probe_interval
        self._streak = 0  # completed calls that said COPIED, one after another
        self._since_probe = 0  # sends that asked in COPYING since the last probe
        self._last_probe = 0.0  # when the last probe went out (or COPYING began)
        self._state = _ZEROCOPY
        self._resume = _ZEROCOPY  # the auto state, while a fixed mode parks it
        self.on_change = None
        self._mode = Mode.AUTO
        self.mode = mode  # type: ignore[assignment]  # the setter also takes the name

    # -- configuration ------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        # Checked first: a bad mode (ValueError) changes nothing.
        mode = Mode(mode)
        state = self._state
        if state is not _ALWAYS and state is not _NEVER:
            self._resume = state
        self._mode = mode
        self._enter(_FIXED.get(mode, self._resume))

    @property
    def min_size(self) -> int:
        """Sends shorter than this are copied in ``auto``."""
        return self._min_size

    @min_size.setter
    def min_size(self, min_size: int) -> None:
        if min_size < 0:
            raise ValueError("min_zerocopy_size must not be negative")
        self._min_size = min_size
        self._enter(self._state)

    @property
    def state(self) -> State:
        """Where the policy is now."""
        return self._state

    @property
    def copying(self) -> bool:
        """Whether ``auto`` found that the kernel copies anyway (``COPYING`` or
        ``PROBING``, also while a fixed mode parks it)."""
        state = self._resume if self._mode is not Mode.AUTO else self._state
        return state is _COPYING or state is _PROBING

    @property
    def current(self) -> str:
        """What sends do now: ``zerocopy`` or ``copy``."""
        state = self._state
        return "zerocopy" if state is _ZEROCOPY or state is _ALWAYS else "copy"

    # -- events ---------------------------------------------------------------------------
    def use_zerocopy(self, nbytes: int, now: float | None = None) -> bool:
        """Whether this send of ``nbytes`` should pass ``MSG_ZEROCOPY`` (event ``SEND``,
        or ``PROBE_DUE``). Kernel: decides the ``MSG_ZEROCOPY`` flag of ``sendmsg``.

        ``now`` (monotonic seconds) should be passed; ``None`` reads ``time.monotonic()``,
        only in ``COPYING`` (the one state where a probe may fall due).

        Refs: none."""
        state = self._state
        if state is _ZEROCOPY:  # SEND: ZEROCOPY -> ZEROCOPY
            return nbytes >= self._min_size
        if state is not _COPYING:  # SEND: a self-loop; ALWAYS answers yes, others no
            return state is _ALWAYS
        if nbytes < self._min_size:
            return False  # no event: a short send is copied and counts for nothing
        self._since_probe += 1
        if now is None:
            now = time.monotonic()
        if self._since_probe >= self.probe_every or now - self._last_probe >= self.probe_interval:
            self._fire(_PROBE_DUE, now)
            return True
        return False  # SEND: COPYING -> COPYING

    def threshold(self) -> int | None:
        """What :meth:`use_zerocopy` answers now for every size, as one number: sends
        of at least that many bytes go zero-copy (-1: none). None while ``auto`` copies
        and probes (each send must then be asked, a probe may fall due).

        Refs: none."""
        state = self._state
        if state is _ZEROCOPY:
            return self._min_size
        if state is _ALWAYS:
            return 0
        if state is _NEVER:
            return -1
        return None

    def known_copying(self, clock: float) -> None:
        """Before any send: the destination is known to copy (delivered locally, or
        learned by an earlier socket), so ``auto`` starts in ``COPYING`` with the probe
        clock ``clock`` (event ``KNOWN_COPYING``). Only from ``ZEROCOPY`` in ``auto``;
        a fixed mode ignores it (``RuntimeError`` from any other ``auto`` state: the
        table has no such transition). Kernel: local delivery copies
        (``skb_orphan_frags_rx``).

        Refs: none."""
        if self._mode is Mode.AUTO:
            self._fire(_KNOWN_COPYING, clock)

    def unsent(self, now: float) -> None:
        """The call :meth:`use_zerocopy` just answered yes to was not taken by the kernel
        as a zero-copy call: a probe (``PROBING``) has failed (``PROBE_FAILED``); in any
        other state this changes nothing.

        Refs: none."""
        if self._state is _PROBING:
            self._fire(_PROBE_FAILED, now)

    def on_completion(self, copied: bool, count: int, now: float) -> None:
        """A completion of ``count`` zero-copy calls arrived, ``copied`` if the kernel
        copied their pages anyway (``SO_EE_CODE_ZEROCOPY_COPIED``); event ``COPIED``,
        ``COPIED_STREAK`` or ``NOT_COPIED``.

        Refs: none."""
        state = self._state
        if state is _ZEROCOPY and not copied:
            self._streak = 0  # NOT_COPIED: ZEROCOPY -> ZEROCOPY, the common case
            return
        if state is _ALWAYS or state is _NEVER:
            return  # the fixed modes: every completion is a self-loop, no streak kept
        if not copied:
            self._streak = 0
            self._fire(_NOT_COPIED, now)
            return
        streak = self._streak + count
        if streak < self.copied_streak:
            if TRANSITIONS[state][_COPIED] is state:
                self._streak = streak
                return
            self._streak = 0
            self._fire(_COPIED, now)
            return
        self._streak = 0
        self._fire(_COPIED_STREAK, now)

    # -- the machine ----------------------------------------------------------------------
    def _fire(self, event: Event, now: float) -> None:
        """Move along :data:`TRANSITIONS`, with the side effects of the module docstring."""
        state = self._state
        try:
            new = TRANSITIONS[state][event]
        except KeyError:
            raise RuntimeError(f"policy: no transition from {state.name} on {event.name}") from None
        if new is _PROBING:
            self._since_probe = 0
            self._last_probe = now
        elif new is _COPYING and state is _ZEROCOPY:
            self._last_probe = now
        if new is not state:
            self._enter(new)
            if self.on_change is not None:
                self.on_change(new, self._last_probe)

    def _enter(self, state: State) -> None:
        # The hot paths: sends shorter than copy_below are copied and sends of at least
        # zerocopy_from go zero-copy, without asking; the others ask use_zerocopy, which
        # also counts towards the next probe.
        self._state = state
        if state is _ALWAYS:
            self.copy_below = self.zerocopy_from = 0
        elif state is _NEVER:
            self.copy_below = self.zerocopy_from = _INF
        elif state is _ZEROCOPY:
            self.copy_below = self.zerocopy_from = self._min_size
        else:
            self.copy_below, self.zerocopy_from = self._min_size, _INF

    def __repr__(self) -> str:
        return f"<ZeroCopyPolicy {self._mode.value} {self._state.name}>"
