"""``pagefrag demo``: the main job, on loopback and between namespaces with loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagefrag.netlab import missing_tools


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagefrag.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_on_loopback_verifies_every_buffer() -> None:
    out = demo("--seconds", "1", "--total-mib", "64", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["ok"] and s["buffers_sent"] == s["received_buffers"] == s["releases"] == 64
    assert s["checksum_failures"] == 0 and s["lost_destructors"] == 0
    assert s["completions"] == s["copied_completions"] > 0  # loopback copies


def test_demo_prints_a_summary_table() -> None:
    out = demo("--seconds", "1", "--total-mib", "16", "--no-live")
    assert out.returncode == 0 and "every byte intact" in out.stdout


def test_demo_between_namespaces_with_loss_counts_retransmits() -> None:
    why = missing_tools()
    if why:
        pytest.skip(why)
    out = demo("--netns", "--loss", "2", "--seconds", "2", "--total-mib", "128", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["ok"] and s["retransmits"] > 0 and s["received_bytes"] == 128 << 20


def test_demo_bad_input_is_one_line_and_nonzero() -> None:
    out = demo("--loss", "2")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "--netns" in out.stderr
