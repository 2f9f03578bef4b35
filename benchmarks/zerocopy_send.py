"""Does tracking every page cost anything, and when does zero-copy pay?

For 4 KiB, 64 KiB and 1 MiB sends over TCP loopback, TCP over veth (into another
namespace) and UDP to a discarding peer (true zero-copy: the frames leave through veth
and are dropped, never delivered locally), this measures, in one run and on fresh
connections, throughput and CPU time of:

  send        a bare ``socket.send`` loop (the copy baseline)
  bare-zc     a bare hand-written MSG_ZEROCOPY loop that only counts completions
  pf-never    ZeroCopySocket(zerocopy="never")
  pf-always   ZeroCopySocket(zerocopy="always")   (every page tracked and pinned)
  pf-auto     ZeroCopySocket(zerocopy="auto")

Both zero-copy loops read the error queue every 16 sends and wait for every completion
before the clock stops. The TCP receiver is another process. UDP datagrams are capped
at 60,000 bytes (the veth MTU is 64,000; 1 MiB datagrams do not exist).

    python benchmarks/zerocopy_send.py [--seconds 0.4] [--rounds 5] [--json FILE]

Needs root for the veth paths (they are skipped otherwise, and said so).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine

from pagefrag.netlab import NetLab, missing_tools
from pagefrag.zerocopy import ZeroCopySocket
from pagefrag.zerocopy._syscalls import (
    ERRQUEUE_ANCBUF,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    MSG_ZEROCOPY,
    SO_ZEROCOPY,
)

SIZES = {"4KiB": 4096, "64KiB": 65536, "1MiB": 1 << 20}
UDP_MAX = 60_000
VARIANTS = ["send", "bare-zc", "pf-never", "pf-always", "pf-auto"]
SINK = Path(__file__).resolve().parent / "_sink.py"

Connect = Callable[[], socket.socket]


def drain_count(sock: socket.socket) -> int:
    done = 0
    while True:
        try:
            _, anc, _, _ = sock.recvmsg(0, ERRQUEUE_ANCBUF, MSG_ERRQUEUE | MSG_DONTWAIT)
        except BlockingIOError:
            return done
        for _, _, data in anc:
            lo = int.from_bytes(data[8:12], "little")
            hi = int.from_bytes(data[12:16], "little")
            done += ((hi - lo) & 0xFFFFFFFF) + 1


def run_send(sock: socket.socket, buf: bytearray, seconds: float) -> int:
    sent = 0
    view = memoryview(buf)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(16):
            sent += sock.send(view)
    return sent


def run_bare_zc(sock: socket.socket, buf: bytearray, seconds: float) -> int:
    sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    sent = calls = done = 0
    view = memoryview(buf)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(16):
            try:
                sent += sock.send(view, MSG_ZEROCOPY)
                calls += 1
            except OSError:  # ENOBUFS: read completions and go on
                pass
        done += drain_count(sock)
    limit = time.monotonic() + 30
    while done < calls and time.monotonic() < limit:
        time.sleep(0.0005)
        done += drain_count(sock)
    return sent


def run_pf(mode: str) -> Callable[[socket.socket, bytearray, float], int]:
    def run(sock: socket.socket, buf: bytearray, seconds: float) -> int:
        zs = ZeroCopySocket(sock, zerocopy=mode)
        sent = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(16):
                sent += zs.send(buf)
        zs.flush(timeout=30)
        return sent

    return run


RUNNERS: dict[str, Callable[[socket.socket, bytearray, float], int]] = {
    "send": run_send,
    "bare-zc": run_bare_zc,
    "pf-never": run_pf("never"),
    "pf-always": run_pf("always"),
    "pf-auto": run_pf("auto"),
}


def measure(connect: Connect, variant: str, size: int, seconds: float) -> dict[str, float]:
    sock = connect()
    buf = bytearray(os.urandom(size))
    cpu0, t0 = time.process_time(), time.perf_counter()
    sent = RUNNERS[variant](sock, buf, seconds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sock.close()
    return {"gbps": sent / wall / 1e9, "cpu_s_per_gb": cpu / (sent / 1e9)}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@contextmanager
def sink(argv: list[str], host: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [*argv, sys.executable, str(SINK), host], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def paths(want_veth: bool) -> Iterator[dict[str, tuple[Connect, list[str]]]]:
    """path name -> (connect function, sizes that apply)."""
    out: dict[str, tuple[Connect, list[str]]] = {}
    with sink([], "127.0.0.1") as port:
        out["tcp-loopback"] = (lambda: socket.create_connection(("127.0.0.1", port)), list(SIZES))
        why = missing_tools() if want_veth else "not asked for"
        if why is not None:
            print(f"(veth paths skipped: {why})", file=sys.stderr)
            yield out
            return
        with NetLab() as lab:
            for ns, dev in ((lab.sender, lab.sender_if), (lab.receiver, lab.receiver_if)):
                lab.ns(ns, "ip", "link", "set", dev, "mtu", "64000")
            target = lab.blackhole_neighbour()
            from pagefrag.netlab import RECEIVER_IP

            with sink(["ip", "netns", "exec", lab.receiver], RECEIVER_IP) as vport:

                def tcp_veth() -> socket.socket:
                    s = lab.open_socket(lab.sender)
                    s.connect((RECEIVER_IP, vport))
                    return s

                def udp_discard() -> socket.socket:
                    s = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
                    s.connect((target, 9))
                    return s

                out["tcp-veth"] = (tcp_veth, list(SIZES))
                out["udp-zerocopy"] = (udp_discard, ["4KiB", "64KiB"])
                yield out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.4, help="per cell and round (0.4)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; median kept (5)")
    parser.add_argument("--no-veth", action="store_true", help="loopback only")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})

    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    with paths(not args.no_veth) as ps:
        samples: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        order = list(VARIANTS)
        rng = random.Random(1)
        for _ in range(args.rounds):
            for path, (connect, sizes) in ps.items():
                for size_name in sizes:
                    size = (
                        SIZES[size_name]
                        if not path.startswith("udp")
                        else min(SIZES[size_name], UDP_MAX)
                    )
                    rng.shuffle(order)  # no variant always runs first
                    for variant in order:
                        samples.setdefault((path, size_name, variant), []).append(
                            measure(connect, variant, size, args.seconds)
                        )
        for (path, size_name, variant), runs in samples.items():
            results.setdefault(path, {}).setdefault(size_name, {})[variant] = {
                "gbps": statistics.median(r["gbps"] for r in runs),
                "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] for r in runs),
            }
    report: dict[str, Any] = {
        "machine": machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "results": results,
    }
    print(f"machine: {report['machine']}")
    print(
        f"{'path':<13} {'size':<6} "
        + " ".join(f"{v:>9}" for v in VARIANTS)
        + "   always/bare  auto/send"
    )
    for path, by_size in results.items():
        for size_name, cells in by_size.items():
            gb = [cells[v]["gbps"] for v in VARIANTS]
            ratio_zc = cells["pf-always"]["gbps"] / cells["bare-zc"]["gbps"]
            ratio_auto = cells["pf-auto"]["gbps"] / cells["send"]["gbps"]
            print(
                f"{path:<13} {size_name:<6} "
                + " ".join(f"{g:>9.2f}" for g in gb)
                + f"   {ratio_zc:>11.2f}  {ratio_auto:>9.2f}"
            )
    print("(GB/s, median of rounds; CPU s/GB in --json)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
