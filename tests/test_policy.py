"""The zero-copy policy as a state machine: every row of its transition table, driven
through the public API with explicit times (sans-I/O, as h11 tests its state machine)."""

from __future__ import annotations

import re
import socket
import time

import pytest
from helpers import Receiver

from pagefrag.zerocopy import ZeroCopySocket
from pagefrag.zerocopy import policy as policy_module
from pagefrag.zerocopy.policy import TRANSITIONS, Event, Mode, State, ZeroCopyPolicy

INF = float("inf")
MIN = 1000


def auto(**kw: float) -> ZeroCopyPolicy:
    """An auto policy whose probes come only when a test makes them due."""
    args: dict[str, float] = {"probe_every": 10**9, "probe_interval": 3600.0, **kw}
    return ZeroCopyPolicy("auto", min_size=MIN, **args)  # type: ignore[arg-type]


def copying(now: float = 0.0, **kw: float) -> ZeroCopyPolicy:
    p = auto(**kw)
    p.on_completion(True, p.copied_streak, now)
    assert p.state is State.COPYING
    return p


def probing(now: float = 0.0, **kw: float) -> ZeroCopyPolicy:
    p = copying(**kw)
    p.probe_every = 1  # the next send that asks is a probe
    assert p.use_zerocopy(MIN, now)
    assert p.state is State.PROBING
    return p


def thresholds(p: ZeroCopyPolicy) -> tuple[float, float]:
    return p.copy_below, p.zerocopy_from


# -- the table is the one of the docstring -------------------------------------------------
def test_the_table_in_the_module_docstring_is_the_table_the_code_reads() -> None:
    doc = policy_module.__doc__ or ""
    header, *rows = [
        line.split()
        for line in doc.splitlines()
        if re.match(r"^ {4}(state|ZEROCOPY|COPYING|PROBING|ALWAYS|NEVER) ", line)
    ]
    events = [Event[name] for name in header[1:]]
    documented = {
        State[row[0]]: {
            e: State[cell] for e, cell in zip(events, row[1:], strict=True) if cell != "-"
        }
        for row in rows
    }
    assert documented == TRANSITIONS
    assert set(TRANSITIONS) == set(State)


# -- ZEROCOPY --------------------------------------------------------------------------------
def test_zerocopy_send_asks_for_zerocopy_from_min_size() -> None:
    p = auto()
    assert p.state is State.ZEROCOPY and p.current == "zerocopy"
    assert thresholds(p) == (MIN, MIN)
    assert p.use_zerocopy(MIN, 0.0) and p.use_zerocopy(10**9, 0.0)
    assert not p.use_zerocopy(MIN - 1, 0.0)  # no event: short sends are copied
    assert p.state is State.ZEROCOPY


def test_zerocopy_copied_below_the_streak_stays_and_not_copied_resets_the_streak() -> None:
    p = auto(copied_streak=8)
    p.on_completion(True, 7, 0.0)  # COPIED: ZEROCOPY -> ZEROCOPY, streak 7
    assert p.state is State.ZEROCOPY and p.use_zerocopy(MIN, 0.0)
    p.on_completion(False, 1, 0.0)  # NOT_COPIED: ZEROCOPY -> ZEROCOPY, streak 0
    p.on_completion(True, 7, 0.0)
    assert p.state is State.ZEROCOPY  # 7 + 7 would have reached 8: the streak was reset
    p.on_completion(True, 1, 0.0)
    assert p.state is State.COPYING


def test_zerocopy_copied_streak_moves_to_copying_and_starts_the_probe_clock() -> None:
    p = auto(copied_streak=3, probe_interval=2.0)
    for _ in range(2):
        p.on_completion(True, 1, 50.0)
    assert p.state is State.ZEROCOPY
    p.on_completion(True, 1, 100.0)  # COPIED_STREAK: ZEROCOPY -> COPYING
    assert p.state is State.COPYING and p.current == "copy"
    assert thresholds(p) == (MIN, INF)
    assert not p.use_zerocopy(MIN, 101.9)  # the clock started at 100.0, not before
    assert p.use_zerocopy(MIN, 102.0)


# -- COPYING ---------------------------------------------------------------------------------
def test_copying_send_is_copied_and_only_long_sends_count_towards_a_probe() -> None:
    p = copying(probe_every=3)
    assert not p.use_zerocopy(MIN, 1.0) and not p.use_zerocopy(MIN, 1.0)  # SEND, twice
    for _ in range(10):
        assert not p.use_zerocopy(MIN - 1, 1.0)  # no event: does not count
    assert p.state is State.COPYING
    assert p.use_zerocopy(MIN, 1.0)  # the third that asked: PROBE_DUE
    assert p.state is State.PROBING


