"""A smoke run of issue 14's benchmark (``benchmarks/dask_comm.py --quick``): every cell
of both schemes is measured and well formed, the ratios and targets are computed from
those figures, and the helper processes (receivers, senders, cluster workers) and the
lab's namespaces are gone afterwards. No timing assertions: the figures themselves are
measured by the benchmark, never here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed")
pytest.importorskip("numpy")

from pagefrag.testing.netlab import lab_namespaces, missing_tools

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dask_comm.py"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_quick_run_measures_every_cell_and_cleans_up(tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    veth = missing_tools() is None
    argv = [sys.executable, str(SCRIPT), "--quick", "--json", str(result)]
    proc = subprocess.Popen(
        argv if veth else [*argv, "--no-veth"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(result.read_text())
    paths = {"loopback", "veth"} if veth else {"loopback"}
    assert report["machine"] in out and "targets:" in out
    assert set(report["left_out"]) == (set() if veth else {"veth"})
    results = report["results"]
    assert set(results) == {"array", "stream", "rpc", "cluster"}
    for workload in ("array", "stream", "rpc"):
        assert set(results[workload]) == paths, workload
        for path, cells in results[workload].items():
            want = {"tcp", "pagefrag"} | ({"pagefrag-always"} if workload == "array" else set())
            assert set(cells) == want, (workload, path)
            for variant, cell in cells.items():
                for figure in ("msgs_per_s", "sender_cpu_us_per_msg", "receiver_cpu_us_per_msg"):
                    assert math.isfinite(cell[figure]) and cell[figure] > 0, (variant, figure)
                assert cell["messages"] >= 1
                assert cell["peak_rss_mib"] > 0
            # pagefrag's own counters: the forced variant sent every large frame zero-copy,
            # and local delivery copied every one of them (this machine's fact).
            if workload == "array":
                always = cells["pagefrag-always"]
                assert always["zerocopy_share"] == 1.0 and always["copied_share"] == 1.0
                for variant, cell in cells.items():
                    assert cell["gbps"] > 0 and cell["cpu_s_per_gb"] > 0, variant
                    total = cell["sender_cpu_s_per_gb"] + cell["receiver_cpu_s_per_gb"]
                    assert cell["cpu_s_per_gb"] == pytest.approx(total)
                assert "zerocopy_share" not in cells["tcp"]
            # the ratios are pagefrag's figure over tcp's
            ratios = report["ratios"][workload][path]
            for figure, ratio in ratios.items():
                assert ratio == pytest.approx(cells["pagefrag"][figure] / cells["tcp"][figure])
    cluster = results["cluster"]["loopback"]
    assert set(cluster) == {"tcp", "pagefrag"}
    for cell in cluster.values():
        assert cell["wall_s"] > 0 and cell["fetched_mib_per_compute"] > 0  # transfers
    assert report["ratios"]["cluster"]["loopback"]["wall_s"] == pytest.approx(
        cluster["pagefrag"]["wall_s"] / cluster["tcp"]["wall_s"]
    )
    # every target has a value and a verdict; the NIC estimate is derived for each path
    targets = report["targets"]
    assert len(targets) == 3 + len(paths)
    for row in targets:
        assert row["value"] is not None and row["value"] > 0 and isinstance(row["met"], bool)
    for path in paths:
        est = report["nic_estimate"][path]
        lo, hi = est["pagefrag_sender_cpu_s_per_gb_nic"]
        assert 0 <= lo <= hi <= est["pagefrag_sender_cpu_s_per_gb_measured"]
    # nothing left behind: the receivers, the senders, the cluster cells and their
    # workers have exited; the lab's namespaces are deleted
    pids = report["helper_pids"]
    assert len(pids) >= 2 * len(paths) + 2  # + the cluster cells (their workers: threads)
    assert not [p for p in pids if alive(p)]
    assert lab_namespaces(proc.pid) == []
