"""SkBuff operations and the kernel scenarios, reference by reference."""

from __future__ import annotations

import array
import mmap
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

from pagefrag import (
    MAX_SKB_FRAGS,
    DestructorError,
    DoubleFreeError,
    Frag,
    FragDestructor,
    FragSharedError,
    InvalidRangeError,
    NotContiguousError,
    SkbFreedError,
    SkBuff,
    TooManyFragsError,
)

PAGE = 4096


class Owner:
    """One higher-level operation: pages, a destructor, and a count of firings."""

    def __init__(self, npages: int = 4, seed: int = 1) -> None:
        self.fired = 0
        self.buf = bytearray((i * 7 + seed) % 251 for i in range(npages * PAGE))
        self.d = FragDestructor(self._destroy)

    def _destroy(self, _: object) -> None:
        self.fired += 1

    def skb(self, head: bytes = b"", npages: int | None = None) -> SkBuff:
        skb = SkBuff(head)
        for i in range(npages if npages is not None else len(self.buf) // PAGE):
            skb.add_frag(self.buf, i * PAGE, PAGE, self.d)
        return skb


@pytest.fixture
def owner() -> Iterator[Owner]:
    o = Owner()
    yield o
    assert o.fired <= 1, "a destructor fired twice"


def refs_unchanged(skb: SkBuff, d: FragDestructor) -> tuple[int, int, bytes]:
    return d.refcount, skb.nr_frags, skb.tobytes()


# -- building -----------------------------------------------------------------------


def test_add_frag_takes_one_ref_per_frag_and_free_drops_them(owner: Owner) -> None:
    skb = owner.skb(b"hdr")
    assert owner.d.refcount == 1 + 4
    assert len(skb) == skb.len() == 3 + 4 * PAGE and skb.head_len == 3
    assert skb.data_len == 4 * PAGE and skb.nr_frags == 4
    assert skb.tobytes() == b"hdr" + bytes(owner.buf)
    owner.d.unref()
    assert owner.fired == 0
    skb.free()
    assert owner.fired == 1 and skb.freed


@pytest.mark.parametrize(
    "page",
    [
        bytes(range(256)) * 4,
        bytearray(range(256)) * 4,
        memoryview(bytearray(1024)),
        array.array("I", range(256)),
        np.arange(256, dtype=np.uint32),
        np.zeros((16, 64), dtype=np.uint8),
    ],
    ids=["bytes", "bytearray", "memoryview", "array", "numpy", "numpy-2d"],
)
def test_frag_accepts_any_c_contiguous_buffer(page: object) -> None:
    skb = SkBuff()
    skb.add_frag(page, 8, 100)
    assert skb.tobytes() == bytes(memoryview(page).cast("B"))[8:108]  # type: ignore[arg-type]
    skb.free()


def test_frag_accepts_mmap_and_keeps_it_from_closing() -> None:
    m = mmap.mmap(-1, PAGE)
    m[:5] = b"hello"
    skb = SkBuff()
    skb.add_frag(m, 0, 5)
    with pytest.raises(BufferError):
        m.close()  # the frag still exports the mapping: it cannot be unmapped under us
    assert skb.tobytes() == b"hello"
    skb.free()
    del skb
    m.close()


def test_non_contiguous_and_non_buffer_pages_are_refused() -> None:
    strided = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(NotContiguousError):
        Frag(strided)
    with pytest.raises(NotContiguousError):
        Frag("text")
    with pytest.raises(NotContiguousError):
        SkBuff().add_frag(np.zeros((4, 4))[:, 1])


@pytest.mark.parametrize("offset,size", [(-1, 10), (0, 0), (PAGE, 1), (10, PAGE), (0, -5)])
def test_out_of_range_frags_raise_and_take_no_reference(
    owner: Owner, offset: int, size: int
) -> None:
    skb = SkBuff()
    with pytest.raises(InvalidRangeError):
        skb.add_frag(owner.buf[:PAGE], offset, size, owner.d)
    assert owner.d.refcount == 1 and skb.nr_frags == 0


def test_an_18th_frag_raises_and_changes_nothing(owner: Owner) -> None:
    skb = SkBuff()
    for _ in range(MAX_SKB_FRAGS):
        skb.add_frag(owner.buf, 0, 10, owner.d)
    before = refs_unchanged(skb, owner.d)
    with pytest.raises(TooManyFragsError):
        skb.add_frag(owner.buf, 0, 10, owner.d)
    with pytest.raises(TooManyFragsError):
        skb.fill_page_desc(MAX_SKB_FRAGS, owner.buf, 0, 10)
    assert refs_unchanged(skb, owner.d) == before
    skb.free()


def test_add_frag_with_a_destroyed_destructor_raises_and_adds_nothing() -> None:
    d = FragDestructor(None)
    d.unref()
    skb = SkBuff()
    with pytest.raises(DestructorError):
        skb.add_frag(b"abc", destructor=d)
    assert skb.nr_frags == 0


def test_fill_page_desc_resets_the_destructor_and_set_destructor_attaches_one(
    owner: Owner,
) -> None:
    skb = SkBuff()
    skb.fill_page_desc(0, owner.buf, 0, 100)
    assert skb.frags[0].destructor is None and owner.d.refcount == 1
    skb.set_destructor(0, owner.d)
    assert skb.frags[0].destructor is owner.d and owner.d.refcount == 2
    # Refilling the slot releases the frag it replaces and resets the destructor.
    skb.fill_page_desc(0, owner.buf, 100, 100)
    assert skb.frags[0].destructor is None and owner.d.refcount == 1
    assert skb.tobytes() == bytes(owner.buf[100:200])
    skb.free()
    owner.d.unref()
    assert owner.fired == 1


def test_set_destructor_is_refused_once_the_frag_is_shared(owner: Owner) -> None:
    skb = SkBuff()
    skb.fill_page_desc(0, owner.buf, 0, 100)
    skb.fill_page_desc(1, owner.buf, 100, 100)
    skb.set_destructor(1, owner.d)
    with pytest.raises(FragSharedError):
        skb.set_destructor(1, FragDestructor(None))  # already has one
    clone = skb.clone()
    with pytest.raises(FragSharedError):
        skb.set_destructor(0, owner.d)  # shared with a clone
    clone.free()
    copy = skb.pskb_copy()
    with pytest.raises(FragSharedError):
        skb.set_destructor(0, owner.d)  # the descriptor was copied into another skb
    assert owner.d.refcount == 3
    with pytest.raises(InvalidRangeError):
        skb.set_destructor(5, owner.d)
    copy.free()
    skb.free()
    assert owner.d.refcount == 1


def test_append_page_coalesces_only_with_the_same_page_and_destructor(owner: Owner) -> None:
    other = FragDestructor(None)
    skb = SkBuff()
    assert skb.append_page(owner.buf, 0, 100, owner.d) == 0
    assert skb.append_page(owner.buf, 100, 100, owner.d) == 0  # skb_can_coalesce
    assert skb.nr_frags == 1 and skb.frags[0].size == 200 and owner.d.refcount == 2
    assert skb.append_page(owner.buf, 200, 100, other) == 1  # another destructor
    assert skb.append_page(owner.buf, 400, 100, other) == 2  # not contiguous
    assert skb.append_page(bytearray(owner.buf), 500, 10, other) == 3  # another page
    assert skb.nr_frags == 4 and other.refcount == 4 and owner.d.refcount == 2
    assert skb.tobytes() == bytes(owner.buf[0:300] + owner.buf[400:510])
    skb.free()
    assert owner.d.refcount == 1 and other.refcount == 1


# -- clones and copies --------------------------------------------------------------


def test_clone_shares_frags_without_references_until_the_last_clone_goes(owner: Owner) -> None:
    skb = owner.skb()
    owner.d.unref()
    clone = skb.clone()
    assert skb.cloned and clone.cloned and skb.dataref == 2
    assert owner.d.refcount == 4
    skb.free()
    assert owner.fired == 0 and not clone.cloned
    assert clone.tobytes() == bytes(owner.buf)
    clone.free()
    assert owner.fired == 1


def test_copy_is_linear_and_holds_no_reference(owner: Owner) -> None:
    skb = owner.skb(b"h")
    copy = skb.copy()
    assert copy.nr_frags == 0 and copy.tobytes() == skb.tobytes()
    assert owner.d.refcount == 5
    skb.free()
    owner.d.unref()
    assert owner.fired == 1 and copy.tobytes() == b"h" + bytes(owner.buf)
    copy.free()


def test_pskb_copy_takes_a_reference_per_frag(owner: Owner) -> None:
    skb = owner.skb(b"hdr")
    copy = skb.pskb_copy()
    assert owner.d.refcount == 1 + 8 and not skb.cloned and not copy.cloned
    skb.free()
    owner.d.unref()
    assert owner.fired == 0 and copy.tobytes() == b"hdr" + bytes(owner.buf)
    copy.free()
    assert owner.fired == 1


# -- reshaping ------------------------------------------------------------------------


def test_pull_within_the_head_changes_nothing(owner: Owner) -> None:
    skb = owner.skb(b"0123456789")
    assert skb.pull(4) == b"0123" and skb.head_len == 10 and owner.d.refcount == 5
    skb.free()


def test_pull_spanning_frags_drops_whole_frags_and_keeps_the_partial_one(owner: Owner) -> None:
    skb = owner.skb(b"hd")
    data = skb.tobytes()
    got = skb.pull(2 + PAGE + 10)
    assert got == data[: 2 + PAGE + 10]
    assert skb.head_len == 2 + PAGE + 10 and skb.nr_frags == 3
    assert owner.d.refcount == 1 + 3 and skb.tobytes() == data
    skb.free()


def test_pull_on_a_clone_unclones_first(owner: Owner) -> None:
    skb = owner.skb()
    clone = skb.clone()
    clone.pull(PAGE + 1)  # pskb_expand_head: +4, then frag 0 consumed whole: -1
    assert owner.d.refcount == 1 + 4 + 3 and not skb.cloned and not clone.cloned
    assert clone.tobytes() == skb.tobytes() == bytes(owner.buf)
    skb.free()
    clone.free()
    assert owner.d.refcount == 1


def test_linearize_drops_every_frag(owner: Owner) -> None:
    skb = owner.skb(b"x")
    skb.linearize()
    assert skb.nr_frags == 0 and owner.d.refcount == 1
    assert skb.tobytes() == b"x" + bytes(owner.buf)
    skb.free()


@pytest.mark.parametrize("length,frags,refs", [(3 * PAGE + 5, 4, 5), (2 * PAGE, 2, 3), (3, 0, 1)])
def test_trim_drops_frags_beyond_the_length(
    owner: Owner, length: int, frags: int, refs: int
) -> None:
    skb = owner.skb(b"hdr")
    data = skb.tobytes()
    skb.trim(length)
    assert skb.tobytes() == data[:length] and skb.nr_frags == frags
    assert owner.d.refcount == refs
    skb.free()
    assert owner.d.refcount == 1


def test_trim_head_is_a_partial_ack(owner: Owner) -> None:
    skb = owner.skb(b"hdr")
    data = skb.tobytes()
    skb.trim_head(2)
    assert skb.tobytes() == data[2:] and owner.d.refcount == 5
    skb.trim_head(1 + PAGE + 7)  # the rest of the head, frag 0 whole, 7 bytes of frag 1
    assert skb.tobytes() == data[3 + PAGE + 7 :] and skb.nr_frags == 3
    assert skb.head_len == 0 and owner.d.refcount == 4
    skb.free()


def test_split_inside_the_head_moves_every_frag(owner: Owner) -> None:
    skb = owner.skb(b"header")
    data = skb.tobytes()
    rest = skb.split(3)
    assert skb.tobytes() == data[:3] and rest.tobytes() == data[3:]
    assert skb.nr_frags == 0 and rest.nr_frags == 4 and owner.d.refcount == 5
    skb.free()
    rest.free()
    assert owner.d.refcount == 1


def test_split_through_a_frag_takes_one_reference(owner: Owner) -> None:
    skb = owner.skb(b"h")
    data = skb.tobytes()
    rest = skb.split(1 + PAGE + 100)
    assert skb.tobytes() == data[: 1 + PAGE + 100] and rest.tobytes() == data[1 + PAGE + 100 :]
    assert skb.nr_frags == 2 and rest.nr_frags == 3 and owner.d.refcount == 6
    rest.free()
    assert owner.d.refcount == 3
    skb.free()
    assert owner.d.refcount == 1


def test_split_on_a_frag_boundary_moves_references(owner: Owner) -> None:
    skb = owner.skb()
    rest = skb.split(2 * PAGE)
    assert skb.nr_frags == 2 and rest.nr_frags == 2 and owner.d.refcount == 5
    skb.free()
    rest.free()
    assert owner.d.refcount == 1


def test_try_coalesce_moves_frags_and_frees_the_other(owner: Owner) -> None:
    a = owner.skb(b"A", npages=2)
    b = SkBuff()
    b.add_frag(owner.buf, 2 * PAGE, 2 * PAGE, owner.d)
    assert a.try_coalesce(b)
    assert b.freed and a.nr_frags == 3 and owner.d.refcount == 4
    assert a.tobytes() == b"A" + bytes(owner.buf)
    a.free()
    assert owner.d.refcount == 1


def test_try_coalesce_from_a_cloned_skb_takes_references(owner: Owner) -> None:
    a = SkBuff()
    b = owner.skb(npages=2)
    b_clone = b.clone()
    assert a.try_coalesce(b)
    assert b.freed and owner.d.refcount == 1 + 2 + 2
    b_clone.free()
    assert owner.d.refcount == 3
    a.free()
    assert owner.d.refcount == 1


def test_coalescing_is_refused_across_different_destructors(owner: Owner) -> None:
    other = Owner(seed=9)
    a = owner.skb(npages=1)
    b = other.skb(npages=1)
    before = (owner.d.refcount, other.d.refcount, a.tobytes(), b.tobytes())
    assert not a.try_coalesce(b)
    assert (owner.d.refcount, other.d.refcount, a.tobytes(), b.tobytes()) == before
    assert not b.freed
    a.free()
    b.free()


def test_try_coalesce_is_refused_into_a_clone_or_past_max_frags(owner: Owner) -> None:
    a = owner.skb(npages=4)
    c = a.clone()
    b = owner.skb(npages=1)
    assert not a.try_coalesce(b) and not b.freed
    c.free()
    big = SkBuff()
    for _ in range(14):
        big.add_frag(owner.buf, 0, 1, owner.d)
    assert not big.try_coalesce(a) and not a.freed
    for s in (a, b, big):
        s.free()
    assert owner.d.refcount == 1


def test_orphan_frags_copies_destructor_frags_and_releases_them(owner: Owner) -> None:
    skb = owner.skb(b"h", npages=2)
    skb.add_frag(b"plain")
    data = skb.tobytes()
    owner.d.unref()
    skb.orphan_frags()
    assert owner.fired == 1  # the owner may reuse its pages now
    owner.buf[:] = b"\xff" * len(owner.buf)
    assert skb.tobytes() == data and all(f.destructor is None for f in skb.frags)
    skb.free()


def test_orphan_frags_on_a_clone_leaves_the_other_clone_holding(owner: Owner) -> None:
    skb = owner.skb(npages=2)
    owner.d.unref()
    clone = skb.clone()
    clone.orphan_frags()
    assert owner.fired == 0 and owner.d.refcount == 2
    skb.free()
    assert owner.fired == 1
    clone.free()


def test_segment_takes_one_reference_per_piece_and_keeps_the_original(owner: Owner) -> None:
    skb = owner.skb(b"HEAD")
    data = skb.tobytes()
    segs = skb.segment(1000, header_len=4)
    payload = data[4:]
    assert [s.tobytes() for s in segs] == [
        b"HEAD" + payload[i : i + 1000] for i in range(0, len(payload), 1000)
    ]
    pieces = sum(s.nr_frags for s in segs)
    assert owner.d.refcount == 5 + pieces
    assert skb.tobytes() == data
    for s in segs:
        s.free()
    assert owner.d.refcount == 5
    skb.free()


def test_segment_rejects_a_bad_mss_or_header(owner: Owner) -> None:
    skb = owner.skb(b"hd")
    with pytest.raises(InvalidRangeError):
        skb.segment(0)
    with pytest.raises(InvalidRangeError):
        skb.segment(100, header_len=3)
    assert owner.d.refcount == 5
    skb.free()


@pytest.mark.parametrize("op", ["pull", "trim", "trim_head", "split"])
@pytest.mark.parametrize("n", [-1, 4 * PAGE + 4])
def test_out_of_range_lengths_raise_and_leave_counts_unchanged(
    owner: Owner, op: str, n: int
) -> None:
    skb = owner.skb(b"hdr")
    clone = skb.clone()
    before = (*refs_unchanged(skb, owner.d), skb.dataref)
    with pytest.raises(InvalidRangeError):
        getattr(skb, op)(n)
    assert (*refs_unchanged(skb, owner.d), skb.dataref) == before
    skb.free()
    clone.free()


# -- freeing -------------------------------------------------------------------------


def test_a_freed_skb_refuses_everything_and_double_free_raises(owner: Owner) -> None:
    skb = owner.skb()
    skb.free()
    assert owner.d.refcount == 1
    with pytest.raises(DoubleFreeError):
        skb.free()
    for call in (
        skb.clone,
        skb.tobytes,
        skb.pskb_copy,
        skb.orphan_frags,
        lambda: len(skb),
        lambda: skb.pull(1),
        lambda: skb.add_frag(b"x", destructor=owner.d),
    ):
        with pytest.raises(SkbFreedError):
            call()
    assert owner.d.refcount == 1
    with pytest.raises(SkbFreedError):
        SkBuff().try_coalesce(skb)


def test_context_manager_frees_on_exit(owner: Owner) -> None:
    with owner.skb() as skb:
        assert owner.d.refcount == 5
    assert skb.freed and owner.d.refcount == 1


def test_unfreed_skb_warns_on_collection_and_releases(owner: Owner) -> None:
    skb = owner.skb()
    owner.d.unref()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del skb
    assert owner.fired == 1
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


def test_iovecs_are_zero_copy_views(owner: Owner) -> None:
    skb = owner.skb(b"hd", npages=2)
    views = skb.iovecs()
    assert [len(v) for v in views] == [2, PAGE, PAGE]
    owner.buf[0] = 0xAB
    assert views[1][0] == 0xAB
    skb.free()


# -- kernel scenarios -------------------------------------------------------------------


def test_tcp_transmit_clone_for_the_wire_original_on_retransmit_queue(owner: Owner) -> None:
    rtx = owner.skb()
    owner.d.unref()
    wire = rtx.clone()  # tcp_transmit_skb
    wire.free()  # the driver completed the transmission
    assert owner.fired == 0, "the retransmit queue still holds the pages"
    rtx.free()  # ACKed: tcp_clean_rtx_queue
    assert owner.fired == 1


def test_partial_ack_while_a_clone_is_in_flight(owner: Owner) -> None:
    rtx = owner.skb()
    owner.d.unref()
    wire = rtx.clone()
    rtx.trim_head(PAGE + 1)  # unclone (+4), frag 0 consumed (-1)
    assert owner.d.refcount == 7
    wire.free()
    assert owner.d.refcount == 3
    rtx.free()
    assert owner.fired == 1


def test_retransmit_while_the_first_transmission_is_in_flight(owner: Owner) -> None:
    rtx = owner.skb()
    owner.d.unref()
    first = rtx.clone()
    second = rtx.clone()  # RTO: tcp_retransmit_skb clones again
    rtx.free()  # ACK of everything arrives
    first.free()
    assert owner.fired == 0, "the retransmission still reads the pages"
    second.free()
    assert owner.fired == 1


def test_gso_segmentation_of_an_in_flight_clone(owner: Owner) -> None:
    rtx = owner.skb()
    owner.d.unref()
    wire = rtx.clone()
    segs = wire.segment(1448)
    wire.free()
    rtx.free()
    assert owner.fired == 0
    assert b"".join(s.tobytes() for s in segs) == bytes(owner.buf)
    for s in segs[:-1]:
        s.free()
    assert owner.fired == 0
    segs[-1].free()
    assert owner.fired == 1


def test_receive_pull_up_of_a_header_spanning_frags() -> None:
    d = FragDestructor(None)
    page_a, page_b = bytearray(b"A" * 30), bytearray(b"B" * 100)
    skb = SkBuff()
    skb.add_frag(page_a, 10, 20, d)
    skb.add_frag(page_b, 0, 100, d)
    d.unref()
    assert skb.pull(40) == b"A" * 20 + b"B" * 20  # header: 20 from a, 20 from b
    assert skb.nr_frags == 1 and d.refcount == 1
    skb.free()
    assert d.done


def test_one_destructor_shared_by_the_frags_of_several_skbs() -> None:
    fired: list[object] = []
    d = FragDestructor(fired.append, "rpc")
    pages = [bytearray(PAGE) for _ in range(6)]
    skbs = []
    for i in range(3):
        skb = SkBuff(b"rpc-header")
        skb.add_frag(pages[2 * i], destructor=d)
        skb.add_frag(pages[2 * i + 1], destructor=d)
        skbs.append(skb)
    d.unref()
    assert d.refcount == 6
    clones = [s.clone() for s in skbs]
    for s in skbs:
        s.free()
    clones[0].free()
    clones[1].free()
    assert fired == []
    clones[2].free()
    assert fired == ["rpc"]
