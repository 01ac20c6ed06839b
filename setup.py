"""Build the compiled core, replay._fastparse, and the replay's send loop, replay._sendloop, from
their Cython sources.

REPLAY_NO_EXTENSIONS=1 skips the build (the pure-Python twins, replay._fastparse_py and
replay._sendloop_py, are then used).
"""

import os
import sys

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("REPLAY_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    # -ffp-contract=off: no fused multiply-add, whose single rounding would make a deadline
    # computed in the core 1 ns off the scheduler's (Python rounds a product and a sum apart)
    exts = [Extension("replay._fastparse", ["replay/_fastparse.pyx"],
                      extra_compile_args=["-O3", "-ffp-contract=off"])]
    if sys.platform.startswith("linux"):     # (epoll; elsewhere the replay uses asyncio's sockets)
        exts.append(Extension("replay._sendloop", ["replay/_sendloop.pyx"],
                              extra_compile_args=["-O3"]))
    ext_modules = cythonize(
        exts,
        # bounds and negative-index checks stay on, as the first line of the .pyx says (that line
        # wins over these; the two say the same so that neither misleads): the hot paths read raw
        # pointers in nogil C functions, where the checks do not apply, and the rest indexes
        # Python lists with negative indices (``pending[-1]``) that need wraparound. Built with
        # both off in the .pyx's first line, convert crashed (SIGSEGV) on an API capture.
        compiler_directives={"language_level": "3", "boundscheck": True, "wraparound": True,
                             "cdivision": True, "initializedcheck": False},
        annotate=False,
    )

setup(ext_modules=ext_modules)
