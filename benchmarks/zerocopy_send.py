"""Does tracking every page cost anything, and when does zero-copy pay? Issue 12's
throughput ratios, measured in one run against a C anchor.

Paths and sizes: UDP through veth to a discarding neighbour (true zero-copy: the frames
leave and are dropped, never delivered locally; MTU 64000 on both ends) with 4 KiB,
16 KiB and 60000 B datagrams; TCP over loopback and over veth into another namespace
with 4 KiB, 64 KiB and 1 MiB sends. Every send takes the next slice of 256 MiB of
distinct memory (``--hot``: the same cells again from one reused buffer, shown beside).
The sender runs on core 0, the TCP receiver on core 1. Variants, each cell on a fresh
connection, in a shuffled order each round, medians over the rounds:

  C copy                      benchmarks/zc_anchor.c, a send() loop (compiled now, cc -O2)
  C MSG_ZEROCOPY              the same with MSG_ZEROCOPY, completions read every 32 sends
  socket.send                 a bare Python socket.send loop
  bare MSG_ZEROCOPY           a bare Python MSG_ZEROCOPY loop (as the C one; no tracking)
  pagefrag never/always/auto  ZeroCopySocket(zerocopy=...).send, a FragDestructor per send
  pagefrag always, no destructor

Ratios: pagefrag always / C MSG_ZEROCOPY and / C copy, auto / C MSG_ZEROCOPY, auto /
socket.send (and more) in every cell, with issue 12's targets. The machinery is
pagefrag.bench (also behind ``pagefrag bench``).

``--uring`` (issue 13): the io_uring backend beside the MSG_ZEROCOPY one, on UDP 4 KiB
and 60000 B (true zero-copy) and TCP veth 64 KiB and 1 MiB, with issue 13's targets:

  C io_uring SEND, SEND_ZC    zc_anchor.c on the raw io_uring system calls, 32 requests
  C io_uring SEND_ZC fixed    per io_uring_enter (fixed: the working set registered once;
    [, 1 per enter]           1 per enter: one request per io_uring_enter); datagrams
  pagefrag always/auto[, send_many]   ZeroCopySocket (MSG_ZEROCOPY backend)
  uring always/auto[, send_many]      UringSocket(zerocopy=...).send / send_many of 32
  uring always, fixed[, send_many]    ... on a ring where the working set is registered
  uring always, pool[, send_many]     ... each send a loan of a BufferPool(register=ring)
                                      spanning 256 MiB, sent whole, released
  uring raw[+pin], fixed[, 1 per enter]   time splits: Channel.submit_one/Ring.submit/
                                      wait_result driven directly (+pin: each send pinned
                                      in Python, IoVec/Pin, a FragDestructor each)

Every pagefrag and uring row carries a FragDestructor per send; its release latency is
stamped (perf_counter_ns) in the destructor callback of one send in 32.

    python benchmarks/zerocopy_send.py [--seconds 0.3] [--rounds 7] [--hot] [--no-veth]
        [--no-c] [--paths udp,tcp-loopback,tcp-veth] [--sizes 4KiB,60000B] [--uring]
        [--json FILE] [--markdown FILE]

Needs root for the veth paths (they are left out otherwise, and said so); without a C
compiler the C rows are left out, and said so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pagefrag.bench.matrix import (
    PATH_KEYS,
    SIZES,
    URING_CELLS,
    URING_SEND,
    ZEROCOPY_SEND,
    cells_left,
    run_matrix,
)
from pagefrag.bench.report import URING_TARGETS, build, markdown, splits_markdown, table
from pagefrag.bench.workset import COLD, HOT
from pagefrag.cli._args import names_in


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.3, help="per cell and round (0.3)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, medians kept (7)")
    parser.add_argument("--hot", action="store_true", help="also from one reused buffer")
    parser.add_argument("--no-veth", action="store_true", help="TCP loopback only")
    parser.add_argument("--no-c", action="store_true", help="leave out the C anchor")
    parser.add_argument("--paths", type=names_in(list(PATH_KEYS)), help="comma-separated")
    parser.add_argument("--sizes", type=names_in(list(SIZES)), help="comma-separated")
    parser.add_argument(
        "--uring",
        action="store_true",
        help="issue 13: the io_uring backend beside the MSG_ZEROCOPY one and the C anchor",
    )
    parser.add_argument("--json", metavar="FILE", help="write the whole report here")
    parser.add_argument("--markdown", metavar="FILE", help="write the results page here")
    args = parser.parse_args()
    if not (args.seconds > 0 and args.rounds > 0):
        parser.error("--seconds and --rounds must be positive")
    path_names = [PATH_KEYS[k] for k in args.paths] if args.paths else None
    if not cells_left(path_names, args.sizes):
        parser.error("no path has those sizes")

    def progress(cell: str) -> None:
        print(f"  {cell:<70}", end="\r", file=sys.stderr, flush=True)

    data = run_matrix(
        args.seconds,
        args.rounds,
        veth=not args.no_veth,
        progress=progress,
        variants=URING_SEND if args.uring else ZEROCOPY_SEND,
        worksets=[COLD, HOT] if args.hot else [COLD],
        path_names=path_names,
        sizes=args.sizes,
        c_anchor=not args.no_c,
        cells=URING_CELLS if args.uring else None,
    )
    print(" " * 74, end="\r", file=sys.stderr)
    report = build(data, args.seconds, args.rounds, URING_TARGETS if args.uring else None)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        command = "python benchmarks/zerocopy_send.py" + (" --uring" if args.uring else "")
        page = markdown(report, command=command)
        if args.uring:
            page += "\n## Time splits and release latency (issue 13)\n\n" + splits_markdown(report)
        Path(args.markdown).write_text(page + "\n")


if __name__ == "__main__":
    main()
