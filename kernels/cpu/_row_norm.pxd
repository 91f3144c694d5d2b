# Row statistics and the layer-norm row backward, written once for every kernel that normalizes
# a row: layer_norm.pyx (LayerNorm, RMSNorm, residual-add + norm) and the layer-normalized
# recurrent cells (_recurrent_layer_norm.pxi).
#
# Statistics of a row v of n:
#     K    = v[0]                                   (a shift: one of the row's own values)
#     mu   = K + sum(v - K) / n                     (0 for RMSNorm)
#     rstd = 1 / sqrt(sum((v - mu)^2) / n + eps)
#     xhat = (v - mu) * rstd
# The shift makes a constant row exact: v - K is exactly 0, so mu == v[0], v - mu == 0, and
# xhat == 0 however large 1 / sqrt(eps) is (an unshifted fp32 sum rounds: 3.3 summed 768 times
# and divided by 768 is not 3.3, and at eps = 1e-12 the difference times rstd = 1e6 is O(1)).
# A near-constant row with a large offset sums small exact differences instead of large values.
# xhat is (v - mu) * rstd, never v * rstd - mu * rstd: the rounding of mu * rstd is of the size
# of the offset times rstd, not of the deviation.
#
# Two reads of the row (the shifted sum, then the centered squares) and the caller's write pass;
# the first read brings the row into L1, the others run from there.  A single running sum is
# one long chain of dependent adds (latency-bound): the reductions keep LANES independent
# partial sums, which gcc turns into several vector accumulators.
#
# Backward through xhat = (v - mu) * rstd with g = dy * w (the normalized output y = xhat w + b):
#     dv = rstd * (g - mean(g) - xhat * mean(g * xhat))          (LayerNorm)
#     dv = rstd * (g - xhat * mean(g * xhat))                     (RMSNorm: mu = 0, no mean(g))
# because d mu / dv = 1/N and d rstd / dv = -rstd^3 (v - mu) / N.

from _common cimport real, rsqrt_, LANES


cdef inline real row_sum_dev_(const real* a, real k, Py_ssize_t n) noexcept nogil:
    """sum(a - k) over the row, in LANES partial sums."""
    cdef real part[LANES]
    cdef real acc = 0
    cdef Py_ssize_t j, l, nb = n - n % LANES
    for l in range(LANES):
        part[l] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        for l in range(LANES):
            part[l] = part[l] + (a[j + l] - k)
    for j in range(nb, n):
        acc = acc + (a[j] - k)
    for l in range(LANES):
        acc = acc + part[l]
    return acc


cdef inline real row_sq_dev_(const real* a, real mu, Py_ssize_t n) noexcept nogil:
    """sum((a - mu)^2) over the row, in LANES partial sums."""
    cdef real part[LANES]
    cdef real acc = 0, d
    cdef Py_ssize_t j, l, nb = n - n % LANES
    for l in range(LANES):
        part[l] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        for l in range(LANES):
            d = a[j + l] - mu
            part[l] = part[l] + d * d
    for j in range(nb, n):
        d = a[j] - mu
        acc = acc + d * d
    for l in range(LANES):
        acc = acc + part[l]
    return acc


cdef inline void row_stats_(const real* v, Py_ssize_t n, real eps, bint center, real* mean,
                            real* rstd) noexcept nogil:
    """mean (0 unless center) and rstd of the row v of n > 0 (see the top of this file)."""
    cdef real k = v[0] if center else 0
    cdef real mu = (k + row_sum_dev_(v, k, n) / n) if center else 0
    mean[0] = mu
    rstd[0] = rsqrt_(row_sq_dev_(v, mu, n) / n + eps)


cdef inline void row_normalize_(const real* v, real mu, real rs, real* vhat, Py_ssize_t n) noexcept nogil:
    """vhat = (v - mu) * rs."""
    cdef Py_ssize_t j
    for j in range(n):
        vhat[j] = (v[j] - mu) * rs


cdef inline void row_norm_bwd_(const real* dy, const real* w, const real* v, real mu, real vs, real rstd,
                               real* dx, Py_ssize_t n, bint center) noexcept nogil:
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w, xhat = (v - mu) vs (see the top of this
    file; without center the mean(g) term is dropped).  layer_norm passes the row itself with
    vs = rstd; a caller that kept xhat passes it as v with mu = 0, vs = 1.  dx may be dy.

    g is stored in dx by the first pass and read back by the second: a rounded g, the same one the
    sums saw.  Formed again in the second pass, gcc would contract dy w - mean(g) into one FMA
    (dy w unrounded), and g - mean(g) of a one-element row would be its rounding error, not 0."""
    cdef real pg[LANES]
    cdef real pgx[LANES]
    cdef real sg = 0, sgx = 0, g, c1, c2
    cdef Py_ssize_t j, l, nb = n - n % LANES
    for l in range(LANES):
        pg[l] = 0
        pgx[l] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        for l in range(LANES):
            g = dy[j + l] * w[j + l]
            dx[j + l] = g
            pg[l] = pg[l] + g
            pgx[l] = pgx[l] + g * ((v[j + l] - mu) * vs)
    for j in range(nb, n):
        g = dy[j] * w[j]
        dx[j] = g
        sg = sg + g
        sgx = sgx + g * ((v[j] - mu) * vs)
    for l in range(LANES):
        sg = sg + pg[l]
        sgx = sgx + pgx[l]
    c1 = sg / n if center else 0
    c2 = sgx / n
    for j in range(n):
        dx[j] = rstd * (dx[j] - c1 - ((v[j] - mu) * vs) * c2)
