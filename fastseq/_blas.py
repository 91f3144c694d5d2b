"""Find a Fortran-ABI sgemm_/dgemm_ for the Cython kernels: torch's own (MKL on x86 wheels),
else scipy's OpenBLAS, else none (the kernels fall back to plain loops; explain() says so)."""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Optional, Tuple

import torch

_found: Optional[Tuple[int, int, str]] = None


def _from_torch():
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libtorch_cpu*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            s, d = lib.sgemm_, lib.dgemm_
        except (OSError, AttributeError):
            continue
        return ctypes.cast(s, ctypes.c_void_p).value, ctypes.cast(d, ctypes.c_void_p).value, "torch's BLAS (" + os.path.basename(path) + ")"
    return None


def _from_scipy():
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return None
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    name = ctypes.pythonapi.PyCapsule_GetName
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    caps = cython_blas.__pyx_capi__
    s, d = caps["sgemm"], caps["dgemm"]
    return get(s, name(s)), get(d, name(d)), "scipy's BLAS"


def blas() -> Tuple[int, int, str]:
    """(sgemm address, dgemm address, where from); addresses 0 when no BLAS was found."""
    global _found
    if _found is None:
        _found = _from_torch() or _from_scipy() or (0, 0, "none (plain loops)")
    return _found


def install(module) -> None:
    """Give a compiled kernel module (one that cimports fastseq._cpu._blas) its GEMM."""
    s, d, _ = blas()
    module.set_blas(s, d)


def cpu_kernels(family: str):
    """fastseq._cpu.<family> with its GEMM installed (once)."""
    from . import _dispatch

    k = _dispatch.cpu_kernels(family)
    if not getattr(k, "_fastseq_blas", False):
        install(k)
        k._fastseq_blas = True
    return k
