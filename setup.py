"""Build the optional compiled core, pagefrag._speedups and pagefrag._uring (Cython).

If it cannot be built (no compiler, no Python headers), the install goes on with the
pure-Python core and says so once, as aiohttp and yarl do; ``PAGEFRAG_PURE_PYTHON=1`` in
the environment skips the build. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure-Python core instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any build failure means: the pure core
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    _warned = False

    def _fallback(self, exc: BaseException) -> None:
        OptionalBuildExt._fallback_once(exc)

    @staticmethod
    def _fallback_once(exc: BaseException) -> None:
        if not OptionalBuildExt._warned:
            OptionalBuildExt._warned = True
            print(
                "WARNING: pagefrag: the compiled core (pagefrag._speedups) could not be "
                f"built ({exc}); installing the pure-Python core",
                file=sys.stderr,
            )


def extensions() -> list[Extension]:
    """The extension from its ``.pyx`` (a checkout) or, without one, from the generated
    ``.c`` (an sdist built elsewhere); none, with one warning, if neither can be used.
    Nothing here may fail the install: the pure-Python core always remains."""
    if os.environ.get("PAGEFRAG_PURE_PYTHON", "") not in ("", "0"):
        return []
    names = ("_speedups", "_uring")
    pyx = [f"src/pagefrag/{name}.pyx" for name in names]
    if not all(map(os.path.exists, pyx)):
        c = [p[:-4] + ".c" for p in pyx]
        if all(map(os.path.exists, c)):
            return [
                Extension(f"pagefrag.{name}", [src], optional=True)
                for name, src in zip(names, c, strict=True)
            ]
        OptionalBuildExt._fallback_once(FileNotFoundError(pyx[0]))
        return []
    try:
        from Cython.Build import cythonize

        return cythonize(
            [
                Extension(f"pagefrag.{name}", [src], optional=True)
                for name, src in zip(names, pyx, strict=True)
            ],
            compiler_directives={"language_level": "3"},
        )
    except Exception as exc:  # no Cython, or it failed: the pure core
        OptionalBuildExt._fallback_once(exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
