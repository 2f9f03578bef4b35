"""What does waiting for the kernel's release cost an RPC?

Calls of 4 KiB, 64 KiB and 1 MiB payloads to a server in another process over loopback
(zero-copy forced on, so the request's pages are pinned until the peer's ACK), with
``safe=True`` (the call completes when its reply has arrived *and* its pages are released)
and ``safe=False`` (on the reply alone), interleaved in one run. Reports calls/s, GB/s and
the completion latency p50/p99 of each; the difference is what safety adds.

    python benchmarks/rpc.py [--seconds 1.0] [--rounds 3] [--inflight 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pagefrag.bench.machine import machine
from pagefrag.rpc import RpcClient

SIZES = {"4KiB": 4096, "64KiB": 65536, "1MiB": 1 << 20}
SERVER = """
import asyncio, sys
from pagefrag.rpc import RpcServer
async def main():
    server = RpcServer({"put": lambda args, payload: len(payload)}, zerocopy="auto")
    host, port = await server.start("127.0.0.1", 0)
    print(port, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def measure(
    port: int, size: int, safe: bool, seconds: float, inflight: int
) -> dict[str, float]:
    payload = bytearray(os.urandom(size))
    lat: list[float] = []
    async with RpcClient("127.0.0.1", port, safe=safe, zerocopy="always", timeout=30) as client:
        end = time.perf_counter() + seconds
        calls = 0

        async def worker() -> None:
            nonlocal calls
            while time.perf_counter() < end:
                t = time.perf_counter()
                await client.call("put", payload=payload)
                lat.append(time.perf_counter() - t)
                calls += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {
        "calls_per_s": calls / wall,
        "gbps": calls * size / wall / 1e9,
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=4, help="concurrent calls (4)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(server.pid, {1})
            os.sched_setaffinity(0, {0})
        samples: dict[tuple[str, bool], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for name, size in SIZES.items():
                for safe in (False, True):
                    cell = asyncio.run(measure(port, size, safe, args.seconds, args.inflight))
                    samples.setdefault((name, safe), []).append(cell)
    finally:
        server.kill()
        server.wait()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for (name, safe), runs in samples.items():
        results.setdefault(name, {})["safe" if safe else "unsafe"] = {
            k: statistics.median(r[k] for r in runs) for k in runs[0]
        }
    report: dict[str, Any] = {"machine": machine(), "inflight": args.inflight, "results": results}
    print(
        f"machine: {report['machine']}; {args.inflight} calls in flight, zerocopy=always, loopback"
    )
    print(f"{'size':<6} {'mode':<7} {'calls/s':>9} {'GB/s':>6} {'p50 us':>8} {'p99 us':>8}")
    for name, modes in results.items():
        for mode, c in modes.items():
            print(
                f"{name:<6} {mode:<7} {c['calls_per_s']:>9,.0f} {c['gbps']:>6.2f} "
                f"{c['p50_us']:>8.0f} {c['p99_us']:>8.0f}"
            )
        added50 = modes["safe"]["p50_us"] - modes["unsafe"]["p50_us"]
        added99 = modes["safe"]["p99_us"] - modes["unsafe"]["p99_us"]
        print(f"{name:<6} safe adds p50 {added50:+.0f} us, p99 {added99:+.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
