# One query row's softmax attention pieces, written once for the kernels that attend a single
# query over a key / value cache: attention.pyx (flash forward, backward's recomputation) and
# decode.pyx (the fused decode step).

from libc.stdint cimport int64_t

from _common cimport real


# One query row (decode) reads each key and value row once: the BLAS calls' fixed costs (two per
# key tile, each ~0.5-1 us at these sizes) would outweigh the row's own work.  The loops over D
# vectorize (-fassociative-math).
cdef inline void scores_1_(const real* q, const real* k, Py_ssize_t ks, Py_ssize_t nk, Py_ssize_t D, real scale,
                           real* sc) noexcept nogil:
    """sc[j] = scale * q . k_j for the nk key rows k_j = k + j ks."""
    cdef Py_ssize_t j, c
    cdef real s
    cdef const real* kj
    for j in range(nk):
        kj = k + j * ks
        s = 0
        for c in range(D):
            s = s + q[c] * kj[c]
        sc[j] = scale * s


cdef inline void accumulate_1_(const real* p, const real* v, Py_ssize_t vs, Py_ssize_t nk, Py_ssize_t Dv,
                               real* acc) noexcept nogil:
    """acc += sum_j p[j] v_j for the nk value rows v_j = v + j vs."""
    cdef Py_ssize_t j, c
    cdef real pj
    cdef const real* vj
    for j in range(nk):
        pj = p[j]
        vj = v + j * vs
        for c in range(Dv):
            acc[c] = acc[c] + pj * vj[c]


# The same through a table of rows (a KV cache reordered by beam search, KVCache.origin): key /
# value j is in row org[j], so its address is base + org[j] * row_stride + j * D.
cdef inline void scores_rows_(const real* q, const real* k, const int64_t* org, Py_ssize_t row_stride,
                              Py_ssize_t nk, Py_ssize_t D, real scale, real* sc) noexcept nogil:
    """sc[j] = scale * q . k_j, k_j = k + org[j] row_stride + j D."""
    cdef Py_ssize_t j, c
    cdef real s
    cdef const real* kj
    for j in range(nk):
        kj = k + (org[j] * row_stride + j * D)
        s = 0
        for c in range(D):
            s = s + q[c] * kj[c]
        sc[j] = scale * s


cdef inline void accumulate_rows_(const real* p, const real* v, const int64_t* org, Py_ssize_t row_stride,
                                  Py_ssize_t nk, Py_ssize_t D, real* acc) noexcept nogil:
    """acc += sum_j p[j] v_j, v_j = v + org[j] row_stride + j D."""
    cdef Py_ssize_t j, c
    cdef real pj
    cdef const real* vj
    for j in range(nk):
        pj = p[j]
        vj = v + (org[j] * row_stride + j * D)
        for c in range(D):
            acc[c] = acc[c] + pj * vj[c]
