"""``pagefrag demo``: stream buffers from a BufferPool to a receiver with zero-copy sends,
poisoning every buffer the moment the kernel releases it, and verify every byte.

Each buffer goes out as one SkBuff: a 16-byte header (sequence number, length, CRC-32 of
the payload) in the linear head and the pool buffer as a frag carrying its destructor.
When the destructor fires the demo overwrites the buffer with a poison pattern before the
pool lends it again, so a release that came too early would put poison on the wire and
fail the receiver's checksum. Exit status 1 on any integrity failure or lost destructor.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import BufferPool, SkBuff, ZeroCopySocket
from ..errors import ZeroCopyUnsupportedError
from ..testing.netlab import NetLab, missing_tools
from ..uring import UringSocket
from ..zerocopy import BACKENDS, choose_backend, tcp_info, zerocopy_socket
from ._args import UsageError, int_in, seconds_up_to

EXAMPLE = """examples:
  pagefrag demo                          # loopback, a few seconds, no root needed
  sudo pagefrag demo --netns --loss 2    # two namespaces, veth, 2 % of frames dropped: retransmits
  pagefrag demo --seconds 2 --json
  pagefrag demo --backend msg_zerocopy   # MSG_ZEROCOPY instead of io_uring SEND_ZC"""

HEADER = struct.Struct("!QII")  # sequence, payload length, CRC-32
POISON = 0xEE
MiB = 1 << 20
MAX_POOL_MIB = 1024  # the pool is allocated (and, zero-copy, pinned) up front


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="stream pool buffers with zero-copy sends; poison on release; verify every byte",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--seconds", type=seconds_up_to(86400), default=4.0, help="stop after this long (4)"
    )
    p.add_argument(
        "--total-mib",
        type=int_in(1, 1 << 20),
        default=2048,
        help="or after this much data (2048)",
    )
    p.add_argument(
        "--buffer-kib", type=int_in(1, MAX_POOL_MIB * 1024), default=1024, help="buffer size (1024)"
    )
    p.add_argument("--buffers", type=int_in(1, 4096), default=8, help="pool buffers (8)")
    p.add_argument("--zerocopy", choices=["auto", "always", "never"], default="always")
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="MSG_ZEROCOPY or io_uring SEND_ZC (auto: io_uring where it works)",
    )
    p.add_argument("--netns", action="store_true", help="two namespaces joined by veth (root)")
    p.add_argument(
        "--loss",
        type=int_in(0, 99),
        default=0,
        metavar="PCT",
        help="with --netns: drop PCT of every 100 frames at the receiver (0-99)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-live", action="store_true", help="no live display")
    p.set_defaults(run=run)


@dataclass
class Progress:
    """What the live display and the summary show."""

    mode: str
    path: str
    backend: str = "msg_zerocopy"
    buffers_sent: int = 0
    bytes_sent: int = 0
    releases: int = 0
    pinned_buffers: int = 0
    free_buffers: int = 0
    completions: int = 0
    copied_completions: int = 0
    retransmits: int = 0
    dropped: int = 0  # frames the loss rule dropped (nftables counter)
    elapsed: float = 0.0
    received_buffers: int = 0
    received_bytes: int = 0
    checksum_failures: int = 0
    lost_destructors: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes_sent / self.elapsed / 1e9 if self.elapsed else 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.checksum_failures
            and not self.lost_destructors
            and not self.errors
            and self.received_buffers == self.buffers_sent
        )


class Receiver(threading.Thread):
    """Reads records to EOF and checks each payload's CRC-32."""

    def __init__(self, sock: socket.socket, progress: Progress) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.progress = progress
        self.start()

    def _exact(self, n: int, into: bytearray) -> bool:
        view = memoryview(into)[:n]
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                return False
            got += k
        return True

    def run(self) -> None:
        p = self.progress
        head = bytearray(HEADER.size)
        payload = bytearray(16 * MiB)
        try:
            self.sock.settimeout(60)
            while self._exact(HEADER.size, head):
                seq, length, crc = HEADER.unpack(head)
                if length > len(payload):
                    payload = bytearray(length)
                if not self._exact(length, payload):
                    p.errors.append(f"stream ended inside buffer {seq}")
                    return
                if zlib.crc32(memoryview(payload)[:length]) != crc:
                    p.checksum_failures += 1
                p.received_buffers += 1
                p.received_bytes += length
        except OSError as exc:
            p.errors.append(f"receiver: {exc}")


def check(args: argparse.Namespace) -> None:
    """Refuse options that do not fit together, before anything runs."""
    if args.loss and not args.netns:
        raise UsageError("--loss needs --netns (loopback cannot drop packets here)")
    try:
        choose_backend(args.backend)
    except ZeroCopyUnsupportedError as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from exc
    pool_mib = args.buffers * args.buffer_kib / 1024
    if pool_mib > MAX_POOL_MIB:
        raise UsageError(
            f"--buffers {args.buffers} x --buffer-kib {args.buffer_kib} is a "
            f"{pool_mib:,.0f} MiB pool; at most {MAX_POOL_MIB} MiB"
        )


def _no_drops() -> int:
    return 0


