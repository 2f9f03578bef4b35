"""What do the core operations cost, next to the cheapest thread-safe counter Python has?

Baseline (measured in the same run): a plain method doing a lock-guarded increment and
one doing a lock-guarded decrement. Every skb figure is the best of several timeit
repeats, with the FragDestructor implementation selected at import
(``pagefrag.implementation``).

FragDestructor's own operations are measured for both implementations side by side: the
compiled core (pagefrag._speedups) and the pure-Python reference, interleaved round by
round (each round times every operation of both, in alternating order), medians over the
rounds. Each is a timeit statement, so the figure includes timeit's loop (~10 ns).

The zero-copy CompletionTracker likewise, both implementations interleaved round by round:
"file+absorb+complete one id" is ``s = t.sent(token, 4096); t.absorb(); t.complete(s, s)``
per call (what one tracked send costs the tracker); "complete a range of 32 ids" times
``t.complete(lo, lo + 31)`` over ranges of calls filed and taken in beforehand (untimed),
per id (the error queue's completions arrive coalesced, 32 a typical range).

    python benchmarks/core_ops.py [--json] [--rounds N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
import timeit
from collections.abc import Callable
from typing import Any

import pagefrag
from pagefrag import MAX_SKB_FRAGS, FragDestructor, SkBuff
from pagefrag._destructor import PyFragDestructor
from pagefrag.bench.machine import machine
from pagefrag.zerocopy.tracker import PyCompletionTracker

try:
    from pagefrag._speedups import CompletionTracker as CCompletionTracker
    from pagefrag._speedups import FragDestructor as CFragDestructor
except ImportError:  # not built: only the pure-Python figures
    CFragDestructor = None
    CCompletionTracker = None


class LockedCounter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 1

    def inc(self) -> None:
        with self.lock:
            self.n += 1

    def dec(self) -> None:
        with self.lock:
            self.n -= 1


def best_ns(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e9


def _noop(_: object) -> None:
    pass


# (name, statement, target ns for the compiled core or None)
DESTRUCTOR_OPS = [
    ("create+ref+unref+fire, destroy=None", "d = F(); d.ref(); d.unref(); d.unref()", 200.0),
    (
        "create+ref+unref+fire, destroy=a Python no-op",
        "d = F(noop); d.ref(); d.unref(); d.unref()",
        None,
    ),
    ("ref+unref", "d.ref(); d.unref()", 80.0),
]


def destructor_ops(rounds: int, number: int) -> list[dict[str, Any]]:
    """Median ns per op of every DESTRUCTOR_OPS statement for each implementation,
    interleaved: each round times all of them, the implementations in alternating order."""
    impls: list[tuple[str, Any]] = [("python", PyFragDestructor)]
    if CFragDestructor is not None:
        impls.insert(0, ("compiled", CFragDestructor))
    timers = {
        (impl, name): timeit.Timer(stmt, globals={"F": cls, "noop": _noop, "d": cls()})
        for impl, cls in impls
        for name, stmt, _ in DESTRUCTOR_OPS
    }
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for r in range(rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for name, _, _ in DESTRUCTOR_OPS:
            for impl, _ in order:
                samples[impl, name].append(timers[impl, name].timeit(number) / number * 1e9)
    rows = []
    for name, _, target in DESTRUCTOR_OPS:
        row: dict[str, Any] = {"op": name, "target_ns": target}
        for impl, _ in impls:
            row[f"{impl}_ns"] = statistics.median(samples[impl, name])
        if "compiled_ns" in row:
            row["speedup"] = row["python_ns"] / row["compiled_ns"]
            row["target_met"] = None if target is None else row["compiled_ns"] <= target
        rows.append(row)
    return rows


RANGE = 32  # ids per completion in the range figure
RANGES = 500  # ranges completed per round and implementation


def _complete_ranges_ns(cls: Any) -> float:
    """ns per id of ``complete`` over RANGES ranges of RANGE ids, filed and taken in first
    (untimed); the ranges completed in order, as the kernel reports them."""
    t = cls(2**32 - RANGES * RANGE // 2)  # the ids wrap halfway through
    t.filings.extend(zip(itertools.repeat(4096), t.ids, range(RANGES * RANGE)))
    t.absorb()
    first = t.next_id - RANGES * RANGE
    complete = t.complete
    los = [(first + k * RANGE) % 2**32 for k in range(RANGES)]
    start = time.perf_counter()
    for lo in los:
        complete(lo, lo + RANGE - 1)
    elapsed = time.perf_counter() - start
    assert t.completions == RANGES * RANGE and not t.has_pending
    return elapsed / (RANGES * RANGE) * 1e9


def tracker_ops(rounds: int, number: int) -> list[dict[str, Any]]:
    """Median ns of each tracker operation for each implementation, interleaved: each
    round times both operations of both, the implementations in alternating order."""
    impls: list[tuple[str, Any]] = [("python", PyCompletionTracker)]
    if CCompletionTracker is not None:
        impls.insert(0, ("compiled", CCompletionTracker))
    stmt = "s = t.sent(tok, 4096); t.absorb(); t.complete(s, s)"
    timers = {
        impl: timeit.Timer(stmt, globals={"t": cls(), "tok": object()}) for impl, cls in impls
    }
    one: dict[str, list[float]] = {impl: [] for impl, _ in impls}
    ranged: dict[str, list[float]] = {impl: [] for impl, _ in impls}
    for r in range(rounds):
        for impl, cls in impls if r % 2 == 0 else impls[::-1]:
            one[impl].append(timers[impl].timeit(number) / number * 1e9)
            ranged[impl].append(_complete_ranges_ns(cls))
    rows = []
    for name, samples in (
        ("file+absorb+complete one id (per call)", one),
        (f"complete a range of {RANGE} ids (per id)", ranged),
    ):
        row: dict[str, Any] = {"op": name}
        for impl, _ in impls:
            row[f"{impl}_ns"] = statistics.median(samples[impl])
        if "compiled_ns" in row:
            row["speedup"] = row["python_ns"] / row["compiled_ns"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (median)")
    args = parser.parse_args()
    n = max(1, int(20_000 * args.scale))
    destructor_rows = destructor_ops(args.rounds, max(1, n * 5))
    tracker_rows = tracker_ops(args.rounds, max(1, n))

    counter = LockedCounter()

    def baseline() -> None:
        counter.inc()
        counter.dec()

    d = FragDestructor(None)

    def ref_unref() -> None:
        d.ref()
        d.unref()

    page = bytearray(64 * 1024)
    skb17 = SkBuff()
    for i in range(MAX_SKB_FRAGS):
        skb17.add_frag(page, i * 3000, 3000, d)

    def clone_free() -> None:
        skb17.clone().free()

    def make64k() -> SkBuff:
        s = SkBuff(b"h" * 66)
        for off in range(0, 64 * 1024, 4096):
            s.add_frag(page, off, 4096, d)
        return s

    def split() -> None:
        s = make64k()
        s.split(30_000).free()
        s.free()

    def pull() -> None:
        s = make64k()
        s.pull(128)
        s.free()

    def segment() -> None:
        s = make64k()
        for seg in s.segment(1448):
            seg.free()
        s.free()

    def build() -> None:
        make64k().free()

    base = best_ns(baseline, n)
    build_ns = best_ns(build, max(1, n // 20))
    # split, pull and segment consume the skb they cut, so each run builds one first;
    # the bare cost is the run minus build+free measured alone.
    rows = [
        ("ref()+unref()", best_ns(ref_unref, n)),
        ("clone()+free(), 17 frags", best_ns(clone_free, n)),
        ("build+free 64 KiB skb (16 frags)", build_ns),
        ("split(30000) of 64 KiB skb", best_ns(split, max(1, n // 20)) - build_ns),
        ("pull(128) of 64 KiB skb", best_ns(pull, max(1, n // 20)) - build_ns),
        ("segment(1448) of 64 KiB skb, 46 segs", best_ns(segment, max(1, n // 200)) - build_ns),
    ]
    result = {
        "machine": machine(),
        "implementation": pagefrag.implementation,
        "destructor": destructor_rows,
        "tracker": tracker_rows,
        "baseline": "lock-guarded increment + decrement (two method calls)",
        "baseline_ns": base,
        "ops": [{"op": name, "ns": ns, "ratio": ns / base} for name, ns in rows],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}")
    print(f"FragDestructor, both implementations, median of {args.rounds} interleaved rounds:")
    print(f"{'operation':<46} {'compiled':>9} {'python':>9} {'speedup':>8} {'target':>8}")
    for row in destructor_rows:
        compiled = f"{row['compiled_ns']:,.0f}" if "compiled_ns" in row else "n/a"
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else ""
        target = "" if row["target_ns"] is None else f"<= {row['target_ns']:.0f}"
        if row.get("target_met") is False:
            target += " MISSED"
        print(f"{row['op']:<46} {compiled:>9} {row['python_ns']:>9,.0f} {speedup:>8} {target:>8}")
    print(f"CompletionTracker, both implementations, median of {args.rounds} interleaved rounds:")
    print(f"{'operation':<46} {'compiled':>9} {'python':>9} {'speedup':>8}")
    for row in tracker_rows:
        compiled = f"{row['compiled_ns']:,.0f}" if "compiled_ns" in row else "n/a"
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else ""
        print(f"{row['op']:<46} {compiled:>9} {row['python_ns']:>9,.0f} {speedup:>8}")
    print(f"skb operations (implementation: {pagefrag.implementation}):")
    print(f"baseline: {result['baseline']}: {base:,.0f} ns")
    print(f"{'operation':<42} {'ns/op':>10} {'x baseline':>11}")
    for name, ns in rows:
        print(f"{name:<42} {ns:>10,.0f} {ns / base:>11.1f}")
    print("(split, pull and segment: the run minus build+free of the skb they consume)")


if __name__ == "__main__":
    main()
