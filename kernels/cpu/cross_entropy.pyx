# cython: language_level=3
"""Softmax cross-entropy over rows of logits on the CPU: forward and backward, one pass each.

Row i of z (V logits), target t = t_i, class weights w (w = 1 without weights, W = sum_c w_c):
    lse  = m + log(sum_c exp(z_c - m)),  m = max_c z_c          (NaN-aware max, as fs_rowmaxf)
    loss = A w_t (lse - z_t) + B (W lse - sum_c w_c z_c) + Z lse^2
A and B carry the label smoothing (fastseq/cross_entropy.py):
    torch's     A = 1 - eps,              B = eps / V           (target 1 - eps + eps/V, others eps/V)
    fairseq's   A = 1 - eps - eps/(V-1),  B = eps / (V - 1)     (target 1 - eps, others eps/(V-1))
and Z is the z-loss coefficient.  A row whose target is ignore_index has loss 0 and weight 0.
Forward writes per row: loss, lse and the row's weight w_t (0 when ignored: the mean's
denominator).  The passes over a row (max, exponentials, gradient) run while the row
(V * 4 bytes: 128 KiB at V = 32000) stays in L2, so memory sees one read.

The gradient (p_c = exp(z_c - lse), g the row's gradient scale), written in the forward's pass
when asked (the caller knows g there for reductions "mean" and "sum": one scalar, and for
"none" scales the rows afterwards), so training reads the logits once:
    d/dz_c [w_t (lse - z_t)]              = w_t (p_c - [c = t])
    d/dz_c [sum_k w_k (lse - z_k)]        = W p_c - w_c
    d/dz_c [lse^2]                        = 2 lse p_c
so  dz_c = g (p_c K - B w_c) - g A w_t [c = t],   K = A w_t + B W + 2 Z lse.
Memory traffic: one read of z, one write of dz (dz may be z: the fused linear + cross-entropy
overwrites its chunk of logits with their gradient); one exponential per element (e_c is kept
in dz between the sum and the gradient).  Ignored rows get dz = 0.

Rows are independent: each OpenMP thread takes a contiguous chunk.  Targets are checked by the
caller; a target outside [0, V) here (other than ignore_index) is treated as ignored, never read.
"""
from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN
from libc.stdint cimport int64_t

from _common cimport real, chunk_, exp_, row_max_, LANES
from _row_norm cimport row_sum_dev_

cdef extern from * nogil:
    void __builtin_prefetch(const void* addr)

cdef extern from "<math.h>" nogil:
    double log(double)
    float logf(float)


cdef inline real log_(real v) noexcept nogil:
    if real is float:
        return logf(v)
    else:
        return log(v)


cdef inline real row_sum_exp_(const real* z, real m, Py_ssize_t n, const real* pf) noexcept nogil:
    """sum_j exp(z_j - m), in LANES partial sums; pf: the next row to prefetch (row_exp_into_)."""
    cdef real part[LANES]
    cdef real acc = 0
    cdef Py_ssize_t j, l, nb = n - n % LANES
    for l in range(LANES):
        part[l] = 0
    for j in range(0, nb, 32):                  # step LANES (a literal for a C loop)
        if pf != NULL:
            __builtin_prefetch(pf + j)
            __builtin_prefetch(pf + j + 16)
        for l in range(LANES):
            part[l] = part[l] + exp_(z[j + l] - m)
    for j in range(nb, n):
        acc = acc + exp_(z[j] - m)
    for l in range(LANES):
        acc = acc + part[l]
    return acc


cdef inline real row_exp_into_(const real* z, real m, real* e, Py_ssize_t n, const real* pf) noexcept nogil:
    """e_j = exp(z_j - m) (e may be z) and their sum, in LANES partial sums.  pf: the next row,
    prefetched a block at a time while this one computes (its max pass then reads from cache:
    the exponentials, not memory, set this pass's time), or NULL."""
    cdef real part[LANES]
    cdef real acc = 0, x
    cdef Py_ssize_t j, l, nb = n - n % LANES
    for l in range(LANES):
        part[l] = 0
    for j in range(0, nb, 32):                  # step LANES
        if pf != NULL:
            __builtin_prefetch(pf + j)
            __builtin_prefetch(pf + j + 16)
        for l in range(LANES):
            x = exp_(z[j + l] - m)
            e[j + l] = x
            part[l] = part[l] + x
    for j in range(nb, n):
        x = exp_(z[j] - m)
        e[j] = x
        acc = acc + x
    for l in range(LANES):
        acc = acc + part[l]
    return acc


cdef inline real row_dot_(const real* z, const real* w, Py_ssize_t n) noexcept nogil:
    """sum_j w_j z_j (sum_j z_j when w is NULL), in LANES partial sums."""
    cdef real part[LANES]
    cdef real acc = 0
    cdef Py_ssize_t j, l, nb = n - n % LANES
    if w == NULL:
        return row_sum_dev_(z, 0, n)            # _row_norm.pxd's shifted sum, with no shift
    for l in range(LANES):
        part[l] = 0
    for j in range(0, nb, 32):                  # step LANES
        for l in range(LANES):
            part[l] = part[l] + w[j + l] * z[j + l]
    for j in range(nb, n):
        acc = acc + w[j] * z[j]
    for l in range(LANES):
        acc = acc + part[l]
    return acc


cdef struct Loss:
    int64_t ignore_index
    double A, B, W, Z         # see the top of the file


