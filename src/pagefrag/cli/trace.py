"""``pagefrag trace``: print the lifecycle of one buffer, every reference count at
every step, ending with the destructor firing."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import MAX_SKB_FRAGS
from ..trace import TraceStep, run_trace
from ._args import UsageError, int_in

MAX_SIZE = 16 << 20
MAX_GSO_SEGS = 65535  # the kernel's GSO_MAX_SEGS

EXAMPLE = """examples:
  pagefrag trace
  pagefrag trace --json
  pagefrag trace --png trace.png --size 65536 --mss 1448"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="walk one buffer through a TCP-like life and show every reference count",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size", type=int_in(2, MAX_SIZE), default=64 * 1024, help="bytes written (65536)"
    )
    p.add_argument(
        "--page-size", type=int_in(1, MAX_SIZE), default=16 * 1024, help="bytes per frag (16384)"
    )
    p.add_argument("--mss", type=int_in(1, 65535), default=1448, help="GSO segment size (1448)")
    p.add_argument(
        "--acked", type=int_in(1, MAX_SIZE), default=20_000, help="bytes of the partial ACK (20000)"
    )
    p.add_argument("--json", action="store_true", help="print the steps as JSON")
    p.add_argument("--png", metavar="FILE", help="also draw the timeline into FILE (matplotlib)")
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


def lanes(steps: list[TraceStep]) -> dict[str, list[int]]:
    """For each holder, the steps at which it holds the pages (segments folded into one
    lane): the owner until it drops its reference, then every skb while it lives."""
    out: dict[str, list[int]] = {"owner": []}
    for s in steps:
        if s.index <= 1 or (s.holder == "owner" and s.index < 2):
            out["owner"].append(s.index)
        for k in s.skbs:
            name = "segments" if k.name.startswith("seg-") else k.name
            held = out.setdefault(name, [])
            if not held or held[-1] != s.index:
                held.append(s.index)
    return out


def render_png(steps: list[TraceStep], path: str) -> None:
    """The trace as a timeline: a lane per holder, the reference count over time, and
    the moment the destructor fires."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = lanes(steps)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.6]}
    )
    xs = [s.index for s in steps]
    top.step(xs, [s.refcount for s in steps], where="post", color="tab:blue", linewidth=2)
    top.set_ylabel("destructor refcount")
    top.set_title("pagefrag trace: one 64 KiB write through a TCP life")
    fire = next((s.index for s in steps if s.fired), None)
    names = list(held)
    for row, name in enumerate(names):
        for i in held[name]:
            bottom.broken_barh([(i, 1)], (row - 0.35, 0.7), color=f"C{row % 10}")
    bottom.set_yticks(range(len(names)), names)
    bottom.invert_yaxis()
    labels = [f"{s.index} {s.kernel.split(' ')[0]}" for s in steps]
    bottom.set_xticks(xs, labels, fontsize=7, rotation=35, ha="right")
    bottom.set_xlabel("step (kernel function)")
    for ax in (top, bottom):
        if fire is not None:
            ax.axvline(fire, color="red", linestyle="--")
    if fire is not None:
        top.annotate(
            "destroy() runs",
            (fire, 0),
            xytext=(fire - 3.5, max(s.refcount for s in steps) * 0.6),
            arrowprops={"arrowstyle": "->", "color": "red"},
            color="red",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check(args: argparse.Namespace) -> None:
    """Refuse sizes the walk cannot take, before it starts."""
    size, page, mss = args.size, args.page_size, args.mss
    if not args.acked < size:
        raise UsageError(f"--acked {args.acked} must be less than --size {size}")
    frags = -(-size // page)
    if not 2 <= frags <= MAX_SKB_FRAGS:
        raise UsageError(
            f"--size {size} in --page-size {page} pages is {frags} frags; "
            f"the walk needs 2 to {MAX_SKB_FRAGS} (MAX_SKB_FRAGS)"
        )
    segs = -(-size // mss)
    if segs > MAX_GSO_SEGS:
        raise UsageError(f"--size {size} in --mss {mss} segments is {segs}; at most {MAX_GSO_SEGS}")
    if all(k * page % mss == 0 for k in range(1, frags)):
        raise UsageError(
            f"no --mss {mss} segment straddles a --page-size {page} page boundary; "
            "the walk pulls up one that does"
        )


def run(args: argparse.Namespace) -> int:
    check(args)
    steps = run_trace(args.size, args.page_size, args.mss, args.acked)
    if args.png:
        render_png(steps, args.png)
    if args.json:
        print(json.dumps([s.as_dict() for s in steps], indent=2))
    else:
        print(render(steps))
    return 0 if steps[-1].fired else 1
