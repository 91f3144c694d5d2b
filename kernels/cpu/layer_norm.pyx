# cython: language_level=3
"""LayerNorm / RMSNorm / fused residual-add + norm on the CPU: forward and backward.

Rows are independent: an (M, N) buffer holds M rows of N = prod(normalized_shape) features.
Each OpenMP thread takes one contiguous chunk of rows (static schedule), so the rows it writes
are the pages it first touches, and its weight/bias partial sums land in its own row of a
(threads, N) buffer that is reduced in a fixed order: no atomics, the same bits for the same
thread count.

Per row, forward (v = x, or v = x + r for the fused residual):
    mu   = mean(v)                          (0 for RMSNorm)
    rstd = 1 / sqrt(mean((v - mu)^2) + eps)
    y    = (v - mu) * rstd * w + b
The row is read from memory once; the three passes over it run from L1/L2.
Memory traffic per element: forward reads x (and r), writes y (and s = x + r if asked);
backward reads v (or x and r), dy (and ds), writes dx.

Missing affine parameters are passed by the caller as w = 1, b = 0 (an N-vector that stays in L1).
The kernels never allocate, never validate: fastseq/layer_norm.py does both.
"""
from cython.parallel cimport prange

from _common cimport real, rsqrt_, chunk_


cdef inline real* ptr_(real[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


# ---------------------------------------------------------------------------------------------
# row helpers: v is a, or a + b when b is not NULL
# ---------------------------------------------------------------------------------------------

cdef inline real row_sum_(const real* a, const real* b, Py_ssize_t n) noexcept nogil:
    cdef real acc = 0
    cdef Py_ssize_t j
    if b == NULL:
        for j in range(n):
            acc = acc + a[j]
    else:
        for j in range(n):
            acc = acc + (a[j] + b[j])
    return acc


cdef inline real row_sq_dev_(const real* a, const real* b, real mu, Py_ssize_t n) noexcept nogil:
    cdef real acc = 0, d
    cdef Py_ssize_t j
    if b == NULL:
        for j in range(n):
            d = a[j] - mu
            acc = acc + d * d
    else:
        for j in range(n):
            d = (a[j] + b[j]) - mu
            acc = acc + d * d
    return acc


cdef void fwd_rows_(const real* x, const real* r, const real* w, const real* b,
                    real* y, real* s, real* mean, real* rstd,
                    Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n, real eps, bint center) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* v
    cdef const real* vr
    cdef real* si
    cdef real* yi
    cdef real mu, rs
    for i in range(lo, hi):
        v = x + i * n
        vr = NULL if r == NULL else r + i * n
        if vr != NULL and s != NULL:            # materialize s = x + r, then normalize s
            si = s + i * n
            for j in range(n):
                si[j] = v[j] + vr[j]
            v = si
            vr = NULL
        mu = row_sum_(v, vr, n) / n if center else 0
        rs = rsqrt_(row_sq_dev_(v, vr, mu, n) / n + eps)
        mean[i] = mu
        rstd[i] = rs
        yi = y + i * n
        if vr == NULL:
            for j in range(n):
                yi[j] = (v[j] - mu) * rs * w[j] + b[j]
        else:
            for j in range(n):
                yi[j] = ((v[j] + vr[j]) - mu) * rs * w[j] + b[j]


def forward(real[::1] x, real[::1] r, real[::1] w, real[::1] b,
            real[::1] y, real[::1] s, real[::1] mean, real[::1] rstd,
            Py_ssize_t m, Py_ssize_t n, double eps, bint center, int num_threads):
    """y = norm(x [+ r]) * w + b over rows of n.  x, y: (m*n,); r, s: (m*n,) or empty;
    w, b: (n,); mean, rstd: (m,) outputs.  s, when given, receives x + r."""
    cdef Py_ssize_t t, lo, hi, nt = max(1, min(num_threads, m))
    cdef real* px = ptr_(x)
    cdef real* pr = ptr_(r)
    cdef real* pw = ptr_(w)
    cdef real* pb = ptr_(b)
    cdef real* py = ptr_(y)
    cdef real* ps = ptr_(s)
    cdef real* pmean = ptr_(mean)
    cdef real* prstd = ptr_(rstd)
    cdef real e = <real> eps
    if m == 0 or n == 0:
        return
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
        lo, hi = chunk_(m, nt, t)
        fwd_rows_(px, pr, pw, pb, py, ps, pmean, prstd, lo, hi, n, e, center)


# ---------------------------------------------------------------------------------------------
# backward
#
# With xhat = (v - mu) * rstd and g = dy * w, the normalized output is y = xhat * w + b, and
#     dxhat   = g
#     dv      = rstd * (g - mean(g) - xhat * mean(g * xhat))          (LayerNorm)
#     dv      = rstd * (g - xhat * mean(g * xhat))                     (RMSNorm: mu = 0, no mean(g))
# because d mu / dv = 1/N and d rstd / dv = -rstd^3 (v - mu) / N.  For the fused residual the
# same dv is the gradient of both x and r; a gradient ds arriving at the returned sum adds to it.
#     dw = sum_rows dy * xhat,   db = sum_rows dy
# Traffic per element: read v (or x, r), dy (and ds), write dv; the partials stay in cache.
# ---------------------------------------------------------------------------------------------

cdef void bwd_rows_(const real* x, const real* r, const real* dy, const real* ds, const real* w,
                    const real* mean, const real* rstd, real* dx, real* dwp, real* dbp,
                    Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n, bint center) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* v
    cdef const real* vr
    cdef const real* dyi
    cdef const real* dsi
    cdef real* dxi
    cdef real mu, rs, xh, g, sg, sgx, c1, c2
    for i in range(lo, hi):
        v = x + i * n
        vr = NULL if r == NULL else r + i * n
        dyi = dy + i * n
        dxi = dx + i * n
        mu = mean[i]
        rs = rstd[i]
        sg = 0
        sgx = 0
        if vr == NULL:
            for j in range(n):
                g = dyi[j] * w[j]
                sg = sg + g
                sgx = sgx + g * ((v[j] - mu) * rs)
        else:
            for j in range(n):
                g = dyi[j] * w[j]
                sg = sg + g
                sgx = sgx + g * (((v[j] + vr[j]) - mu) * rs)
        c1 = sg / n if center else 0
        c2 = sgx / n
        if vr == NULL:
            for j in range(n):
                xh = (v[j] - mu) * rs
                dxi[j] = rs * (dyi[j] * w[j] - c1 - xh * c2)
        else:
            for j in range(n):
                xh = ((v[j] + vr[j]) - mu) * rs
                dxi[j] = rs * (dyi[j] * w[j] - c1 - xh * c2)
        if ds != NULL:
            dsi = ds + i * n
            for j in range(n):
                dxi[j] = dxi[j] + dsi[j]
        if dwp != NULL:
            if vr == NULL:
                for j in range(n):
                    dwp[j] = dwp[j] + dyi[j] * ((v[j] - mu) * rs)
            else:
                for j in range(n):
                    dwp[j] = dwp[j] + dyi[j] * (((v[j] + vr[j]) - mu) * rs)
        if dbp != NULL:
            for j in range(n):
                dbp[j] = dbp[j] + dyi[j]


def backward(real[::1] x, real[::1] r, real[::1] dy, real[::1] ds, real[::1] w,
             real[::1] mean, real[::1] rstd, real[::1] dx,
             real[::1] dw_partial, real[::1] db_partial, real[::1] dw, real[::1] db,
             Py_ssize_t m, Py_ssize_t n, bint center, int num_threads):
    """Gradients of forward().  x: the normalized input, or x and r of the fused residual (the
    sum is rebuilt on the fly); ds: gradient at the returned sum, or empty.  dx: (m*n,) output.
    dw/db: (n,) outputs, or empty when not wanted; dw_partial/db_partial: (num_threads*n,)
    scratch when dw/db are wanted (the caller passes the thread count it sized them for)."""
    cdef Py_ssize_t t, lo, hi, j, k, nt = max(1, min(num_threads, m))
    cdef bint want_dw = dw.shape[0] > 0, want_db = db.shape[0] > 0
    cdef real* px = ptr_(x)
    cdef real* pr = ptr_(r)
    cdef real* pdy = ptr_(dy)
    cdef real* pds = ptr_(ds)
    cdef real* pw = ptr_(w)
    cdef real* pmean = ptr_(mean)
    cdef real* prstd = ptr_(rstd)
    cdef real* pdx = ptr_(dx)
    cdef real* pdwp = ptr_(dw_partial) if want_dw else NULL
    cdef real* pdbp = ptr_(db_partial) if want_db else NULL
    cdef real acc
    if n == 0:
        return
    for j in range(nt * n):
        if want_dw:
            pdwp[j] = 0
        if want_db:
            pdbp[j] = 0
    if m > 0:
        for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
            lo, hi = chunk_(m, nt, t)
            bwd_rows_(px, pr, pdy, pds, pw, pmean, prstd, pdx,
                      (pdwp + t * n) if want_dw else NULL,
                      (pdbp + t * n) if want_db else NULL,
                      lo, hi, n, center)
    # fixed-order reduction of the per-thread partial sums
    if want_dw:
        for j in range(n):
            acc = 0
            for k in range(nt):
                acc = acc + pdwp[k * n + j]
            dw[j] = acc
    if want_db:
        for j in range(n):
            acc = 0
            for k in range(nt):
                acc = acc + pdbp[k * n + j]
            db[j] = acc