@contextmanager
def _connection(
    args: argparse.Namespace,
) -> Iterator[tuple[socket.socket, socket.socket, str, Callable[[], int]]]:
    if not args.netns:
        srv = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
        srv.close()
        try:
            yield client, server, "TCP over loopback", _no_drops
        finally:
            client.close()
            server.close()
        return
    why = missing_tools()
    if why:
        raise OSError(f"--netns: {why}")
    with NetLab() as lab:
        if args.loss:
            lab.add_loss(args.loss)
        client, server = lab.tcp_pair()
        try:
            yield (
                client,
                server,
                f"TCP over veth between namespaces, {args.loss} % loss",
                lab.dropped,
            )
        finally:
            client.close()
            server.close()


def stream(args: argparse.Namespace, on_tick: Callable[[Progress], None]) -> Progress:
    """Run the demo; ``on_tick`` sees the progress a few times a second."""
    check(args)
    size = args.buffer_kib * 1024
    with _connection(args) as (client, server, path, dropped):
        p = Progress(mode=args.zerocopy, path=path, backend=choose_backend(args.backend))
        rx = Receiver(server, p)
        zs = zerocopy_socket(client, backend=p.backend, zerocopy=args.zerocopy)
        pool = BufferPool(size, args.buffers)
        fill = bytes(range(256)) * (size // 256 + 1)
        poison = bytes([POISON]) * size
        fired = 0

        def released(_: object) -> None:
            nonlocal fired
            fired += 1

        start = last_tick = time.monotonic()
        limit = args.total_mib * MiB
        seq = 0
        while p.bytes_sent < limit and time.monotonic() - start < args.seconds:
            while not pool.free:
                zs.poll_completions(timeout=0.05)
            buf = pool.acquire()
            shift = seq % 251
            buf.data[:] = memoryview(fill)[shift : shift + size]
            view = buf.data
            # Runs the moment the kernel lets go, before the pool lends the buffer again.
            buf.destructor.add_done_callback(_poisoner(view, poison))
            buf.destructor.add_done_callback(released)
            with SkBuff(HEADER.pack(seq, size, zlib.crc32(view))) as skb:
                skb.add_frag(buf.frag())
                zs.sendall(skb)
            buf.release()
            seq += 1
            p.buffers_sent, p.bytes_sent = seq, p.bytes_sent + size
            now = time.monotonic()
            if now - last_tick > 0.1:
                last_tick = now
                _sample(p, zs, pool, client, fired, now - start)
                on_tick(p)
        # Retransmits are read once every send has completed (all data acknowledged)
        # and before close() takes the socket away.
        zs.flush(timeout=60)
        _sample(p, zs, pool, client, fired, time.monotonic() - start)
        p.dropped = dropped()
        zs.close(timeout=60)
        rx.join(60)
        _sample(p, zs, pool, client, fired, time.monotonic() - start)
        p.lost_destructors = p.buffers_sent - fired
        on_tick(p)
        return p


def _sample(
    p: Progress,
    zs: ZeroCopySocket | UringSocket,
    pool: BufferPool,
    sock: socket.socket,
    fired: int,
    t: float,
) -> None:
    st = zs.stats
    p.releases, p.elapsed = fired, t
    p.pinned_buffers, p.free_buffers = pool.in_use, pool.free
    p.completions, p.copied_completions = st.completions, st.copied_completions
    if sock.fileno() >= 0:
        p.retransmits = tcp_info(sock).total_retrans


def _table(p: Progress) -> Any:
    from rich.table import Table

    t = Table(
        title=f"pagefrag demo — {p.path}, zerocopy={p.mode}, {p.backend}", show_header=False
    )
    rows = [
        ("sent", f"{p.buffers_sent} buffers, {p.bytes_sent / MiB:,.0f} MiB"),
        ("throughput", f"{p.gbps:.2f} GB/s over {p.elapsed:.1f} s"),
        ("pool", f"{p.pinned_buffers} pinned / {p.free_buffers} free"),
        ("releases (destructors fired)", f"{p.releases}"),
        (
            "completions",
            f"{p.completions - p.copied_completions} zero-copy, "
            f"{p.copied_completions} copied by the kernel",
        ),
        ("TCP retransmits", f"{p.retransmits}"),
        ("frames dropped (loss rule)", f"{p.dropped}"),
        (
            "received and verified",
            f"{p.received_buffers} buffers, {p.checksum_failures} checksum failures",
        ),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def run(args: argparse.Namespace) -> int:
    check(args)
    live_ok = not args.json and not args.no_live and sys.stdout.isatty()
    if live_ok:
        from rich.live import Live

        with Live(refresh_per_second=8, transient=True) as live:
            p = stream(args, lambda pr: live.update(_table(pr)))
    else:
        p = stream(args, _ignore)
    if p.lost_destructors:
        p.errors.append(f"{p.lost_destructors} destructors never fired")
    if args.json:
        print(json.dumps({**asdict(p), "gbps": p.gbps, "ok": p.ok}, indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(_table(p))
        verdict = (
            "[green]every byte intact, every destructor fired once"
            if p.ok
            else ("[red]FAILED: " + "; ".join(p.errors or [f"{p.checksum_failures} bad buffers"]))
        )
        console.print(verdict)
        if "loopback" in p.path:
            console.print(
                "(loopback delivers locally, and local delivery copies: "
                "try --netns --loss 2 as root)"
            )
    return 0 if p.ok else 1


def _poisoner(view: memoryview, poison: bytes) -> Callable[[object], None]:
    def overwrite(_: object) -> None:
        view[:] = poison

    return overwrite


def _ignore(_: Progress) -> None:
    pass
