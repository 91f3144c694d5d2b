# Shared declarations for the Cython CPU kernels.

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
