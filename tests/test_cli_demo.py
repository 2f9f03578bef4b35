"""``pagefrag demo``: the main job, on loopback and between namespaces with loss; bad
input refused up front; Ctrl-C and SIGTERM end it in one line, namespaces deleted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pagefrag.testing.netlab import lab_namespaces, missing_tools

CLI = [sys.executable, "-m", "pagefrag.cli"]


def sigint_default() -> None:
    """In the child before it runs: SIGINT back to its default, so Python installs its
    KeyboardInterrupt handler even when this test run was started with SIGINT ignored
    (a shell's background job: tests/run's second pass, nohup)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the CLI to the end. On timeout it is terminated (SIGTERM, so it deletes its
    namespaces; SIGKILL only if it does not stop) and the timeout is raised; either way
    no namespace of it may be left behind."""
    proc = subprocess.Popen(
        CLI + list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        leaked = lab_namespaces(proc.pid)
        for ns in leaked:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=60)
        assert not leaked, f"pagefrag left namespaces behind: {leaked}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[str, str]:
    """Signal ``proc`` and collect its output; SIGKILL if it is still there after 60 s."""
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        raise


def demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_cli("demo", *args, timeout=timeout)


def needs_netns() -> None:
    why = missing_tools()
    if why:
        pytest.skip(why)


def test_demo_on_loopback_verifies_every_buffer() -> None:
    out = demo("--seconds", "1", "--total-mib", "64", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["ok"] and s["buffers_sent"] == s["received_buffers"] == s["releases"] == 64
    assert s["checksum_failures"] == 0 and s["lost_destructors"] == 0
    assert s["completions"] == s["copied_completions"] > 0  # loopback copies
    assert s["dropped"] == 0


def test_demo_prints_a_summary_table() -> None:
    out = demo("--seconds", "1", "--total-mib", "16", "--no-live")
    assert out.returncode == 0 and "every byte intact" in out.stdout
    assert "frames dropped" in out.stdout


def test_demo_between_namespaces_with_loss_counts_retransmits() -> None:
    needs_netns()
    out = demo("--netns", "--loss", "2", "--seconds", "2", "--total-mib", "128", "--json")
    s = json.loads(out.stdout or "{}")
    assert s.get("dropped", 0) > 0, f"the loss rule dropped nothing: {out.stderr}"
    assert out.returncode == 0, out.stderr
    assert s["ok"] and s["retransmits"] > 0 and s["received_bytes"] == 128 << 20


def test_a_short_run_with_loss_reports_its_retransmits() -> None:
    """Retransmits used to be read only on the live display's 0.1 s ticks: a run that
    finished sooner reported 0 although the loss rule dropped frames."""
    needs_netns()
    out = demo("--netns", "--loss", "2", "--seconds", "2", "--total-mib", "16", "--json")
    s = json.loads(out.stdout or "{}")
    assert s.get("dropped", 0) > 0, f"the loss rule dropped nothing: {out.stderr}"
    assert out.returncode == 0, out.stderr
    assert s["retransmits"] >= s["dropped"]  # a dropped GSO frame is >= 1 segment resent
    assert s["ok"] and s["received_bytes"] == 16 << 20


def test_demo_bad_input_is_one_line_and_nonzero() -> None:
    out = demo("--loss", "2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--netns" in out.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["demo", "--netns", "--loss", "100"], "--loss"),
        (["demo", "--netns", "--loss", "-3"], "--loss"),
        (["demo", "--netns", "--loss", "150"], "--loss"),
        (["demo", "--netns", "--loss", "2.5"], "--loss"),
        (["demo", "--seconds", "-1"], "--seconds"),
        (["demo", "--seconds", "0"], "--seconds"),
        (["demo", "--seconds", "inf"], "--seconds"),
        (["demo", "--seconds", "nan"], "--seconds"),
        (["demo", "--total-mib", "0"], "--total-mib"),
        (["demo", "--total-mib", str(1 << 40)], "--total-mib"),
        (["demo", "--buffers", "0"], "--buffers"),
        (["demo", "--buffers", "100000"], "--buffers"),
        (["demo", "--buffer-kib", "0"], "--buffer-kib"),
        (["demo", "--buffer-kib", str(1 << 40)], "--buffer-kib"),
        (["demo", "--buffers", "4096", "--buffer-kib", "4096"], "MiB pool"),
        (["bench", "--seconds", "-1"], "--seconds"),
        (["bench", "--seconds", "0"], "--seconds"),
        (["bench", "--seconds", "1e9"], "--seconds"),
        (["bench", "--rounds", "0"], "--rounds"),
        (["bench", "--rounds", "-2"], "--rounds"),
        (["trace", "--size", "0"], "--size"),
        (["trace", "--size", str(1 << 40)], "--size"),
        (["trace", "--size", "10000000"], "MAX_SKB_FRAGS"),
        (["trace", "--page-size", "0"], "--page-size"),
        (["trace", "--page-size", "65536"], "MAX_SKB_FRAGS"),
        (["trace", "--mss", "0"], "--mss"),
        (["trace", "--mss", "1"], "--mss"),
        (["trace", "--mss", "100000"], "--mss"),
        (["trace", "--acked", "-1"], "--acked"),
        (["trace", "--acked", "65536"], "--acked"),
    ],
)
def test_bad_numbers_are_a_one_line_usage_error_before_anything_runs(
    args: list[str], option: str
) -> None:
    out = run_cli(*args, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert option in out.stderr and "error" in out.stderr
    assert out.stdout == ""


def start_long_demo(*extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "demo", "--seconds", "120", "--total-mib", str(1 << 20), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )


def wait_until_streaming(proc: subprocess.Popen[str]) -> list[str]:
    """Wait (at most 60 s) until ``proc``'s lab exists and its loss rule is in place:
    the run has started. Its namespaces."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        names = lab_namespaces(proc.pid)
        receiver = [n for n in names if n.startswith("pfr")]
        if len(names) == 2 and receiver:
            tables = subprocess.run(
                ["ip", "netns", "exec", receiver[0], "nft", "list", "tables"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            if "pagefrag_loss" in tables:
                time.sleep(1)  # connected and sending by now
                assert proc.poll() is None, proc.communicate()
                return names
        time.sleep(0.05)
    stop(proc)
    raise AssertionError("the demo did not start within 60 s")


@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_signal_mid_run_exits_in_one_line_and_deletes_the_namespaces(
    sig: int, status: int, word: str
) -> None:
    needs_netns()
    proc = start_long_demo("--netns", "--loss", "2")
    names = wait_until_streaming(proc)
    t0 = time.monotonic()
    _out, err = stop(proc, sig)
    assert time.monotonic() - t0 < 30, "the demo did not stop promptly"
    assert proc.returncode == status, err
    assert err == f"pagefrag demo: {word}\n"
    assert not set(names) & set(lab_namespaces())


def test_ctrl_c_on_loopback_exits_130_in_one_line() -> None:
    proc = start_long_demo()
    time.sleep(2)
    assert proc.poll() is None, proc.communicate()
    _out, err = stop(proc, signal.SIGINT)
    assert proc.returncode == 130 and err == "pagefrag demo: interrupted\n"


def test_a_run_that_outlives_its_test_timeout_leaves_no_namespaces() -> None:
    """subprocess.run(timeout=...) SIGKILLs the child, which cannot clean up: its
    namespaces stayed until some later lab happened to start. run_cli terminates it."""
    needs_netns()
    with pytest.raises(subprocess.TimeoutExpired):  # run_cli asserts none of its are left
        demo("--netns", "--seconds", "60", "--total-mib", str(1 << 20), timeout=4)


@pytest.mark.parametrize("backend", ["msg_zerocopy", "uring"])
def test_demo_verifies_every_buffer_on_either_backend(backend: str) -> None:
    from pagefrag.uring import unsupported_reason

    if backend == "uring" and unsupported_reason():
        pytest.skip(f"io_uring zero-copy: {unsupported_reason()}")
    out = demo("--seconds", "1", "--total-mib", "32", "--backend", backend, "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["backend"] == backend and s["ok"]
    assert s["buffers_sent"] == s["received_buffers"] == s["releases"] == 32
    assert s["completions"] == s["copied_completions"] > 0  # loopback copies


def test_demo_backend_uring_without_the_compiled_ring_is_a_usage_error() -> None:
    proc = subprocess.run(
        [*CLI, "demo", "--backend", "uring", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PAGEFRAG_PURE_PYTHON": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "--backend uring" in proc.stderr and "compiled core" in proc.stderr
