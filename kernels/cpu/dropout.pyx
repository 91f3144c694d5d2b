# cython: language_level=3
"""Dropout, dropout + residual add, and bias + activation + dropout on the CPU.

The mask is _dropout_mask.pxd's counter-based draw: element k (flat row-major index) is kept
when a keyed hash of k clears p 2^32, and kept elements are scaled by 1 / (1 - p).  Backward
regenerates the mask from (seed, k); it is never stored.

dropout:          y = x * Z / (1 - p) [+ r]                  reads x (and r), writes y
  backward:       dx = dy * Z / (1 - p)  (the same kernel on dy; dr = dy is the caller's)
bias_act_dropout: y = act(x + b) * Z / (1 - p)               reads x, writes y   (x: (m, n), b: (n,))
  backward (below): dx = dy * Z / (1 - p) * act'(x + b), db = sum_rows dx
                                                             reads x, dy, writes dx
The unfused sequence moves (x + b) -> u, act(u) -> a, bernoulli -> mask, a * mask -> y: four
full passes each way, and the saved mask.  Here each direction is one pass; the pre-activation
u = x + b is rebuilt in backward (b stays in L1), act' is recomputed (cheaper than a pass).

Work is split over OpenMP threads in contiguous chunks (blocks of MASK_BLOCK elements for the
flat kernels, rows for the row kernels); the mask depends only on the index, so outputs and dx do
not depend on the thread count; db's per-thread partial sums are reduced in a fixed order (the
same bits for the same thread count; another count groups the sums differently).
The kernels never allocate and never validate: fastseq/dropout.py does both.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint64_t

from _common cimport real, chunk_, exp_, fixed_order_col_sums_, tanh_
from _dropout_mask cimport Drop, drop_, keep_mul_, keep_span_, MASK_BLOCK
from _activation cimport RELU, GELU, GELU_TANH, SILU, normcdf_, normpdf_, act_fwd_

cdef double GELU_K = 0.7978845608028654         # sqrt(2 / pi)
cdef double GELU_A = 0.044715


# ---------------------------------------------------------------------------------------------
# dropout (and dropout + residual): flat, in aligned blocks of MASK_BLOCK (a block never crosses
# a multiple of 2^32, so its draws are one 32-bit span)
# ---------------------------------------------------------------------------------------------

cdef void dropout_blocks_(const real* x, const real* r, real* y, Py_ssize_t numel, Py_ssize_t blo,
                          Py_ssize_t bhi, const Drop* dr) noexcept nogil:
    cdef real mul[MASK_BLOCK]
    cdef Py_ssize_t blk, k0, nb, j
    for blk in range(blo, bhi):
        k0 = blk * MASK_BLOCK
        nb = min(<Py_ssize_t> MASK_BLOCK, numel - k0)
        keep_span_(mul, <uint64_t> k0, nb, dr)
        if r == NULL:
            for j in range(nb):
                y[k0 + j] = x[k0 + j] * mul[j]
        else:
            for j in range(nb):
                y[k0 + j] = x[k0 + j] * mul[j] + r[k0 + j]


cdef void dropout_core_(const real* x, const real* r, real* y, Py_ssize_t numel, double p, uint64_t seed,
                        int num_threads) noexcept nogil:
    cdef Drop dr = drop_(p, seed)
    cdef Py_ssize_t blocks = (numel + MASK_BLOCK - 1) // MASK_BLOCK
    cdef Py_ssize_t t, lo, hi, nt = max(1, min(num_threads, blocks))
    if numel == 0:
        return
    if nt == 1:
        dropout_blocks_(x, r, y, numel, 0, blocks, &dr)
        return
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        lo, hi = chunk_(blocks, nt, t)
        dropout_blocks_(x, r, y, numel, lo, hi, &dr)


def dropout_ptr(size_t x, size_t r, size_t y, Py_ssize_t numel, double p, uint64_t seed, int num_threads,
                bint dbl):
    """y = x * Z / (1 - p) [+ r] over numel elements (r = 0: absent; y may be x).  p > 0.
    Addresses of contiguous buffers of doubles (dbl) or floats.  Releases the GIL."""
    with nogil:
        if dbl:
            dropout_core_(<const double*> x, <const double*> r, <double*> y, numel, p, seed, num_threads)
        else:
            dropout_core_(<const float*> x, <const float*> r, <float*> y, numel, p, seed, num_threads)


# ---------------------------------------------------------------------------------------------
# the activations' derivatives (the forwards are _activation.pxd's act_fwd_)
# ---------------------------------------------------------------------------------------------

# Backward of y = act(u) * m, u = x + b, m = Z / (1 - p):   dx = dy * m * act'(u), db = sum_rows dx
#     relu'(u)      = [not u <= 0]                                      (torch's threshold_backward)
#     gelu'(u)      = Phi(u) + u phi(u)                                 (d/du u Phi(u); phi = Phi')
#     gelu_tanh'(u) = (1 + t) / 2 + u (1 - t^2) k (1 + 3 c u^2) / 2,    t = tanh(k (u + c u^3))
#     silu'(u)      = s (1 + u (1 - s)),                                s = sigmoid(u)
cdef void act_bwd_(const real* x, const real* b, const real* dy, const real* mul, real* dx, Py_ssize_t n,
                   int act) noexcept nogil:
    """dx[j] = dy[j] * mul[j] * act'(x[j] + b[j])."""
    cdef Py_ssize_t j
    cdef real u, g, t, s
    cdef real k = <real> GELU_K, c = <real> GELU_A
    if act == RELU:
        for j in range(n):
            u = x[j] + b[j]
            g = dy[j] * mul[j]
            dx[j] = 0 if u <= 0 else g                  # torch's threshold_backward: NaN passes g
    elif act == GELU:
        for j in range(n):
            u = x[j] + b[j]
            g = dy[j] * mul[j]
            dx[j] = g * (normcdf_(u) + u * normpdf_(u))
    elif act == GELU_TANH:
        for j in range(n):
            u = x[j] + b[j]
            g = dy[j] * mul[j]
            t = tanh_(k * (u + c * u * u * u))
            dx[j] = g * (0.5 * (1 + t) + 0.5 * u * (1 - t * t) * k * (1 + 3 * c * u * u))
    else:
        for j in range(n):
            u = x[j] + b[j]
            g = dy[j] * mul[j]
            s = 1 / (1 + exp_(-u))
            dx[j] = g * (s * (1 + u * (1 - s)))


