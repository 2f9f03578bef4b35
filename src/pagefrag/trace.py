"""The lifecycle trace: one buffer walked through a TCP-like life, every reference
count recorded at every step. Pure logic (no I/O); ``pagefrag trace`` renders it.

The walk follows what the kernel does to a zero-copy send: the owner injects pages
with a destructor (``do_tcp_sendpages`` + ``skb_frag_set_destructor``), TCP clones the
skb for the wire and keeps the original on the retransmit queue (``tcp_transmit_skb``),
a timeout retransmits another clone while the first is still in flight, a partial ACK
trims the head (``tcp_trim_head``), the retransmission is cut by GSO (``skb_segment``),
one segment is delivered locally and its headers pulled up (``__pskb_pull_tail``), and
the last free fires the destructor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ._destructor import FragDestructor
from ._skbuff import SkBuff

__all__ = ["SkbState", "TraceStep", "run_trace"]


@dataclass(frozen=True)
class SkbState:
    """One live skb at one step."""

    name: str
    length: int
    head_len: int
    nr_frags: int
    dataref: int


@dataclass(frozen=True)
class TraceStep:
    """What happened, who did it, and every reference count afterwards."""

    index: int
    holder: str
    action: str
    kernel: str
    refcount: int
    fired: bool
    skbs: tuple[SkbState, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_trace(
    size: int = 64 * 1024, page_size: int = 16 * 1024, mss: int = 1448, acked: int = 20_000
) -> list[TraceStep]:
    """Walk one ``size``-byte buffer (pages of ``page_size``) through its TCP life."""
    if not 0 < acked < size or page_size <= 0 or mss <= 0:
        raise ValueError("need 0 < acked < size and positive page_size and mss")
    fired: list[bool] = []
    buffer = bytearray(size)
    d = FragDestructor(lambda _: fired.append(True), name="write#1")
    live: dict[str, SkBuff] = {}
    steps: list[TraceStep] = []

    def record(holder: str, action: str, kernel: str) -> None:
        states = tuple(
            SkbState(name, len(s), s.head_len, s.nr_frags, s.dataref) for name, s in live.items()
        )
        steps.append(TraceStep(len(steps), holder, action, kernel, d.refcount, bool(fired), states))

    record(
        "owner",
        "create the write's destructor (the owner holds one reference)",
        "struct skb_frag_destructor",
    )
    rtx = SkBuff()
    for off in range(0, size, page_size):
        rtx.add_frag(buffer, off, min(page_size, size - off), d)
    live["rtx-queue"] = rtx
    record(
        "owner",
        f"inject {size} bytes as {rtx.nr_frags} frags sharing the destructor",
        "skb_fill_page_desc + skb_frag_set_destructor",
    )
    d.unref()
    record("owner", "drop the owner's initial reference", "skb_frag_destructor_unref")

    live["wire-1"] = rtx.clone()
    record(
        "wire-1",
        "clone for the wire; the original stays on the retransmit queue",
        "tcp_transmit_skb / skb_clone",
    )
    live["wire-2"] = rtx.clone()
    record(
        "wire-2",
        "retransmit timeout: another clone while the first is in flight",
        "tcp_retransmit_skb / skb_clone",
    )

    rtx.trim_head(acked)
    record(
        "rtx-queue",
        f"partial ACK of {acked} bytes: unclone, drop frags consumed whole",
        "tcp_trim_head / pskb_expand_head / __pskb_trim_head",
    )
    live.pop("wire-1").free()
    record("wire-1", "first transmission completes: the driver frees its clone", "kfree_skb")

    wire2 = live["wire-2"]
    segments = wire2.segment(mss)
    for i, seg in enumerate(segments):
        live[f"seg-{i}"] = seg
    record(
        "gso", f"GSO cuts the retransmission into {len(segments)} segments of {mss}", "skb_segment"
    )
    live.pop("wire-2").free()
    record("wire-2", "the GSO skb is consumed once segmented", "consume_skb")

    # Deliver locally the segment that straddles a page boundary; free the others.
    boundary = next(i for i, s in enumerate(segments) if s.nr_frags > 1)
    for i in range(len(segments)):
        if i != boundary:
            live.pop(f"seg-{i}").free()
    record("segments", f"{len(segments) - 1} segments transmitted and freed", "napi_consume_skb")

    received = live.pop(f"seg-{boundary}")
    live["receiver"] = received
    first = received.frags[0].size
    received.pull(first + 64)
    record(
        "receiver",
        f"receive pull-up of {first + 64} header bytes spanning two frags",
        "__pskb_pull_tail",
    )
    live.pop("receiver").free()
    record("receiver", "the receiver consumes the segment", "kfree_skb")

    live.pop("rtx-queue").free()
    record(
        "rtx-queue",
        "the rest is ACKed: the retransmit queue frees the original; the destructor fires",
        "tcp_clean_rtx_queue / kfree_skb",
    )
    return steps
