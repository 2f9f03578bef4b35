"""Leak detection: levels, reports with holders and call sites, collected skbs."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
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
