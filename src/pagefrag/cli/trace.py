"""``pagefrag trace``: print the lifecycle of one buffer, every reference count at
every step, ending with the destructor firing."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..trace import TraceStep, run_trace

EXAMPLE = "example: pagefrag trace --size 65536 --mss 1448 --json"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="walk one buffer through a TCP-like life and show every reference count",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=int, default=64 * 1024, help="bytes written (default 65536)")
    p.add_argument("--page-size", type=int, default=16 * 1024, help="bytes per frag (16384)")
    p.add_argument("--mss", type=int, default=1448, help="GSO segment size (1448)")
    p.add_argument("--acked", type=int, default=20_000, help="bytes of the partial ACK (20000)")
    p.add_argument("--json", action="store_true", help="print the steps as JSON")
    p.set_defaults(run=run)


def render(steps: list[TraceStep]) -> str:
    lines = [f"{'#':>2}  {'holder':<10} {'refs':>4}  action (kernel)"]
    for s in steps:
        lines.append(f"{s.index:>2}  {s.holder:<10} {s.refcount:>4}  {s.action}  ({s.kernel})")
        shown = [k for k in s.skbs if not k.name.startswith("seg-")]
        segs = [k for k in s.skbs if k.name.startswith("seg-")]
        parts = [f"{k.name}: len={k.length} frags={k.nr_frags} dataref={k.dataref}" for k in shown]
        if segs:
            parts.append(f"{len(segs)} segments holding {sum(k.nr_frags for k in segs)} frags")
        if parts:
            lines.append("                    " + "; ".join(parts))
    last = steps[-1]
    verdict = "FIRED exactly once" if last.fired else "NOT fired"
    lines.append(f"destructor refcount {last.refcount}: {verdict}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    steps = run_trace(args.size, args.page_size, args.mss, args.acked)
    if args.json:
        print(json.dumps([s.as_dict() for s in steps], indent=2))
    else:
        print(render(steps))
    return 0 if steps[-1].fired else 1
