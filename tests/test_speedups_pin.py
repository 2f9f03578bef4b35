"""The compiled Pin and Unrefs (pagefrag._speedups) against the pure-Python reference
(pagefrag._iov.PyPin, PyUnrefs): the same operations on both, everything observable
compared after every step."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagefrag import DestructorError, FragDestructor, implementation
from pagefrag._iov import PyPin, PyUnrefs

pytestmark = pytest.mark.skipif(
    implementation != "compiled", reason="pagefrag._speedups is not in use (pure-Python run)"
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("trim"), st.integers(0, 40)),
        st.tuples(st.just("detach"), st.just(0)),
        st.tuples(st.just("release"), st.just(0)),
    ),
    max_size=6,
)


def _world(sizes: list[int], owned: list[bool], extra: bool) -> tuple[Any, ...]:
    """Views over fresh memory, destructors for the owned pieces, and the extra one."""
    views = [memoryview(bytearray(bytes([i + 1]) * n)) for i, n in enumerate(sizes)]
    owners = [FragDestructor() if o else None for o in owned]
    return views, owners, FragDestructor() if extra else None


def _seen(pin: Any, owners: list[Any], extra: Any) -> tuple[Any, ...]:
    views = None if pin.views is None else [bytes(v) for v in pin.views]
    refs = None if pin.refs is None else len(pin.refs)
    counts = [d.refcount if d is not None else None for d in [*owners, extra]]
    return views, refs, pin.released, counts


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    data=st.data(),
    extra=st.booleans(),
    steps=ops,
)
def test_compiled_pin_matches_the_reference(
    sizes: list[int], data: st.DataObject, extra: bool, steps: list[tuple[str, int]]
) -> None:
    from pagefrag._speedups import Pin as CPin

    owned = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    worlds = [_world(sizes, owned, extra) for _ in range(2)]
    pins = []
    for cls, (views, owners, x) in zip((PyPin, CPin), worlds, strict=True):
        pin = cls(list(views), list(owners))
        pin.take("holder", x)
        pins.append(pin)
    for op, arg in steps:
        results = []
        for pin, (_, owners, x) in zip(pins, worlds, strict=True):
            if op == "trim":
                out: Any = [owners.index(d) if d in owners else "x" for d in pin.trim(arg)]
            elif op == "detach":
                out = len(pin.detach())
            else:
                pin.release("holder")
                out = None
            results.append((out, _seen(pin, owners, x)))
        assert results[0] == results[1], op


def test_compiled_pin_takes_all_or_nothing_and_refuses_non_destructors() -> None:
    from pagefrag._speedups import Pin as CPin

    for cls in (PyPin, CPin):
        live, dead = FragDestructor(), FragDestructor()
        dead.unref()
        pin = cls([memoryview(b"ab"), memoryview(b"cd")], [live, dead])
        with pytest.raises(DestructorError):
            pin.take("holder")
        assert live.refcount == 1 and pin.released  # the one taken was dropped again
        with pytest.raises(TypeError, match="must be a FragDestructor"):
            cls([memoryview(b"ab")], ["nope"]).take("holder")  # type: ignore[list-item]


def test_compiled_unrefs_drop_each_once_and_fire_the_last() -> None:
    from pagefrag._speedups import Unrefs as CUnrefs

    for cls in (PyUnrefs, CUnrefs):
        fired: list[int] = []
        ds = [FragDestructor(fired.append, i) for i in range(5)]
        for d in ds:
            d.ref()
        u = cls()
        u.extend(ds)
        u.extend(ds[:2])  # the creators' references of the first two, too
        u.run("holder")
        u.run("holder")  # nothing left: nothing dropped twice
        assert fired == [0, 1] and [d.refcount for d in ds] == [0, 0, 1, 1, 1]
