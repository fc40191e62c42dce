"""The matrix products of a training step on one core: OpenBLAS, MKL and
charlm's own kernel, in GFLOP/s.

    python benchmarks/bench_blas.py                  # MKL too, if `pip install mkl` put it here
    python benchmarks/bench_blas.py --mkl /path/to/libmkl_rt.so.3

charlm calls the OpenBLAS that scipy ships (scipy.linalg.cython_blas) for
the products it does not run on its own packed kernel. MKL (on PyPI as
`mkl`) is the usual candidate for a faster BLAS; this is the measurement
that decides whether it would pay (README, Design: BLAS). It builds
benchmarks/blas_products.c with gcc (the flags setup.py uses) against
charlm/_packed_gemm.h, loads both libraries with dlopen, and times each
product by each library in alternating rounds on one thread (medians of 9).
The shapes are a 2x128 LSTM worker's (25 streams, 50 steps, spans of 250
rows) and a 2x512 LSTM's step; the last is the one such a step leaves to
BLAS (65 columns would leave a third of the packed panels empty).
"""

import argparse
import ctypes
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_train import cpu_model  # noqa: E402


def scipy_openblas():
    """(path, sgemm symbol) of the OpenBLAS inside scipy's wheel."""
    import scipy
    libs = sorted(glob.glob(str(Path(scipy.__file__).parent.parent / "scipy.libs" / "*openblas*.so*")))
    for path in libs:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_sgemm_", "sgemm_"):
            if hasattr(lib, symbol):
                return path, symbol
    sys.exit("bench_blas: no OpenBLAS found in scipy's wheel (scipy.libs)")


def installed_mkl():
    """libmkl_rt where `pip install mkl` puts it (this environment's lib/), or None."""
    for prefix in {sys.prefix, sysconfig.get_config_var("prefix") or sys.prefix}:
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    return None


def build(workdir):
    exe = Path(workdir) / "blas_products"
    flags = ["-O3"]
    if os.environ.get("CHARLM_PORTABLE") != "1":
        flags += ["-march=native", "-mprefer-vector-width=512"]
    subprocess.run(["gcc", *flags, "-I", str(REPO_ROOT / "charlm"), str(HERE / "blas_products.c"),
                    "-o", str(exe), "-ldl"], check=True)
    return exe


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mkl", help="path of libmkl_rt.so (default: this environment's, if any)")
    args = parser.parse_args()
    openblas, symbol = scipy_openblas()
    mkl = args.mkl or installed_mkl()
    if mkl and not Path(mkl).exists():
        sys.exit(f"bench_blas: {mkl}: no such file")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MKL_THREADING_LAYER="SEQUENTIAL")
    command = [openblas, symbol]
    if mkl:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(Path(mkl).parent)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        command += [mkl, "sgemm_"]
    with tempfile.TemporaryDirectory() as workdir:
        exe = build(workdir)
        print(f"{cpu_model()}, one thread, GFLOP/s, medians of 9 alternating rounds, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"OpenBLAS: {openblas}")
        print(f"MKL: {mkl or 'not installed (pip install mkl, or --mkl PATH)'}\n", flush=True)
        if subprocess.run([str(exe), *command], env=env).returncode != 0:
            sys.exit("bench_blas: the harness failed (see above)")


if __name__ == "__main__":
    main()
