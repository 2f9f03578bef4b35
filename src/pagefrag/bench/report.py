"""Turn a matrix run into JSON, a Markdown page and PNG charts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .matrix import ANCHORS, PAGEFRAG

LOOPBACK_NOTE = (
    "Loopback and veth into another namespace deliver locally, and local delivery copies "
    "the data (every zero-copy completion says COPIED): on those paths zero-copy can only "
    "cost, and the figures measure pagefrag's overhead, not its benefit. The UDP path sends "
    "through veth to a neighbour whose MAC nobody owns: the frames leave and are dropped, "
    "so the kernel really transmits from the program's pages — the one true zero-copy path "
    "a single machine offers. pyzmq copies messages under 64 KiB even with copy=False, so "
    "its tracker is done at once for 4 KiB."
)


def ratios(cells: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """pagefrag variant -> anchor -> throughput ratio."""
    out: dict[str, dict[str, float]] = {}
    for pf in PAGEFRAG:
        if pf not in cells:
            continue
        out[pf] = {
            a: cells[pf]["gbps"] / cells[a]["gbps"]
            for a in ANCHORS
            if a in cells and cells[a]["gbps"]
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# pagefrag bench",
        "",
        f"Machine: {report['machine']}. {report['rounds']} rounds of {report['seconds']} s per "
        "cell, interleaved in a shuffled order, medians; sender and receiver on their own cores.",
        "",
    ]
    if report.get("left_out"):
        lines += [f"Left out: the veth paths ({report['left_out']}).", ""]
    for path, by_size in report["results"].items():
        lines += [f"## {path}", ""]
        for size, cells in by_size.items():
            lines += [
                f"### {size}",
                "",
                "| variant | messages/s | GB/s | CPU s/GB | release p50 µs | release p99 µs |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for v, m in sorted(cells.items(), key=lambda kv: -kv[1]["gbps"]):
                lines.append(
                    f"| {v} | {m['messages_per_s']:,.0f} | {m['gbps']:.2f} | "
                    f"{m['cpu_s_per_gb']:.3f} | {_num(m['release_p50_us'])} | "
                    f"{_num(m['release_p99_us'])} |"
                )
            rs = ratios(cells)
            if rs:
                anchors = [a for a in ANCHORS if any(a in r for r in rs.values())]
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
    return "\n".join(lines)


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def charts(report: dict[str, Any], out: Path) -> list[Path]:
    """One throughput chart and one release-latency chart per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for path, by_size in report["results"].items():
        variants = sorted({v for cells in by_size.values() for v in cells})
        for metric, label, log in (
            ("gbps", "GB/s", False),
            ("release_p50_us", "release latency p50 (µs, log)", True),
        ):
            fig, ax = plt.subplots(figsize=(10, 4.5))
            width = 0.8 / len(variants)
            for i, v in enumerate(variants):
                xs = [k + i * width for k in range(len(by_size))]
                ys = [by_size[s].get(v, {}).get(metric, float("nan")) for s in by_size]
                ax.bar(xs, ys, width, label=v)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(by_size))], list(by_size))
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{path}: {label}")
            ax.legend(fontsize=8, ncol=2)
            fig.tight_layout()
            name = out / f"{path.lower().replace(' ', '-')}-{metric}.png"
            fig.savefig(name, dpi=100)
            plt.close(fig)
            files.append(name)
    return files


def write(report: dict[str, Any], out: Path, with_charts: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    files = [out / "results.json", out / "results.md"]
    if with_charts:
        files += charts(report, out)
    return files
