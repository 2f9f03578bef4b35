"""The benchmark matrix: paths x sizes x working sets x variants, each measurement on a
fresh connection, rounds interleaved (the variants of a cell in a shuffled order each
round), medians kept.

Paths: TCP over loopback; TCP over veth into another namespace; UDP through veth to a
neighbour whose MAC nobody owns (MTU 64000 on both ends: the frames leave and are
dropped, the only true zero-copy path on a single machine). The veth paths need root;
without it they are left out and the report says so. The sender (this process, and the
C anchor it starts) runs on core 0, the receivers on core 1.

Variants: :data:`VARIANTS` (name -> runner), plus the C anchor's two loops when a
compiler is present (:func:`c_variants`). To add one, add an entry to
:data:`VARIANTS` (and to :data:`ZEROCOPY_SEND` to run it by default in
benchmarks/zerocopy_send.py); a ratio a target needs goes in ``report.RATIOS``.
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
from pathlib import Path as FilePath
from typing import Any

from ..testing.netlab import RECEIVER_IP, NetLab, missing_tools
from . import anchor
from .runners import (
    BATCH,
    Run,
    Runner,
    fixed_ring,
    pool_fits,
    registered_pool,
    run_asyncio_streams,
    run_bare_zerocopy,
    run_c,
    run_pagefrag,
    run_pagefrag_aio,
    run_pagefrag_many,
    run_send,
    run_uring,
    run_uring_many,
    run_uring_pool,
    run_uring_raw,
    run_zmq,
)
from .workset import COLD, HOT, Work, work

SIZES = {"4KiB": 4096, "16KiB": 16384, "60000B": 60_000, "64KiB": 65536, "1MiB": 1 << 20}
TCP_SIZES = ["4KiB", "64KiB", "1MiB"]
# The veth MTU is 64,000: larger datagrams would be fragmented (copied).
UDP_SIZES = ["4KiB", "16KiB", "60000B"]
SENDER_CPU, RECEIVER_CPU = 0, 1


@dataclass(frozen=True)
class Variant:
    """A way of sending: its runner, its column label in the compact table, on which
    paths it runs (``any``, ``stream`` or ``datagram``), and whether it needs io_uring
    (left out, and said so, where io_uring zero-copy does not work); ``fits``: the
    cells it can run (a registered pool needs a fixed-buffer slot per buffer);
    ``prepare``: what it sets up once per cell before the timed rounds (registering
    memory with a ring)."""

    run: Runner
    short: str
    on: str = "any"
    uring: bool = False
    fits: Callable[[Work], bool] | None = None  # cells whose work it can send
    prepare: Callable[[Work], object] | None = None  # before the rounds, untimed


def _zmq_placeholder(sock: socket.socket, w: Work, seconds: float) -> Run:
    raise AssertionError("pyzmq track connects by endpoint (run_matrix runs it apart)")


# name -> variant, in the report's column order. The C anchor's loops come first, at run
# time (c_variants), when a compiler is present.
VARIANTS: dict[str, Variant] = {
    "socket.send": Variant(run_send, "send"),
    "bare MSG_ZEROCOPY": Variant(run_bare_zerocopy, "bare-zc"),
    "pagefrag never": Variant(run_pagefrag("never"), "pf-never"),
    "pagefrag always": Variant(run_pagefrag("always"), "pf-alw"),
    "pagefrag auto": Variant(run_pagefrag("auto"), "pf-auto"),
    "pagefrag always, no destructor": Variant(run_pagefrag("always", destructor=False), "alw-nod"),
    "pagefrag auto, send_many": Variant(run_pagefrag_many("auto"), "pf-many"),
    "asyncio streams": Variant(run_asyncio_streams, "asyncio", on="stream"),
    "pagefrag.aio": Variant(run_pagefrag_aio, "pf-aio", on="stream"),
    "pyzmq track": Variant(_zmq_placeholder, "zmq", on="stream"),
    # issue 13: UringSocket (IORING_OP_SEND_ZC), a FragDestructor per send
    "uring always": Variant(run_uring("always"), "ur-alw", uring=True),
    "uring auto": Variant(run_uring("auto"), "ur-auto", uring=True),
    "uring always, send_many": Variant(run_uring_many("always"), "ur-many", uring=True),
    "uring auto, send_many": Variant(run_uring_many("auto"), "ur-amany", uring=True),
    "uring always, fixed": Variant(
        run_uring("always", fixed=True), "ur-fix", uring=True, prepare=fixed_ring
    ),
    "uring always, fixed, send_many": Variant(
        run_uring_many("always", fixed=True), "ur-fixm", uring=True, prepare=fixed_ring
    ),
    "uring always, pool": Variant(
        run_uring_pool("always"), "ur-pool", uring=True, fits=pool_fits, prepare=registered_pool
    ),
    "uring always, pool, send_many": Variant(
        run_uring_pool("always", many=True),
        "ur-poolm",
        uring=True,
        fits=pool_fits,
        prepare=registered_pool,
    ),
    # time splits: the compiled ring driven directly (raw: nothing pinned; +pin: what
    # UringSocket pins), from the registered working set
    "uring raw, fixed, 1 per enter": Variant(
        run_uring_raw(1, pin=False), "raw1", on="datagram", uring=True, prepare=fixed_ring
    ),
    "uring raw, fixed": Variant(
        run_uring_raw(BATCH, pin=False), "raw32", on="datagram", uring=True, prepare=fixed_ring
    ),
    "uring raw+pin, fixed": Variant(
        run_uring_raw(BATCH, pin=True), "raw32pin", on="datagram", uring=True, prepare=fixed_ring
    ),
}
C_COPY, C_ZEROCOPY = "C copy", "C MSG_ZEROCOPY"
# The anchor's io_uring loops (issue 13): what C reaches through io_uring on this kernel.
C_URING = {
    "C io_uring SEND": ("uring-copy", "C-ur"),
    "C io_uring SEND_ZC": ("uring-zc", "C-urzc"),
    "C io_uring SEND_ZC fixed": ("uring-fixed", "C-urfix"),
    "C io_uring SEND_ZC fixed, 1 per enter": ("uring-fixed-1", "C-urfix1"),
}
C_VARIANTS = [C_COPY, C_ZEROCOPY, *C_URING]
# What benchmarks/zerocopy_send.py runs by default (``pagefrag bench`` runs them all).
ZEROCOPY_SEND = [
    C_COPY,
    C_ZEROCOPY,
    "socket.send",
    "bare MSG_ZEROCOPY",
    "pagefrag never",
    "pagefrag always",
    "pagefrag auto",
    "pagefrag always, no destructor",
    "pagefrag auto, send_many",
]
# What benchmarks/zerocopy_send.py --uring runs (issue 13): both backends on the same
# cells, the C anchor beside them.
URING_SEND = [
    C_COPY,
    C_ZEROCOPY,
    *C_URING,
    "pagefrag always",
    "pagefrag auto",
    "pagefrag auto, send_many",
    "uring always",
    "uring auto",
    "uring always, send_many",
    "uring auto, send_many",
    "uring always, fixed",
    "uring always, fixed, send_many",
    "uring always, pool",
    "uring always, pool, send_many",
    "uring raw, fixed, 1 per enter",
    "uring raw, fixed",
    "uring raw+pin, fixed",
]
# ... on these cells: the true zero-copy path and TCP over veth.
URING_CELLS = {"UDP true zero-copy": ["4KiB", "60000B"], "TCP veth": ["64KiB", "1MiB"]}


C_SHORT = {C_COPY: "C-copy", C_ZEROCOPY: "C-zc", **{k: v[1] for k, v in C_URING.items()}}


def c_variants(binary: FilePath) -> dict[str, Variant]:
    """The C anchor's loops (benchmarks/zc_anchor.c), built as ``binary``."""
    return {
        C_COPY: Variant(run_c(binary, "copy"), C_SHORT[C_COPY]),
        C_ZEROCOPY: Variant(run_c(binary, "zerocopy"), C_SHORT[C_ZEROCOPY]),
        **{
            # datagrams only: a stream would need one request in flight and the rest of
            # a partial send sent again, which these loops do not do
            name: Variant(run_c(binary, mode), short, on="datagram", uring=True)
            for name, (mode, short) in C_URING.items()
        },
    }