# ---------------------------------------------------------------------------------------------
# bias + activation + dropout over rows of n, in column blocks of MASK_BLOCK per row
# ---------------------------------------------------------------------------------------------

cdef void bias_act_rows_(const real* x, const real* b, const real* dy, real* out, real* dbp, Py_ssize_t lo,
                         Py_ssize_t hi, Py_ssize_t n, int act, const Drop* dr) noexcept nogil:
    """Forward (dy NULL): out = act(x + b) * m.  Backward: out = dx = dy * m * act'(x + b), and
    dbp[j] += dx[i, j] over the rows (when dbp is given)."""
    cdef real mul[MASK_BLOCK]
    cdef real zeros[MASK_BLOCK]
    cdef Py_ssize_t i, j, j0, nb
    cdef const real* bj
    cdef real* o
    for j in range(MASK_BLOCK):
        mul[j] = 1                              # no dropout: multipliers of one
        zeros[j] = 0                            # no bias: a bias of zeros
    for i in range(lo, hi):
        for j0 in range(0, n, 512):             # step MASK_BLOCK (a literal for a C loop)
            nb = min(<Py_ssize_t> MASK_BLOCK, n - j0)
            if dr.on:
                keep_mul_(mul, <uint64_t> (i * n + j0), nb, dr)
            bj = (b + j0) if b != NULL else zeros
            o = out + i * n + j0
            if dy == NULL:
                act_fwd_(x + i * n + j0, bj, mul, o, nb, act)
            else:
                act_bwd_(x + i * n + j0, bj, dy + i * n + j0, mul, o, nb, act)
                if dbp != NULL:
                    for j in range(nb):
                        dbp[j0 + j] = dbp[j0 + j] + o[j]


