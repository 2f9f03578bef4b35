"""``pagefrag bench --quick``: runs and writes well-formed output (no timing assertions)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagefrag.testing.netlab import lab_namespaces, missing_tools

BENCH = [sys.executable, "-m", "pagefrag.cli", "bench"]


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


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("a-file", "exists and is not a folder"),
        ("a-file/below", "cannot create it"),
    ],
)
def test_bench_refuses_an_unusable_output_folder_before_the_run(
    tmp_path: Path, where: str, why: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    t0 = time.monotonic()
    out = subprocess.run(
        [*BENCH, "--quick", "--no-veth", "--out", str(tmp_path / where)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--out" in out.stderr and why in out.stderr
    assert time.monotonic() - t0 < 60, "the matrix ran before the folder was checked"


def test_bench_refuses_a_page_that_is_a_folder_before_the_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [*BENCH, "--quick", "--no-veth", "--out", str(tmp_path / "o"), "--page", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--page" in out.stderr and not (tmp_path / "o" / "results.json").exists()


def test_every_subcommand_has_help_with_an_example() -> None:
    for cmd in ("demo", "bench", "trace", "repro"):
        out = subprocess.run(
            [sys.executable, "-m", "pagefrag.cli", cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "example" in out.stdout and f"pagefrag {cmd}" in out.stdout


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_mid_bench_stops_its_sinks_and_deletes_its_namespaces(tmp_path: Path) -> None:
    """The old bench died on SIGTERM at once: its sink processes were orphaned (they
    ran on) and its namespaces stayed."""
    veth = [] if missing_tools() is None else ["--no-veth"]
    log = tmp_path / "stderr"
    # Output to a file, not a pipe: orphaned sinks would hold a pipe open.
    with log.open("w") as err_file:
        proc = subprocess.Popen(
            [*BENCH, "--seconds", "600", "--rounds", "1", "--out", str(tmp_path / "o"), *veth],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:
        deadline = time.monotonic() + 60
        while len(sinks := children(proc.pid)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert len(sinks) >= 2, "no sink processes started"
        time.sleep(1)
        sinks = children(proc.pid)  # the veth sinks start after the loopback ones
        names = lab_namespaces(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in sinks) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [p for p in sinks if alive(p)]
    for p in orphans:
        os.kill(p, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == 143 and err.endswith("pagefrag bench: terminated\n"), err
    assert not orphans, "sink processes outlived the bench"
    assert not set(names) & set(lab_namespaces())
