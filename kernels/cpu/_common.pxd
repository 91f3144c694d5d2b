# Shared declarations for the Cython CPU kernels.

from libc.math cimport INFINITY

# The element types every kernel is compiled for.  Accumulation happens in the same type:
# fp32 for float inputs, fp64 for double inputs (DESIGN.md section 5).
ctypedef fused real:
    float
    double


# Independent partial sums a row reduction keeps (see layer_norm.pyx; loops step by it literally).
cdef enum:
    LANES = 32


cdef extern from "<math.h>" nogil:
    float sqrtf(float)
    double sqrt(double)
    float expf(float)
    double exp(double)
    float tanhf(float)
    double tanh(double)


cdef extern from "_fastmath.h" nogil:
    float fs_expf(float x)
    float fs_tanhf(float x)
    float fs_rowmaxf(const float* x, long n)


cdef inline real exp_(real v) noexcept nogil:
    """exp; fp32 through _fastmath.h's branch-free one (loops that call it vectorize), fp64 libm's."""
    if real is float:
        return fs_expf(v)
    else:
        return exp(v)


cdef inline real tanh_(real v) noexcept nogil:
    """tanh; fp32 through _fastmath.h's branch-free one, fp64 libm's."""
    if real is float:
        return fs_tanhf(v)
    else:
        return tanh(v)


cdef inline real row_max_(const real* x, Py_ssize_t n) noexcept nogil:
    """max of a row ignoring NaN; -inf for an empty or all -inf row (a softmax's shift)."""
    cdef Py_ssize_t j
    cdef real m = -INFINITY
    if real is float:
        return fs_rowmaxf(x, n)
    for j in range(n):
        m = x[j] if x[j] > m else m
    return m


cdef inline real rsqrt_(real v) noexcept nogil:
    if real is float:
        return 1.0 / sqrtf(v)
    else:
        return 1.0 / sqrt(v)


cdef inline (Py_ssize_t, Py_ssize_t) chunk_(Py_ssize_t n, Py_ssize_t parts, Py_ssize_t k) noexcept nogil:
    """Rows [lo, hi) of part k when n rows are cut into `parts` near-equal contiguous chunks."""
    cdef Py_ssize_t q = n // parts, r = n % parts
    cdef Py_ssize_t lo = k * q + (k if k < r else r)
    return lo, lo + q + (1 if k < r else 0)


cdef inline (Py_ssize_t, Py_ssize_t) col_slice_(Py_ssize_t n, int parts, int k, Py_ssize_t align) noexcept nogil:
    """Columns [lo, hi) of part k when n columns are cut into `parts` near-equal slices that start
    at multiples of align (whole vectors or cache lines for each thread)."""
    cdef Py_ssize_t per = ((n + parts - 1) // parts + align - 1) // align * align
    cdef Py_ssize_t lo = min(n, k * per)
    return lo, min(n, lo + per)


# ---------------------------------------------------------------------------- pointer helpers
# The `def` entries take typed memoryviews; the nogil cores take raw pointers.

cdef inline real* ptr_(real[::1] a) noexcept nogil:
    """The first element's address, NULL for None or an empty view (an absent optional buffer)."""
    return &a[0] if a is not None and a.shape[0] > 0 else NULL


cdef inline void copy_(real* dst, const real* src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


cdef inline void fixed_order_col_sums_(const real* part, Py_ssize_t rows, Py_ssize_t n, real* out) noexcept nogil:
    """out[j] = sum over k < rows of part[k n + j], added in row order: per-thread partial sums
    reduced the same way every call (the same bits for the same thread count)."""
    cdef Py_ssize_t j, k
    cdef real acc
    for j in range(n):
        acc = 0
        for k in range(rows):
            acc = acc + part[k * n + j]
        out[j] = acc
