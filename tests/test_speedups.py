"""The compiled core (pagefrag._speedups) against the pure-Python reference.

* which implementation is selected (``pagefrag.implementation``, PAGEFRAG_PURE_PYTHON);
* a hypothesis state machine driving a compiled and a pure-Python FragDestructor with the
  same operations and comparing everything observable after every step;
* threads racing ref/unref on one compiled destructor: it fires exactly once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import python_in_child
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pagefrag
from pagefrag import DestructorError, leaks
from pagefrag._destructor import PyFragDestructor

SRC = os.path.dirname(os.path.dirname(os.path.abspath(pagefrag.__file__)))


def compiled_class() -> Any:
    try:
        from pagefrag._speedups import FragDestructor
    except ImportError:
        return None
    return FragDestructor


CFrag = compiled_class()
needs_compiled = pytest.mark.skipif(
    CFrag is None, reason="pagefrag._speedups is not built (no compiler at install?)"
)


def implementation_in_child(pure: bool) -> str:
    return python_in_child(
        "import pagefrag; print(pagefrag.implementation)", pure=pure
    ).stdout.strip()


# -- selection ------------------------------------------------------------------------------
def test_implementation_is_compiled_when_built_and_python_when_asked() -> None:
    assert implementation_in_child(pure=True) == "python"
    if importlib.util.find_spec("pagefrag._speedups") is None:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("pagefrag._speedups is not built: no C compiler on this machine")
        pytest.fail("a C compiler is present but pagefrag._speedups was not built")
    assert implementation_in_child(pure=False) == "compiled"


def test_every_module_gets_the_selected_class() -> None:
    expected = PyFragDestructor if pagefrag.implementation == "python" else CFrag
    assert expected is not None
    assert pagefrag.FragDestructor is expected
    assert (os.environ.get("PAGEFRAG_PURE_PYTHON", "") not in ("", "0")) == (
        pagefrag.implementation == "python"
    ) or CFrag is None
    for name in (
        "pagefrag._iov",
        "pagefrag._skbuff",
        "pagefrag.pool",
        "pagefrag.trace",
        "pagefrag.zerocopy.socket",
        "pagefrag.zerocopy._sender",
        "pagefrag.rpc.client",
        "pagefrag.rpc.record",
        "pagefrag.aio.transport",
        "pagefrag.aio._stream",
        "pagefrag.aio._writes",
        "pagefrag.aio._tls",
        "pagefrag.bench.runners",
    ):
        assert importlib.import_module(name).FragDestructor is expected, name


def test_pin_takes_references_on_the_selected_class_and_refuses_the_other() -> None:
    """_iov's ``type(d) is FragDestructor`` fast path and its isinstance check see the
    selected class; a destructor of the other implementation is refused, unchanged."""
    from pagefrag import IoVec

    d = pagefrag.FragDestructor()
    pin = IoVec.of(b"abc").pin("holder", extra=d)
    assert d.refcount == 2
    pin.release("holder")
    assert d.refcount == 1
    other_cls = CFrag if pagefrag.FragDestructor is PyFragDestructor else PyFragDestructor
    if other_cls is None:
        return
    other = other_cls()
    with pytest.raises(TypeError, match="must be a FragDestructor"):
        IoVec.of(b"abc").pin("holder", extra=other)
    assert other.refcount == 1


# -- the state machine ----------------------------------------------------------------------
ADDR = re.compile(r" at 0x[0-9a-f]+")


def norm(text: str) -> str:
    """A message or repr without the object's address (the two objects differ in it)."""
    return ADDR.sub(" at 0x?", text)


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    try:
        return ("ok", fn())
    except Exception as exc:
        return (type(exc).__name__, norm(str(exc)))


HOLDERS = st.sampled_from([None, "a", "b", 7])
CALLBACKS = st.integers(min_value=0, max_value=3)


