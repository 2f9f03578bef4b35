"""The sans-I/O side of the pagefrag:// Dask comm: the wire format (frame_message and
MessageReader, under any split of the byte stream into receives) and the
distributed.comm.pagefrag.* settings. No sockets here: the comm itself is tested in
test_dask_comm.py and test_dask_cluster.py."""

from __future__ import annotations

import re
import struct

import dask.config
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagefrag.dask import FramingError
from pagefrag.dask import settings as dask_settings
from pagefrag.dask._framing import DIRECT_READ_MIN, FRAME_COST, MessageReader, frame_message

SIZES = st.one_of(
    st.just(0),
    st.integers(1, 300),
    st.integers(DIRECT_READ_MIN - 2, DIRECT_READ_MIN + 2),
    st.integers(DIRECT_READ_MIN, 3 * DIRECT_READ_MIN),
)


def _frames(sizes: list[int], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


def _stream(frames: list[object], copy_below: float) -> tuple[bytes, int]:
    pieces, total = frame_message(frames, copy_below)
    return b"".join(bytes(p) for p, _ in pieces), total


def _feed(reader: MessageReader, data: bytes, cuts: list[int]) -> None:
    """Receive ``data`` as a socket would: into get_buffer(), at most the next cut's
    worth (and never more than the buffer holds) per receive."""
    pos, i = 0, 0
    while pos < len(data):
        buf = reader.get_buffer()
        want = cuts[i % len(cuts)] if cuts else len(data)
        i += 1
        n = min(len(buf), want, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        reader.buffer_updated(n)
        pos += n


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.lists(SIZES, max_size=6), min_size=1, max_size=4),
    cuts=st.lists(st.integers(1, 200_000), max_size=8),
    copy_below=st.sampled_from([0, 16 * 1024, float("inf")]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_split_of_the_stream_gives_back_every_frame(
    messages: list[list[int]], cuts: list[int], copy_below: float, seed: int
) -> None:
    sent = [_frames(sizes, seed + k) for k, sizes in enumerate(messages)]
    streams = [_stream(list(frames), copy_below) for frames in sent]
    reader = MessageReader(1 << 20, 1 << 40)
    _feed(reader, b"".join(s for s, _ in streams), cuts)
    assert reader.idle
    got = list(reader.messages)
    assert [[bytes(f) for f in frames] for frames, _ in got] == sent
    assert [n for _, n in got] == [
        total + FRAME_COST * len(frames) for (_, total), frames in zip(streams, sent, strict=True)
    ]
    for frames, _ in got:
        assert all(not f.readonly for f in frames)  # numpy arrays made from them are writable
        bases = [f.obj for f in frames if f.nbytes]
        assert len({id(b) for b in bases}) == len(bases)  # one buffer per frame


def test_large_frames_are_the_callers_memory_and_small_ones_one_copy() -> None:
    big = np.arange(DIRECT_READ_MIN, dtype="f8").reshape(256, -1)  # not byte format, 2-D
    small = bytearray(b"x" * 100)
    pieces, total = frame_message([b"head", big.data, small, big.data], 16 * 1024)
    assert [theirs for _, theirs in pieces] == [False, True, False, True]
    header = pieces[0][0]
    assert struct.unpack_from("<5Q", header) == (4, 4, big.nbytes, 100, big.nbytes)
    assert header.endswith(b"head")
    for view, theirs in pieces:
        if theirs:
            assert view.format == "B" and view.nbytes == big.nbytes
            assert np.shares_memory(np.frombuffer(view, dtype="u1"), big)  # by reference
    assert pieces[2][0] == bytes(small)
    assert total == 8 * 5 + 4 + 2 * big.nbytes + 100


def test_a_frame_without_the_buffer_protocol_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        frame_message([b"ok", object()], 1024)


def test_large_frames_are_received_straight_into_their_own_buffer() -> None:
    allocated: list[memoryview] = []

    def allocate(n: int) -> memoryview:
        allocated.append(memoryview(bytearray(n)))
        return allocated[-1]

    frame = bytes(range(256)) * (4 * DIRECT_READ_MIN // 256)
    data, _ = _stream([frame], 16 * 1024)
    reader = MessageReader(16, 1 << 30, allocate)
    reader.get_buffer()[:40] = data[:40]  # header (16 bytes) and 24 bytes of the frame
    reader.buffer_updated(40)
    buf = reader.get_buffer()
    assert len(allocated) == 1 and buf.obj is allocated[0].obj  # the frame's own memory
    assert len(buf) == len(frame) - 24
    buf[:] = data[40:]
    reader.buffer_updated(len(buf))
    ((frames, _),) = reader.messages
    assert frames[0].obj is allocated[0].obj and bytes(frames[0]) == frame


@pytest.mark.parametrize(
    "header, what",
    [
        (struct.pack("<Q", 2**40), "frames"),
        (struct.pack("<QQ", 1, 2**50), "bytes"),
        (struct.pack("<QQQ", 2, 2**61, 2**61), "bytes"),
    ],
)
def test_a_header_out_of_bounds_is_refused_before_anything_is_allocated(
    header: bytes, what: str
) -> None:
    allocated: list[int] = []
    reader = MessageReader(1 << 20, 1 << 30, lambda n: allocated.append(n) or memoryview(b""))
    with pytest.raises(FramingError, match=what):
        _feed(reader, header, [])
    assert allocated == [] and not reader.messages


def test_bad_reader_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        MessageReader(0, 1 << 20)
    with pytest.raises(ValueError):
        MessageReader(10, 4)


def test_an_empty_message_and_empty_frames() -> None:
    data = _stream([], 16)[0] + _stream([b"", b"", b"z"], 16)[0]
    reader = MessageReader(4, 1 << 10)
    _feed(reader, data, [1])
    assert [[bytes(f) for f in frames] for frames, _ in reader.messages] == [[], [b"", b"", b"z"]]


# -- distributed.comm.pagefrag.* -------------------------------------------------------------


def test_the_defaults_are_registered_with_dask() -> None:
    s = dask_settings()
    assert s.wait_for_release is True
    assert s.high_water == 64 * 2**20 and s.linger == 10.0
    assert dask.config.get("distributed.comm.pagefrag.backend") == "auto"


def test_settings_are_read_from_dask_config_and_parsed() -> None:
    with dask.config.set(
        {
            "distributed.comm.pagefrag.high-water": "1 MiB",
            "distributed.comm.pagefrag.min-zerocopy-size": "32 kiB",
            "distributed.comm.pagefrag.linger": "250ms",
            "distributed.comm.pagefrag.zerocopy": "always",
            "distributed.comm.pagefrag.wait-for-release": False,
        }
    ):
        s = dask_settings()
    assert (s.high_water, s.min_zerocopy_size, s.linger) == (2**20, 32 * 1024, 0.25)
    assert (s.zerocopy, s.wait_for_release) == ("always", False)


@pytest.mark.parametrize(
    "key, value",
    [
        ("backend", "rdma"),
        ("zerocopy", "sometimes"),
        ("high-water", "lots"),
        ("high-water", -1),
        ("read-high-water", True),
        ("max-frames", 0),
        ("max-frames", "many"),
        ("max-message-size", "1 XB"),
        ("wait-for-release", "yes"),
        ("linger", "forever"),
        ("linger", -1),
        ("min-zerocopy-size", "big"),
    ],
)
def test_a_bad_setting_is_a_value_error_naming_its_key(key: str, value: object) -> None:
    with (
        dask.config.set({f"distributed.comm.pagefrag.{key}": value}),
        pytest.raises(ValueError, match=re.escape(f"distributed.comm.pagefrag.{key}")),
    ):
        dask_settings()


def test_a_tcp_timeout_too_short_for_the_keepalive_probes_is_refused() -> None:
    with (
        dask.config.set({"distributed.comm.timeouts.tcp": "5s"}),
        pytest.raises(ValueError, match=re.escape("distributed.comm.timeouts.tcp")),
    ):
        dask_settings()
    with dask.config.set({"distributed.comm.timeouts.tcp": "45s"}):
        assert dask_settings().tcp_timeout == 45


def test_readers_of_one_thread_share_one_scratch_buffer_and_empty_frames_cost_memory() -> None:
    """1000 idle connections do not hold 1000 scratch buffers; a message of many empty
    frames is charged for them (so read-high-water bounds what a peer can make us hold)."""
    a, b = MessageReader(4, 1 << 20), MessageReader(4, 1 << 20)
    assert a.get_buffer().obj is b.get_buffer().obj
    reader = MessageReader(1 << 20, 1 << 30)
    data, total = _stream([b""] * 10_000, 16)
    _feed(reader, data, [])
    ((frames, cost),) = reader.messages
    assert len(frames) == 10_000 and cost == total + 10_000 * FRAME_COST
    assert reader.message_bytes == cost