def test_copying_probe_due_after_the_interval_moves_to_probing() -> None:
    p = copying(now=10.0, probe_interval=2.0)
    assert not p.use_zerocopy(MIN, 11.99)
    assert p.use_zerocopy(MIN, 12.0)  # PROBE_DUE: COPYING -> PROBING
    assert p.state is State.PROBING and p.current == "copy"
    assert thresholds(p) == (MIN, INF)


def test_copying_copied_and_copied_streak_stay_without_restarting_the_probe_clock() -> None:
    p = copying(now=0.0, probe_interval=2.0, copied_streak=4)
    p.on_completion(True, 1, 1.5)  # COPIED: COPYING -> COPYING
    assert p.state is State.COPYING
    p.on_completion(True, 4, 1.9)  # COPIED_STREAK: COPYING -> COPYING
    assert p.state is State.COPYING and thresholds(p) == (MIN, INF)
    assert p.use_zerocopy(MIN, 2.0)  # still due two seconds after entering COPYING


def test_copying_not_copied_moves_back_to_zerocopy() -> None:
    p = copying()
    p.on_completion(False, 1, 5.0)  # NOT_COPIED: COPYING -> ZEROCOPY
    assert p.state is State.ZEROCOPY and p.current == "zerocopy"
    assert thresholds(p) == (MIN, MIN) and p.use_zerocopy(MIN, 5.0)


# -- PROBING ---------------------------------------------------------------------------------
def test_probing_send_is_copied_whatever_its_size_and_time() -> None:
    p = probing(now=0.0)
    for now in (0.0, 10.0, 10**6):
        assert not p.use_zerocopy(10**9, now)  # SEND: PROBING -> PROBING, one probe at a time
    assert p.state is State.PROBING


def test_probing_copied_moves_to_copying_with_the_clock_of_the_probe() -> None:
    p = probing(now=20.0, probe_interval=2.0, copied_streak=8)
    p.probe_every = 10**9
    p.on_completion(True, 1, 21.5)  # COPIED (streak 1 of 8): PROBING -> COPYING
    assert p.state is State.COPYING and thresholds(p) == (MIN, INF)
    assert not p.use_zerocopy(MIN, 21.99)
    assert p.use_zerocopy(MIN, 22.0)  # two seconds after the probe went out


def test_a_probe_restarts_the_count_of_sends_towards_the_next() -> None:
    p = copying(probe_every=3)
    assert [p.use_zerocopy(MIN, 1.0) for _ in range(3)] == [False, False, True]
    p.on_completion(True, 1, 1.0)  # the probe was copied: PROBING -> COPYING
    assert [p.use_zerocopy(MIN, 1.0) for _ in range(3)] == [False, False, True]


def test_probing_copied_streak_moves_to_copying() -> None:
    p = probing(now=0.0, copied_streak=2)
    p.on_completion(True, 5, 1.0)  # COPIED_STREAK: PROBING -> COPYING
    assert p.state is State.COPYING and p.current == "copy"


def test_probing_not_copied_moves_to_zerocopy() -> None:
    p = probing(now=0.0)
    p.on_completion(False, 1, 1.0)  # NOT_COPIED: PROBING -> ZEROCOPY
    assert p.state is State.ZEROCOPY and p.use_zerocopy(MIN, 1.0)
    assert thresholds(p) == (MIN, MIN)


# -- the fixed modes -------------------------------------------------------------------------
def test_always_asks_for_everything_and_ignores_completions() -> None:
    p = ZeroCopyPolicy("always", min_size=MIN, copied_streak=1)
    assert p.state is State.ALWAYS and thresholds(p) == (0, 0)
    assert p.use_zerocopy(1, 0.0) and p.use_zerocopy(0, 0.0)  # SEND
    p.on_completion(True, 100, 0.0)  # COPIED
    p.on_completion(False, 1, 0.0)  # NOT_COPIED
    assert p.state is State.ALWAYS and p.current == "zerocopy" and p.use_zerocopy(1, 0.0)


def test_never_asks_for_nothing_and_ignores_completions() -> None:
    p = ZeroCopyPolicy("never", min_size=MIN, copied_streak=1)
    assert p.state is State.NEVER and thresholds(p) == (INF, INF)
    assert not p.use_zerocopy(10**9, 0.0)  # SEND
    p.on_completion(True, 100, 0.0)
    p.on_completion(False, 1, 0.0)
    assert p.state is State.NEVER and p.current == "copy" and not p.use_zerocopy(10**9, 0.0)


