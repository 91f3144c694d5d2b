# cython: language_level=3
"""LayerNorm / RMSNorm / fused residual-add + norm on the CPU: forward and backward.

Rows are independent: an (M, N) buffer holds M rows of N = prod(normalized_shape) features.
Each OpenMP thread takes one contiguous chunk of rows (static schedule), so the rows it writes
are the pages it first touches, and its weight/bias partial sums land in its own row of a
(threads, N) buffer that is reduced in a fixed order: no atomics, the same bits for the same
thread count.

Per row, forward (v = x, or v = x + r for the fused residual, or v = x Z / (1 - p) + r with
dropout on the branch x (_dropout_mask.pxd's counter-based mask over the element index; never
stored, regenerated in backward), built in a per-thread scratch row that stays in L1 unless the
caller asks for the sum s):
    mu   = v[0] + mean(v - v[0])                (0 for RMSNorm)
    rstd = 1 / sqrt(mean((v - mu)^2) + eps)
    y    = (v - mu) * rstd * w + b
The statistics and the row backward are _row_norm.pxd's (shared with the layer-normalized
recurrent cells); the shift by the row's own first value makes a constant row exactly the bias.
The row is read from memory once; the later passes over it run from L1/L2.
Memory traffic per element: forward reads x (and r), writes y (and s = x + r if asked);
backward reads v (or x and r), dy (and ds), writes dx.

Missing affine parameters are passed by the caller as w = 1, b = 0 (an N-vector that stays in L1).
The kernels never allocate, never validate: fastseq/layer_norm.py does both.  Every entry runs
without the GIL, at every thread count.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint64_t

from _common cimport real, chunk_, fixed_order_col_sums_, ptr_
from _dropout_mask cimport Drop, drop_, keep_mul_, MASK_BLOCK
from _row_norm cimport row_norm_bwd_, row_stats_


cdef inline const real* row_input_(const real* x, const real* r, real* dst, Py_ssize_t n, uint64_t k0,
                                   const Drop* dr) noexcept nogil:
    """The row to normalize: x itself, or x + r written to dst, or x Z / (1 - p) + r when dr.on
    (k0: the flat index of the row's first element)."""
    cdef Py_ssize_t j, j0, nb
    cdef real mul[MASK_BLOCK]
    if r == NULL:
        return x
    if not dr.on:
        for j in range(n):
            dst[j] = x[j] + r[j]
        return dst
    for j0 in range(0, n, 512):                 # step MASK_BLOCK (a literal for a C loop)
        nb = min(<Py_ssize_t> MASK_BLOCK, n - j0)
        keep_mul_(mul, k0 + <uint64_t> j0, nb, dr)
        for j in range(nb):
            dst[j0 + j] = x[j0 + j] * mul[j] + r[j0 + j]
    return dst


cdef inline void row_drop_(const real* g, real* out, Py_ssize_t n, uint64_t k0, const Drop* dr) noexcept nogil:
    """out = g Z / (1 - p) over a row (the gradient of the dropped branch)."""
    cdef Py_ssize_t j, j0, nb
    cdef real mul[MASK_BLOCK]
    for j0 in range(0, n, 512):                 # step MASK_BLOCK
        nb = min(<Py_ssize_t> MASK_BLOCK, n - j0)
        keep_mul_(mul, k0 + <uint64_t> j0, nb, dr)
        for j in range(nb):
            out[j0 + j] = g[j0 + j] * mul[j]


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

cdef void fwd_rows_(const real* x, const real* r, const real* w, const real* b,
                    real* y, real* s, real* scratch, real* mean, real* rstd,
                    Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n, real eps, bint center, const Drop* dr) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* v
    cdef real* yi
    cdef real mu, rs
    for i in range(lo, hi):
        v = row_input_(x + i * n, NULL if r == NULL else r + i * n,
                       scratch if s == NULL else s + i * n, n, <uint64_t> (i * n), dr)
        # two passes (shifted mean, then centered squares): a one-pass formula loses ~n ulps of
        # the variance when the shift is an outlier channel, which real models have
        row_stats_(v, n, eps, center, &mu, &rs)
        mean[i] = mu
        rstd[i] = rs
        yi = y + i * n
        for j in range(n):                      # (v - mu) first: exact zeros for a constant row
            yi[j] = ((v[j] - mu) * rs) * w[j] + b[j]


cdef void forward_core_(const real* px, const real* pr, const real* pw, const real* pb, real* py, real* ps,
                        real* pscr, real* pmean, real* prstd, Py_ssize_t m, Py_ssize_t n, real e,
                        bint center, int num_threads, double p, uint64_t seed) noexcept nogil:
    """forward() on pointers (NULL for an absent buffer).  One row (or one thread) runs without
    opening an OpenMP region.  p > 0 (with pr): dropout on x."""
    cdef Py_ssize_t t, lo, hi, nt = max(1, min(num_threads, m))
    cdef Drop dr = drop_(p if pr != NULL else 0.0, seed)
    if m == 0 or n == 0:
        return
    if nt == 1:
        fwd_rows_(px, pr, pw, pb, py, ps, pscr, pmean, prstd, 0, m, n, e, center, &dr)
        return
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        lo, hi = chunk_(m, nt, t)
        fwd_rows_(px, pr, pw, pb, py, ps, (pscr + t * n) if pscr != NULL else NULL,
                  pmean, prstd, lo, hi, n, e, center, &dr)


def forward(real[::1] x, real[::1] r, real[::1] w, real[::1] b,
            real[::1] y, real[::1] s, real[::1] scratch, real[::1] mean, real[::1] rstd,
            Py_ssize_t m, Py_ssize_t n, double eps, bint center, int num_threads):
    """y = norm(x [+ r]) * w + b over rows of n.

    x, y: (m*n,).  r: (m*n,) or empty.  w, b: (n,).  mean, rstd: (m,) outputs.
    s: (m*n,) receives x + r, or empty.  scratch: (num_threads*n,) when r is given without s.
    """
    with nogil:
        forward_core_(ptr_(x), ptr_(r), ptr_(w), ptr_(b), ptr_(y), ptr_(s), ptr_(scratch), ptr_(mean),
                      ptr_(rstd), m, n, <real> eps, center, num_threads, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# backward
#
# With xhat = (v - mu) * rstd and g = dy * w, the normalized output is y = xhat * w + b, and
#     dv      = rstd * (g - mean(g) - xhat * mean(g * xhat))          (LayerNorm)
#     dv      = rstd * (g - xhat * mean(g * xhat))                     (RMSNorm: mu = 0, no mean(g))
# (row_norm_bwd_ in _row_norm.pxd).  For the fused residual the same dv is the gradient of both
# x and r; a gradient ds arriving at the returned sum adds to it.  With dropout on the branch
# (v = x Z / (1 - p) + r) dv + ds is r's gradient and x's is (dv + ds) Z / (1 - p), written to
# dxd in the same row pass (the mask regenerated from the element index).
#     dw = sum_rows dy * xhat,   db = sum_rows dy
# xhat is rebuilt from the saved mean and rstd exactly as the forward formed it.
# Traffic per element: read v (or x and r), dy (and ds), write dv; the partials stay in cache.
# ---------------------------------------------------------------------------------------------

cdef void bwd_rows_(const real* x, const real* r, const real* dy, const real* ds, const real* w,
                    const real* mean, const real* rstd, real* dx, real* dxd, real* dwp, real* dbp, real* scratch,
                    Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n, bint center, const Drop* dr) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* v
    cdef const real* dyi
    cdef const real* dsi
    cdef real* dxi
    cdef real mu, rs
    for i in range(lo, hi):
        v = row_input_(x + i * n, NULL if r == NULL else r + i * n, scratch, n, <uint64_t> (i * n), dr)
        dyi = dy + i * n
        dxi = dx + i * n
        mu = mean[i]
        rs = rstd[i]
        row_norm_bwd_(dyi, w, v, mu, rs, rs, dxi, n, center)
        # separate loops: each has one store stream, so gcc vectorizes with cheap alias checks
        if dwp != NULL:
            for j in range(n):
                dwp[j] = dwp[j] + dyi[j] * ((v[j] - mu) * rs)
            for j in range(n):
                dbp[j] = dbp[j] + dyi[j]
        if ds != NULL:
            dsi = ds + i * n
            for j in range(n):
                dxi[j] = dxi[j] + dsi[j]
        if dxd != NULL:
            row_drop_(dxi, dxd + i * n, n, <uint64_t> (i * n), dr)


cdef void backward_core_(const real* px, const real* pr, const real* pdy, const real* pds, const real* pw,
                         const real* pmean, const real* prstd, real* pdx, real* pdxd, real* ppart, real* pscr,
                         real* pdw, real* pdb, Py_ssize_t m, Py_ssize_t n, bint center, int num_threads, double p,
                         uint64_t seed) noexcept nogil:
    """backward() on pointers (NULL for an absent buffer; ppart NULL when neither dw nor db is
    wanted).  p > 0: the forward dropped x (pr given: the sum is rebuilt with the mask; pdxd
    receives x's gradient)."""
    cdef Py_ssize_t t, lo, hi, j, nt = max(1, min(num_threads, m))
    cdef Drop dr = drop_(p, seed)
    cdef real* pdbp = (ppart + nt * n) if ppart != NULL else NULL
    if n == 0:
        return
    if ppart != NULL:
        for j in range(2 * nt * n):
            ppart[j] = 0
    if nt == 1:
        bwd_rows_(px, pr, pdy, pds, pw, pmean, prstd, pdx, pdxd, ppart, pdbp, pscr, 0, m, n, center, &dr)
    else:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo, hi = chunk_(m, nt, t)
            bwd_rows_(px, pr, pdy, pds, pw, pmean, prstd, pdx, pdxd,
                      (ppart + t * n) if ppart != NULL else NULL,
                      (pdbp + t * n) if pdbp != NULL else NULL,
                      (pscr + t * n) if pscr != NULL else NULL,
                      lo, hi, n, center, &dr)
    if pdw != NULL:
        fixed_order_col_sums_(ppart, nt, n, pdw)
    if pdb != NULL:
        fixed_order_col_sums_(pdbp, nt, n, pdb)


def backward(real[::1] x, real[::1] r, real[::1] dy, real[::1] ds, real[::1] w,
             real[::1] mean, real[::1] rstd, real[::1] dx, real[::1] partial, real[::1] scratch,
             real[::1] dw, real[::1] db, Py_ssize_t m, Py_ssize_t n, bint center, int num_threads):
    """Gradients of forward().

    x: the normalized input, or with r (m*n,) the two summands (the sum is rebuilt per row in
    scratch, (num_threads*n,)).  ds: gradient at the returned sum, or empty.  dx: (m*n,) output.
    dw, db: (n,) outputs, or empty when not wanted; partial: (2*num_threads*n,) scratch when
    either is wanted.
    """
    cdef bint want = dw.shape[0] > 0 or db.shape[0] > 0
    with nogil:
        backward_core_(ptr_(x), ptr_(r), ptr_(dy), ptr_(ds), ptr_(w), ptr_(mean), ptr_(rstd), ptr_(dx), NULL,
                       ptr_(partial) if want else NULL, ptr_(scratch), ptr_(dw), ptr_(db), m, n, center,
                       num_threads, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# pointer entry: the same forward on raw addresses (tensor.data_ptr()), for the per-call path.
# A typed-memoryview argument costs ~0.5-1 us to acquire and a tensor's .numpy() view ~1-2 us;
# for a (1, 512) row the kernel itself takes ~0.3 us, so a decoding step pays for the plumbing,
# not the math.  One row (or one thread) runs without opening an OpenMP region.
# ---------------------------------------------------------------------------------------------

def forward_ptr(size_t x, size_t r, size_t w, size_t b, size_t y, size_t s, size_t scratch, size_t mean,
                size_t rstd, Py_ssize_t m, Py_ssize_t n, double eps, bint center, int num_threads, bint dbl,
                double p=0.0, uint64_t seed=0):
    """forward() on addresses (0 for an absent buffer); dbl: the buffers hold doubles, else floats.
    p > 0 (with r): the normalized row is x Z / (1 - p) + r, Z the mask keyed by seed.  Releases
    the GIL for the whole call."""
    with nogil:
        if dbl:
            forward_core_(<const double*> x, <const double*> r, <const double*> w, <const double*> b,
                          <double*> y, <double*> s, <double*> scratch, <double*> mean, <double*> rstd,
                          m, n, <double> eps, center, num_threads, p, seed)
        else:
            forward_core_(<const float*> x, <const float*> r, <const float*> w, <const float*> b,
                          <float*> y, <float*> s, <float*> scratch, <float*> mean, <float*> rstd,
                          m, n, <float> eps, center, num_threads, p, seed)


def backward_ptr(size_t x, size_t r, size_t dy, size_t ds, size_t w, size_t mean, size_t rstd, size_t dx,
                 size_t dxd, size_t partial, size_t scratch, size_t dw, size_t db, Py_ssize_t m, Py_ssize_t n,
                 bint center, int num_threads, bint dbl, double p=0.0, uint64_t seed=0):
    """backward() on addresses (0 for an absent buffer; partial is used when dw or db is given).
    p > 0: the forward dropped x with the mask keyed by seed; dx is then the residual's gradient
    and dxd (when given) x's.  Releases the GIL."""
    cdef bint want = dw != 0 or db != 0
    with nogil:
        if dbl:
            backward_core_(<const double*> x, <const double*> r, <const double*> dy, <const double*> ds,
                           <const double*> w, <const double*> mean, <const double*> rstd, <double*> dx,
                           <double*> dxd, <double*> partial if want else NULL, <double*> scratch, <double*> dw,
                           <double*> db, m, n, center, num_threads, p, seed)
        else:
            backward_core_(<const float*> x, <const float*> r, <const float*> dy, <const float*> ds,
                           <const float*> w, <const float*> mean, <const float*> rstd, <float*> dx,
                           <float*> dxd, <float*> partial if want else NULL, <float*> scratch, <float*> dw,
                           <float*> db, m, n, center, num_threads, p, seed)
