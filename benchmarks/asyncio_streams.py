"""pagefrag.aio against asyncio streams (and uvloop), 64 KiB and 1 MiB writes over loopback,
and 512 B and 4 KiB small writes.

Each variant runs in its own process (so peak RSS is its own) against one TCP sink
process, writing the same buffer in a ``write(); await drain()`` loop:

  asyncio           asyncio.open_connection (copies every write into its buffer)
  uvloop            the same on uvloop
  pf-auto           pagefrag.aio.open_connection(zerocopy="auto"), write_zerocopy(buf)
  pf-always         pagefrag.aio.open_connection(zerocopy="always"), write_zerocopy(buf)
  pf-always-uvloop  the same on uvloop

Small writes (512 B, 4 KiB): ``write(data)`` of one ``bytes`` object (the same for every
variant) in a loop, ``await drain()`` after every 64 writes; variants asyncio, uvloop,
pf-auto and pf-auto-uvloop (pagefrag.aio in its default mode on each loop, plain
``write``). No release latency there (``nan``).

The buffer is a bytearray, reused: asyncio copies it; pagefrag sends it by reference
through ``write_zerocopy`` (a plain ``write`` of a bytearray is copied, as asyncio's).

Release latency: for pagefrag, from ``write()`` to its handle firing (the kernel released
the pages); asyncio has no such event — its figure is ``write()`` to ``drain()`` returning,
the moment it lets a program go on (it copied the bytes, so reuse was safe at once).

    python benchmarks/asyncio_streams.py [--seconds 1.0] [--rounds 3] [--json FILE]

Connection sweep (issue 12: short connections to a local peer): ``--connections
1,100,1000`` opens that many connections at once, each writing 8 MiB in 1 MiB
``write(); await drain()`` steps, then closing, against one sink process (epoll, one
thread); pagefrag.aio ``auto`` and asyncio streams alternate round by round, medians of
the aggregate GB/s (connection set-up to the last close) and the ratio are printed:

    python benchmarks/asyncio_streams.py --connections 1,100,1000 [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pagefrag.bench.machine import machine

SIZES = {"64KiB": 65536, "1MiB": 1 << 20}
SMALL_SIZES = {"512B": 512, "4KiB": 4096}
SMALL_DRAIN_EVERY = 64
SMALL_VARIANTS = ["asyncio", "pf-auto", "uvloop", "pf-auto-uvloop"]


def _variants() -> list[str]:
    out = ["asyncio", "pf-auto", "pf-always"]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return out
    return [*out, "uvloop", "pf-always-uvloop"]


def _small_variants() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return [v for v in SMALL_VARIANTS if "uvloop" not in v]
    return SMALL_VARIANTS


async def _small_client(variant: str, port: int, size: int, seconds: float) -> dict[str, float]:
    """``write(data)`` of one bytes object, ``await drain()`` every 64 writes."""
    data = os.urandom(size)
    now = time.perf_counter
    if variant.startswith("pf"):
        from pagefrag import aio

        _, writer = await aio.open_connection("127.0.0.1", port)
    else:
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # type: ignore[assignment]
    write, drain = writer.write, writer.drain
    batches = 0
    cpu0, t0 = time.process_time(), now()
    end = t0 + seconds
    while now() < end:
        for _ in range(SMALL_DRAIN_EVERY):
            write(data)
        await drain()
        batches += 1
    wall, cpu = now() - t0, time.process_time() - cpu0
    sent = batches * SMALL_DRAIN_EVERY * size
    writer.close()
    await writer.wait_closed()
    return {
        "gbps": sent / wall / 1e9,
        "cpu_s_per_gb": cpu / (sent / 1e9),
        "release_p50_us": float("nan"),
        "release_p99_us": float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def _client(variant: str, port: int, size: int, seconds: float) -> dict[str, float]:
    if size in SMALL_SIZES.values():
        return await _small_client(variant, port, size, seconds)
    buf = bytearray(os.urandom(size))
    lat: list[float] = []
    now = time.perf_counter
    if variant.startswith("pf"):
        from pagefrag import aio

        mode = "auto" if variant == "pf-auto" else "always"
        _, writer = await aio.open_connection("127.0.0.1", port, zerocopy=mode)
    else:
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # type: ignore[assignment]
    sent = 0
    cpu0, t0 = time.process_time(), now()
    end = t0 + seconds
    zerocopy = getattr(writer, "write_zerocopy", None)  # pagefrag: by reference
    while now() < end:
        start = now()
        if zerocopy is not None:  # pagefrag: latency to the kernel's release
            handle = zerocopy(buf)
            handle.add_done_callback(lambda _h, s=start: lat.append(now() - s))
            await writer.drain()
        else:
            writer.write(buf)
            await writer.drain()
            lat.append(now() - start)
        sent += size
    if variant.startswith("pf"):
        await writer.wait_released()  # type: ignore[attr-defined]
    wall, cpu = now() - t0, time.process_time() - cpu0
    writer.close()
    await writer.wait_closed()
    lat.sort()
    return {
        "gbps": sent / wall / 1e9,
        "cpu_s_per_gb": cpu / (sent / 1e9),
        "release_p50_us": lat[len(lat) // 2] * 1e6,
        "release_p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(variant: str, port: int, size: int, seconds: float) -> None:
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    coro = _client(variant, port, size, seconds)
    if variant.endswith("uvloop") or variant == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    print(json.dumps(result))


SWEEP_WRITE = 1 << 20
SWEEP_WRITES = 8
SWEEP_VARIANTS = ("asyncio", "pf-auto")



Samples = dict[tuple[str, str], list[dict[str, float]]]


def _run_child(*argv: str, timeout: float) -> dict[str, float]:
    """One measurement in a process of its own (this script with ``argv``): its JSON."""
    out = subprocess.run(
        [sys.executable, __file__, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _medians(samples: Samples) -> dict[str, dict[str, dict[str, float]]]:
    """``{row: {variant: {figure: median over the rounds}}}``."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for (row, variant), runs in samples.items():
        results.setdefault(row, {})[variant] = {
            k: statistics.median(r[k] for r in runs) for k in runs[0]
        }
    return results