def all_variants() -> list[str]:
    return [*C_VARIANTS, *VARIANTS]


def short_name(variant: str) -> str:
    return C_SHORT.get(variant) or VARIANTS[variant].short


def _zmq_available() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Path:
    name: str
    key: str  # for --paths
    connect: Callable[[], socket.socket]
    zmq_endpoint: str | None
    sizes: list[str]
    stream: bool
    # Where threads must be born to reach the path (pyzmq connects from its I/O thread).
    inside: Callable[[], AbstractContextManager[None]] = nullcontext


PATH_KEYS = {"tcp-loopback": "TCP loopback", "tcp-veth": "TCP veth", "udp": "UDP true zero-copy"}
PATH_SIZES = {"TCP loopback": TCP_SIZES, "TCP veth": TCP_SIZES, "UDP true zero-copy": UDP_SIZES}


def cells_left(path_names: list[str] | None, sizes: list[str] | None) -> bool:
    """Whether the filters leave any (path, size) cell to measure."""
    return any(not sizes or set(sizes) & set(PATH_SIZES[p]) for p in path_names or PATH_SIZES)


@contextmanager
def _child(argv: list[str]) -> Iterator[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{' '.join(argv)} did not start")
        yield line
    finally:
        proc.kill()
        proc.wait()


def _sink(prefix: list[str], host: str, zmq: bool = False) -> Any:
    argv = [*prefix, sys.executable, "-m", "pagefrag.bench.sink", "--cpu", str(RECEIVER_CPU)]
    if (os.cpu_count() or 1) < 2:
        argv[-2:] = []  # one core: nothing to pin apart
    return _child([*argv, *(["--zmq"] if zmq else []), host])


@contextmanager
def paths(
    veth: bool, wanted: set[str], zmq: bool = True
) -> Iterator[tuple[list[Path], str | None]]:
    """The paths to measure (their names in ``wanted``), and why the veth ones are left
    out (or None)."""
    zmq = zmq and _zmq_available()
    with ExitStack() as stack:
        out: list[Path] = []
        if "TCP loopback" in wanted:
            port = int(stack.enter_context(_sink([], "127.0.0.1")))
            zmq_lo = stack.enter_context(_sink([], "127.0.0.1", zmq=True)) if zmq else None
            out.append(
                Path(
                    "TCP loopback",
                    "tcp-loopback",
                    lambda: socket.create_connection(("127.0.0.1", port)),
                    zmq_lo,
                    TCP_SIZES,
                    True,
                )
            )
        on_veth = wanted & {"TCP veth", "UDP true zero-copy"}
        why = (missing_tools() if veth else "not asked for (--no-veth)") if on_veth else None
        if on_veth and why is None:
            lab = stack.enter_context(NetLab())
            for ns, dev in ((lab.sender, lab.sender_if), (lab.receiver, lab.receiver_if)):
                lab.ns(ns, "ip", "link", "set", dev, "mtu", "64000")
            target = lab.blackhole_neighbour()
            if "TCP veth" in wanted:
                inside = ["ip", "netns", "exec", lab.receiver]
                vport = int(stack.enter_context(_sink(inside, RECEIVER_IP)))
                zmq_veth = (
                    stack.enter_context(_sink(inside, RECEIVER_IP, zmq=True)) if zmq else None
                )

                def tcp_veth() -> socket.socket:
                    s = lab.open_socket(lab.sender)
                    s.connect((RECEIVER_IP, vport))
                    return s

                out.append(
                    Path(
                        "TCP veth",
                        "tcp-veth",
                        tcp_veth,
                        zmq_veth,
                        TCP_SIZES,
                        True,
                        lambda: lab.inside(lab.sender),
                    )
                )
            if "UDP true zero-copy" in wanted:

                def udp_discard() -> socket.socket:
                    s = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
                    s.connect((target, 9))
                    return s

                out.append(Path("UDP true zero-copy", "udp", udp_discard, None, UDP_SIZES, False))
        yield out, why


def metrics(run: Run, wall: float, cpu: float) -> dict[str, float | None]:
    """One measurement's figures. Release latency: None where the variant reports none
    (the C anchor; pagefrag with no destructor)."""
    lat = sorted(run.latencies)
    calls = run.messages if run.send_calls is None else run.send_calls
    return {
        "messages_per_s": run.messages / wall,
        "gbps": run.bytes / wall / 1e9,
        "cpu_s_per_gb": cpu / (run.bytes / 1e9) if run.bytes else None,
        "release_p50_us": lat[len(lat) // 2] * 1e6 if lat else None,
        "release_p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6 if lat else None,
        # share of send calls made with MSG_ZEROCOPY; of those the kernel released, the
        # share it had copied (local delivery) instead of sending from the pages
        "zerocopy_share": run.zerocopy_calls / calls if calls else None,
        "copied_share": run.copied / run.completions if run.completions else None,
    }


def _measure(path: Path, name: str, runner: Runner, w: Work, seconds: float) -> dict[str, Any]:
    if name == "pyzmq track":
        assert path.zmq_endpoint is not None
        cpu0, t0 = time.process_time(), time.perf_counter()
        with path.inside():
            run = run_zmq(path.zmq_endpoint, w, seconds)
    else:
        sock = path.connect()
        try:
            cpu0, t0 = time.process_time(), time.perf_counter()
            run = runner(sock, w, seconds)
        finally:
            sock.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if run.wall is not None and run.cpu is not None:  # measured by the child itself
        wall, cpu = run.wall, run.cpu
    return metrics(run, wall, cpu)


def runs_on(path: Path, name: str, variants: dict[str, Variant], w: Work | None = None) -> bool:
    on = variants[name].on
    fits = variants[name].fits
    if fits is not None and w is not None and not fits(w):
        return False
    if name == "pyzmq track" and not path.zmq_endpoint:
        return False
    return on == "any" or on == ("stream" if path.stream else "datagram")


def _median(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    """This thread (and the children it starts) on core ``cpu``; restored after."""
    if (os.cpu_count() or 1) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_matrix(
    seconds: float,
    rounds: int,
    veth: bool,
    progress: Callable[[str], None] | None = None,
    variants: list[str] | None = None,
    worksets: list[str] | None = None,
    path_names: list[str] | None = None,
    sizes: list[str] | None = None,
    c_anchor: bool = True,
    cells: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Measure every cell. Returns ``{"results": {path: {size: {workset: {variant:
    metrics}}}}, "left_out": {what: why}, "worksets": [...], "load": ...}``.

    ``variants`` defaults to all (the C anchor's when it builds); ``worksets`` to
    ``["256MiB"]`` (add ``"hot"`` for one reused buffer); ``path_names``/``sizes``
    filter the paths and sizes; ``cells`` (path -> sizes) narrows each path's sizes
    further. The io_uring variants are left out, and said so, where io_uring zero-copy
    does not work."""
    wanted = list(variants or all_variants())
    unknown = [v for v in wanted if v not in all_variants()]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {all_variants()}")
    worksets = list(worksets or [COLD])
    for ws in worksets:
        if ws not in (COLD, HOT):
            raise ValueError(f"unknown working set {ws!r}")
    wanted_paths = set(path_names or PATH_KEYS.values())
    if cells is not None:
        wanted_paths &= set(cells)
    left_out: dict[str, str] = {}
    load_before = os.getloadavg()
    rng = random.Random(1)
    samples: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        table = dict(VARIANTS)
        if any(v in C_VARIANTS for v in wanted):
            binary, why = (
                stack.enter_context(anchor.built())
                if c_anchor
                else (None, "not asked for (--no-c)")
            )
            if binary is None:
                left_out["C anchor"] = str(why)
                wanted = [v for v in wanted if v not in C_VARIANTS]
            else:
                table = {**c_variants(binary), **table}
        if any(table[v].uring for v in wanted if v in table):
            from ..uring import unsupported_reason

            no_uring = unsupported_reason()
            if no_uring is not None:
                left_out["io_uring variants"] = no_uring
                wanted = [v for v in wanted if not (v in table and table[v].uring)]
        if "pyzmq track" in wanted and not _zmq_available():
            left_out["pyzmq track"] = "pyzmq is not installed"
        stack.enter_context(_pinned(SENDER_CPU))
        ps, why = stack.enter_context(paths(veth, wanted_paths, zmq="pyzmq track" in wanted))
        if why is not None:
            left_out["veth paths"] = why

        def measured(path: Path) -> list[str]:
            return [
                s
                for s in path.sizes
                if (not sizes or s in sizes) and (cells is None or s in cells.get(path.name, []))
            ]

        for path in ps:  # registrations and the like: never inside a timed cell
            for size_name in measured(path):
                for ws in worksets:
                    w = work(SIZES[size_name], ws)
                    for name in list(wanted):
                        prepare = table[name].prepare
                        if prepare is not None and runs_on(path, name, table, w):
                            try:
                                prepare(w)
                            except OSError as exc:  # e.g. RLIMIT_MEMLOCK without root
                                left_out[name] = f"could not set up ({exc})"
                                wanted.remove(name)
        for _ in range(rounds):
            for path in ps:
                for size_name in measured(path):
                    for ws in worksets:
                        w = work(SIZES[size_name], ws)
                        order = [v for v in wanted if runs_on(path, v, table, w)]
                        rng.shuffle(order)
                        for name in order:
                            if name in left_out:
                                continue
                            if progress:
                                progress(f"{path.name} {size_name} {ws} {name}")
                            try:
                                cell = _measure(path, name, table[name].run, w, seconds)
                            except OSError as exc:
                                if not table[name].uring:
                                    raise
                                # io_uring refusing for good (non-root: RLIMIT_MEMLOCK
                                # below one request's pages): said so, not measured on
                                left_out[name] = f"{path.name} {size_name}: {exc}"
                                continue
                            samples.setdefault((path.name, size_name, ws, name), []).append(cell)
    results: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    for (path_name, size_name, ws, name), runs in samples.items():
        cell_results = results.setdefault(path_name, {}).setdefault(size_name, {})
        cell_results.setdefault(ws, {})[name] = {k: _median([r[k] for r in runs]) for k in runs[0]}
    # Report in the table's order: variants as listed, worksets as asked.
    rank = {v: i for i, v in enumerate(all_variants())}
    for by_size in results.values():
        for by_ws in by_size.values():
            for ws in list(by_ws):
                by_ws[ws] = dict(sorted(by_ws[ws].items(), key=lambda kv: rank[kv[0]]))
            ordered = {ws: by_ws[ws] for ws in worksets if ws in by_ws}
            by_ws.clear()
            by_ws.update(ordered)
    return {
        "results": results,
        "left_out": left_out,
        "worksets": worksets,
        "load": {"before": list(load_before), "after": list(os.getloadavg())},
    }
