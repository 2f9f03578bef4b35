"""Types and values are checked at the core's API boundary (issue 9, item 18, core part):
a bad argument raises TypeError or ValueError (or a PageFragError deriving from one) at
once, before anything changes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from pagefrag import (
    BufferPool,
    DestructorError,
    Frag,
    FragDestructor,
    InvalidRangeError,
    SkBuff,
    leaks,
)
from pagefrag.errors import NotABufferError, NotContiguousError

PAGE = bytearray(b"0123456789" * 10)


@pytest.fixture
def unraisable() -> Iterator[list[Any]]:
    seen: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    yield seen
    sys.unraisablehook = old


# -- FragDestructor ----------------------------------------------------------------------
@pytest.mark.parametrize("destroy", [42, "destroy", b"x", 1.5])
def test_a_destructor_whose_destroy_is_not_callable_is_refused_at_once(destroy: object) -> None:
    with pytest.raises(TypeError, match="destroy must be callable"):
        FragDestructor(destroy)  # type: ignore[arg-type]


def test_a_destructor_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="name"):
        FragDestructor(None, name=5)  # type: ignore[arg-type]
    assert FragDestructor(None, name="ok").name == "ok"


def test_a_done_callback_that_is_not_callable_is_refused_at_once(
    unraisable: list[Any],
) -> None:
    fired: list[FragDestructor] = []
    d = FragDestructor(None)
    d.add_done_callback(fired.append)
    with pytest.raises(TypeError, match="callable"):
        d.add_done_callback(5)  # type: ignore[arg-type]
    assert d.refcount == 1 and not d.done
    d.unref()
    assert fired == [d] and not unraisable  # the bad callback was never registered
    with pytest.raises(TypeError):  # also once it has fired (it would run at once)
        d.add_done_callback(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("timeout", "error"),
    [("1", TypeError), (True, TypeError), (-1, ValueError), (float("nan"), ValueError)],
)
def test_wait_checks_its_timeout(timeout: object, error: type[Exception]) -> None:
    d = FragDestructor(None)
    with pytest.raises(error):
        d.wait(timeout)  # type: ignore[arg-type]
    d.unref()
    with pytest.raises(error):  # even when it would return at once
        d.wait(timeout)  # type: ignore[arg-type]
    assert d.wait(0) and d.wait(float("inf"))


# -- Frag --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((PAGE, 1.5, 2), TypeError),
        ((PAGE, 0, 2.0), TypeError),
        ((PAGE, True, 2), TypeError),
        ((PAGE, 0, True), TypeError),
        ((PAGE, "1", 2), TypeError),
        ((PAGE, None, 2), TypeError),
        ((PAGE, -1, 2), ValueError),
        ((PAGE, 0, 0), ValueError),
        ((PAGE, 0, -5), ValueError),
        ((PAGE, 99, 2), ValueError),
        ((PAGE, 101), ValueError),
        ((PAGE, 0, 2, "destructor"), TypeError),
        ((5,), TypeError),
        (("text",), TypeError),
    ],
)
def test_frag_checks_types_and_ranges(args: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        Frag(*args)


def test_frag_errors_are_pagefrag_errors_too() -> None:
    with pytest.raises(InvalidRangeError):
        Frag(PAGE, -1, 2)
    with pytest.raises(NotABufferError) as info:
        Frag(5)
    assert isinstance(info.value, NotContiguousError) and isinstance(info.value, TypeError)


def test_frag_accepts_integer_types_and_stores_plain_ints() -> None:
    f = Frag(PAGE, np.int64(2), np.uint16(3))
    assert type(f.offset) is int and type(f.size) is int
    assert bytes(f.view()) == b"234"


# -- SkBuff -------------------------------------------------------------------------------
class Scene:
    """An skb with a destructor-carrying frag, cloned (so any unclone would show), and
    a snapshot of everything a bad call could change."""

    def __init__(self) -> None:
        self.d = FragDestructor(None)
        self.skb = SkBuff(b"head")
        self.skb.add_frag(PAGE, 0, 10, self.d)
        self.skb.add_frag(bytearray(b"plain page"), 0, 10)
        self.clone = self.skb.clone()
        self.other = SkBuff(b"x")

    def state(self) -> tuple[object, ...]:
        return (
            self.skb.tobytes(),
            self.skb.nr_frags,
            self.skb.dataref,
            self.skb._sh,
            [(f.offset, f.size, f.destructor, f._shared) for f in self.skb.frags],
            self.d.refcount,
            self.clone.tobytes(),
            self.other.tobytes(),
            self.other.freed,
        )


def fired() -> FragDestructor:
    d = FragDestructor(None)
    d.unref()
    return d


BAD_SKB_CALLS: list[tuple[str, Callable[[Scene], object], type[Exception]]] = [
    ("add_frag offset float", lambda s: s.skb.add_frag(PAGE, 1.5, 2), TypeError),
    ("add_frag size bool", lambda s: s.skb.add_frag(PAGE, 0, True), TypeError),
    ("add_frag(frag, offset)", lambda s: s.skb.add_frag(Frag(PAGE), 1.5), ValueError),
    ("add_frag(frag, False)", lambda s: s.skb.add_frag(Frag(PAGE), False), ValueError),
    ("add_frag not a buffer", lambda s: s.skb.add_frag(42), TypeError),
    ("fill_page_desc index float", lambda s: s.skb.fill_page_desc(1.5, PAGE, 0, 2), TypeError),
    ("fill_page_desc index bool", lambda s: s.skb.fill_page_desc(True, PAGE, 0, 2), TypeError),
    ("fill_page_desc size float", lambda s: s.skb.fill_page_desc(0, PAGE, 0, 2.0), TypeError),
    ("set_destructor(0, None)", lambda s: s.skb.set_destructor(0, None), TypeError),
    ("set_destructor(1, 'x')", lambda s: s.skb.set_destructor(1, "x"), TypeError),
    ("set_destructor index float", lambda s: s.skb.set_destructor(1.0, s.d), TypeError),
    ("append_page offset float", lambda s: s.skb.append_page(PAGE, 10.0, 2, s.d), TypeError),
    ("append_page offset bool", lambda s: s.skb.append_page(PAGE, True, 2), TypeError),
    ("pull float", lambda s: s.skb.pull(1.5), TypeError),
    ("pull float past the head", lambda s: s.skb.pull(6.5), TypeError),
    ("pull bool", lambda s: s.skb.pull(True), TypeError),
    ("pull str", lambda s: s.skb.pull("3"), TypeError),
    ("pull negative", lambda s: s.skb.pull(-1), ValueError),
    ("pull too much", lambda s: s.skb.pull(10_000), ValueError),
    ("trim float", lambda s: s.skb.trim(7.5), TypeError),
    ("trim_head float", lambda s: s.skb.trim_head(7.5), TypeError),
    ("trim_head None", lambda s: s.skb.trim_head(None), TypeError),
    ("split float", lambda s: s.skb.split(7.5), TypeError),
    ("split past the end", lambda s: s.skb.split(25), ValueError),
    ("segment mss float", lambda s: s.skb.segment(3.0), TypeError),
    ("segment mss zero", lambda s: s.skb.segment(0), ValueError),
    ("segment header_len float", lambda s: s.skb.segment(3, 1.5), TypeError),
    ("segment header_len past the head", lambda s: s.skb.segment(3, 5), ValueError),
    ("add_frag a fired destructor", lambda s: s.skb.add_frag(PAGE, 0, 2, fired()), DestructorError),
    (
        "add_frag(frag) a fired one",
        lambda s: s.skb.add_frag(Frag(PAGE, 0, 2, fired())),
        DestructorError,
    ),
    ("try_coalesce(b'x')", lambda s: s.other.try_coalesce(b"x"), TypeError),
    ("try_coalesce(None)", lambda s: s.other.try_coalesce(None), TypeError),
]


@pytest.mark.parametrize(
    ("call", "error"), [(c, e) for _, c, e in BAD_SKB_CALLS], ids=[n for n, _, _ in BAD_SKB_CALLS]
)
def test_a_bad_skb_call_raises_before_changing_anything(
    call: Callable[[Scene], object], error: type[Exception]
) -> None:
    scene = Scene()
    before = scene.state()
    with pytest.raises(error):
        call(scene)
    assert scene.state() == before
    for skb in (scene.skb, scene.clone, scene.other):
        skb.free()
    scene.d.unref()
    assert scene.d.done


@pytest.mark.parametrize("bad", [None, 0, "d", object()])
def test_set_destructor_on_a_fresh_frag_refuses_a_non_destructor(bad: object) -> None:
    skb = SkBuff()
    skb.add_frag(PAGE, 0, 10)  # no destructor, not shared: set_destructor is allowed
    with pytest.raises(TypeError, match="FragDestructor"):
        skb.set_destructor(0, bad)  # type: ignore[arg-type]
    assert skb.frags[0].destructor is None
    d = FragDestructor(None)
    skb.set_destructor(0, d)  # still allowed: the bad call changed nothing
    assert d.refcount == 2
    skb.free()
    d.unref()
    assert d.done


def test_an_skb_head_must_be_a_buffer() -> None:
    with pytest.raises(TypeError):
        SkBuff(5)


# -- BufferPool ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((1.5, 2), TypeError),
        ((1024, 2.0), TypeError),
        ((True, 2), TypeError),
        (("1024", 2), TypeError),
        ((1024, None), TypeError),
        ((0, 2), ValueError),
        ((1024, -1), ValueError),
    ],
)
def test_pool_checks_its_sizes(args: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        BufferPool(*args)


def test_pool_accepts_integer_types() -> None:
    pool = BufferPool(np.int64(512), np.int32(2))
    assert type(pool.buffer_size) is int and pool.count == 2
    with pool.acquire() as buf:
        assert len(buf) == 512


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        ("x", TypeError),
        (True, TypeError),
        ([], TypeError),
        (-1, ValueError),
        (float("nan"), ValueError),
    ],
)
def test_acquire_checks_its_timeout_even_with_buffers_free(
    timeout: object, error: type[Exception]
) -> None:
    pool = BufferPool(1024, 2)
    with pytest.raises(error):
        pool.acquire(timeout=timeout)  # type: ignore[arg-type]
    assert pool.free == 2
    pool.acquire(timeout=0).release()
    pool.acquire(timeout=float("inf")).release()
    assert pool.free == 2


@pytest.mark.parametrize(
    ("args", "error"),
    [((1.5,), TypeError), ((None, 1.5), TypeError), ((0,), ValueError), ((2000,), ValueError)],
)
def test_pool_buffer_frag_checks_its_arguments(
    args: tuple[Any, ...], error: type[Exception]
) -> None:
    pool = BufferPool(1024, 1)
    buf = pool.acquire()
    with pytest.raises(error):
        buf.frag(*args)
    assert buf.destructor.refcount == 1
    buf.release()
    assert pool.free == 1


# -- leaks --------------------------------------------------------------------------------
def test_set_level_refuses_a_non_level() -> None:
    before = leaks.get_level()
    with pytest.raises(TypeError):
        leaks.set_level(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        leaks.set_level("loud")
    assert leaks.get_level() is before
