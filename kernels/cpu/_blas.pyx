# cython: language_level=3
"""Row-major GEMM for the CPU kernels, through the BLAS that torch itself uses.

One compiled module (fastseq._cpu._blas) owns the Fortran sgemm_/dgemm_ pointers; the kernel
modules cimport gemm_rm (_blas.pxd) and keep thin `set_blas` / `has_blas` entries that forward
here, so fastseq/_blas.py can install the GEMM through any of them.  fastseq/_blas.py looks up
the sgemm_/dgemm_ that torch's libtorch_cpu exports (MKL on x86 wheels), or scipy's, and
installs their addresses; without one the loops below run (slow but right).
Called from inside OpenMP regions: MKL then runs single-threaded per call (it sees the
enclosing parallel region of the same libgomp), which is what the kernels want.
"""
from _common cimport real

ctypedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*) noexcept nogil
ctypedef void (*dgemm_t)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*,
                         const int*) noexcept nogil

cdef sgemm_t _sgemm = NULL
cdef dgemm_t _dgemm = NULL


cdef void install_blas(size_t sgemm_addr, size_t dgemm_addr) noexcept nogil:
    global _sgemm, _dgemm
    _sgemm = <sgemm_t> sgemm_addr
    _dgemm = <dgemm_t> dgemm_addr


cdef bint blas_installed() noexcept nogil:
    return _sgemm != NULL and _dgemm != NULL


def set_blas(size_t sgemm_addr, size_t dgemm_addr):
    """Install the Fortran-ABI sgemm_/dgemm_ at these addresses (0: use the fallback loops)."""
    install_blas(sgemm_addr, dgemm_addr)


def has_blas():
    return blas_installed()


# A row-major matrix read as column-major is its transpose, so row-major C = op(A) op(B) is the
# column-major C^T = op(B)^T op(A)^T: the Fortran call with A and B swapped and the flags kept.

cdef void sgemm_rm(bint ta, bint tb, int m, int n, int k, float alpha, const float* a, int lda,
                   const float* b, int ldb, float beta, float* c, int ldc) noexcept nogil:
    gemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void dgemm_rm(bint ta, bint tb, int m, int n, int k, double alpha, const double* a, int lda,
                   const double* b, int ldb, double beta, double* c, int ldc) noexcept nogil:
    gemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef inline void gemm_(bint ta, bint tb, int m, int n, int k, real alpha, const real* a, int lda,
                       const real* b, int ldb, real beta, real* c, int ldc) noexcept nogil:
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    cdef Py_ssize_t i, j, p
    cdef real acc
    if m <= 0 or n <= 0:
        return
    if real is float:
        if _sgemm != NULL:
            _sgemm(&cb, &ca, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
            return
    else:
        if _dgemm != NULL:
            _dgemm(&cb, &ca, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
            return
    for i in range(m):                          # no BLAS: plain loops (slow but right)
        for j in range(n):
            acc = 0
            for p in range(k):
                acc = acc + (a[p * lda + i] if ta else a[i * lda + p]) * (b[j * ldb + p] if tb else b[p * ldb + j])
            c[i * ldc + j] = alpha * acc + (beta * c[i * ldc + j] if beta != 0 else 0)