cdef inline bint live_(int64_t t, int64_t ignore_index, Py_ssize_t v) noexcept nogil:
    return t != ignore_index and 0 <= t < v


cdef void rows_(const real* z, Py_ssize_t ldz, const int64_t* target, const real* w, const Loss* L,
                real* loss, real* lse, real* wrow, const real* g, real gs, real* dz, Py_ssize_t ldd,
                Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t v) noexcept nogil:
    """Forward rows [lo, hi): loss, lse, wrow; with dz, also the gradient scaled by g[i] (or gs).
    Three passes over a row that stays in L2: (1) max, z_t and sum_c w_c z_c; (2) e_c =
    exp(z_c - m) into dz and its sum; (3) dz_c = e_c K / s - g B w_c.  dz may be z (each pass has
    read what it needs from z before dz overwrites it)."""
    cdef Py_ssize_t i, j
    cdef const real* zi
    cdef real* di
    cdef real m, s, l, wt, sz, zt, gi, K, Bg, r
    cdef int64_t t
    cdef bint live
    for i in range(lo, hi):
        zi = z + i * ldz
        t = target[i]
        live = live_(t, L.ignore_index, v)
        # pass 1: everything that needs z itself
        m = row_max_(zi, v)
        zt = zi[t] if live else 0
        sz = row_dot_(zi, w, v) if live and L.B != 0 else 0
        # pass 2: the exponentials (kept in dz when the gradient is wanted)
        if m == -INFINITY:                      # an all -inf row: lse = -inf, as torch's logsumexp
            s = 0
        elif dz != NULL and live:
            s = row_exp_into_(zi, m, dz + i * ldd, v, (zi + ldz) if i + 1 < hi else NULL)
        else:
            s = row_sum_exp_(zi, m, v, (zi + ldz) if i + 1 < hi else NULL)
        l = m + log_(s) if m > -INFINITY else m
        lse[i] = l
        if not live:
            loss[i] = 0
            wrow[i] = 0
            if dz != NULL:
                di = dz + i * ldd
                for j in range(v):
                    di[j] = 0
            continue
        wt = w[t] if w != NULL else 1
        loss[i] = (<real> L.A) * wt * (l - zt) + ((<real> L.B) * ((<real> L.W) * l - sz) if L.B != 0 else 0) \
            + ((<real> L.Z) * l * l if L.Z != 0 else 0)
        wrow[i] = wt
        if dz == NULL:
            continue
        di = dz + i * ldd
        if m == -INFINITY:                      # all -inf (or all NaN): torch's gradient is NaN
            for j in range(v):
                di[j] = NAN
            continue
        # pass 3: dz_c = g (p_c K - B w_c) - g A w_t [c = t],  p_c = e_c / s
        gi = g[i] if g != NULL else gs
        K = gi * ((<real> L.A) * wt + (<real> L.B) * (<real> L.W) + 2 * (<real> L.Z) * l)
        r = K / s
        Bg = gi * (<real> L.B)
        if w == NULL:
            for j in range(v):
                di[j] = di[j] * r - Bg
        else:
            for j in range(v):
                di[j] = di[j] * r - Bg * w[j]
        di[t] = di[t] - gi * (<real> L.A) * wt


cdef void core_(const real* z, Py_ssize_t ldz, const int64_t* target, const real* w, Loss L, real* loss, real* lse,
                real* wrow, const real* g, real gs, real* dz, Py_ssize_t ldd, Py_ssize_t n, Py_ssize_t v,
                int num_threads) noexcept nogil:
    cdef Py_ssize_t t, lo, hi, nt = max(1, min(num_threads, n))
    if n == 0 or v == 0:
        return
    if nt == 1:
        rows_(z, ldz, target, w, &L, loss, lse, wrow, g, gs, dz, ldd, 0, n, v)
        return
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        lo, hi = chunk_(n, nt, t)
        rows_(z, ldz, target, w, &L, loss, lse, wrow, g, gs, dz, ldd, lo, hi, v)


cdef Loss loss_(int64_t ignore_index, double A, double B, double W, double Z) noexcept nogil:
    cdef Loss L
    L.ignore_index, L.A, L.B, L.W, L.Z = ignore_index, A, B, W, Z
    return L


def forward_ptr(size_t z, Py_ssize_t ldz, size_t target, size_t weight, int64_t ignore_index, double A, double B,
                double W, double Z, size_t loss, size_t lse, size_t wrow, size_t g, double gs, size_t dz,
                Py_ssize_t ldd, Py_ssize_t n, Py_ssize_t v, int num_threads, bint dbl):
    """Per row of z ((n, v), row stride ldz): loss, lse and the row's weight ((n,) each); with dz
    (row stride ldd; may be z) also the gradient of the rows' losses scaled by g (n,) or, when
    g = 0, by the scalar gs.  target: int64 (n,); weight: (v,) or 0.  Releases the GIL."""
    cdef Loss L = loss_(ignore_index, A, B, W, Z)
    with nogil:
        if dbl:
            core_(<const double*> z, ldz, <const int64_t*> target, <const double*> weight, L, <double*> loss,
                  <double*> lse, <double*> wrow, <const double*> g, gs, <double*> dz, ldd, n, v, num_threads)
        else:
            core_(<const float*> z, ldz, <const int64_t*> target, <const float*> weight, L, <float*> loss,
                  <float*> lse, <float*> wrow, <const float*> g, <float> gs, <float*> dz, ldd, n, v, num_threads)
