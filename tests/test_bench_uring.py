"""Smoke runs of issue 13's benchmark (``benchmarks/zerocopy_send.py --uring``) and of the
C anchor's io_uring loops: they run and report well-formed figures (no timing
assertions; the figures themselves are measured in benchmarks, never here)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagefrag.testing.netlab import missing_tools
from pagefrag.uring import unsupported_reason

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zerocopy_send.py"
no_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None,
    reason="no C compiler (cc): the C anchor cannot be built here",
)
no_uring = pytest.mark.skipif(
    unsupported_reason() is not None, reason=f"io_uring: {unsupported_reason()}"
)
no_lab = pytest.mark.skipif(missing_tools() is not None, reason=f"veth paths: {missing_tools()}")

URING_ROWS = {
    "uring always",
    "uring auto",
    "uring always, send_many",
    "uring auto, send_many",
    "uring always, fixed",
    "uring always, fixed, send_many",
}
POOL_ROWS = {"uring always, pool", "uring always, pool, send_many"}
RAW_ROWS = {"uring raw, fixed, 1 per enter", "uring raw, fixed", "uring raw+pin, fixed"}
C_URING = {
    "C io_uring SEND",
    "C io_uring SEND_ZC",
    "C io_uring SEND_ZC fixed",
    "C io_uring SEND_ZC fixed, 1 per enter",
}


@no_compiler
@no_uring
@no_lab
def test_uring_benchmark_reports_both_backends_and_issue_13_targets(tmp_path: Path) -> None:
    """Every issue-13 cell holds both backends and the C anchors; on the true zero-copy
    path every io_uring row sends zero-copy (except ``auto`` and the copying C loop at
    4 KiB) and no notification says COPIED; every target has a value and a verdict."""
    result = tmp_path / "r.json"
    argv = [sys.executable, str(SCRIPT), "--uring", "--seconds", "0.05", "--rounds", "1"]
    out = subprocess.run(
        [*argv, "--json", str(result)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["machine"] in out.stdout and "targets (issue 13)" in out.stdout
    assert report["left_out"] == {}
    udp = report["results"]["UDP true zero-copy"]
    tcp = report["results"]["TCP veth"]
    assert set(udp) == {"4KiB", "60000B"} and set(tcp) == {"64KiB", "1MiB"}
    # a registered pool needs a slot per buffer: 65536 buffers of 4 KiB do not fit
    assert set(udp["4KiB"]["256MiB"]) >= URING_ROWS | RAW_ROWS | C_URING
    assert not POOL_ROWS & set(udp["4KiB"]["256MiB"])
    big = udp["60000B"]["256MiB"]
    assert set(big) >= URING_ROWS | POOL_ROWS | RAW_ROWS | C_URING
    for name in URING_ROWS | POOL_ROWS | RAW_ROWS | C_URING - {"C io_uring SEND"}:
        if name in {"uring auto", "uring auto, send_many"}:
            continue  # auto may copy until notifications say zero-copy pays
        assert big[name]["zerocopy_share"] == 1.0, name
        assert big[name]["copied_share"] == 0.0, name
    # the Python rows time their releases (destructor stamps); the C rows do not
    for name in URING_ROWS | POOL_ROWS | {"pagefrag always", "uring raw+pin, fixed"}:
        assert big[name]["release_p50_us"] is not None, name
        assert big[name]["release_p99_us"] >= big[name]["release_p50_us"], name
    assert big["C io_uring SEND_ZC fixed"]["release_p50_us"] is None
    for by_ws in tcp.values():
        assert {"pagefrag always", "uring always", "uring always, pool"} <= set(by_ws["256MiB"])
        assert not RAW_ROWS & set(by_ws["256MiB"])  # datagram-only rows
    targets = report["targets"]
    assert {t["issue"] for t in targets} == {13}
    assert len(targets) == 11
    assert all(t["value"] is not None and t["met"] in (True, False) for t in targets)
    ratios = report["ratios"]["UDP true zero-copy"]["60000B"]["256MiB"]
    assert "uring always, pool, send_many / C MSG_ZEROCOPY" in ratios
    assert "C io_uring SEND_ZC fixed / C MSG_ZEROCOPY" in ratios


@pytest.fixture
def loopback_sink() -> Iterator[tuple[str, int]]:
    """A TCP sink on loopback that reads and discards one connection at a time."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                buf = bytearray(1 << 20)
                while not stop.is_set() and conn.recv_into(buf):
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[:2]
    finally:
        stop.set()
        t.join(40)
        srv.close()


@no_compiler
@no_uring
@pytest.mark.parametrize("mode", ["uring-copy", "uring-zc", "uring-fixed", "uring-fixed-1"])
def test_c_anchor_io_uring_loops_on_loopback(mode: str, loopback_sink: tuple[str, int]) -> None:
    """The anchor's io_uring loops send over an inherited socket, wait for every
    notification and count them: on loopback the kernel copies, so every notification
    says COPIED; the copying loop has none."""
    from pagefrag.bench import anchor

    with anchor.built() as (binary, why):
        assert binary is not None, why
        with socket.create_connection(loopback_sink) as sock:
            fd = sock.fileno()
            out = subprocess.run(
                [str(binary), f"fd:{fd}", "65536", str(1 << 20), "0.2", mode],
                pass_fds=(fd,),
                capture_output=True,
                text=True,
                timeout=120,
            )
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert r["bytes"] > 0 and r["calls"] > 0 and r["wall_s"] >= 0.2
        if mode == "uring-copy":
            assert r["zerocopy_calls"] == r["completions"] == 0
        else:
            assert r["zerocopy_calls"] == r["calls"] == r["completions"] == r["copied"]
        bad = subprocess.run(
            [str(binary), "fd:0", "4096", "4096", "0.1", "uring-fixed-33"],
            capture_output=True,
            timeout=60,
        )
        assert bad.returncode == 2 and b"1 <= N <= 32" in bad.stderr


def _memlock_8mib() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))


root_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


@no_compiler
@no_uring
@root_setpriv
def test_bench_without_cap_ipc_lock_leaves_io_uring_rows_out_and_says_why(tmp_path: Path) -> None:
    """Without CAP_IPC_LOCK, RLIMIT_MEMLOCK (8 MiB) counts registered and pinned pages:
    the registered rows cannot be set up; the bench says so and measures the rest (it
    used to die with ENOMEM). A 32 MiB send_many on a stream, over the limit on its own,
    goes in halved requests (it used to be refused for good)."""
    argv = ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock"]
    argv += [sys.executable, "-m", "pagefrag.cli", "bench", "--quick", "--no-veth"]
    out = subprocess.run(
        [*argv, "--sizes", "1MiB", "--no-charts", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_memlock_8mib,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    left = report["left_out"]
    for name in ("uring always, fixed", "uring always, pool"):
        assert "could not set up" in left[name] and "ENOMEM" in left[name], left
    assert "uring always, send_many" not in left, left
    cells = report["results"]["TCP loopback"]["1MiB"]["256MiB"]
    assert {"pagefrag always", "uring always", "uring always, send_many"} <= set(cells)
    assert "C MSG_ZEROCOPY" in cells and "uring always, fixed" not in cells
    page = (tmp_path / "results.md").read_text()
    assert "Left out: uring always, fixed (could not set up" in page