def test_a_fixed_mode_parks_the_auto_machine_and_auto_resumes_it() -> None:
    p = copying(now=0.0, probe_interval=2.0)
    p.mode = Mode.NEVER  # as the socket does when SO_ZEROCOPY is refused
    assert p.state is State.NEVER and p.current == "copy" and p.copying
    p.on_completion(False, 1, 1.0)  # ignored: the auto machine is parked
    p.mode = "auto"  # type: ignore[assignment]  # a name is taken too
    assert p.mode is Mode.AUTO and p.state is State.COPYING
    assert thresholds(p) == (MIN, INF) and p.use_zerocopy(MIN, 2.0)


# -- bad input and the table's guard ---------------------------------------------------------
def test_an_unknown_mode_or_a_negative_size_is_refused_and_changes_nothing() -> None:
    with pytest.raises(ValueError):
        ZeroCopyPolicy("sometimes")
    p = copying()
    with pytest.raises(ValueError):
        p.mode = "sometimes"  # type: ignore[assignment]
    with pytest.raises(ValueError):
        p.min_size = -1
    assert p.mode is Mode.AUTO and p.state is State.COPYING and thresholds(p) == (MIN, INF)
    p.min_size = 10  # a new size moves the thresholds at once
    assert thresholds(p) == (10, INF) and not p.use_zerocopy(10, 0.0)


def test_a_pair_missing_from_the_table_is_refused() -> None:
    # No public call reaches one (PROBE_DUE is raised only in COPYING); the guard is what
    # h11 does for an event its table does not list.
    p = ZeroCopyPolicy("never")
    with pytest.raises(RuntimeError, match="NEVER on PROBE_DUE"):
        p._fire(Event.PROBE_DUE, 0.0)
    assert p.state is State.NEVER


def test_without_now_the_clock_is_read_only_where_a_probe_may_fall_due() -> None:
    start = time.monotonic()
    p = copying(now=start, probe_interval=3600.0)
    assert not p.use_zerocopy(MIN)  # read the clock: far from due
    p.probe_interval = 0.0
    assert p.use_zerocopy(MIN)  # the clock has not gone backwards: due at once
    assert p.state is State.PROBING


# -- PROBE_FAILED (review of issue 10: a refused probe left auto copying for good) --------
def test_probing_probe_failed_moves_to_copying_and_the_next_probe_comes_on_time() -> None:
    p = auto(copied_streak=1, probe_interval=2.0, probe_every=10**9)
    p.on_completion(True, 1, 0.0)  # ZEROCOPY -> COPYING, the probe clock at 0
    assert p.use_zerocopy(MIN, 2.0) and p.state is State.PROBING
    p.unsent(2.5)  # the probe was refused before the kernel took it
    assert p.state is State.COPYING and p.current == "copy"
    assert not p.use_zerocopy(MIN, 3.9)  # the clock of the failed probe: 2.0
    assert p.use_zerocopy(MIN, 4.0) and p.state is State.PROBING
    for state_setup in ("zerocopy", "copying"):  # elsewhere unsent changes nothing
        q = auto(copied_streak=1)
        if state_setup == "copying":
            q.on_completion(True, 1, 0.0)
        before = q.state
        q.unsent(1.0)
        assert q.state is before


def test_a_probe_refused_with_eagain_does_not_stop_auto_probing(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Loopback copies, so ``auto`` stops asking for zero-copy and probes every 2 s. A
    probe that meets a full send buffer (EAGAIN) never reaches the kernel: the policy must
    probe again later, not wait for ever for its completion."""
    client, server = tcp_pair
    client.setblocking(False)
    zs = ZeroCopySocket(client, zerocopy="auto")
    chunk = bytes(64 * 1024)
    for _ in range(32):  # zero-copy sends the kernel copies: the policy starts copying
        zs.sendall(chunk, timeout=10)
        got = 0
        while got < len(chunk):
            got += len(server.recv(len(chunk) - got))
    zs.flush(timeout=10)
    assert zs.stats.current_mode == "copy"
    time.sleep(2.2)  # a probe is due
    for small in (8192, 1):  # fill the send buffer; below min_size the policy is not asked
        for _ in range(1_000_000):
            try:
                zs.send(bytes(small))
            except BlockingIOError:
                break
        else:
            pytest.fail("the send buffer never filled")
    with pytest.raises(BlockingIOError):
        zs.send(chunk)  # the probe: refused before the kernel took it
    rx = Receiver(server)
    zerocopy_before = zs.stats.zerocopy_sends
    deadline = time.monotonic() + 20
    while zs.stats.zerocopy_sends == zerocopy_before and time.monotonic() < deadline:
        try:
            zs.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
        time.sleep(0.01)
    assert zs.stats.zerocopy_sends > zerocopy_before, "auto never probed again"
    zs.flush(timeout=10)
    client.shutdown(socket.SHUT_WR)
    rx.join()
    zs.close()
