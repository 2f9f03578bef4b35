"""Does tracking every page cost anything, and when does zero-copy pay?

For 4 KiB, 64 KiB and 1 MiB sends over TCP loopback, TCP over veth (into another
namespace) and UDP to a discarding peer (true zero-copy: the frames leave through veth
and are dropped, never delivered locally), this measures in one run, on fresh
connections, in shuffled interleaved rounds:

  socket.send          a bare ``socket.send`` loop (the copy baseline)
  bare MSG_ZEROCOPY    a bare hand-written MSG_ZEROCOPY loop that only counts completions
  pagefrag never       ZeroCopySocket(zerocopy="never")
  pagefrag always      ZeroCopySocket(zerocopy="always")   (every page tracked and pinned)
  pagefrag auto        ZeroCopySocket(zerocopy="auto")

Every pagefrag send carries a destructor, whose firing gives the release latency. The
machinery is pagefrag.bench (also behind ``pagefrag bench``).

    python benchmarks/zerocopy_send.py [--seconds 0.3] [--rounds 7] [--no-veth] [--json FILE]

Needs root for the veth paths (they are left out otherwise, and said so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagefrag.bench.machine import machine
from pagefrag.bench.matrix import run_matrix

VARIANTS = [
    "socket.send",
    "bare MSG_ZEROCOPY",
    "pagefrag never",
    "pagefrag always",
    "pagefrag auto",
]
SHORT = ["send", "bare-zc", "pf-never", "pf-always", "pf-auto"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-veth", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    data = run_matrix(args.seconds, args.rounds, veth=not args.no_veth, variants=VARIANTS)
    report = {"machine": machine(), "seconds": args.seconds, "rounds": args.rounds, **data}
    print(f"machine: {report['machine']}")
    if data["left_out"]:
        print(f"(veth paths left out: {data['left_out']})")
    print(
        f"{'path':<19} {'size':<6} "
        + " ".join(f"{v:>9}" for v in SHORT)
        + "  always/bare  auto/send"
    )
    for path, by_size in data["results"].items():
        for size, cells in by_size.items():
            g = {v: cells[v]["gbps"] for v in VARIANTS}
            print(
                f"{path:<19} {size:<6} "
                + " ".join(f"{g[v]:>9.2f}" for v in VARIANTS)
                + f"  {g['pagefrag always'] / g['bare MSG_ZEROCOPY']:>11.2f}"
                + f"  {g['pagefrag auto'] / g['socket.send']:>9.2f}"
            )
    print("(GB/s, medians; CPU s/GB and release latency in --json)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