def _raise_nofile() -> None:
    """Descriptors: one per connection (twice in the sink); soft limit up to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sweep_sink() -> None:
    """Accept and discard on 127.0.0.1, one epoll thread, one buffer for every read."""
    import selectors
    import socket

    _raise_nofile()
    srv = socket.create_server(("127.0.0.1", 0), backlog=4096)
    srv.setblocking(False)
    print(srv.getsockname()[1], flush=True)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    buf = bytearray(4 << 20)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is srv:
                while True:
                    try:
                        conn, _ = srv.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                n = sock.recv_into(buf)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if not n:
                sel.unregister(sock)
                sock.close()  # type: ignore[union-attr]


async def _sweep_client(variant: str, port: int, count: int) -> dict[str, float]:
    buf = os.urandom(SWEEP_WRITE)
    from pagefrag import aio  # imported before the clock starts

    async def one() -> None:
        if variant == "pf-auto":
            _, writer = await aio.open_connection("127.0.0.1", port, zerocopy="auto")
        else:
            _, writer = await asyncio.open_connection("127.0.0.1", port)  # type: ignore[assignment]
        for _ in range(SWEEP_WRITES):
            writer.write(buf)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sent = count * SWEEP_WRITES * SWEEP_WRITE
    return {"gbps": sent / wall / 1e9, "cpu_s_per_gb": cpu / (sent / 1e9), "seconds": wall}


def sweep_child(variant: str, port: int, count: int) -> None:
    _raise_nofile()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    print(json.dumps(asyncio.run(_sweep_client(variant, port, count))))


Children = Callable[[int, int], Iterator[tuple[tuple[str, str], list[str], float]]]


def _sampled(
    sink_argv: list[str], rounds: int, children: Children
) -> dict[str, dict[str, dict[str, float]]]:
    """Start the sink (``python *sink_argv``, on core 1; it prints its port), run every
    child ``children(port, round)`` names, round after round, and return the medians."""
    sink = subprocess.Popen([sys.executable, *sink_argv], stdout=subprocess.PIPE, text=True)
    samples: Samples = {}
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(sink.pid, {1})
        for r in range(rounds):
            for key, argv, timeout in children(port, r):
                samples.setdefault(key, []).append(_run_child(*argv, timeout=timeout))
    finally:
        sink.kill()
        sink.wait()
    return _medians(samples)


def run_sweep(counts: list[int], rounds: int, json_file: str | None) -> None:
    """The connection sweep: variants interleaved within each round, medians."""
    def children(port: int, r: int) -> Iterator[tuple[tuple[str, str], list[str], float]]:
        for count in counts:
            # Alternate which variant goes first, round by round.
            for variant in SWEEP_VARIANTS if r % 2 == 0 else SWEEP_VARIANTS[::-1]:
                argv = ["--sweep-child", variant, str(port), str(count)]
                yield (str(count), variant), argv, 600

    results = _sampled([__file__, "--sweep-sink"], rounds, children)
    report: dict[str, Any] = {
        "machine": machine(),
        "rounds": rounds,
        "per_connection_bytes": SWEEP_WRITES * SWEEP_WRITE,
        "write_bytes": SWEEP_WRITE,
        "results": results,
    }
    print(f"machine: {report['machine']}")
    print(f"connections, each {SWEEP_WRITES} x {SWEEP_WRITE >> 20} MiB; medians of {rounds}")
    print(
        "{:>11} {:<8} {:>6} {:>9} {:>10}".format(
            "connections", "variant", "GB/s", "CPU s/GB", "vs asyncio"
        )
    )
    for count, cells in results.items():
        base = cells["asyncio"]["gbps"]
        for variant, c in cells.items():
            print(
                f"{count:>11} {variant:<8} {c['gbps']:>6.2f} {c['cpu_s_per_gb']:>9.3f} "
                f"{c['gbps'] / base:>10.2f}"
            )
    if json_file:
        Path(json_file).write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--child", nargs=4, metavar=("VARIANT", "PORT", "SIZE", "SECONDS"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--connections",
        metavar="N,N,...",
        help="run the connection sweep instead (e.g. 1,100,1000)",
    )
    parser.add_argument("--sweep-sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep_sink:
        sweep_sink()
        return
    if args.sweep_child:
        v, port, count = args.sweep_child
        sweep_child(v, int(port), int(count))
        return
    if args.connections:
        counts = [int(c) for c in args.connections.split(",")]
        run_sweep(counts, args.rounds, args.json)
        return
    if args.child:
        v, port, size, secs = args.child
        child(v, int(port), int(size), float(secs))
        return
    def children(port: int, r: int) -> Iterator[tuple[tuple[str, str], list[str], float]]:
        for size_name, size in {**SMALL_SIZES, **SIZES}.items():
            small = size_name in SMALL_SIZES
            for variant in _small_variants() if small else _variants():
                argv = ["--child", variant, str(port), str(size), str(args.seconds)]
                yield (size_name, variant), argv, 120

    results = _sampled(["-m", "pagefrag.bench.sink", "127.0.0.1"], args.rounds, children)
    report: dict[str, Any] = {
        "machine": machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "results": results,
    }
    print(f"machine: {report['machine']}")
    head = ("size", "variant", "GB/s", "CPU s/GB", "p50 us", "p99 us", "RSS MiB", "vs asyncio")
    print("{:<6} {:<17} {:>6} {:>9} {:>8} {:>8} {:>8} {:>10}".format(*head))
    for size_name, cells in results.items():
        base = cells["asyncio"]["gbps"]
        for variant, c in cells.items():
            print(
                f"{size_name:<6} {variant:<17} {c['gbps']:>6.2f} {c['cpu_s_per_gb']:>9.3f} "
                f"{c['release_p50_us']:>8.0f} {c['release_p99_us']:>8.0f} "
                f"{c['peak_rss_mib']:>8.1f} {c['gbps'] / base:>10.2f}"
            )
        if "pf-auto-uvloop" in cells and "uvloop" in cells:
            ratio = cells["pf-auto-uvloop"]["gbps"] / cells["uvloop"]["gbps"]
            print(f"{size_name:<6} pf-auto-uvloop / uvloop streams: {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
