# Elementwise activations, written once for every kernel that applies one: dropout.pyx (bias +
# activation + dropout, and its backward) and decode.pyx (the fused decode step's feed-forward).
# Codes are the index in fastseq.dropout.ACTIVATIONS.  The fp32 transcendental functions are
# _fastmath.h's branch-free ones (gcc vectorizes the loops that call them), fp64 uses libm.

from _common cimport real, exp_, tanh_

cdef extern from "_fastmath.h" nogil:
    float fs_normcdff(float)
    float fs_normpdff(float)

cdef extern from "<math.h>" nogil:
    double exp(double)
    double erfc(double)


cdef enum:
    RELU = 0
    GELU = 1
    GELU_TANH = 2
    SILU = 3


# One loop per activation: the switch stays out of the loops, which gcc vectorizes.

cdef inline real normcdf_(real u) noexcept nogil:
    """Phi(u); fp64 through erfc(-u / sqrt 2) / 2, accurate in both tails."""
    if real is float:
        return fs_normcdff(u)
    else:
        return 0.5 * erfc(-u * 0.7071067811865476)        # 1 / sqrt 2


cdef inline real normpdf_(real u) noexcept nogil:
    if real is float:
        return fs_normpdff(u)
    else:
        return 0.3989422804014327 * exp(-0.5 * u * u)   # 1 / sqrt(2 pi)


# The loops below have no branch and no optional operand (an absent bias is a block of zeros, no
# dropout a block of ones): a conditional load stops gcc from vectorizing, and a scalar exp /
# erfc-based loop costs ~10x the vector one (4 ns against 0.4 ns an element, measured).

cdef inline void act_fwd_(const real* x, const real* b, const real* mul, real* y, Py_ssize_t n, int act) noexcept nogil:
    """y[j] = act(x[j] + b[j]) * mul[j]."""
    cdef Py_ssize_t j
    cdef real u, a, t
    cdef real k = <real> 0.7978845608028654, c = <real> 0.044715   # sqrt(2 / pi), GELU's cubic
    if act == RELU:
        for j in range(n):
            u = x[j] + b[j]
            a = 0 if u < 0 else u                           # NaN stays NaN, as torch.relu
            y[j] = a * mul[j]
    elif act == GELU:
        for j in range(n):
            u = x[j] + b[j]
            a = u * normcdf_(u)
            y[j] = a * mul[j]
    elif act == GELU_TANH:
        for j in range(n):
            u = x[j] + b[j]
            a = 0.5 * u * (1 + tanh_(k * (u + c * u * u * u)))
            y[j] = a * mul[j]
    else:
        for j in range(n):
            u = x[j] + b[j]
            a = u / (1 + exp_(-u))                      # u sigmoid(u)
            y[j] = a * mul[j]
