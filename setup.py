"""Build the Cython kernels (charlm._kernels).

Two environment variables change the build:

CHARLM_DEBUG_KERNELS=1  turn Cython's bounds, wraparound and initialisation
                        checks back on. Slow; used for one CI pass of the tests
                        so an indexing bug shows up as an IndexError, not as
                        silent memory corruption.
CHARLM_PORTABLE=1       do not pass -march=native. Use this when building a
                        wheel to run on other machines. By default the kernels
                        are compiled for the CPU that builds them, so the
                        vectorised loops use its full SIMD width (AVX2,
                        AVX-512...) without the user passing any flag.

-O3 is used; -ffast-math/-Ofast never are, because they change floating-point
semantics for the whole process (flush-to-zero, reassociation, no NaN checks).
-fno-trapping-math is used: it changes no computed value, it only tells gcc
that no program here unmasks floating-point traps, which lets it turn the
comparisons in charlm/_fastmath.h into vector selects, so the gate loops
vectorise. -fno-math-errno likewise changes no computed value: sqrt of a
negative number still gives NaN, but errno (which nothing here reads) is not
set, so sqrt becomes one vector instruction and the optimiser loops vectorise.
-mprefer-vector-width=512 goes with -march=native: gcc's tuning for Intel's
AVX-512 cores (rocketlake and later) keeps its own vectorised loops at 256
bits, which halves the width of the gate loops (the packed product's
explicit vector types are 512-bit either way). On an Intel Xeon with AVX-512 the LSTM
forward of a 25-stream share went from 3.77 to 2.74 ms and a 2x128 LSTM
training step got 11% faster; on AMD Zen 4 it changed nothing beyond noise.
Without AVX-512 the flag has no effect.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


debug = _flag("CHARLM_DEBUG_KERNELS")
portable = _flag("CHARLM_PORTABLE")

compile_args = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
if not portable and sys.platform != "win32":
    compile_args += ["-march=native", "-mprefer-vector-width=512"]
if debug:
    compile_args = ["-O1", "-g"]
# POSIX threads, for the team that shares a single stream's recurrence
# (charlm/_team.h); without them (Windows) the team's work runs on one thread.
thread_args = ["-pthread"] if sys.platform != "win32" else []

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "charlm._kernels",
        ["charlm/_kernels.pyx"],
        include_dirs=["charlm"],
        depends=["charlm/_fastmath.h", "charlm/_packed_gemm.h", "charlm/_lstm_units.h",
                 "charlm/_gru_units.h", "charlm/_gemv.h", "charlm/_team.h"],
        extra_compile_args=compile_args + thread_args,
        extra_link_args=thread_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("CHARLM_DEBUG_BUILD", "1" if debug else "0")],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
