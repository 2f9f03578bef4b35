"""``pagefrag repro`` (root): reproduce the RPC retransmission corruption that
per-fragment destructors prevent — a stalled connection, a reconnect, a reply, a reused
buffer, and the stale retransmission that carries the new bytes. Runs unsafe then safe
(or one of them) and reports what the block store holds."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

EXAMPLE = """examples:
  sudo pagefrag repro               # both ways: unsafe corrupts, safe does not
  sudo pagefrag repro --safe --json"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "repro",
        help="reproduce the RPC retransmit corruption, unsafe and safe (root)",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--safe", action="store_true", help="only the safe run")
    which.add_argument("--unsafe", action="store_true", help="only the unsafe run")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..testing.netlab import missing_tools
    from ..testing.repro import run_repro

    why = missing_tools()
    if why:
        raise OSError(f"repro: {why}")
    modes = [True] if args.safe else [False] if args.unsafe else [False, True]
    results = [run_repro(safe) for safe in modes]
    if args.json:
        print(json.dumps([{**asdict(r), "corrupted": r.corrupted} for r in results], indent=2))
    else:
        for r in results:
            mode = "safe=True " if r.safe else "safe=False"
            verdict = "CORRUPTED: block 0 holds B" if r.corrupted else "intact: block 0 holds A"
            print(
                f"{mode}  first write completed after {r.first_call_seconds:.2f} s, "
                f"{r.transmissions} transmissions, {r.stall_dropped} packets dropped by the stall, "
                f"{r.writes_applied} writes applied -> {verdict}"
            )
    # Success means: the unsafe run shows the corruption, the safe run prevents it.
    expected = all(r.corrupted != r.safe for r in results)
    return 0 if expected else 1
