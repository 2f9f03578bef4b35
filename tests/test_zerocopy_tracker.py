"""The sans-I/O completion tracker and policy: no socket involved."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagefrag.zerocopy import (
    CompletionTracker,
    ErrQueueMessage,
    ZeroCopyCompletion,
    ZeroCopyPolicy,
    parse_extended_err,
)

EE = struct.Struct("=IBBBBII")


def test_ids_are_consecutive_and_a_range_releases_its_calls_in_order() -> None:
    t: CompletionTracker[str] = CompletionTracker()
    assert [t.sent(f"call{i}", 100) for i in range(5)] == [0, 1, 2, 3, 4]
    assert t.outstanding == 5 and t.pinned_bytes == 500
    assert t.complete(1, 3) == ["call1", "call2", "call3"]
    assert t.outstanding == 2 and t.pinned_bytes == 200 and t.peak_pinned_bytes == 500
    assert t.complete(0, 0, copied=True) == ["call0"]
    assert t.completions == 4 and t.copied_completions == 1


def test_wraparound_across_two_to_the_32() -> None:
    t: CompletionTracker[int] = CompletionTracker(first_id=2**32 - 3)
    ids = [t.sent(i, 1) for i in range(6)]
    assert ids == [2**32 - 3, 2**32 - 2, 2**32 - 1, 0, 1, 2]
    assert t.complete(2**32 - 2, 1) == [1, 2, 3, 4]  # one coalesced range across the wrap
    assert t.complete(2**32 - 3, 2) == [0, 5]
    assert t.outstanding == 0 and t.next_id == 3


def test_out_of_order_and_duplicate_ranges() -> None:
    t: CompletionTracker[int] = CompletionTracker()
    for i in range(10):
        t.sent(i, 10)
    assert t.complete(5, 9) == [5, 6, 7, 8, 9]  # a retransmitted tail completes first
    assert t.complete(0, 2) == [0, 1, 2]
    assert t.complete(1, 6) == [3, 4]  # overlaps what is done: only the new ones
    assert t.duplicates == 4
    assert t.complete(3, 4) == [] and t.outstanding == 5 - 5


def test_a_wide_range_walks_only_what_is_pending() -> None:
    t: CompletionTracker[int] = CompletionTracker()
    t.sent(0, 1)
    t.sent(1, 1)
    assert t.complete(2**32 - 5, 0) == [0]  # from before the start, across the wrap
    assert t.outstanding == 1


@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 40), min_size=1, max_size=30))
def test_any_split_of_the_id_space_into_ranges_releases_each_call_once(
    first: int, cuts: list[int]
) -> None:
    t: CompletionTracker[int] = CompletionTracker(first_id=first)
    n = 41
    for i in range(n):
        t.sent(i, 1)
    bounds = sorted({0, n, *cuts})
    released: list[int] = []
    for lo, hi in reversed(list(itertools.pairwise(bounds))):  # out of order
        released += t.complete((first + lo) % 2**32, (first + hi - 1) % 2**32)
    assert sorted(released) == list(range(n)) and t.outstanding == 0 and t.pinned_bytes == 0


def test_failed_send_that_used_an_id_and_one_that_did_not() -> None:
    t: CompletionTracker[str] = CompletionTracker()
    t.sent("a", 1)
    sid = t.failed_send()
    assert t.complete(0, 1) == ["a"]  # the kernel used the id: its notification came
    assert t.settle_failed(sid) is True and t.next_id == 2
    sid = t.failed_send()
    assert t.settle_failed(sid) is False and t.next_id == 2  # given back
    assert t.sent("b", 1) == 2 and t.complete(2, 2) == ["b"]
    assert t.completions == 2


def test_parse_zero_copy_completion_and_foreign_messages() -> None:
    raw = EE.pack(0, 5, 0, 1, 0, 7, 9)
    assert parse_extended_err(raw) == ZeroCopyCompletion(7, 9, copied=True)
    assert ZeroCopyCompletion(2**32 - 1, 1, False).count == 3
    icmp = EE.pack(111, 2, 3, 3, 0, 0, 0) + b"\x02\x00" + bytes(14)  # ECONNREFUSED, ICMP
    msg = parse_extended_err(icmp)
    assert isinstance(msg, ErrQueueMessage) and msg.errno == 111 and msg.origin == 2
    assert msg.offender.startswith(b"\x02\x00")
    with pytest.raises(ValueError):
        parse_extended_err(b"short")


def test_auto_policy_stops_zerocopy_when_the_kernel_keeps_copying_and_probes_later() -> None:
    p = ZeroCopyPolicy("auto", min_size=1000, copied_streak=4, probe_every=10, probe_interval=60)
    assert not p.use_zerocopy(999, 0.0) and p.use_zerocopy(1000, 0.0)
    p.on_completion(copied=True, count=4, now=0.0)
    assert p.current == "copy"
    decisions = [p.use_zerocopy(5000, 1.0) for _ in range(10)]
    assert decisions == [False] * 9 + [True]  # one probe after probe_every sends
    assert not p.use_zerocopy(5000, 1.0)  # only one probe at a time
    p.on_completion(copied=False, count=1, now=1.0)  # the probe went zero-copy for real
    assert p.current == "zerocopy" and p.use_zerocopy(5000, 1.0)


def test_auto_policy_probes_after_the_interval_and_always_never_ignore_completions() -> None:
    p = ZeroCopyPolicy("auto", min_size=0, copied_streak=1, probe_every=10**9, probe_interval=2)
    p.on_completion(True, 1, now=10.0)
    assert not p.use_zerocopy(1, 11.0) and p.use_zerocopy(1, 12.5)
    p.on_completion(True, 1, now=12.6)  # the probe was copied again
    assert p.current == "copy" and not p.use_zerocopy(1, 13.0)
    always = ZeroCopyPolicy("always")
    always.on_completion(True, 100, 0.0)
    assert always.use_zerocopy(1, 0.0) and always.current == "zerocopy"
    assert not ZeroCopyPolicy("never").use_zerocopy(10**9, 0.0)
    with pytest.raises(ValueError):
        ZeroCopyPolicy("sometimes")


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=40))
def test_has_pending_is_outstanding_as_a_bool(steps: list[tuple[bool, int]]) -> None:
    """``has_pending`` (the cheap test) agrees with ``outstanding`` after any mix of
    filings, completions (in order or not, duplicates included) and absorbs."""
    t: CompletionTracker[int] = CompletionTracker()
    assert not t.has_pending
    for send, k in steps:
        if send:
            t.sent(k, 1)
        else:
            t.complete(k, k + 1)
        assert t.has_pending == (t.outstanding > 0)
        t.absorb()
        assert t.has_pending == (t.outstanding > 0)
