"""Random sequences of every SkBuff operation, over several skbs that share
destructors, checked after every step against a reference model.

The model knows nothing of references: it keeps, for each live skb, its bytes and for
each byte the destructor whose page it still comes from (``-1`` when the byte is a copy
or its page has no destructor). A destructor must be alive exactly while its owner
still holds its initial reference or some live skb still has a byte from its pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagefrag import MAX_SKB_FRAGS, FragDestructor, SkBuff

PAGE = 64
MAX_SKBS = 10


@dataclass
class OwnerModel:
    page: bytearray
    d: FragDestructor
    fired: list[int] = field(default_factory=list)
    holds: bool = True


@dataclass
class SkbModel:
    skb: SkBuff
    data: bytes
    prov: tuple[int, ...]


frag_spec = st.tuples(
    st.integers(0, 7), st.integers(0, PAGE - 1), st.integers(1, PAGE), st.booleans()
)


class SkBuffMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.owners: list[OwnerModel] = []
        self.skbs: list[SkbModel] = []
        for _ in range(2):
            self._new_owner()

    # -- helpers ---------------------------------------------------------------------
    def _new_owner(self) -> None:
        k = len(self.owners)
        page = bytearray((k * 31 + i * 7) % 256 for i in range(PAGE))
        fired: list[int] = []
        d = FragDestructor(lambda _: fired.append(1), name=f"owner{k}")
        self.owners.append(OwnerModel(page, d, fired))

    def _alive(self, k: int) -> bool:
        o = self.owners[k]
        return o.holds or any(k in m.prov for m in self.skbs)

    def _pick(self, i: int) -> SkbModel:
        return self.skbs[i % len(self.skbs)]

    def _frag(
        self, spec: tuple[int, int, int, bool]
    ) -> tuple[bytearray, int, int, FragDestructor | None, int]:
        k, off, size, with_d = spec
        k %= len(self.owners)
        size = min(size, PAGE - off)
        o = self.owners[k]
        if with_d and self._alive(k):
            return o.page, off, size, o.d, k
        return o.page, off, size, None, -1

    def _add(self, m: SkbModel, spec: tuple[int, int, int, bool], append: bool) -> None:
        page, off, size, d, k = self._frag(spec)
        if append:
            m.skb.append_page(page, off, size, d)
        else:
            m.skb.add_frag(page, off, size, d)
        m.data += bytes(page[off : off + size])
        m.prov += (k,) * size

    # -- rules -----------------------------------------------------------------------
    @precondition(lambda self: len(self.owners) < 6)
    @rule()
    def new_owner(self) -> None:
        self._new_owner()

    @rule(k=st.integers(0, 7))
    def owner_releases(self, k: int) -> None:
        o = self.owners[k % len(self.owners)]
        if o.holds:
            o.holds = False
            o.d.unref()

    @precondition(lambda self: len(self.skbs) < MAX_SKBS)
    @rule(head=st.binary(max_size=8), specs=st.lists(frag_spec, max_size=4))
    def new_skb(self, head: bytes, specs: list[tuple[int, int, int, bool]]) -> None:
        m = SkbModel(SkBuff(head), head, (-1,) * len(head))
        self.skbs.append(m)
        for spec in specs:
            self._add(m, spec, append=False)

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99), spec=frag_spec, append=st.booleans())
    def add_frag(self, i: int, spec: tuple[int, int, int, bool], append: bool) -> None:
        m = self._pick(i)
        if m.skb.nr_frags < MAX_SKB_FRAGS:
            self._add(m, spec, append)

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99), spec=frag_spec)
    def fill_then_set_destructor(self, i: int, spec: tuple[int, int, int, bool]) -> None:
        m = self._pick(i)
        if m.skb.nr_frags >= MAX_SKB_FRAGS:
            return
        page, off, size, d, k = self._frag(spec)
        idx = m.skb.nr_frags
        m.skb.fill_page_desc(idx, page, off, size)
        if d is not None:
            m.skb.set_destructor(idx, d)
        m.data += bytes(page[off : off + size])
        m.prov += (k,) * size

    @precondition(lambda self: self.skbs and len(self.skbs) < MAX_SKBS)
    @rule(i=st.integers(0, 99), how=st.sampled_from(["clone", "copy", "pskb_copy"]))
    def duplicate(self, i: int, how: str) -> None:
        m = self._pick(i)
        new = getattr(m.skb, how)()
        prov = (-1,) * len(m.prov) if how == "copy" else m.prov
        self.skbs.append(SkbModel(new, m.data, prov))

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99), frac=st.floats(0, 1))
    def pull(self, i: int, frac: float) -> None:
        m = self._pick(i)
        n = int(len(m.data) * frac)
        assert m.skb.pull(n) == m.data[:n]
        m.prov = (-1,) * n + m.prov[n:]

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99))
    def linearize(self, i: int) -> None:
        m = self._pick(i)
        m.skb.linearize()
        m.prov = (-1,) * len(m.prov)

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99), frac=st.floats(0, 1))
    def trim(self, i: int, frac: float) -> None:
        m = self._pick(i)
        n = int(len(m.data) * frac)
        m.skb.trim(n)
        m.data, m.prov = m.data[:n], m.prov[:n]

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99), frac=st.floats(0, 1))
    def trim_head(self, i: int, frac: float) -> None:
        m = self._pick(i)
        n = int(len(m.data) * frac)
        m.skb.trim_head(n)
        m.data, m.prov = m.data[n:], m.prov[n:]

    @precondition(lambda self: self.skbs and len(self.skbs) < MAX_SKBS)
    @rule(i=st.integers(0, 99), frac=st.floats(0, 1))
    def split(self, i: int, frac: float) -> None:
        m = self._pick(i)
        n = int(len(m.data) * frac)
        rest = m.skb.split(n)
        self.skbs.append(SkbModel(rest, m.data[n:], m.prov[n:]))
        m.data, m.prov = m.data[:n], m.prov[:n]

    @precondition(lambda self: len(self.skbs) >= 2)
    @rule(i=st.integers(0, 99), j=st.integers(0, 99))
    def try_coalesce(self, i: int, j: int) -> None:
        a, b = self._pick(i), self._pick(j)
        if a is b:
            return
        before = b.skb.tobytes()
        if a.skb.try_coalesce(b.skb):
            assert b.skb.freed
            a.data += b.data
            a.prov += b.prov
            self.skbs.remove(b)
        else:
            assert not b.skb.freed and b.skb.tobytes() == before

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99))
    def orphan_frags(self, i: int) -> None:
        m = self._pick(i)
        m.skb.orphan_frags()
        m.prov = (-1,) * len(m.prov)

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99), mss=st.integers(1, 80), keep=st.booleans())
    def segment(self, i: int, mss: int, keep: bool) -> None:
        m = self._pick(i)
        segs = m.skb.segment(mss)
        chunks = [(m.data[s : s + mss], m.prov[s : s + mss]) for s in range(0, len(m.data), mss)]
        assert [s.tobytes() for s in segs] == [c[0] for c in chunks]
        for seg, (data, prov) in zip(segs, chunks, strict=True):
            if keep and len(self.skbs) < MAX_SKBS:
                self.skbs.append(SkbModel(seg, data, prov))
            else:
                seg.free()

    @precondition(lambda self: self.skbs)
    @rule(i=st.integers(0, 99))
    def free(self, i: int) -> None:
        m = self._pick(i)
        m.skb.free()
        self.skbs.remove(m)

    # -- the checks --------------------------------------------------------------------
    @invariant()
    def bytes_match_the_model(self) -> None:
        for m in self.skbs:
            assert m.skb.tobytes() == m.data
            assert len(m.skb) == len(m.data)

    @invariant()
    def each_destructor_lives_exactly_while_something_holds_its_pages(self) -> None:
        for k, o in enumerate(self.owners):
            alive = self._alive(k)
            assert o.d.done is (not alive), f"owner{k}: alive={alive} but {o.d!r}"
            assert len(o.fired) == (0 if alive else 1)

    def teardown(self) -> None:
        for m in self.skbs:
            m.skb.free()
        for o in self.owners:
            if o.holds:
                o.d.unref()
        for o in self.owners:
            assert o.fired == [1] and o.d.refcount == 0


SkBuffMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSkBuffMachine = SkBuffMachine.TestCase
