"""Leak detection: levels, reports with holders and call sites, collected skbs."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator

import pytest

from pagefrag import FragDestructor, SkBuff, leaks


@pytest.fixture
def level() -> Iterator[None]:
    before = leaks.get_level()
    yield
    leaks.set_level(before)


def test_disabled_by_default_records_nothing(level: None) -> None:
    leaks.set_level("disabled")
    d = FragDestructor(None)
    assert all(r.destructor != repr(d) for r in leaks.report())
    d.unref()


def test_paranoid_report_names_every_holder_and_where_it_took_its_reference(
    level: None,
) -> None:
    leaks.set_level(leaks.Level.PARANOID)
    d = FragDestructor(None, name="leaky-write")
    skb = SkBuff()
    skb.add_frag(bytearray(100), destructor=d)
    clone_copy = skb.pskb_copy()
    (rec,) = [r for r in leaks.report() if "leaky-write" in r.destructor]
    assert rec.refcount == 3 and __file__ in rec.created_at
    holders = [h.holder for h in rec.holders]
    assert holders[0] == "creator" and len(holders) == 3
    assert any(f"SkBuff#{skb._id}" in h for h in holders)
    assert all(__file__ in h.site and h.stack for h in rec.holders)
    assert "leaky-write" in leaks.format_report()

    skb.free()
    (rec,) = [r for r in leaks.report() if "leaky-write" in r.destructor]
    assert [h.holder for h in rec.holders] == ["creator", f"<frags of SkBuff#{clone_copy._id}>"]
    clone_copy.free()
    d.unref()
    assert not [r for r in leaks.report() if "leaky-write" in r.destructor]


def test_simple_level_records_creation_sites_without_holders(level: None) -> None:
    leaks.set_level("simple")
    d = FragDestructor(None, name="simple-one")
    (rec,) = [r for r in leaks.report() if "simple-one" in r.destructor]
    assert __file__ in rec.created_at and rec.holders == ()
    d.unref()


def test_collected_skb_warns_with_its_creation_site_and_releases(level: None) -> None:
    leaks.set_level("simple")
    d = FragDestructor(None)
    skb = SkBuff()
    skb.add_frag(b"data", destructor=d)
    d.unref()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del skb
    (w,) = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert "never freed" in str(w.message) and __file__ in str(w.message)
    assert d.done


def test_environment_variable_sets_the_level() -> None:
    code = "from pagefrag import leaks; print(leaks.get_level().value)"
    env = {**os.environ, "PAGEFRAG_LEAK_DETECTION": "paranoid"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "paranoid"


# -- issue 9 item 9: a destructor collected while it still holds references ---------------
@pytest.fixture
def fresh_collected() -> Iterator[None]:
    leaks.clear_collected()
    yield
    leaks.clear_collected()


def make_and_drop(name: str, refs: int = 0) -> None:
    d = FragDestructor(lambda _: None, name=name)  # the reports must name this line
    for k in range(refs):
        d.ref(holder=f"write {k}")
    # d goes out of scope here holding 1 + refs references: destroy never runs


CREATION_LINE = make_and_drop.__code__.co_firstlineno + 1


def leak_warnings(caught: list[warnings.WarningMessage], name: str) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and name in str(w.message)
    ]


def test_a_destructor_collected_unfired_is_reported_with_its_creation_site(
    level: None, fresh_collected: None
) -> None:
    leaks.set_level("simple")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_and_drop("dropped-simple")
    (msg,) = leak_warnings(caught, "dropped-simple")
    assert msg.startswith("LEAK:") and f"{__file__}:{CREATION_LINE}" in msg
    assert "1 reference" in msg
    (rec,) = [r for r in leaks.collected() if "dropped-simple" in r.destructor]
    assert rec.kind == leaks.KIND_COLLECTED and rec.refcount == 1 and rec.holders == ()
    assert f"{__file__}:{CREATION_LINE}" in rec.created_at
    assert "dropped-simple" in leaks.format_report()
    assert not [r for r in leaks.report() if "dropped-simple" in r.destructor]


def test_paranoid_names_the_holders_still_recorded_when_collected(
    level: None, fresh_collected: None
) -> None:
    leaks.set_level("paranoid")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_and_drop("dropped-paranoid", refs=2)
    (msg,) = leak_warnings(caught, "dropped-paranoid")
    assert "3 reference" in msg and "'write 0'" in msg and "'write 1'" in msg
    (rec,) = [r for r in leaks.collected() if "dropped-paranoid" in r.destructor]
    assert rec.refcount == 3
    assert [h.holder for h in rec.holders] == ["creator", "'write 0'", "'write 1'"]
    assert all(__file__ in h.site for h in rec.holders)


def test_a_destructor_in_a_cycle_is_reported_when_the_collector_frees_it(
    level: None, fresh_collected: None
) -> None:
    leaks.set_level("simple")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = FragDestructor(None, name="in-a-cycle")
        d.data = [d]  # a cycle: only the cycle collector frees it
        del d
        gc.collect()
    assert len(leak_warnings(caught, "in-a-cycle")) == 1
    assert [r for r in leaks.collected() if "in-a-cycle" in r.destructor]


def test_a_fired_destructor_collected_is_not_a_leak(level: None, fresh_collected: None) -> None:
    leaks.set_level("paranoid")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = FragDestructor(None, name="fired-one")
        d.ref(holder="w")
        d.unref(holder="w")
        d.unref()
        del d
        gc.collect()
    assert not leak_warnings(caught, "fired-one")
    assert not [r for r in leaks.collected() if "fired-one" in r.destructor]


def test_disabled_level_watches_nothing(level: None, fresh_collected: None) -> None:
    leaks.set_level("disabled")
    d = FragDestructor(None, name="unwatched")
    assert weakref.getweakrefcount(d) == 0  # no finalizer, no record: no overhead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del d
    assert not leak_warnings(caught, "unwatched") and not leaks.collected()


# -- issue 10 item 5: the tracker API (leaks.track -> Track) -------------------------------
class Handle:
    """Any object that counts references of its own can be tracked, not only destructors."""

    def __repr__(self) -> str:
        return "<Handle under test>"


def test_track_is_none_when_disabled(level: None) -> None:
    leaks.set_level("disabled")
    h = Handle()
    assert leaks.track(h, "<Handle>") is None
    assert weakref.getweakrefcount(h) == 0


def test_a_tracker_records_holds_forgets_and_closes(level: None, fresh_collected: None) -> None:
    leaks.set_level("paranoid")
    h = Handle()
    t = leaks.track(h, "<Handle label>")
    assert t is not None and t.refcount == 1
    entry = t.record("holder A")  # built before the object's lock; filed by hold()
    assert entry is not None and t.refcount == 1  # recording alone changes nothing
    t.hold(entry)
    t.hold(t.record("holder B"))
    (rec,) = [r for r in leaks.report() if r.destructor == "<Handle under test>"]
    assert rec.refcount == 3 and __file__ in rec.created_at
    assert [x.holder for x in rec.holders] == ["creator", "'holder A'", "'holder B'"]
    assert all(__file__ in x.site and x.stack for x in rec.holders)
    t.forget("holder A")
    t.forget(None)  # an unnamed drop forgets the oldest record
    assert [x.holder for x in t.holders()] == ["'holder B'"] and t.refcount == 1
    pooled = leaks.snapshot(h, leaks.KIND_POOL_BUFFER, "acquired here")
    assert pooled is not None and pooled.kind == leaks.KIND_POOL_BUFFER
    assert pooled.created_at == "acquired here" and pooled.refcount == 1
    t.forget("holder B")
    t.close()
    assert leaks.snapshot(h) is None
    assert not [r for r in leaks.report() if r.destructor == "<Handle under test>"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del h
        gc.collect()
    assert not leak_warnings(caught, "<Handle label>") and not leaks.collected()


def test_a_tracked_object_collected_before_close_is_reported_under_its_label(
    level: None, fresh_collected: None
) -> None:
    leaks.set_level("simple")
    h = Handle()
    t = leaks.track(h, "<Handle never closed>")
    assert t is not None and t.record("w") is None  # simple: no holders recorded
    t.hold(None)
    assert leaks.snapshot(Handle()) is None  # not tracked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del h
        gc.collect()
    (msg,) = leak_warnings(caught, "<Handle never closed>")
    assert "2 reference" in msg
    (rec,) = leaks.collected()
    assert rec.kind == leaks.KIND_COLLECTED and rec.refcount == 2 and rec.holders == ()


def test_the_track_follows_refs_from_many_threads(level: None) -> None:
    # hold/forget run under the destructor's lock, in the order of its own count: after
    # any interleaving the mirror and the holders match the count.
    leaks.set_level("paranoid")
    d = FragDestructor(None, name="threaded")
    rounds = 50

    def worker(k: int) -> None:
        me = f"thread {k}"
        for _ in range(rounds):
            d.ref(holder=me)
            d.ref(holder=me)
            d.unref(holder=me)
            d.unref(holder=me)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    (rec,) = [r for r in leaks.report() if "threaded" in r.destructor]
    assert rec.refcount == d.refcount == 1
    assert [h.holder for h in rec.holders] == ["creator"]
    d.unref()
    assert d.done and not [r for r in leaks.report() if "threaded" in r.destructor]
