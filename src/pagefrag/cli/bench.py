"""``pagefrag bench``: the benchmark matrix — 4 KiB, 64 KiB, 1 MiB over TCP loopback and TCP
over veth, 4 KiB, 16 KiB, 60000 B datagrams over UDP true zero-copy, sent from 256 MiB of
distinct buffers (``--hot``: also from one reused buffer) — for pagefrag beside the anchors
measured in the same run (a C send loop, copying and MSG_ZEROCOPY, compiled at run time;
plain ``socket.send``; a bare ``MSG_ZEROCOPY`` loop; asyncio streams; pyzmq
``send(copy=False, track=True)``), written as JSON, a Markdown table and PNG charts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._args import UsageError, int_in, names_in, seconds_up_to, writable_file, writable_folder

PATHS = ("tcp-loopback", "tcp-veth", "udp")
SIZE_NAMES = ("4KiB", "16KiB", "60000B", "64KiB", "1MiB")


EXAMPLE = """examples:
  pagefrag bench --quick --out bench-out          # a short run (about a minute)
  pagefrag bench --paths udp --sizes 60000B --hot # one cell, both working sets
  sudo pagefrag bench --out docs/bench --page docs/performance.md   # the full matrix
  pagefrag bench --no-veth --json                 # loopback only, results on stdout"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark pagefrag against socket.send, MSG_ZEROCOPY, asyncio and pyzmq",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="bench-out", help="output folder (bench-out)")
    p.add_argument("--quick", action="store_true", help="one short round per cell")
    p.add_argument(
        "--seconds", type=seconds_up_to(600), default=0.4, help="per cell and round (0.4)"
    )
    p.add_argument("--rounds", type=int_in(1, 1000), default=5, help="rounds, medians kept (5)")
    p.add_argument("--no-veth", action="store_true", help="loopback only (no root needed)")
    p.add_argument(
        "--hot", action="store_true", help="also send from one reused buffer (beside 256 MiB)"
    )
    p.add_argument("--no-c", action="store_true", help="leave out the C anchor")
    p.add_argument(
        "--paths",
        type=names_in(PATHS),
        help=f"only these paths, comma-separated ({','.join(PATHS)})",
    )
    p.add_argument(
        "--sizes", type=names_in(SIZE_NAMES), help=f"only these sizes ({','.join(SIZE_NAMES)})"
    )
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument(
        "--page", metavar="FILE", help="also write the results page (docs/performance.md)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..bench.matrix import PATH_KEYS, cells_left, run_matrix
    from ..bench.report import build, write
    from ..bench.workset import COLD, HOT

    seconds, rounds = (0.1, 1) if args.quick else (args.seconds, args.rounds)
    path_names = [PATH_KEYS[k] for k in args.paths] if args.paths else None
    if not cells_left(path_names, args.sizes):
        raise UsageError(f"no path has the sizes {','.join(args.sizes)}")
    # Where the results go is checked before the run, not after minutes of measuring.
    writable_folder(Path(args.out), "--out")
    if args.page:
        writable_file(Path(args.page), "--page")

    def progress(cell: str) -> None:
        if not args.json:
            print(f"  {cell:<60}", end="\r", file=sys.stderr, flush=True)

    data = run_matrix(
        seconds,
        rounds,
        veth=not args.no_veth,
        progress=progress,
        worksets=[COLD, HOT] if args.hot else [COLD],
        path_names=path_names,
        sizes=args.sizes,
        c_anchor=not args.no_c,
    )
    report = build(data, seconds, rounds)
    page = Path(args.page) if args.page else None
    files = write(report, Path(args.out), with_charts=not args.no_charts, page=page)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(" " * 70, end="\r", file=sys.stderr)
        print((Path(args.out) / "results.md").read_text())
        print("wrote " + ", ".join(str(f) for f in files))
    return 0