class Side:
    """One destructor of one implementation and everything it did that can be seen."""

    def __init__(self, cls: Any, raising_destroy: bool, name: str | None) -> None:
        self.log: list[object] = []
        self.unraisable: list[tuple[str, str]] = []
        self.callbacks: dict[int, Callable[[Any], object]] = {}

        def destroy(data: object) -> None:
            self.log.append(("destroy", data))
            if raising_destroy:
                raise KeyError("destroy failed")

        self.d = cls(destroy, "payload", name=name)

    def callback(self, k: int) -> Callable[[Any], object]:
        # One function object per k and side, so remove_done_callback can find it.
        if k not in self.callbacks:

            def cb(d: Any) -> None:
                self.log.append(("callback", k, d.done, d.refcount))
                if k == 3:
                    raise ValueError(f"callback {k} failed")

            self.callbacks[k] = cb
        return self.callbacks[k]


class CompiledMatchesPure(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.old_level = leaks.get_level()
        self.old_hook = sys.unraisablehook
        self.sides: list[Side] = []
        self.seen_unraisable: list[tuple[str, str, str]] = []
        self.current = 0

        def hook(args: Any) -> None:
            self.seen_unraisable.append(
                (type(args.object).__name__, type(args.exc_value).__name__, norm(args.err_msg))
            )

        sys.unraisablehook = hook
        self.pairs: list[tuple[Side, Side]] = []

    def new_pair(self, level: str, raising_destroy: bool, name: str | None) -> None:
        leaks.set_level(level)
        try:
            pair = (
                Side(PyFragDestructor, raising_destroy, name),
                Side(CFrag, raising_destroy, name),
            )
        finally:
            leaks.set_level(self.old_level)
        self.pairs.append(pair)
        self.current = len(self.pairs) - 1

    @property
    def pair(self) -> tuple[Side, Side]:
        return self.pairs[self.current]

    def both(self, op: Callable[[Side], object]) -> None:
        """Run ``op`` on the pure side, then the compiled one, and compare the results
        and the unraisable reports each produced."""
        results = []
        for side in self.pair:
            start = len(self.seen_unraisable)
            results.append((outcome(lambda side=side: op(side)), self.seen_unraisable[start:]))
        assert results[0] == results[1]

    @initialize(
        level=st.sampled_from(["disabled", "simple", "paranoid"]),
        raising=st.booleans(),
        name=st.sampled_from([None, "rpc-1", ""]),
    )
    def first(self, level: str, raising: bool, name: str | None) -> None:
        self.new_pair(level, raising, name)

    @rule(
        level=st.sampled_from(["disabled", "simple", "paranoid"]),
        raising=st.booleans(),
        name=st.sampled_from([None, "rpc-1", ""]),
    )
    def create(self, level: str, raising: bool, name: str | None) -> None:
        if len(self.pairs) < 4:
            self.new_pair(level, raising, name)

    @rule(i=st.integers(min_value=0, max_value=3))
    def switch(self, i: int) -> None:
        self.current = i % len(self.pairs)

    @rule(holder=HOLDERS)
    def ref(self, holder: object) -> None:
        self.both(lambda s: s.d.ref(holder=holder))

    @rule(holder=HOLDERS)
    def unref(self, holder: object) -> None:
        self.both(lambda s: s.d.unref(holder=holder))

    @rule()
    def fire(self) -> None:
        """Drop every reference left: it fires (or raises when none is left)."""
        self.both(lambda s: [s.d.unref() for _ in range(max(s.d.refcount, 1))])

    @rule(k=CALLBACKS)
    def add_callback(self, k: int) -> None:
        self.both(lambda s: s.d.add_done_callback(s.callback(k)))

    @rule(k=CALLBACKS)
    def remove_callback(self, k: int) -> None:
        self.both(lambda s: s.d.remove_done_callback(s.callback(k)))

    @rule(bad=st.sampled_from([None, 3, "x"]))
    def add_not_callable(self, bad: object) -> None:
        self.both(lambda s: s.d.add_done_callback(bad))

    @rule(timeout=st.sampled_from([0, 0.0, -1, float("nan"), "1", True]))
    def wait(self, timeout: object) -> None:
        self.both(lambda s: s.d.wait(timeout))

    @rule()
    def construct_badly(self) -> None:
        self.both(lambda s: type(s.d)(destroy=5))
        self.both(lambda s: type(s.d)(None, name=b"x"))

    @invariant()
    def same_state(self) -> None:
        if not self.pairs:
            return
        for p, c in self.pairs:
            assert (p.d.refcount, p.d.done, p.d.data, p.d.name) == (
                c.d.refcount,
                c.d.done,
                c.d.data,
                c.d.name,
            )
            assert p.log == c.log
            assert norm(repr(p.d)) == norm(repr(c.d))
            assert p.d._dead == c.d._dead
            assert (p.d._track is None) == (c.d._track is None)
            if p.d._track is not None:
                pt, ct = p.d._track, c.d._track
                assert (pt.refcount, pt.closed) == (ct.refcount, ct.closed)
                assert [h.holder for h in pt.holders()] == [h.holder for h in ct.holders()]
            assert [id(f) for f in p.d._callbacks] == [
                id(p.callbacks[k]) for k in _ks(p, p.d._callbacks)
            ]
            assert _ks(p, p.d._callbacks) == _ks(c, c.d._callbacks)

    def teardown(self) -> None:
        try:
            for pair in self.pairs:
                for side in pair:
                    while side.d.refcount:
                        side.d.unref()  # fired: nothing is reported as leaked
        finally:
            sys.unraisablehook = self.old_hook
            leaks.set_level(self.old_level)


def _ks(side: Side, callbacks: list[Any]) -> list[int]:
    by_id = {id(f): k for k, f in side.callbacks.items()}
    return [by_id[id(f)] for f in callbacks]


CompiledMatchesPure.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCompiledMatchesPure = needs_compiled(CompiledMatchesPure.TestCase)


# -- threads --------------------------------------------------------------------------------
@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can, to make races likely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@needs_compiled
@pytest.mark.parametrize("level", ["disabled", "simple"])
def test_threads_racing_ref_unref_pairs_fire_it_exactly_once(
    fast_switching: None, level: str
) -> None:
    """N threads each take and drop references on one compiled destructor while the
    creator holds its own; the count ends where it began, and the creator's drop fires it
    exactly once, in the creator's thread."""
    old = leaks.get_level()
    leaks.set_level(level)
    try:
        fired: list[int] = []
        d = CFrag(lambda _: fired.append(threading.get_ident()))
    finally:
        leaks.set_level(old)
    n_threads, pairs = 8, 5000 if level == "disabled" else 500
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work() -> None:
        try:
            start.wait(timeout=60)
            for _ in range(pairs):
                d.ref(holder="worker")
                d.unref(holder="worker")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and fired == [] and d.refcount == 1 and not d.done
    d.unref()
    assert fired == [threading.get_ident()] and d.done and d.refcount == 0
    with pytest.raises(DestructorError):
        d.ref()


@needs_compiled
def test_threads_dropping_the_last_references_together_fire_once_in_the_last_one(
    fast_switching: None,
) -> None:
    """Many holders drop their references at once, over many rounds: each destructor
    fires exactly once, in one of the dropping threads, and after every drop."""
    n_threads, rounds = 6, 300
    for _ in range(rounds):
        fired: list[int] = []
        d = CFrag(lambda _, fired=fired: fired.append(threading.get_ident()))
        for _ in range(n_threads - 1):
            d.ref()
        start = threading.Barrier(n_threads)
        idents: list[int] = []

        def drop(d: Any = d, start: threading.Barrier = start, idents: list[int] = idents) -> None:
            idents.append(threading.get_ident())
            start.wait(timeout=60)
            d.unref()

        threads = [threading.Thread(target=drop) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert len(fired) == 1 and fired[0] in idents
        assert d.done and d.refcount == 0


@needs_compiled
def test_compiled_destructor_is_weakly_referenceable_and_awaitable_across_threads() -> None:
    import asyncio
    import weakref

    d = CFrag(None, name="w")
    ref = weakref.ref(d)
    assert ref() is d

    async def main(d: Any) -> bool:
        threading.Timer(0.05, d.unref).start()
        await asyncio.wait_for(d, timeout=60)
        return bool(d.done)

    assert asyncio.run(main(d))
    del d
    import gc

    gc.collect()
    assert ref() is None


@needs_compiled
def test_remove_done_callback_removes_the_first_equal_callback_in_both() -> None:
    """Bound methods of one object are equal but not identical: both implementations
    remove the first equal one (list.remove's rule), and nothing else."""

    class Owner:
        def done(self, d: Any) -> None:
            pass

    results = []
    for cls in (PyFragDestructor, CFrag):
        owner = Owner()
        first, second = owner.done, owner.done
        assert first == second and first is not second
        d = cls()
        d.add_done_callback(first)
        d.add_done_callback(second)
        removed = d.remove_done_callback(second)
        results.append((removed, [cb is first for cb in d._callbacks], d.remove_done_callback(len)))
        d.unref()
    assert results[0] == results[1] == (True, [False], False)


def test_neither_implementation_can_be_copied_or_pickled() -> None:
    """A copy would share the lock and callbacks but count on its own: destroy would run
    twice. Found in review: copy.copy() of the pure class made such a twin (destroy ran
    twice) where the compiled class refuses; both refuse now, and nothing fires."""
    import copy
    import pickle

    for cls in [c for c in (PyFragDestructor, CFrag) if c is not None]:
        calls: list[str] = []
        d = cls(calls.append, "D")
        for how in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError):
                how(d)
        d.unref()
        assert calls == ["D"], cls


@needs_compiled
def test_compiled_remove_done_callback_finds_it_when_the_list_shifts_during_eq() -> None:
    """``==`` runs Python code, during which the callback list may change (another
    thread; here the callable's own ``__eq__``, deterministically): an earlier entry
    removed then must not make the search skip the one asked for. Found in review: the
    index-based search returned False with the callback still registered."""
    assert CFrag is not None
    d = CFrag()

    def a(_: Any) -> None:
        pass

    def b(_: Any) -> None:
        pass

    class Target:
        def __eq__(self, other: object) -> bool:
            if other is b:
                d.remove_done_callback(a)  # the list shifts under the search
            return other is self

        __hash__ = object.__hash__

        def __call__(self, _: Any) -> None:
            pass

    target = Target()
    d.add_done_callback(a)
    d.add_done_callback(b)
    d.add_done_callback(target)
    assert d.remove_done_callback(target) is True
    assert d._callbacks == [b]
    d.unref()


@pytest.mark.parametrize(
    ("module", "warning"),
    [
        ("API = 1\nclass FragDestructor: pass\n", "built from other sources"),
        ("raise ImportError('undefined symbol: __pyx_something')\n", "does not load"),
    ],
    ids=["stale", "broken"],
)
def test_a_stale_or_broken_build_is_not_used_and_says_so(
    tmp_path: Any, module: str, warning: str
) -> None:
    # Before: a build left from older sources was imported as the compiled core (the
    # import of pagefrag then failed on a name it lacks), a broken one passed in silence.
    pkg = tmp_path / "pagefrag"
    shutil.copytree(
        os.path.join(SRC, "pagefrag"), pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    (pkg / "_speedups.py").write_text(module)
    out = python_in_child(
        "import pagefrag; print(pagefrag.implementation)", pure=False, path=str(tmp_path)
    )
    assert out.stdout.strip() == "python"
    assert out.stderr.count(warning) == 1, out.stderr