cdef void bias_act_core_(const real* x, const real* b, const real* dy, real* out, real* part, real* db,
                         Py_ssize_t m, Py_ssize_t n, int act, double p, uint64_t seed,
                         int num_threads) noexcept nogil:
    """part: (nt * n,) per-thread partial sums of db (NULL when db is not wanted)."""
    cdef Drop dr = drop_(p, seed)
    cdef Py_ssize_t t, lo, hi, j, nt = max(1, min(num_threads, m))
    if n == 0:
        return
    if part != NULL:
        for j in range(nt * n):
            part[j] = 0
    if nt == 1:
        bias_act_rows_(x, b, dy, out, part, 0, m, n, act, &dr)
    else:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo, hi = chunk_(m, nt, t)
            bias_act_rows_(x, b, dy, out, (part + t * n) if part != NULL else NULL, lo, hi, n, act, &dr)
    if part != NULL:
        fixed_order_col_sums_(part, nt, n, db)


def bias_act_forward_ptr(size_t x, size_t b, size_t y, Py_ssize_t m, Py_ssize_t n, int act, double p,
                         uint64_t seed, int num_threads, bint dbl):
    """y = act(x + b) * Z / (1 - p) over m rows of n (b = 0: no bias; p = 0: no dropout).
    Releases the GIL."""
    with nogil:
        if dbl:
            bias_act_core_(<const double*> x, <const double*> b, NULL, <double*> y, NULL, NULL, m, n, act, p,
                           seed, num_threads)
        else:
            bias_act_core_(<const float*> x, <const float*> b, NULL, <float*> y, NULL, NULL, m, n, act, p,
                           seed, num_threads)


def bias_act_backward_ptr(size_t x, size_t b, size_t dy, size_t dx, size_t part, size_t db, Py_ssize_t m,
                          Py_ssize_t n, int act, double p, uint64_t seed, int num_threads, bint dbl):
    """dx = dy * Z / (1 - p) * act'(x + b); db = sum over rows of dx when db != 0, through part
    ((num_threads * n,) scratch).  dx may be dy.  Releases the GIL."""
    with nogil:
        if dbl:
            bias_act_core_(<const double*> x, <const double*> b, <const double*> dy, <double*> dx,
                           <double*> part if db != 0 else NULL, <double*> db, m, n, act, p, seed, num_threads)
        else:
            bias_act_core_(<const float*> x, <const float*> b, <const float*> dy, <float*> dx,
                           <float*> part if db != 0 else NULL, <float*> db, m, n, act, p, seed, num_threads)


# ---------------------------------------------------------------------------------------------
# the multipliers alone, for tests: the spans the kernels cut at multiples of 2^32 are reachable
# here without a 2^32-element tensor
# ---------------------------------------------------------------------------------------------

def mask_ptr(size_t out, uint64_t k0, Py_ssize_t n, double p, uint64_t seed, bint dbl):
    """out[j] = Z_(k0 + j) / (1 - p) for j < n: the multipliers every kernel here applies."""
    cdef Drop dr = drop_(p, seed)
    cdef Py_ssize_t j0, nb
    with nogil:
        for j0 in range(0, n, 512):             # step MASK_BLOCK
            nb = min(<Py_ssize_t> MASK_BLOCK, n - j0)
            if dbl:
                keep_mul_((<double*> out) + j0, k0 + <uint64_t> j0, nb, &dr)
            else:
                keep_mul_((<float*> out) + j0, k0 + <uint64_t> j0, nb, &dr)
