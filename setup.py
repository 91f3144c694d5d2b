"""Build the Cython CPU kernels (kernels/cpu/*.pyx) into fastseq._cpu.

-O3 with OpenMP.  Where the compiler has no OpenMP the kernels build serial and a warning says so.
FASTSEQ_NATIVE=0 drops -march=native for a portable binary (default: tuned to the build machine,
as a source install runs where it is built).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler_accepts(flag):
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 0;}\n"
                    if "openmp" in flag else "int main(void){return 0;}\n")
        r = subprocess.run([cc, flag, src, "-o", os.path.join(d, "t")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0


compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math",
                # lets gcc vectorize reductions; NaN/Inf semantics stay (no -ffinite-math-only)
                "-fassociative-math", "-fno-signed-zeros"]
link_args = []
if sys.platform != "win32":
    if os.environ.get("FASTSEQ_NATIVE", "1") != "0" and _compiler_accepts("-march=native"):
        compile_args.append("-march=native")
    if _compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        warnings.warn("fastseq: the C compiler has no OpenMP; CPU kernels build single-threaded")


def _cimport_tree():
    """An include directory in which fastseq/_cpu is kernels/cpu.

    The kernel modules cimport the compiled module fastseq._cpu._blas by its full name (the name
    it is imported by at run time); Cython finds a cimported module's .pxd by package layout, and
    the sources live in kernels/cpu, installed as fastseq._cpu.  A link (or, where links are not
    allowed, a copy of the .pxd files) under build/ gives it that layout."""
    root = os.path.join("build", "cython_include")
    pkg = os.path.join(root, "fastseq", "_cpu")
    src = os.path.abspath(os.path.join("kernels", "cpu"))
    if os.path.islink(pkg) and os.path.realpath(pkg) != os.path.realpath(src):
        os.remove(pkg)
    if not os.path.exists(pkg):
        os.makedirs(os.path.dirname(pkg), exist_ok=True)
        try:
            os.symlink(src, pkg, target_is_directory=True)
        except OSError:
            os.makedirs(pkg, exist_ok=True)
    if not os.path.islink(pkg):
        for f in glob.glob(os.path.join(src, "*.pxd")):
            shutil.copy2(f, pkg)
    return root


extensions = [
    Extension(
        "fastseq._cpu." + os.path.splitext(os.path.basename(p))[0],
        [p],
        include_dirs=["kernels/cpu"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    for p in sorted(glob.glob("kernels/cpu/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["kernels/cpu", _cimport_tree()],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ),
    packages=["fastseq", "fastseq.recurrent", "fastseq.models", "fastseq.models.reference", "fastseq.trainer",
              "fastseq.generation", "fastseq.layer_norm",
              "fastseq._cpu", "fastseq._cuda", "fastseq.bench"],
    package_dir={"fastseq._cpu": "kernels/cpu", "fastseq._cuda": "kernels/cuda"},
    package_data={"fastseq._cpu": ["*.pxd"]},
)
