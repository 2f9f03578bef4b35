"""``pagefrag://`` against ``tcp://``: dask.distributed comms, interleaved in one run.

Workloads (each a cell per scheme and path; the cells of a round run in a shuffled
order, medians over the rounds):

  array   worker-to-worker transfer: the sender writes ``{"op": "data", "data":
          to_serialize(array)}`` (one 64 MiB float64 NumPy array, its buffer a pickle-5
          out-of-band frame) and waits for the receiver's small ack before the next one,
          as a worker answers one ``get_data`` request at a time. The arrays cycle through
          a working set of 256 MiB of distinct memory (4 arrays), larger than the caches.
          GB/s, CPU seconds per GB of the sender and of the receiver (each process's own
          CPU time, threads included, measured separately), and the sender's peak RSS.
  stream  many small messages, streaming: the sender writes dicts of ~300 bytes (the
          shape of a scheduler-to-worker message) back to back, each ``await
          comm.write``, then a ``done`` message; timed until the receiver has read them
          all and answered. Messages/s.
  rpc     many small messages, request/response: one ~300-byte dict written, one small
          reply read, in a loop. Round trips/s.

Variants: ``tcp`` (distributed's TCP comm), ``pagefrag`` (the defaults a Dask user gets)
and, for the arrays, ``pagefrag-always`` (``distributed.comm.pagefrag.zerocopy: always``:
every large frame sent zero-copy and pinned until the kernel releases it).

Paths: TCP over loopback, and across veth from one network namespace to another
(pagefrag.testing.netlab.NetLab; root only). Sender on core 0, receiver on core 1.
Each path has one receiver process (listening on both schemes) and one sender process
(it holds the working set); they live for the whole run and take one cell at a time.
Peak RSS: the sender resets its high-water mark before each cell (``echo 5 >
/proc/self/clear_refs``) and reads ``VmHWM`` after it. CPU: the kernel's delivery work
(softirq) is charged to whichever process is on the CPU, so the split between sender and
receiver shifts; their sum is the robust figure.

  cluster a ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
          protocol=...)`` (a process of its own per cell, loopback): ``x`` (8192 x 8192
          float64, 2048 x 2048 chunks: 512 MiB), its top half persisted on one worker,
          its bottom half on the other; then, 5 times (after a warm-up), ``y = (x +
          k).persist()`` (made where x's chunks are) and the timed ``(y +
          y.T).sum().compute()``, whose blocks off the two diagonal quarters need a 32 MiB
          block from the other worker (4 to 8 fetches, as replicas already fetched serve
          the mirror block: 128-256 MiB per compute). Median wall time,
          and the bytes workers fetched from each other per compute (their
          ``transfer_incoming_log``).

Local delivery (loopback and veth) copies on this machine: every zero-copy completion
says COPIED, so these figures measure pagefrag's overhead, not its benefit. The report
also gives an estimate for a real NIC, derived from the true zero-copy UDP measurements
(see ``NIC_ESTIMATE`` below and docs/performance.md, "Dask comm").

    python benchmarks/dask_comm.py [--seconds 2] [--rounds 5] [--no-veth] [--no-cluster]
        [--workloads array,stream,rpc,cluster] [--quick] [--json FILE]

``--quick``: 1 MiB arrays in a 4 MiB working set, 0.2 s cells, one round, a 512 x 512
cluster array on a ``processes=False`` cluster (its workers are threads of the cell's
process, still talking over the scheme on loopback): a smoke run, shapes, not figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pagefrag.bench.machine import machine
from pagefrag.cli._args import names_in

SCHEMES = ("tcp", "pagefrag")
VARIANTS = {
    # variant: (scheme, distributed.comm.pagefrag.zerocopy on the sender)
    "tcp": ("tcp", None),
    "pagefrag": ("pagefrag", None),  # the defaults: what a Dask user gets
    "pagefrag-always": ("pagefrag", "always"),  # zero-copy forced on, local or not
}
WORKLOADS = ("array", "stream", "rpc")
TARGETS = [
    # (workload, path, figure, target: pagefrag / tcp at least, or CPU at most)
    ("array", "loopback", "gbps", 1.0),
    ("stream", "loopback", "msgs_per_s", 0.9),
    ("rpc", "loopback", "msgs_per_s", 0.9),
]
NIC_ESTIMATE = {
    # CPU seconds per GB the *sender* saves when the kernel really sends from its pages
    # instead of copying them: the C loops on the true zero-copy path (UDP 60000 B to a
    # discarding veth neighbour, 256 MiB working set), C copy minus C MSG_ZEROCOPY.
    # docs/performance.md, io_uring section (issue 13 run): 0.196 - 0.103 CPU s/GB;
    # BRIEF.md (2026-11-25): 9.7 GB/s copy, 18.3 zero-copy -> 1/9.7 - 1/18.3.
    "saved_s_per_gb_low": round(1 / 9.7 - 1 / 18.3, 4),
    "saved_s_per_gb_high": round(0.196 - 0.103, 4),
}
SMALL = {
    "op": "small",
    "key": "('random_sample-b3c1e08a5f0e6e4d3f8b2a1c', 3, 7)",
    "priority": [0, 1, 12, 7],
    "nbytes": {"('x-0f1e2d3c4b5a69788796a5b4', 3, 7)": 33554432},
    "who_has": {"('x-0f1e2d3c4b5a69788796a5b4', 3, 7)": ["tcp://198.18.0.2:40123"]},
    "stimulus_id": "compute-task-1764140000.123456",
    "duration": 0.5,
}


def _pin(core: int) -> None:
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def _child_env() -> dict[str, str]:
    """The environment of every helper: this pagefrag's sources first on the path."""
    import pagefrag

    src = str(Path(pagefrag.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


# -- the receiver: one process per path, listening on both schemes ----------------------


async def _serve(host: str) -> None:
    from distributed.comm import listen
    from distributed.comm.core import CommClosedError

    import pagefrag.dask  # noqa: F401  (the scheme is registered)

    async def handle(comm: Any) -> None:
        cpu0 = time.process_time()
        messages = nbytes = 0
        try:
            while True:
                msg = await comm.read()
                op = msg["op"]
                if op == "data":
                    messages += 1
                    nbytes += msg["data"].nbytes
                    del msg
                    await comm.write({"op": "ack"})
                elif op == "small":
                    messages += 1
                elif op == "ping":
                    messages += 1
                    await comm.write({"op": "pong"})
                elif op == "done":
                    cpu = time.process_time() - cpu0
                    await comm.write({"cpu": cpu, "messages": messages, "bytes": nbytes})
        except CommClosedError:
            pass
        finally:
            await comm.close()

    listeners = []
    for scheme in SCHEMES:
        listener = await listen(f"{scheme}://{host}:0", handle)
        await listener.start()
        listeners.append(listener)
    print(json.dumps({x.contact_address.split(":")[0]: x.contact_address for x in listeners}))
    sys.stdout.flush()
    # Serve until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for listener in listeners:
        listener.stop()


# -- the sender: one process per path, one cell per command line -------------------------


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (``VmHWM``: peak RSS, ``VmRSS``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS


async def _cell(arrays: list[Any], cmd: dict[str, Any]) -> dict[str, Any]:
    import dask.config
    from distributed.comm import connect
    from distributed.protocol import to_serialize

    workload, seconds = cmd["workload"], cmd["seconds"]
    _reset_hwm()
    rss0 = _status_mib("VmRSS")
    config = (
        {} if cmd["zerocopy"] is None else {"distributed.comm.pagefrag.zerocopy": cmd["zerocopy"]}
    )
    with dask.config.set(config):  # read when the comm connects
        comm = await connect(cmd["address"], timeout=30)
    now = time.perf_counter
    sent = messages = 0
    cpu0, t0 = time.process_time(), now()
    end = t0 + seconds
    if workload == "array":
        while now() < end or messages == 0:
            array = arrays[messages % len(arrays)]
            await comm.write({"op": "data", "data": to_serialize(array)})
            ack = await comm.read()
            assert ack == {"op": "ack"}, ack
            messages += 1
            sent += array.nbytes
    elif workload == "stream":
        write = comm.write
        while now() < end or messages == 0:
            for _ in range(64):
                await write(SMALL)
            messages += 64
    else:
        write, read = comm.write, comm.read
        while now() < end or messages == 0:
            await write(SMALL | {"op": "ping"})
            await read()
            messages += 1
    await comm.write({"op": "done"})
    peer = await comm.read()
    wall, cpu = now() - t0, time.process_time() - cpu0
    stats = comm.stats() if hasattr(comm, "stats") else {}
    await comm.close()
    assert peer["messages"] == messages, (peer, messages)
    result: dict[str, Any] = {
        "wall_s": wall,
        "messages": messages,
        "msgs_per_s": messages / wall,
        "sender_cpu_us_per_msg": cpu / messages * 1e6,
        "receiver_cpu_us_per_msg": peer["cpu"] / messages * 1e6,
        "peak_rss_mib": _status_mib("VmHWM"),
        "rss_growth_mib": _status_mib("VmHWM") - rss0,
    }
    if workload == "array":
        gb = sent / 1e9
        result |= {
            "gbps": gb / wall,
            "sender_cpu_s_per_gb": cpu / gb,
            "receiver_cpu_s_per_gb": peer["cpu"] / gb,
            "cpu_s_per_gb": (cpu + peer["cpu"]) / gb,
        }
    zc = stats.get("zerocopy")
    if zc is not None:
        result["zerocopy_share"] = zc.zerocopy_sends / zc.sends if zc.sends else 0.0
        result["copied_share"] = (
            zc.copied_completions / zc.completions if zc.completions else float("nan")
        )
    return result


async def _drive(array_bytes: int, workset_bytes: int) -> None:
    import numpy as np

    import pagefrag.dask  # noqa: F401

    _pin(0)
    count = max(1, workset_bytes // array_bytes)
    # np.full writes every page: real, distinct memory, not the shared zero page.
    arrays = [np.full(array_bytes // 8, float(i)) for i in range(count)]
    print(json.dumps({"ready": True, "rss_mib": _status_mib("VmRSS")}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        result = await _cell(arrays, json.loads(line))
        print(json.dumps(result), flush=True)


# -- the cluster workload: one LocalCluster per cell --------------------------------------


def _cluster(protocol: str, n: int, chunk: int, reps: int, processes: bool) -> None:
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    def fetched(dask_worker: Any) -> int:
        return sum(int(d["total"]) for d in dask_worker.transfer_incoming_log)

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=processes,
            protocol=protocol,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = sorted(set(client.run(os.getpid).values()) - {os.getpid()})
        # The top half of x's rows on one worker, the bottom half on the other: every
        # block of (y + y.T) off the two diagonal quarters needs a block that is on the
        # other worker (unless an earlier task of the compute fetched it already).
        first, second = sorted(client.scheduler_info()["workers"])
        top = client.persist(da.random.random((n // 2, n), chunks=chunk), workers=[first])
        bottom = client.persist(da.random.random((n // 2, n), chunks=chunk), workers=[second])
        x = da.concatenate([top, bottom], axis=0)
        wait([top, bottom])
        base = float(2 * x.sum().compute())
        times, moved = [], 0
        for rep in range(reps + 1):  # the first is a warm-up (imports, code paths)
            # A fresh persisted input each time, made where x's chunks are (no
            # transfer): the replicas the last compute fetched do not serve this one.
            y = (x + float(rep + 1)).persist()
            wait(y)
            before = sum(client.run(fetched).values())
            t0 = time.perf_counter()
            total = (y + y.T).sum().compute()
            if rep:
                times.append(time.perf_counter() - t0)
                moved += sum(client.run(fetched).values()) - before
            expected = base + 2 * (rep + 1) * n * n
            assert abs(total - expected) <= 1e-9 * expected, (total, expected)
            del y
    print(
        json.dumps(
            {
                "wall_s": statistics.median(times),
                "fetched_mib_per_compute": moved / reps / (1 << 20),
                "worker_pids": pids,
            }
        )
    )


# -- the run -------------------------------------------------------------------------------


class Helper:
    """A long-lived helper process speaking JSON lines on stdin/stdout."""

    def __init__(self, argv: list[str], pids: list[int]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env()
        )
        pids.append(self.proc.pid)

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(30)
            raise RuntimeError(f"helper {self.proc.args} ended ({self.proc.returncode})")
        result: dict[str, Any] = json.loads(text)
        return result

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.line()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


@contextlib.contextmanager
def _path(name: str, args: argparse.Namespace, pids: list[int]) -> Iterator[tuple[Helper, Helper]]:
    """The sender and the receiver of path ``name``, started (not yet ready: each
    prints one line when it is)."""
    me = [sys.executable, os.path.abspath(__file__)]
    size = ["--array-bytes", str(args.array_bytes), "--workset-bytes", str(args.workset_bytes)]
    with contextlib.ExitStack() as stack:
        if name == "loopback":
            host, wrap_s, wrap_r = "127.0.0.1", [], []
        else:
            from pagefrag.testing.netlab import RECEIVER_IP, NetLab

            lab = stack.enter_context(NetLab())
            host = RECEIVER_IP
            wrap_s = ["ip", "netns", "exec", lab.sender]
            wrap_r = ["ip", "netns", "exec", lab.receiver]
        receiver = Helper([*wrap_r, *me, "--serve", host], pids)
        stack.callback(receiver.stop)
        sender = Helper([*wrap_s, *me, "--drive", *size], pids)
        stack.callback(sender.stop)
        yield sender, receiver


def _cluster_cell(protocol: str, args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--cluster-child",
        protocol,
        str(args.cluster_n),
        str(args.cluster_chunk),
        str(args.cluster_reps),
        str(int(args.cluster_processes)),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=_child_env())
    pids.append(proc.pid)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    if proc.returncode != 0:
        raise RuntimeError(f"cluster cell {protocol} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    pids.extend(result.pop("worker_pids"))
    return result


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pagefrag.testing.netlab import missing_tools

    pids: list[int] = []
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    paths = ["loopback"]
    left_out: dict[str, str] = {}
    if args.no_veth:
        left_out["veth"] = "--no-veth"
    elif (why := missing_tools()) is not None:
        left_out["veth"] = why
    else:
        paths.append("veth")
    load_before = _loadavg()
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        helpers = {p: stack.enter_context(_path(p, args, pids)) for p in paths}
        senders: dict[str, tuple[Helper, dict[str, str]]] = {}
        for path, (sender, receiver) in helpers.items():  # all started, now wait
            addresses = receiver.line()
            sender.line()  # its working set is allocated
            senders[path] = (sender, addresses)
        for r in range(args.rounds):
            cells: list[tuple[str, str, str]] = [
                (p, w, v)
                for p in paths
                for w in args.workloads
                if w != "cluster"
                for v in VARIANTS
                if w == "array" or v != "pagefrag-always"
            ]
            if "cluster" in args.workloads and not args.no_cluster:
                cells += [("loopback", "cluster", s) for s in SCHEMES]
            rng.shuffle(cells)
            for path, workload, scheme in cells:
                print(
                    f"  round {r + 1}/{args.rounds}: {path} {workload} {scheme}    ",
                    end="\r",
                    file=sys.stderr,
                    flush=True,
                )
                if workload == "cluster":
                    cell = _cluster_cell(scheme, args, pids)
                else:
                    sender, addresses = senders[path]
                    scheme_name, zerocopy = VARIANTS[scheme]
                    cell = sender.ask(
                        {
                            "workload": workload,
                            "address": addresses[scheme_name],
                            "zerocopy": zerocopy,
                            "seconds": args.seconds,
                        }
                    )
                samples.setdefault((path, workload, scheme), []).append(cell)
    print(" " * 60, end="\r", file=sys.stderr)
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    order = {
        name: i for i, name in enumerate([*WORKLOADS, "cluster", "loopback", "veth", *VARIANTS])
    }
    for (path, workload, scheme), runs in sorted(
        samples.items(), key=lambda item: [order[k] for k in (item[0][1], item[0][0], item[0][2])]
    ):
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
        results.setdefault(workload, {}).setdefault(path, {})[scheme] = {
            k: statistics.median(float(r[k]) for r in runs) for k in keys
        }
    return {
        "machine": machine(),
        "load_before": load_before,
        "load_after": _loadavg(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "array_bytes": args.array_bytes,
        "workset_bytes": args.workset_bytes,
        "cluster": {"n": args.cluster_n, "chunk": args.cluster_chunk, "reps": args.cluster_reps},
        "left_out": left_out,
        "results": results,
        "ratios": _ratios(results),
        "ratios_always": _ratios(results, "pagefrag-always"),
        "targets": _targets(results),
        "nic_estimate": _nic_estimate(results),
        "helper_pids": pids,
    }


FIGURES = {
    "array": [
        "gbps",
        "sender_cpu_s_per_gb",
        "receiver_cpu_s_per_gb",
        "cpu_s_per_gb",
        "peak_rss_mib",
    ],
    "stream": ["msgs_per_s", "sender_cpu_us_per_msg", "receiver_cpu_us_per_msg"],
    "rpc": ["msgs_per_s", "sender_cpu_us_per_msg", "receiver_cpu_us_per_msg"],
    "cluster": ["wall_s", "fetched_mib_per_compute"],
}


def _ratios(
    results: dict[str, Any], variant: str = "pagefrag"
) -> dict[str, dict[str, dict[str, float]]]:
    """``variant`` / tcp of every figure of every cell."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for workload, paths in results.items():
        for path, cells in paths.items():
            if "tcp" in cells and variant in cells:
                pf, tcp = cells[variant], cells["tcp"]
                out.setdefault(workload, {})[path] = {
                    k: pf[k] / tcp[k] for k in FIGURES[workload] if tcp.get(k)
                }
    return out


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = _ratios(results)
    rows = []
    for workload, path, figure, target in TARGETS:
        value = ratios.get(workload, {}).get(path, {}).get(figure)
        rows.append(
            {
                "ratio": f"pagefrag/tcp {figure}",
                "cell": f"{workload} {path}",
                "target": f">= {target}",
                "value": value,
                "met": value is not None and value >= target,
            }
        )
    for path in ("loopback", "veth"):
        value = ratios.get("array", {}).get(path, {}).get("cpu_s_per_gb")
        if value is not None:
            rows.append(
                {
                    "ratio": "pagefrag/tcp CPU s/GB (both ends)",
                    "cell": f"array {path}",
                    "target": "< 1.0",
                    "value": value,
                    "met": value < 1.0,
                }
            )
    return rows


def _nic_estimate(results: dict[str, Any]) -> dict[str, Any]:
    """What a real NIC would make of the array cells: the sender's copy goes away for
    pagefrag (the kernel sends from the pinned pages), stays for tcp (it copies into
    socket buffers); the receiver is unchanged (both copy from the socket)."""
    out: dict[str, Any] = dict(NIC_ESTIMATE)
    for path, cells in results.get("array", {}).items():
        if not {"tcp", "pagefrag-always"} <= set(cells):
            continue
        # pagefrag-always: zero-copy as a NIC path would have it (auto copies locally).
        pf = cells["pagefrag-always"]["sender_cpu_s_per_gb"]
        tcp = cells["tcp"]["sender_cpu_s_per_gb"]
        lo, hi = NIC_ESTIMATE["saved_s_per_gb_low"], NIC_ESTIMATE["saved_s_per_gb_high"]
        out[path] = {
            "tcp_sender_cpu_s_per_gb": tcp,
            "pagefrag_sender_cpu_s_per_gb_measured": pf,
            "pagefrag_sender_cpu_s_per_gb_nic": [max(pf - hi, 0.0), max(pf - lo, 0.0)],
            # sender-CPU-bound throughput ratio pagefrag/tcp on a NIC (range)
            "sender_bound_ratio_nic": [tcp / max(pf - lo, 1e-9), tcp / max(pf - hi, 1e-9)],
        }
    return out


def table(report: dict[str, Any]) -> str:
    lines = [
        f"machine: {report['machine']}; load {report['load_before']} before, "
        f"{report['load_after']} after; medians of {report['rounds']} rounds of "
        f"{report['seconds']} s; arrays of {report['array_bytes'] >> 20} MiB cycling "
        f"through {report['workset_bytes'] >> 20} MiB"
    ]
    for why in report["left_out"].items():
        lines.append(f"left out: {why[0]} ({why[1]})")
    lines.append(
        "local delivery (loopback, veth) copies here: these figures measure "
        "overhead, not zero-copy's benefit"
    )
    for workload, paths in report["results"].items():
        figs = FIGURES[workload]
        lines.append("")
        lines.append(
            f"{workload:<8} {'path':<9} {'variant':<16} " + " ".join(f"{f:>22}" for f in figs)
        )
        for path, cells in paths.items():
            for variant in VARIANTS:
                if variant in cells:
                    c = cells[variant]
                    lines.append(
                        f"{'':<8} {path:<9} {variant:<16} "
                        + " ".join(f"{c.get(f, float('nan')):>22.4g}" for f in figs)
                    )
            for key, label in (("ratios", "pagefrag/tcp"), ("ratios_always", "always/tcp")):
                ratio = report[key].get(workload, {}).get(path)
                if ratio:
                    lines.append(
                        f"{'':<8} {path:<9} {label:<16} "
                        + " ".join(f"{ratio.get(f, float('nan')):>22.3f}" for f in figs)
                    )
            for variant in ("pagefrag", "pagefrag-always"):
                zc = cells.get(variant, {})
                if "zerocopy_share" in zc:
                    lines.append(
                        f"{'':<8} {path:<9} {variant}: zero-copy sends "
                        f"{zc['zerocopy_share']:.0%}, completions copied "
                        f"{zc.get('copied_share', float('nan')):.0%}"
                    )
    lines.append("")
    lines.append("targets:")
    for t in report["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(
            f"  {t['ratio']:<36} {t['cell']:<16} {t['target']:<7} {v:>6} "
            f"{'met' if t['met'] else 'MISSED'}"
        )
    est = report["nic_estimate"]
    for path in ("loopback", "veth"):
        if path in est:
            e = est[path]
            lo, hi = e["pagefrag_sender_cpu_s_per_gb_nic"]
            rlo, rhi = e["sender_bound_ratio_nic"]
            lines.append(
                f"NIC estimate ({path} array cell): pagefrag sender {lo:.3f}-{hi:.3f} CPU "
                f"s/GB (measured {e['pagefrag_sender_cpu_s_per_gb_measured']:.3f}) vs tcp "
                f"{e['tcp_sender_cpu_s_per_gb']:.3f}: {rlo:.2f}-{rhi:.2f}x when "
                "sender-CPU-bound"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell (2.0)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, medians kept (5)")
    parser.add_argument("--no-veth", action="store_true", help="loopback only")
    parser.add_argument("--no-cluster", action="store_true", help="leave out LocalCluster")
    parser.add_argument(
        "--workloads",
        type=names_in((*WORKLOADS, "cluster")),
        default=[*WORKLOADS, "cluster"],
        metavar="W,W",
        help="comma-separated, of array,stream,rpc,cluster (all)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes)")
    parser.add_argument("--seed", type=int, default=None, help="of the shuffles")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--array-bytes", type=int, default=64 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--workset-bytes", type=int, default=256 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="HOST", help=argparse.SUPPRESS)
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _pin(1)
        asyncio.run(_serve(args.serve))
        return
    if args.drive:
        asyncio.run(_drive(args.array_bytes, args.workset_bytes))
        return
    if args.cluster_child:
        proto, n, chunk, reps, processes = args.cluster_child
        _cluster(proto, int(n), int(chunk), int(reps), processes == "1")
        return
    args.cluster_n, args.cluster_chunk, args.cluster_reps = 8192, 2048, 5
    args.cluster_processes = True
    if args.quick:
        args.seconds, args.rounds = 0.2, 1
        args.array_bytes, args.workset_bytes = 1 << 20, 4 << 20
        args.cluster_n, args.cluster_chunk, args.cluster_reps = 512, 128, 1
        args.cluster_processes = False  # workers in the cell's process: a faster start
    if not (args.seconds > 0 and args.rounds > 0):
        parser.error("--seconds and --rounds must be positive")
    if not 0 < args.array_bytes <= args.workset_bytes or args.array_bytes % 8:
        parser.error("bad --array-bytes / --workset-bytes")
    from pagefrag.testing.netlab import sigterm_exits

    with sigterm_exits():
        report = run(args)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
