"""``pagefrag trace``: the lifecycle walk, as text and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagefrag.cli import main
from pagefrag.trace import run_trace


def test_trace_ends_with_the_destructor_firing_once_and_never_earlier() -> None:
    steps = run_trace()
    assert steps[-1].fired and steps[-1].refcount == 0
    assert not any(s.fired for s in steps[:-1])
    assert all(s.refcount > 0 for s in steps[:-1])
    kernels = " ".join(s.kernel for s in steps)
    for name in ("skb_clone", "tcp_trim_head", "skb_segment", "__pskb_pull_tail", "kfree_skb"):
        assert name in kernels


def test_trace_reference_counts_follow_the_kernel_rules() -> None:
    s = {step.index: step for step in run_trace(size=65536, page_size=16384, acked=20_000)}
    assert [s[i].refcount for i in (0, 1, 2, 3, 4)] == [1, 5, 4, 4, 4]  # clones take none
    assert s[5].refcount == 4 + 4 - 1  # unclone takes 4, the ACK consumed one frag
    assert s[4].skbs[0].dataref == 3


def test_cli_prints_every_step_and_json_gives_the_same_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["trace"]) == 0
    text = capsys.readouterr().out
    assert "FIRED exactly once" in text and "skb_segment" in text
    assert main(["trace", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps([step.as_dict() for step in run_trace()]))


def test_console_script_runs_and_bad_input_is_one_clear_line() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "pagefrag.cli", "trace"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "FIRED" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pagefrag.cli", "trace", "--acked", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "acked" in bad.stderr


def test_trace_png_draws_a_timeline(tmp_path: pytest.TempPathFactory) -> None:
    from pagefrag.cli.trace import lanes

    out = tmp_path / "trace.png"  # type: ignore[operator]
    assert main(["trace", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    held = lanes(run_trace())
    assert {"owner", "rtx-queue", "wire-1", "wire-2", "segments", "receiver"} <= set(held)
    assert held["owner"] == [0, 1] and held["segments"] == [7, 8, 9]
