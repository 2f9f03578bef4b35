"""Mutation checks: each mutant plants a reference bug in a copy of ``src/`` and must
make the tests named beside it fail (KILLED). A mutant of a ``.py`` file runs with the
pure-Python core (``PAGEFRAG_PURE_PYTHON=1``: the compiled twins would hide it); a mutant
of a ``.pyx`` file (``_speedups``, ``_uring``) rebuilds that extension in the copy and
runs with it. Usage: ``python tests/mutate.py [N ...]`` (all mutants, or those
numbered). Not collected by pytest; a run takes a few minutes."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
POISON = [
    "tests/test_zerocopy_netns.py::test_poison_after_release_under_loss",
    "tests/test_aio.py::test_poison_after_release_through_aio_and_a_pool_under_loss",
    "tests/test_zerocopy_hardening.py::test_threads_sending_on_one_socket_under_loss",
]
STATEFUL = ["tests/test_skbuff_stateful.py"]
MUTANTS = [
    (
        "skbuff: unclone takes no frag refs",
        "src/pagefrag/_skbuff.py",
        "        for f in new.frags:\n            _frag_ref(f, new)\n",
        "        for f in new.frags:\n            pass\n",
        STATEFUL,
    ),
    (
        "skbuff: clone does not count dataref",
        "src/pagefrag/_skbuff.py",
        "            sh.dataref += 1\n        for f in sh.frags:\n            f._shared = True",
        "            sh.dataref += 0\n        for f in sh.frags:\n            f._shared = True",
        STATEFUL,
    ),
    (
        "iov: pin takes no references",
        "src/pagefrag/zerocopy/_sender.py",
        "            if destructor is not None or any(iov.owners):\n                pin.take(",
        "            if False:\n                pin.take(",
        POISON,
    ),
    (
        "iov: trim hands back the call's own reference",
        "src/pagefrag/_iov.py",
        "        kept_refs.extend(taken)  # the extra one",
        "        dropped.extend(taken)",
        [*POISON, "tests/test_iov.py"],
    ),
    (
        "tracker: a completion releases one id too many",
        "src/pagefrag/zerocopy/tracker.py",
        "            ids: Iterable[int] = range(ulo, uhi + 1)",
        "            ids: Iterable[int] = range(ulo, uhi + 2)",
        POISON,
    ),
    (
        "aio: the write queue drops its references at once",
        "src/pagefrag/aio/_writes.py",
        "                    hold.take(holder)\n",
        "                    hold.take(holder)\n                    hold.release(holder)\n",
        POISON[1:2],
    ),
    (
        "compiled tracker: a completion releases one id too many",
        "src/pagefrag/_speedups.pyx",
        "            if uhi < last:\n                last = uhi\n",
        "            if uhi < last:\n                last = uhi + 1\n",
        POISON,
    ),
    (
        "compiled pin: trim hands back the call's own reference",
        "src/pagefrag/_speedups.pyx",
        "        kept_refs.extend(taken)  # the extra one",
        "        dropped.extend(taken)",
        [*POISON, "tests/test_speedups_pin.py"],
    ),
    (
        "compiled send: the destructor's reference is not taken",
        "src/pagefrag/_speedups.pyx",
        "                    _take_ref(destructor, self.eq)\n",
        "                    pass\n",
        ["tests/test_zerocopy_netns.py::test_poison_after_release_through_send_under_loss"],
    ),
    (
        "tracker: pins released when their filing is taken in",
        "src/pagefrag/zerocopy/tracker.py",
        "                elif sid not in pending:  # (an interrupted absorb may repeat a filing)",
        "                elif sid not in pending and (released.append(token) or False):",
        POISON,
    ),
    (
        "io_uring ring: pins released at the result CQE, not at the notification",
        "src/pagefrag/_uring.pyx",
        "                if not req.more or req.notified:\n                    self._finish(req)\n",
        "                if req.pin is not None:\n"
        "                    self._releases.append((0, req.pin, ch.holder))\n"
        "                    req.pin = None\n"
        "                if req.ref is not None:\n"
        "                    self._releases.append((2, req.ref, ch.holder))\n"
        "                    req.ref = None\n"
        "                req.view = None\n"
        "                if not req.more or req.notified:\n                    self._finish(req)\n",
        [
            "tests/test_backends_net.py::test_poison_after_release_under_loss[uring-sendall]",
            "tests/test_backends_net.py::test_poison_after_release_under_loss[uring-send]",
        ],
    ),
    (
        "dask comm: write() returns without waiting for the kernel's release",
        "src/pagefrag/dask/comm.py",
        "            if self._settings.wait_for_release:\n",
        "            if False:\n",
        ["tests/test_dask_cluster.py::test_overwrite_after_write_under_loss_through_dask"],
    ),
]


def main(only: list[str]) -> int:
    survived = 0
    for i, (name, path, old, new, tests) in enumerate(MUTANTS):
        if only and str(i) not in only:
            continue
        survived += not run(i, name, path, old, new, tests)
    return 1 if survived else 0


def run(i: int, name: str, path: str, old: str, new: str, tests: list[str]) -> bool:
    """True if the mutant was killed."""
    with tempfile.TemporaryDirectory(prefix=f"pagefrag-mutant{i}-") as tmp:
        d = pathlib.Path(tmp)
        shutil.copytree(ROOT / "src", d / "src")
        f = d / path
        text = f.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"M{i} {name}: the code to mutate is not found once in {path}")
        mutated = text.replace(old, new)
        if path.endswith(".py"):
            compile(mutated, path, "exec")  # a mutant that does not parse kills nothing
        f.write_text(mutated)
        env = {**os.environ, "PYTHONPATH": str(d / "src")}
        t0 = time.monotonic()
        if path.endswith(".pyx"):  # a mutant of the compiled core: rebuild it
            build = [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", "-q", str(f)]
            subprocess.run(build, check=True, capture_output=True, timeout=600)
        else:  # a mutant of the pure-Python reference: run it, not its compiled twin
            env["PAGEFRAG_PURE_PYTHON"] = "1"
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    last = [line for line in r.stdout.splitlines() if line.strip()][-1:]
    verdict = "KILLED" if r.returncode else "SURVIVED"
    print(f"M{i} {name}: {verdict} ({time.monotonic() - t0:.0f}s) {last}", flush=True)
    return r.returncode != 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
