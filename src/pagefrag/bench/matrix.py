"""The benchmark matrix: paths x sizes x variants, each cell on a fresh connection,
rounds interleaved in a shuffled order, medians kept.

Paths: TCP over loopback; TCP over veth into another namespace; UDP through veth to a
neighbour whose MAC nobody owns (the frames leave and are dropped: the only true
zero-copy path on a single machine). The veth paths need root; without it they are
left out and the report says so.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from ..testing.netlab import RECEIVER_IP, NetLab, missing_tools
from .runners import (
    Run,
    run_asyncio_streams,
    run_bare_zerocopy,
    run_pagefrag,
    run_pagefrag_aio,
    run_send,
    run_zmq,
)

SIZES = {"4KiB": 4096, "64KiB": 65536, "1MiB": 1 << 20}
UDP_MAX = 60_000  # the veth MTU is 64,000: larger datagrams would be fragmented (copied)

# variant -> runner (pyzmq runs apart: it connects by endpoint, not over our socket)
SOCKET_VARIANTS: dict[str, Callable[[socket.socket, bytearray, float], Run]] = {
    "socket.send": run_send,
    "bare MSG_ZEROCOPY": run_bare_zerocopy,
    "pagefrag never": run_pagefrag("never"),
    "pagefrag auto": run_pagefrag("auto"),
    "pagefrag always": run_pagefrag("always"),
    "asyncio streams": run_asyncio_streams,
    "pagefrag.aio": run_pagefrag_aio,
}
STREAM_ONLY = {"asyncio streams", "pagefrag.aio", "pyzmq track"}
ANCHORS = ["socket.send", "bare MSG_ZEROCOPY", "asyncio streams", "pyzmq track"]
DEFAULT_VARIANTS = [v for v in (*SOCKET_VARIANTS, "pyzmq track") if v != "pagefrag never"]
PAGEFRAG = ["pagefrag auto", "pagefrag always", "pagefrag.aio"]


def _zmq_available() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Path:
    name: str
    connect: Callable[[], socket.socket]
    zmq_endpoint: str | None
    sizes: list[str]
    stream: bool
    # Where threads must be born to reach the path (pyzmq connects from its I/O thread).
    inside: Callable[[], AbstractContextManager[None]] = nullcontext


def _pin(pid: int, cpu: int) -> None:
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


@contextmanager
def _child(argv: list[str]) -> Iterator[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{' '.join(argv)} did not start")
        _pin(proc.pid, 1)  # the receiver on its own core: less noise
        yield line
    finally:
        proc.kill()
        proc.wait()


def _sink(prefix: list[str], host: str, zmq: bool = False) -> Any:
    argv = [*prefix, sys.executable, "-m", "pagefrag.bench.sink", *(["--zmq"] if zmq else []), host]
    return _child(argv)


@contextmanager
def paths(veth: bool) -> Iterator[tuple[list[Path], str | None]]:
    """The paths to measure, and why the veth ones are left out (or None)."""
    with ExitStack() as stack:
        out: list[Path] = []
        port = int(stack.enter_context(_sink([], "127.0.0.1")))
        zmq_lo = stack.enter_context(_sink([], "127.0.0.1", zmq=True)) if _zmq_available() else None
        out.append(
            Path(
                "TCP loopback",
                lambda: socket.create_connection(("127.0.0.1", port)),
                zmq_lo,
                list(SIZES),
                True,
            )
        )
        why = missing_tools() if veth else "not asked for (--no-veth)"
        if why is None:
            lab = stack.enter_context(NetLab())
            for ns, dev in ((lab.sender, lab.sender_if), (lab.receiver, lab.receiver_if)):
                lab.ns(ns, "ip", "link", "set", dev, "mtu", "64000")
            target = lab.blackhole_neighbour()
            inside = ["ip", "netns", "exec", lab.receiver]
            vport = int(stack.enter_context(_sink(inside, RECEIVER_IP)))
            zmq_veth = (
                stack.enter_context(_sink(inside, RECEIVER_IP, zmq=True))
                if _zmq_available()
                else None
            )

            def tcp_veth() -> socket.socket:
                s = lab.open_socket(lab.sender)
                s.connect((RECEIVER_IP, vport))
                return s

            def udp_discard() -> socket.socket:
                s = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
                s.connect((target, 9))
                return s

            out.append(
                Path(
                    "TCP veth",
                    tcp_veth,
                    zmq_veth,
                    list(SIZES),
                    True,
                    lambda: lab.inside(lab.sender),
                )
            )
            out.append(Path("UDP true zero-copy", udp_discard, None, ["4KiB", "64KiB"], False))
        yield out, why


def _measure_cell(path: Path, variant: str, size: int, seconds: float) -> dict[str, float]:
    buf = bytearray(os.urandom(size))
    cpu0, t0 = time.process_time(), time.perf_counter()
    if variant == "pyzmq track":
        assert path.zmq_endpoint is not None
        with path.inside():
            run = run_zmq(path.zmq_endpoint, buf, seconds)
    else:
        sock = path.connect()
        try:
            run = SOCKET_VARIANTS[variant](sock, buf, seconds)
        finally:
            sock.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat = sorted(run.latencies) or [float("nan")]
    return {
        "messages_per_s": run.messages / wall,
        "gbps": run.bytes / wall / 1e9,
        "cpu_s_per_gb": cpu / (run.bytes / 1e9) if run.bytes else float("nan"),
        "release_p50_us": lat[len(lat) // 2] * 1e6,
        "release_p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
    }


def variants_for(path: Path, wanted: list[str]) -> list[str]:
    return [
        v
        for v in wanted
        if (path.stream or v not in STREAM_ONLY) and (v != "pyzmq track" or path.zmq_endpoint)
    ]


def run_matrix(
    seconds: float,
    rounds: int,
    veth: bool,
    progress: Callable[[str], None] | None = None,
    variants: list[str] | None = None,
) -> dict[str, Any]:
    """Measure every cell; returns ``{"results": {path: {size: {variant: metrics}}},
    "left_out": ...}``."""
    _pin(0, 0)
    rng = random.Random(1)
    samples: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with paths(veth) as (ps, why):
        for _ in range(rounds):
            for path in ps:
                for size_name in path.sizes:
                    size = SIZES[size_name] if path.stream else min(SIZES[size_name], UDP_MAX)
                    order = variants_for(path, variants or DEFAULT_VARIANTS)
                    rng.shuffle(order)
                    for variant in order:
                        if progress:
                            progress(f"{path.name} {size_name} {variant}")
                        cell = _measure_cell(path, variant, size, seconds)
                        samples.setdefault((path.name, size_name, variant), []).append(cell)
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (path_name, size_name, variant), runs in samples.items():
        results.setdefault(path_name, {}).setdefault(size_name, {})[variant] = {
            k: statistics.median(r[k] for r in runs) for k in runs[0]
        }
    return {"results": results, "left_out": why}
