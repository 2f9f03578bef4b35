"""What do the core operations cost, next to the cheapest thread-safe counter Python has?

Baseline (measured in the same run): a plain method doing a lock-guarded increment and
one doing a lock-guarded decrement. Every figure is the best of several timeit repeats.

    python benchmarks/core_ops.py [--json]
"""

from __future__ import annotations

import argparse
import json
import threading
import timeit
from collections.abc import Callable

from pagefrag import MAX_SKB_FRAGS, FragDestructor, SkBuff
from pagefrag.bench.machine import machine


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts")
    args = parser.parse_args()
    n = max(1, int(20_000 * args.scale))

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
        "baseline": "lock-guarded increment + decrement (two method calls)",
        "baseline_ns": base,
        "ops": [{"op": name, "ns": ns, "ratio": ns / base} for name, ns in rows],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}")
    print(f"baseline: {result['baseline']}: {base:,.0f} ns")
    print(f"{'operation':<42} {'ns/op':>10} {'x baseline':>11}")
    for name, ns in rows:
        print(f"{name:<42} {ns:>10,.0f} {ns / base:>11.1f}")
    print("(split, pull and segment: the run minus build+free of the skb they consume)")


if __name__ == "__main__":
    main()
