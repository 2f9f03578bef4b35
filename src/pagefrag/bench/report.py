"""Turn a matrix run into a report: the ratios issue 12's targets need, a compact text
table, JSON, a Markdown page and PNG charts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .machine import machine
from .matrix import C_COPY, C_ZEROCOPY, SIZES, all_variants, short_name
from .workset import COLD

LOOPBACK_NOTE = (
    "Loopback and veth into another namespace deliver locally, and local delivery copies "
    "the data (every zero-copy completion says COPIED): on those paths zero-copy can only "
    "cost, and the figures measure pagefrag's overhead, not its benefit. The UDP path sends "
    "through veth to a neighbour whose MAC nobody owns: the frames leave and are dropped, "
    "so the kernel really transmits from the program's pages — the one true zero-copy path "
    "a single machine offers. pyzmq copies messages under 64 KiB even with copy=False, so "
    "its tracker is done at once for 4 KiB."
)
WORKSET_NOTE = (
    "Working sets: `256MiB` sends cycle through 256 MiB of distinct memory (each send the "
    "next slice of one buffer), so copies hit memory as in real programs; `hot` sends one "
    "buffer again and again (it stays in the caches, which flatters copying)."
)

# Anchors a pagefrag variant is divided by in the Markdown page's "pagefrag ÷" tables.
ANCHORS = [
    C_COPY,
    C_ZEROCOPY,
    "C io_uring SEND_ZC fixed",
    "socket.send",
    "bare MSG_ZEROCOPY",
    "asyncio streams",
    "pyzmq track",
]


@dataclass(frozen=True)
class Ratio:
    """GB/s of ``num`` over GB/s of ``den`` in one cell; ``short`` labels its column."""

    num: str
    den: str
    short: str


# The ratios issue 12's targets are stated in (computed in every cell holding both).
RATIOS: dict[str, Ratio] = {
    r.num + " / " + r.den: r
    for r in (
        Ratio("pagefrag always", C_ZEROCOPY, "alw/Czc"),
        Ratio("pagefrag always", C_COPY, "alw/Ccopy"),
        Ratio("pagefrag auto", C_ZEROCOPY, "auto/Czc"),
        Ratio("pagefrag auto", "socket.send", "auto/send"),
        Ratio("pagefrag always, no destructor", C_ZEROCOPY, "nod/Czc"),
        Ratio("bare MSG_ZEROCOPY", C_ZEROCOPY, "bare/Czc"),
        Ratio("pagefrag auto, send_many", C_COPY, "many/Ccopy"),
        # issue 13: the io_uring backend beside the C anchor and the MSG_ZEROCOPY backend
        Ratio("uring always, fixed", C_ZEROCOPY, "ufix/Czc"),
        Ratio("uring always, fixed", C_COPY, "ufix/Ccopy"),
        Ratio("uring always, fixed, send_many", C_ZEROCOPY, "ufixm/Czc"),
        Ratio("uring always, fixed, send_many", C_COPY, "ufxm/Ccopy"),
        Ratio("uring always", C_ZEROCOPY, "ualw/Czc"),
        Ratio("uring auto, send_many", C_COPY, "uam/Ccopy"),
        Ratio("uring always, send_many", C_COPY, "um/Ccopy"),
        Ratio("uring always", "pagefrag always", "ualw/alw"),
        Ratio("uring auto", "pagefrag auto", "uauto/auto"),
        Ratio("uring always, pool", C_ZEROCOPY, "upool/Czc"),
        Ratio("uring always, pool", C_COPY, "upool/Ccp"),
        Ratio("uring always, pool, send_many", C_ZEROCOPY, "upoolm/Czc"),
        Ratio("uring always, pool, send_many", C_COPY, "upoolm/Ccp"),
        # what C itself reaches through io_uring here, and how near the Python rows come
        Ratio("C io_uring SEND_ZC fixed", C_ZEROCOPY, "Curfix/Czc"),
        Ratio("C io_uring SEND", C_COPY, "Cur/Ccopy"),
        Ratio("uring always, fixed, send_many", "C io_uring SEND_ZC fixed", "ufixm/Curf"),
        Ratio("uring always, fixed", "C io_uring SEND_ZC fixed, 1 per enter", "ufix/Curf1"),
    )
}


@dataclass(frozen=True)
class Target:
    ratio: str
    path: str
    size: str
    workset: str
    at_least: float
    issue: int = 12


UDP = "UDP true zero-copy"
# Issue 12's throughput targets for ZeroCopySocket (compiled core), each with a
# destructor per send on the pagefrag side.
TARGETS = [
    Target("pagefrag always / C MSG_ZEROCOPY", UDP, "60000B", COLD, 0.9),
    Target("pagefrag always / C copy", UDP, "60000B", COLD, 1.6),
    Target("pagefrag auto / C MSG_ZEROCOPY", UDP, "60000B", COLD, 0.9),
    Target("pagefrag auto / socket.send", UDP, "4KiB", COLD, 0.95),
    Target("pagefrag auto, send_many / C copy", UDP, "4KiB", COLD, 1.0),
]
TCP_VETH = "TCP veth"
# Issue 13's targets for UringSocket, a destructor per send: 60000 B datagrams from
# registered buffers — a registered BufferPool's (a loan per send) and, to tell the pool's
# cost from the ring's, slices of a working set registered whole — sent one per
# io_uring_enter (send) and in linked batches of 32 (send_many); 4 KiB datagrams in
# batches; TCP over veth beside the MSG_ZEROCOPY backend (ZeroCopySocket), same mode.
URING_TARGETS = [
    Target("uring always, pool / C MSG_ZEROCOPY", UDP, "60000B", COLD, 1.0, 13),
    Target("uring always, pool / C copy", UDP, "60000B", COLD, 1.9, 13),
    Target("uring always, pool, send_many / C MSG_ZEROCOPY", UDP, "60000B", COLD, 1.0, 13),
    Target("uring always, pool, send_many / C copy", UDP, "60000B", COLD, 1.9, 13),
    Target("uring always, fixed / C MSG_ZEROCOPY", UDP, "60000B", COLD, 1.0, 13),
    Target("uring always, fixed / C copy", UDP, "60000B", COLD, 1.9, 13),
    Target("uring always, fixed, send_many / C MSG_ZEROCOPY", UDP, "60000B", COLD, 1.0, 13),
    Target("uring always, fixed, send_many / C copy", UDP, "60000B", COLD, 1.9, 13),
    Target("uring auto, send_many / C copy", UDP, "4KiB", COLD, 1.2, 13),
    Target("uring always / pagefrag always", TCP_VETH, "64KiB", COLD, 1.0, 13),
    Target("uring always / pagefrag always", TCP_VETH, "1MiB", COLD, 1.0, 13),
]


def cell_ratios(cells: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The :data:`RATIOS` computable in one cell (variant -> metrics)."""
    out = {}
    for name, r in RATIOS.items():
        if r.num in cells and r.den in cells and cells[r.den]["gbps"]:
            out[name] = cells[r.num]["gbps"] / cells[r.den]["gbps"]
    return out


