# Row-major GEMM for the CPU kernels, through the BLAS that torch itself uses: one compiled
# module, fastseq._cpu._blas, owns the sgemm_/dgemm_ pointers; attention.pyx and recurrent.pyx
# cimport gemm_rm from here (`from fastseq._cpu._blas cimport gemm_rm`).  See _blas.pyx.

from _common cimport real


cdef void sgemm_rm(bint ta, bint tb, int m, int n, int k, float alpha, const float* a, int lda,
                   const float* b, int ldb, float beta, float* c, int ldc) noexcept nogil
cdef void dgemm_rm(bint ta, bint tb, int m, int n, int k, double alpha, const double* a, int lda,
                   const double* b, int ldb, double beta, double* c, int ldc) noexcept nogil
cdef void install_blas(size_t sgemm_addr, size_t dgemm_addr) noexcept nogil
cdef bint blas_installed() noexcept nogil


cdef inline void gemm_rm(bint ta, bint tb, int m, int n, int k, real alpha, const real* a, int lda,
                         const real* b, int ldb, real beta, real* c, int ldc) noexcept nogil:
    """Row-major C (m x n) = alpha * op(A) op(B) + beta * C, op = transpose where ta / tb."""
    if real is float:
        sgemm_rm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    else:
        dgemm_rm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
