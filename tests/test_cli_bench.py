"""``pagefrag bench --quick``: runs and writes well-formed output (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_writes_json_markdown_and_charts(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagefrag.cli",
            "bench",
            "--quick",
            "--no-veth",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    cells = report["results"]["TCP loopback"]
    assert set(cells) == {"4KiB", "64KiB", "1MiB"}
    for by_variant in cells.values():
        assert {
            "socket.send",
            "bare MSG_ZEROCOPY",
            "pagefrag auto",
            "pagefrag always",
            "asyncio streams",
            "pagefrag.aio",
        } <= set(by_variant)
        for m in by_variant.values():
            assert set(m) == {
                "messages_per_s",
                "gbps",
                "cpu_s_per_gb",
                "release_p50_us",
                "release_p99_us",
            }
            assert m["gbps"] > 0 and m["messages_per_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "## TCP loopback" in md and "pagefrag ÷" in md and report["machine"] in md
    for png in ("tcp-loopback-gbps.png", "tcp-loopback-release_p50_us.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_every_subcommand_has_help_with_an_example() -> None:
    for cmd in ("demo", "bench", "trace"):
        out = subprocess.run(
            [sys.executable, "-m", "pagefrag.cli", cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "example" in out.stdout and f"pagefrag {cmd}" in out.stdout
