"""The compiled CompletionTracker (pagefrag._speedups) against the pure-Python reference
(pagefrag.zerocopy.tracker.PyCompletionTracker).

* which class ``pagefrag.zerocopy.tracker.CompletionTracker`` is, in both modes;
* a hypothesis state machine driving a compiled and a pure tracker with the same
  operations (filings by ``sent``, by ``filings.extend`` as the socket files and by
  ``filings.append`` as a compiled sender files; absorbs; completions in order, out of
  order, wrapping at 2**32, duplicated, ahead of the filings, wide; failed sends) and
  comparing every result, token list, counter and property after every step;
* bad input changes nothing; a thread filing while another completes loses nothing.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import python_in_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pagefrag
from pagefrag.zerocopy import tracker as tracker_module
from pagefrag.zerocopy.tracker import PyCompletionTracker

SRC = os.path.dirname(os.path.dirname(os.path.abspath(pagefrag.__file__)))
U32 = 2**32


def compiled_class() -> Any:
    try:
        from pagefrag._speedups import CompletionTracker
    except ImportError:
        return None
    return CompletionTracker


CTracker = compiled_class()
needs_compiled = pytest.mark.skipif(
    CTracker is None, reason="pagefrag._speedups is not built (no compiler at install?)"
)
BOTH = [PyCompletionTracker] + ([CTracker] if CTracker is not None else [])


# -- selection ------------------------------------------------------------------------------
def tracker_in_child(pure: bool) -> str:
    code = (
        "import pagefrag.zerocopy.tracker as t; "
        "print(t.CompletionTracker.__module__, t.PyCompletionTracker.__module__)"
    )
    return python_in_child(code, pure=pure).stdout.strip()


def test_the_tracker_follows_the_selected_implementation() -> None:
    pure = "pagefrag.zerocopy.tracker pagefrag.zerocopy.tracker"
    assert tracker_in_child(pure=True) == pure
    if CTracker is not None:
        assert tracker_in_child(pure=False) == "pagefrag._speedups pagefrag.zerocopy.tracker"
    expected = CTracker if pagefrag.implementation == "compiled" else PyCompletionTracker
    import pagefrag.zerocopy as zc
    import pagefrag.zerocopy._errqueue as errqueue
    import pagefrag.zerocopy._sender as sender
    import pagefrag.zerocopy.socket as zsocket

    for module in (tracker_module, zc, errqueue, sender, zsocket):
        assert module.CompletionTracker is expected, module.__name__


@pytest.mark.parametrize("cls", BOTH, ids=lambda c: c.__module__)
def test_the_class_is_generic_at_run_time_and_its_parts_are_the_real_types(cls: Any) -> None:
    import collections

    assert cls[int] is not None and repr(cls[int]).endswith("CompletionTracker[int]")
    t = cls(5)
    assert type(t.filings) is collections.deque and type(t.ids) is itertools.count
    assert type(t.early) is dict and repr(t.ids) == "count(5)"


# -- the state machine ----------------------------------------------------------------------
def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    try:
        return ("ok", fn())
    except Exception as exc:
        return (type(exc).__name__, "")


def observe(t: Any) -> dict[str, object]:
    """Everything of a tracker that can be seen from outside."""
    # Each class files its own placeholder for an id a failed send used: not a test token.
    filings = [(n, sid, tok if isinstance(tok, str) else "<used>") for n, sid, tok in t.filings]
    return {
        "filings": filings,
        "ids": repr(t.ids),
        "early": dict(t.early),
        "next_id": t.next_id,
        "outstanding": t.outstanding,
        "has_pending": t.has_pending,
        "pinned_bytes": t.pinned_bytes,
        "pending_tokens": t.pending_tokens(),
        **{
            name: getattr(t, name)
            for name in (
                "peak_pinned_bytes",
                "completions",
                "copied_completions",
                "duplicates",
                "ids_used_by_failed_sends",
                "filed_calls",
                "filed_bytes",
            )
        },
    }


FIRST_IDS = st.one_of(
    st.sampled_from([0, 1, U32 - 1, U32 - 2, U32 - 40, U32 - 300, U32, -1, 3 * U32 + 7]),
    st.integers(0, U32 - 1),
)
NBYTES = st.integers(0, 70000)


class CompiledTrackerMatchesPure(RuleBasedStateMachine):
    """A pure and a compiled tracker, the same operations, the same observations."""

    def __init__(self) -> None:
        super().__init__()
        self.pair: tuple[Any, Any] = (None, None)
        self.token_count = itertools.count()
        self.failed: int | None = None  # the id of a failed_send not yet settled

    def tokens(self, n: int) -> list[str]:
        return [f"t{next(self.token_count)}" for _ in range(n)]

    def both(self, op: Callable[[Any], object]) -> object:
        pure, compiled = (outcome(lambda t=t: op(t)) for t in self.pair)
        assert pure == compiled
        return pure[1]

    @initialize(first=FIRST_IDS)
    def start(self, first: int) -> None:
        self.pair = (PyCompletionTracker(first), CTracker(first))

    @invariant()
    def same_everywhere(self) -> None:
        assert observe(self.pair[0]) == observe(self.pair[1])

    # Filing: the three ways a send call is filed.
    @rule(nbytes=NBYTES)
    def sent(self, nbytes: int) -> None:
        (token,) = self.tokens(1)
        self.both(lambda t: t.sent(token, nbytes))

    @rule(sizes=st.lists(NBYTES, min_size=1, max_size=5))
    def extend_as_the_socket_does(self, sizes: list[int]) -> None:
        tokens = self.tokens(len(sizes))
        self.both(lambda t: t.filings.extend(zip(sizes, t.ids, tokens)))  # noqa: B905

    @rule(nbytes=NBYTES)
    def append_as_a_compiled_sender_does(self, nbytes: int) -> None:
        (token,) = self.tokens(1)
        self.both(lambda t: t.filings.append((nbytes, next(t.ids), token)))

    @rule(n=st.integers(60, 300), nbytes=NBYTES)
    def burst(self, n: int, nbytes: int) -> None:
        """Many at once: the compiled ring grows past its first size."""
        tokens = self.tokens(n)
        self.both(lambda t: t.filings.extend(zip(itertools.repeat(nbytes, n), t.ids, tokens)))  # noqa: B905

    @rule()
    def absorb(self) -> None:
        self.both(lambda t: t.absorb())

    # Completions, relative to what is filed (the compiled side is asked the same).
    @rule(
        back=st.integers(-3, 400),
        width=st.integers(1, 80),
        copied=st.booleans(),
    )
    def complete_near(self, back: int, width: int, copied: bool) -> None:
        """A range ending near the next id: in order, out of order, duplicated, partly
        or wholly ahead (back < 0), across the wrap when the ids are near 2**32."""
        nxt = self.pair[0].next_id
        hi = (nxt - 1 - back) % U32
        lo = (hi - width + 1) % U32
        self.both(lambda t: t.complete(lo, hi, copied))

    @rule(lo=st.integers(0, U32 - 1), hi=st.integers(0, U32 - 1), copied=st.booleans())
    def complete_anywhere(self, lo: int, hi: int, copied: bool) -> None:
        self.both(lambda t: t.complete(lo, hi, copied))

    @rule(
        lo=st.sampled_from([-1, -(2**40), 2**64 + 3, U32 + 1]),
        span=st.integers(0, 5),
    )
    def complete_with_ints_outside_u32(self, lo: int, span: int) -> None:
        self.both(lambda t: t.complete(lo, lo + span))

    @rule(ahead=st.integers(0, 3), width=st.sampled_from([1, 2, 1023, 1024, 1025, 5000]))
    def complete_ahead(self, ahead: int, width: int) -> None:
        """Read before the filing (small: remembered in early; too wide: duplicates)."""
        lo = (self.pair[0].next_id + ahead) % U32
        self.both(lambda t: t.complete(lo, (lo + width - 1) % U32))

    @rule()
    def complete_everything(self) -> None:
        """The widest range: from just after the next id all the way round."""
        nxt = self.pair[0].next_id
        self.both(lambda t: t.complete((nxt + 1) % U32, nxt))

    # Failed sends.
    @precondition(lambda self: self.failed is None)
    @rule()
    def failed_send(self) -> None:
        self.failed = self.both(lambda t: t.failed_send())  # type: ignore[assignment]

    @precondition(lambda self: self.failed is not None)
    @rule(used=st.booleans(), copied=st.booleans())
    def kernel_used_the_failed_id(self, used: bool, copied: bool) -> None:
        if used:
            sid = self.failed
            self.both(lambda t: t.complete(sid, sid, copied))

    @precondition(lambda self: self.failed is not None)
    @rule(wrong=st.booleans())
    def settle_failed(self, wrong: bool) -> None:
        sid = self.failed
        assert sid is not None
        self.failed = None
        self.both(lambda t: t.settle_failed(sid + 1 if wrong else sid))

    @rule(sid=st.integers(0, 5))
    def settle_without_failed_send(self, sid: int) -> None:
        self.failed = None
        self.both(lambda t: t.settle_failed(sid))

    # Bad input: the same exception, and (the invariant) nothing changed.
    @rule(bad=st.sampled_from([1.5, "1", None]))
    def bad_input(self, bad: object) -> None:
        (token,) = self.tokens(1)
        self.both(lambda t: t.sent(token, bad))
        self.both(lambda t: t.complete(bad, 3))
        self.both(lambda t: t.complete(3, bad))


CompiledTrackerMatchesPure.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCompiledTrackerMatchesPure = needs_compiled(CompiledTrackerMatchesPure.TestCase)


@needs_compiled
@given(
    first=FIRST_IDS,
    n=st.integers(1, 600),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_many_pending_completed_in_any_order_agree(first: int, n: int, data: st.DataObject) -> None:
    """Hundreds pending (the ring grows, wraps and trims), completed in random ranges:
    every release and counter agrees with the pure tracker."""
    pure, compiled = PyCompletionTracker(first), CTracker(first)
    for t in (pure, compiled):
        t.filings.extend(zip(range(n), t.ids, range(n)))  # noqa: B905
    order = data.draw(st.permutations(range(n)))
    k = 0
    while k < n:
        w = data.draw(st.integers(1, 40))
        lo, hi = order[k], order[k] + w - 1
        assert pure.complete(first + lo, first + hi) == compiled.complete(first + lo, first + hi)
        assert observe(pure) == observe(compiled)
        k += w
    assert pure.complete(first, first + n - 1) == compiled.complete(first, first + n - 1)
    assert observe(pure) == observe(compiled) and compiled.outstanding == 0


# -- bad input and threads ------------------------------------------------------------------
@pytest.mark.parametrize("cls", BOTH, ids=lambda c: c.__module__)
def test_bad_input_changes_nothing(cls: Any) -> None:
    """A non-integer byte count or id raises TypeError before anything is filed or taken
    in: a completion read early is not lost by a bad complete() call."""
    t = cls()
    assert t.complete(0, 0) == []  # ahead: remembered
    t.sent("a", 10)
    with pytest.raises(TypeError):
        t.sent("b", 1.5)
    assert list(t.filings) == [(10, 0, "a")]
    with pytest.raises(TypeError):
        t.complete("0", 0)
    with pytest.raises(TypeError):
        t.complete(0, 0.0)
    assert t.absorb() == ["a"] and t.completions == 1 and not t.has_pending


@pytest.mark.parametrize("cls", BOTH, ids=lambda c: c.__module__)
def test_a_thread_filing_while_another_completes_loses_nothing(cls: Any) -> None:
    """The concurrency contract: filings.extend runs concurrently with absorb and
    complete. Every filed token comes back exactly once and the counters add up."""
    t = cls(U32 - 500)  # across the wrap
    n = 20000
    done = threading.Event()

    def filer() -> None:
        try:
            for i in range(n):
                t.filings.extend(zip((7,), t.ids, (i,)))  # noqa: B905
        finally:
            done.set()

    released: list[int] = []
    thread = threading.Thread(target=filer)
    thread.start()
    deadline = time.monotonic() + 120
    while (not done.is_set() or t.has_pending) and time.monotonic() < deadline:
        nxt = t.next_id  # what is filed so far (the filer may add more meanwhile)
        released += t.complete((nxt - 64) % U32, (nxt - 1) % U32)
        released += t.complete((nxt - 200) % U32, (nxt - 1) % U32)  # duplicates
        if done.is_set():
            released += t.complete((nxt - n - 10) % U32, (nxt - 1) % U32)
    thread.join(60)
    assert not thread.is_alive()
    assert sorted(released) == list(range(n))
    assert t.completions == n and t.filed_calls == n and t.filed_bytes == 7 * n
    assert t.outstanding == 0 and t.pinned_bytes == 0 and t.pending_tokens() == []
