# cython: language_level=3
"""LayerNorm / RMSNorm / fused residual-add + norm on the CPU: forward and backward.

Rows are independent: an (M, N) buffer holds M rows of N = prod(normalized_shape) features.
Each OpenMP thread takes one contiguous chunk of rows (static schedule), so the rows it writes
are the pages it first touches, and its weight/bias partial sums land in its own row of a
(threads, N) buffer that is reduced in a fixed order: no atomics, the same bits for the same
thread count.

Per row, forward (v = x, or v = x + r for the fused residual, built in a per-thread scratch row
that stays in L1 unless the caller asks for the sum s):
    mu   = mean(v)                          (0 for RMSNorm)
    rstd = 1 / sqrt(mean((v - mu)^2) + eps)
    y    = (v - mu) * rstd * w + b
The row is read from memory once; the later passes over it run from L1/L2.
Memory traffic per element: forward reads x (and r), writes y (and s = x + r if asked);
backward reads v (or x and r), dy (and ds), writes dx.

Missing affine parameters are passed by the caller as w = 1, b = 0 (an N-vector that stays in L1).
The kernels never allocate, never validate: fastseq/layer_norm.py does both.
"""
from cython.parallel cimport prange

from _common cimport real, rsqrt_, chunk_, LANES


cdef inline real* ptr_(real[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


# ---------------------------------------------------------------------------------------------
# row reductions.  A single running sum is one long chain of dependent adds (latency-bound);
# these keep LANES independent partial sums, which gcc turns into several vector accumulators.
# ---------------------------------------------------------------------------------------------

cdef inline real row_sum_(const real* a, Py_ssize_t n) noexcept nogil:
    cdef real part[LANES]
    cdef real acc = 0
    cdef Py_ssize_t j, k, nb = n - n % LANES
    for k in range(LANES):
        part[k] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        for k in range(LANES):
            part[k] = part[k] + a[j + k]
    for j in range(nb, n):
        acc = acc + a[j]
    for k in range(LANES):
        acc = acc + part[k]
    return acc


cdef inline real row_sq_dev_(const real* a, real mu, Py_ssize_t n) noexcept nogil:
    cdef real part[LANES]
    cdef real acc = 0, d
    cdef Py_ssize_t j, k, nb = n - n % LANES
    for k in range(LANES):
        part[k] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        for k in range(LANES):
            d = a[j + k] - mu
            part[k] = part[k] + d * d
    for j in range(nb, n):
        d = a[j] - mu
        acc = acc + d * d
    for k in range(LANES):
        acc = acc + part[k]
    return acc


cdef inline void row_grad_sums_(const real* v, const real* dy, const real* w, real rs, real nmr,
                                Py_ssize_t n, real* sg, real* sgx) noexcept nogil:
    """sg = sum(g), sgx = sum(g * xhat) with g = dy * w, xhat = v * rs + nmr."""
    cdef real pg[LANES]
    cdef real pgx[LANES]
    cdef real ag = 0, agx = 0, g
    cdef Py_ssize_t j, k, nb = n - n % LANES
    for k in range(LANES):
        pg[k] = 0
        pgx[k] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        for k in range(LANES):
            g = dy[j + k] * w[j + k]
            pg[k] = pg[k] + g
            pgx[k] = pgx[k] + g * (v[j + k] * rs + nmr)
    for j in range(nb, n):
        g = dy[j] * w[j]
        ag = ag + g
        agx = agx + g * (v[j] * rs + nmr)
    for k in range(LANES):
        ag = ag + pg[k]
        agx = agx + pgx[k]
    sg[0] = ag
    sgx[0] = agx


cdef inline const real* row_input_(const real* x, const real* r, real* dst, Py_ssize_t n) noexcept nogil:
    """The row to normalize: x itself, or x + r written to dst."""
    cdef Py_ssize_t j
    if r == NULL:
        return x
    for j in range(n):
        dst[j] = x[j] + r[j]
    return dst


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

cdef void fwd_rows_(const real* x, const real* r, const real* w, const real* b,
                    real* y, real* s, real* scratch, real* mean, real* rstd,
                    Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n, real eps, bint center) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* v
    cdef real* yi
    cdef real mu, rs, nmr
    for i in range(lo, hi):
        v = row_input_(x + i * n, NULL if r == NULL else r + i * n,
                       scratch if s == NULL else s + i * n, n)
        # two passes (exact mean, then centered squares): a one-pass shifted formula loses
        # ~n ulps of the variance when the shift is an outlier channel, which real models have
        mu = row_sum_(v, n) / n if center else 0
        rs = rsqrt_(row_sq_dev_(v, mu, n) / n + eps)
        mean[i] = mu
        rstd[i] = rs
        nmr = -mu * rs                          # y = (v * rs + nmr) * w + b: two FMAs
        yi = y + i * n
        for j in range(n):
            yi[j] = (v[j] * rs + nmr) * w[j] + b[j]


def forward(real[::1] x, real[::1] r, real[::1] w, real[::1] b,
            real[::1] y, real[::1] s, real[::1] scratch, real[::1] mean, real[::1] rstd,
            Py_ssize_t m, Py_ssize_t n, double eps, bint center, int num_threads):
    """y = norm(x [+ r]) * w + b over rows of n.

    x, y: (m*n,).  r: (m*n,) or empty.  w, b: (n,).  mean, rstd: (m,) outputs.
    s: (m*n,) receives x + r, or empty.  scratch: (num_threads*n,) when r is given without s.
    """
    cdef Py_ssize_t t, lo, hi, nt = max(1, min(num_threads, m))
    cdef real* px = ptr_(x)
    cdef real* pr = ptr_(r)
    cdef real* pw = ptr_(w)
    cdef real* pb = ptr_(b)
    cdef real* py = ptr_(y)
    cdef real* ps = ptr_(s)
    cdef real* pscr = ptr_(scratch)
    cdef real* pmean = ptr_(mean)
    cdef real* prstd = ptr_(rstd)
    cdef real e = <real> eps
    if m == 0 or n == 0:
        return
    for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
        lo, hi = chunk_(m, nt, t)
        fwd_rows_(px, pr, pw, pb, py, ps, (pscr + t * n) if pscr != NULL else NULL,
                  pmean, prstd, lo, hi, n, e, center)


# ---------------------------------------------------------------------------------------------
# backward
#
# With xhat = (v - mu) * rstd and g = dy * w, the normalized output is y = xhat * w + b, and
#     dv      = rstd * (g - mean(g) - xhat * mean(g * xhat))          (LayerNorm)
#     dv      = rstd * (g - xhat * mean(g * xhat))                     (RMSNorm: mu = 0, no mean(g))
# because d mu / dv = 1/N and d rstd / dv = -rstd^3 (v - mu) / N.  For the fused residual the
# same dv is the gradient of both x and r; a gradient ds arriving at the returned sum adds to it.
#     dw = sum_rows dy * xhat,   db = sum_rows dy
# Traffic per element: read v (or x and r), dy (and ds), write dv; the partials stay in cache.
# ---------------------------------------------------------------------------------------------

cdef void bwd_rows_(const real* x, const real* r, const real* dy, const real* ds, const real* w,
                    const real* mean, const real* rstd, real* dx, real* dwp, real* dbp, real* scratch,
                    Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n, bint center) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* v
    cdef const real* dyi
    cdef const real* dsi
    cdef real* dxi
    cdef real rs, nmr, sg, sgx, c1, c2
    for i in range(lo, hi):
        v = row_input_(x + i * n, NULL if r == NULL else r + i * n, scratch, n)
        dyi = dy + i * n
        dxi = dx + i * n
        rs = rstd[i]
        nmr = -mean[i] * rs
        row_grad_sums_(v, dyi, w, rs, nmr, n, &sg, &sgx)
        c1 = sg / n if center else 0
        c2 = sgx / n
        # separate loops: each has one store stream, so gcc vectorizes with cheap alias checks
        for j in range(n):
            dxi[j] = rs * (dyi[j] * w[j] - c1 - (v[j] * rs + nmr) * c2)
        if dwp != NULL:
            for j in range(n):
                dwp[j] = dwp[j] + dyi[j] * (v[j] * rs + nmr)
            for j in range(n):
                dbp[j] = dbp[j] + dyi[j]
        if ds != NULL:
            dsi = ds + i * n
            for j in range(n):
                dxi[j] = dxi[j] + dsi[j]


def backward(real[::1] x, real[::1] r, real[::1] dy, real[::1] ds, real[::1] w,
             real[::1] mean, real[::1] rstd, real[::1] dx, real[::1] partial, real[::1] scratch,
             real[::1] dw, real[::1] db, Py_ssize_t m, Py_ssize_t n, bint center, int num_threads):
    """Gradients of forward().

    x: the normalized input, or with r (m*n,) the two summands (the sum is rebuilt per row in
    scratch, (num_threads*n,)).  ds: gradient at the returned sum, or empty.  dx: (m*n,) output.
    dw, db: (n,) outputs, or empty when not wanted; partial: (2*num_threads*n,) scratch when
    either is wanted.
    """
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
    cdef real* pscr = ptr_(scratch)
    cdef real* pdwp = ptr_(partial) if (want_dw or want_db) else NULL
    cdef real* pdbp = (pdwp + nt * n) if pdwp != NULL else NULL
    cdef real acc
    if n == 0:
        return
    if pdwp != NULL:
        for j in range(2 * nt * n):
            pdwp[j] = 0
    if m > 0:
        for t in prange(nt, nogil=True, num_threads=nt, schedule="static", chunksize=1):
            lo, hi = chunk_(m, nt, t)
            bwd_rows_(px, pr, pdy, pds, pw, pmean, prstd, pdx,
                      (pdwp + t * n) if pdwp != NULL else NULL,
                      (pdbp + t * n) if pdbp != NULL else NULL,
                      (pscr + t * n) if pscr != NULL else NULL,
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


# ---------------------------------------------------------------------------------------------
# pointer entry: the same forward on raw addresses (tensor.data_ptr()), for the per-call path.
# A typed-memoryview argument costs ~0.5-1 us to acquire and a tensor's .numpy() view ~1-2 us;
# for a (1, 512) row the kernel itself takes ~0.3 us, so a decoding step pays for the plumbing,
# not the math.  One row (or one thread) runs without opening an OpenMP region.
# ---------------------------------------------------------------------------------------------

cdef void forward_core_(const real* px, const real* pr, const real* pw, const real* pb, real* py, real* ps,
                        real* pscr, real* pmean, real* prstd, Py_ssize_t m, Py_ssize_t n, real e,
                        bint center, int num_threads) noexcept nogil:
    cdef Py_ssize_t t, lo, hi, nt = max(1, min(num_threads, m))
    if m == 0 or n == 0:
        return
    if nt == 1:
        fwd_rows_(px, pr, pw, pb, py, ps, pscr, pmean, prstd, 0, m, n, e, center)
        return
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        lo, hi = chunk_(m, nt, t)
        fwd_rows_(px, pr, pw, pb, py, ps, (pscr + t * n) if pscr != NULL else NULL,
                  pmean, prstd, lo, hi, n, e, center)


def forward_ptr(size_t x, size_t r, size_t w, size_t b, size_t y, size_t s, size_t scratch, size_t mean,
                size_t rstd, Py_ssize_t m, Py_ssize_t n, double eps, bint center, int num_threads, bint dbl):
    """forward() on addresses (0 for an absent buffer); dbl: the buffers hold doubles, else floats.
    Releases the GIL for the whole call."""
    with nogil:
        if dbl:
            forward_core_(<const double*> x, <const double*> r, <const double*> w, <const double*> b,
                          <double*> y, <double*> s, <double*> scratch, <double*> mean, <double*> rstd,
                          m, n, <double> eps, center, num_threads)
        else:
            forward_core_(<const float*> x, <const float*> r, <const float*> w, <const float*> b,
                          <float*> y, <float*> s, <float*> scratch, <float*> mean, <float*> rstd,
                          m, n, <float> eps, center, num_threads)
