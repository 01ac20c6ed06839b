"""Build the compiled core, replay._fastparse, from its Cython source.

REPLAY_NO_EXTENSIONS=1 skips the build (the pure-Python twin, replay._fastparse_py, is then used).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("REPLAY_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension("replay._fastparse", ["replay/_fastparse.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
        annotate=False,
    )

setup(ext_modules=ext_modules)