def pagefrag_ratios(cells: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """pagefrag variant -> anchor -> throughput ratio."""
    out: dict[str, dict[str, float]] = {}
    for pf in cells:
        if pf.startswith(("pagefrag", "uring")):
            out[pf] = {
                a: cells[pf]["gbps"] / cells[a]["gbps"]
                for a in ANCHORS
                if a in cells and cells[a]["gbps"]
            }
    return out


def _measured(data: dict[str, Any]) -> set[str]:
    return {
        v
        for by_size in data["results"].values()
        for by_ws in by_size.values()
        for cells in by_ws.values()
        for v in cells
    }


def build(
    data: dict[str, Any], seconds: float, rounds: int, targets: list[Target] | None = None
) -> dict[str, Any]:
    """The whole report of a :func:`~.matrix.run_matrix` result: machine, settings,
    results, ratios per cell, and each target with its measured value. ``targets``
    defaults to issue 12's, and issue 13's too when an io_uring variant was measured."""
    if targets is None:
        uring = any(v.startswith("uring") for v in _measured(data))
        targets = TARGETS + (URING_TARGETS if uring else [])
    ratios: dict[str, Any] = {}
    for path, by_size in data["results"].items():
        for size, by_ws in by_size.items():
            for ws, cells in by_ws.items():
                ratios.setdefault(path, {}).setdefault(size, {})[ws] = cell_ratios(cells)
    checked = []
    for t in targets:
        value = ratios.get(t.path, {}).get(t.size, {}).get(t.workset, {}).get(t.ratio)
        checked.append(
            {
                "issue": t.issue,
                "ratio": t.ratio,
                "cell": f"{t.path} {t.size} {t.workset}",
                "at_least": t.at_least,
                "value": value,
                "met": None if value is None else value >= t.at_least,
            }
        )
    return {
        "machine": machine(),
        "seconds": seconds,
        "rounds": rounds,
        **data,
        "ratios": ratios,
        "targets": checked,
    }


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [
        (path, size, ws, cells)
        for path, by_size in report["results"].items()
        for size, by_ws in by_size.items()
        for ws, cells in by_ws.items()
    ]


def table(report: dict[str, Any]) -> str:
    """The compact text table: GB/s per variant, then the ratios, one row per cell."""
    rows = _rows(report)
    present = {v for *_, cells in rows for v in cells}
    variants = [v for v in all_variants() if v in present]
    ratio_names = [n for n in RATIOS if any(n in _ratios_of(report, r) for r in rows)]
    head = f"{'path':<19} {'size':<6} {'set':<6}"
    lines = [
        f"machine: {report['machine']}",
        f"{report['rounds']} rounds x {report['seconds']} s per cell, medians; load average "
        f"{_load(report, 'before')} before, {_load(report, 'after')} after",
    ]
    lines += [f"left out: {what} ({why})" for what, why in report.get("left_out", {}).items()]
    lines += ["", "GB/s", head + "".join(f"{short_name(v):>9}" for v in variants)]
    for path, size, ws, cells in rows:
        lines.append(
            f"{path:<19} {size:<6} {ws:<6}"
            + "".join(f"{cells[v]['gbps']:>9.2f}" if v in cells else f"{'-':>9}" for v in variants)
        )
    lines += ["", "CPU µs per message (this process, or the C anchor's)"]
    lines.append(head + "".join(f"{short_name(v):>9}" for v in variants))
    for path, size, ws, cells in rows:
        nbytes = SIZES[size]
        lines.append(
            f"{path:<19} {size:<6} {ws:<6}"
            + "".join(
                f"{cells[v]['cpu_s_per_gb'] * nbytes / 1e3:>9.2f}"
                if v in cells and cells[v]["cpu_s_per_gb"] is not None
                else f"{'-':>9}"
                for v in variants
            )
        )
    lines += ["", "ratios (GB/s over GB/s)", head + "".join(f"{_rs(n):>11}" for n in ratio_names)]
    for row in rows:
        rs = _ratios_of(report, row)
        lines.append(
            f"{row[0]:<19} {row[1]:<6} {row[2]:<6}"
            + "".join(f"{rs[n]:>11.2f}" if n in rs else f"{'-':>11}" for n in ratio_names)
        )
    issue = None
    for t in report["targets"]:
        if t.get("issue", 12) != issue:
            issue = t.get("issue", 12)
            lines += ["", f"targets (issue {issue})"]
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "" if t["met"] is None else ("  met" if t["met"] else "  MISSED")
        lines.append(f"  {t['ratio']} >= {t['at_least']} ({t['cell']}): {value}{verdict}")
    lines.append("(CPU s/GB, release latency p50/p99, zero-copy shares: in --json)")
    return "\n".join(lines)


def _rs(name: str) -> str:
    return RATIOS[name].short


def _load(report: dict[str, Any], when: str) -> str:
    load = report.get("load", {}).get(when)
    return "?" if not load else " ".join(f"{x:.2f}" for x in load)


def _ratios_of(report: dict[str, Any], row: tuple[str, str, str, Any]) -> dict[str, float]:
    path, size, ws, _ = row
    found: dict[str, float] = report["ratios"].get(path, {}).get(size, {}).get(ws, {})
    return found


def markdown(
    report: dict[str, Any], charts: list[str] | None = None, command: str = "pagefrag bench"
) -> str:
    """The results page; ``charts`` are image paths relative to where it is written;
    ``command``: what generated it."""
    lines = [
        "# pagefrag bench",
        "",
        f"Generated by `{command}`: pagefrag beside a C send loop (copying and "
        "`MSG_ZEROCOPY`, benchmarks/zc_anchor.c), plain `socket.send`, a bare Python "
        "`MSG_ZEROCOPY` loop, asyncio streams and pyzmq `send(copy=False, track=True)` "
        "(waiting on its `MessageTracker`), on the same work in the same run. Release "
        "latency is the time from the send until the program may reuse the buffer: for "
        "pagefrag and the bare loop the kernel's completion, for pyzmq its tracker, for "
        "`socket.send` and asyncio the call's return (they copy).",
        "",
        f"Machine: {report['machine']}. {report['rounds']} rounds of {report['seconds']} s per "
        "cell, interleaved in a shuffled order, medians; sender and receiver on their own "
        f"cores. Load average {_load(report, 'before')} before the run, "
        f"{_load(report, 'after')} after.",
        "",
        WORKSET_NOTE,
        "",
    ]
    for what, why in report.get("left_out", {}).items():
        lines += [f"Left out: {what} ({why}).", ""]
    issue = None
    for t in report["targets"]:
        if t.get("issue", 12) != issue:
            if issue is not None:
                lines.append("")
            issue = t.get("issue", 12)
            lines += [
                f"## Targets (issue {issue})",
                "",
                "| ratio | cell | target | measured |",
                "|---|---|---:|---:|",
            ]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "" if t["met"] is None else (" met" if t["met"] else " missed")
        lines.append(f"| {t['ratio']} | {t['cell']} | ≥ {t['at_least']} | {value}{verdict} |")
    lines.append("")
    for path, by_size in report["results"].items():
        lines += [f"## {path}", ""]
        for size, by_ws in by_size.items():
            for ws, cells in by_ws.items():
                lines += [
                    f"### {size}, working set {ws}",
                    "",
                    "| variant | messages/s | GB/s | CPU s/GB | release p50 µs | "
                    "release p99 µs | zero-copy calls | kernel copied |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|",
                ]
                for v, m in sorted(cells.items(), key=lambda kv: -kv[1]["gbps"]):
                    cpu = "-" if m["cpu_s_per_gb"] is None else f"{m['cpu_s_per_gb']:.3f}"
                    lines.append(
                        f"| {v} | {m['messages_per_s']:,.0f} | {m['gbps']:.2f} | {cpu} | "
                        f"{_num(m['release_p50_us'])} | {_num(m['release_p99_us'])} | "
                        f"{_share(m['zerocopy_share'])} | {_share(m['copied_share'])} |"
                    )
                rs = pagefrag_ratios(cells)
                anchors = [a for a in ANCHORS if any(a in r for r in rs.values())]
                if anchors:
                    lines += [
                        "",
                        "| pagefrag ÷ | " + " | ".join(anchors) + " |",
                        "|---|" + "---:|" * len(anchors),
                    ]
                    for pf, r in rs.items():
                        lines.append(
                            f"| {pf} | "
                            + " | ".join(f"{r[a]:.2f}" if a in r else "-" for a in anchors)
                            + " |"
                        )
                lines.append("")
    lines += ["## What loopback can and cannot show", "", LOOPBACK_NOTE, ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in charts] + [""]
    return "\n".join(lines)


def charts(report: dict[str, Any], out: Path) -> list[Path]:
    """One throughput chart and one release-latency chart per path (a group of bars per
    size and working set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for path, by_size in report["results"].items():
        groups = [(s, ws, cells) for s, by_ws in by_size.items() for ws, cells in by_ws.items()]
        present = {v for *_, cells in groups for v in cells}
        variants = [v for v in all_variants() if v in present]
        for metric, label, log in (
            ("gbps", "GB/s", False),
            ("release_p50_us", "release latency p50 (µs, log)", True),
        ):
            fig, ax = plt.subplots(figsize=(12, 4.5))
            width = 0.8 / len(variants)
            for i, v in enumerate(variants):
                xs = [k + i * width for k in range(len(groups))]
                ys = [(cells.get(v, {}).get(metric) or float("nan")) for _, _, cells in groups]
                ax.bar(xs, ys, width, label=v)
            ax.set_xticks(
                [k + 0.4 - width / 2 for k in range(len(groups))],
                [f"{s}\n{ws}" for s, ws, _ in groups],
            )
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{path}: {label}")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            name = out / f"{path.lower().replace(' ', '-')}-{metric}.png"
            fig.savefig(name, dpi=100)
            plt.close(fig)
            files.append(name)
    return files


def write(
    report: dict[str, Any], out: Path, with_charts: bool = True, page: Path | None = None
) -> list[Path]:
    """results.json, results.md and the charts into ``out``; with ``page``, also the
    results page at that path, its chart links relative to it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    pngs = charts(report, out) if with_charts else []
    (out / "results.md").write_text(markdown(report, [p.name for p in pngs]))
    files = [out / "results.json", out / "results.md", *pngs]
    if page is not None:
        rel = [os.path.relpath(p, page.parent) for p in pngs]
        page.write_text(markdown(report, rel))
        files.append(page)
    return files


# Issue 13's time splits: from the C floor up to what a program calls, CPU µs per message
# on the true zero-copy path (the raw rows add one layer each; see runners.run_uring_raw).
SPLITS = {
    "60000B": [
        ("C io_uring SEND_ZC fixed", "C: 32 SEND_ZC per io_uring_enter, fixed buffer"),
        ("uring raw, fixed", "+ Python calls into the ring (submit_one, submit, wait_result)"),
        ("uring raw+pin, fixed", "+ each send pinned in Python (IoVec, Pin, destructor)"),
        ("uring always, fixed, send_many", "UringSocket.send_many (compiled flat batch)"),
        ("uring always, pool, send_many", "send_many of registered pool loans (generic path)"),
        ("C MSG_ZEROCOPY", "for comparison: C MSG_ZEROCOPY send() loop"),
        ("C io_uring SEND_ZC fixed, 1 per enter", "C: one SEND_ZC per io_uring_enter"),
        ("uring raw, fixed, 1 per enter", "+ Python calls into the ring"),
        ("uring always, fixed", "UringSocket.send (compiled flat send)"),
        ("uring always, pool", "send of a registered BufferPool loan (generic path)"),
    ],
    "4KiB": [
        ("C copy", "C send() loop (copies)"),
        ("C io_uring SEND", "C: 32 copying SEND per io_uring_enter"),
        ("uring raw, fixed", "Python: 32 SEND_ZC per enter, nothing pinned"),
        ("uring raw+pin, fixed", "+ pinned in Python (IoVec, Pin, destructor)"),
        ("uring auto, send_many", "UringSocket.send_many, auto (copies 4 KiB)"),
        ("pagefrag auto, send_many", "ZeroCopySocket.send_many, auto (sendmmsg)"),
    ],
}
# Release latency, both backends side by side: (MSG_ZEROCOPY row, io_uring row).
LATENCY_PAIRS = [
    ("pagefrag always", "uring always"),
    ("pagefrag auto", "uring auto"),
    ("pagefrag auto, send_many", "uring auto, send_many"),
]


def splits_markdown(report: dict[str, Any]) -> str:
    """Issue 13's time splits (CPU µs per message, with the GB/s of each row) and the
    release latencies of both backends side by side, as Markdown tables."""
    lines = [
        "| size | step | row | CPU µs per message | GB/s |",
        "|---|---|---|---:|---:|",
    ]
    udp = report["results"].get(UDP, {})
    for size, steps in SPLITS.items():
        cells = udp.get(size, {}).get(COLD, {})
        for name, what in steps:
            m = cells.get(name)
            if m is None or m["cpu_s_per_gb"] is None:
                continue
            cpu_us = m["cpu_s_per_gb"] * SIZES[size] / 1e3
            lines.append(f"| {size} | {what} | {name} | {cpu_us:.2f} | {m['gbps']:.2f} |")
    lines += [
        "",
        "| path | size | MSG_ZEROCOPY row | p50 µs | p99 µs | io_uring row | p50 µs | p99 µs |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for path, by_size in report["results"].items():
        for size, by_ws in by_size.items():
            cells = by_ws.get(COLD, {})
            for zc, ur in LATENCY_PAIRS:
                a, b = cells.get(zc), cells.get(ur)
                if a is None or b is None or b["release_p50_us"] is None:
                    continue
                lines.append(
                    f"| {path} | {size} | {zc} | {_num(a['release_p50_us'])} | "
                    f"{_num(a['release_p99_us'])} | {ur} | {_num(b['release_p50_us'])} | "
                    f"{_num(b['release_p99_us'])} |"
                )
    return "\n".join(lines)
