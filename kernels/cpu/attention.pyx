# cython: language_level=3
"""Flash-style softmax attention on the CPU: forward and backward.

Shapes (all contiguous, flat):  q (B, Hq, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv),
o (B, Hq, T, Dv), lse (B, Hq, T).  Query head h reads key/value head h // (Hq / Hk) (grouped /
multi-query attention without repeating K and V).

Forward, per (batch, head, tile of BQ queries), one OpenMP work unit each:
    for each tile of BK keys that some query of the tile may see:
        Sc  = scale * Q_t K_t^T                          (BLAS, BQ x BK, stays in L2)
        Sc += mask;  Sc = -inf outside each row's key range (causal, window, key length)
        online softmax: m' = max(m, rowmax Sc); P = exp(Sc - m'); l = l e^(m - m') + rowsum P
        acc = acc e^(m - m') + P V_t                     (BLAS)
    o = acc / l;  lse = m + log l                        (+inf for a row with no visible key)
The T x S score matrix never exists: memory is O(T) plus a per-thread tile.  Key tiles no query
of the tile can see (above the causal diagonal, outside the window, past the key length) are
never computed, so causal attention costs half and windowed attention is linear in T.

Dropout (p > 0) multiplies P by Z / (1 - p) after the row sums, Z_ij = [hash(seed, index of
(b, h, i, j)) >= p 2^32]: counter-based, so backward regenerates Z instead of storing it.

Backward recomputes P = exp(scale Q K^T + mask - lse) tile by tile, parallel over
(batch, key/value head, tile of BK keys), so each thread owns its dK, dV rows (race-free):
    dP~  = dO V^T,             dP = dP~ o Z / (1 - p)     (Z = 1 without dropout)
    dV  += P~^T dO,            P~ = P o Z / (1 - p)
    dS   = P o (dP - Delta),   Delta = rowsum(dO o O)     (d softmax, since sum_j P~_ij dP~_ij = Delta_i)
    dQ  += scale dS K          (into the thread's own dQ partial; partials summed in thread order)
    dK  += scale dS^T Q
Five GEMMs per tile pair, as flash-attention 2.  A row with no visible key has lse = +inf,
P = 0 and zero gradients, and outputs 0 (torch's convention).

The kernels never allocate: per-thread workspaces come from the caller (work_size()).
"""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.math cimport INFINITY, log, exp

from _common cimport real, chunk_, exp_, ptr_, row_max_
from _attention_row cimport scores_1_, accumulate_1_
from _dropout_mask cimport Drop, drop_, keep_mul_, MASK_BLOCK
from fastseq._cpu._blas cimport gemm_rm, install_blas, blas_installed

cdef enum:
    BQ = 128       # queries per tile
    BK = 256      # keys per tile


def set_blas(size_t sgemm_addr, size_t dgemm_addr):
    """Install the GEMM of every kernel module (fastseq._cpu._blas owns it; see _blas.pyx)."""
    install_blas(sgemm_addr, dgemm_addr)


def has_blas():
    return blas_installed()


def tile_sizes():
    return BQ, BK


cdef inline Py_ssize_t work_size_(Py_ssize_t d, Py_ssize_t dv, bint backward) noexcept nogil:
    if backward:
        return 2 * BQ * BK + BK * d + BK * dv + BQ
    return BQ * BK + BQ * dv + 2 * BQ


def work_size(Py_ssize_t d, Py_ssize_t dv, bint backward):
    """Elements of per-thread workspace forward / backward need."""
    return work_size_(d, dv, backward)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------

cdef struct Mask:
    Py_ssize_t left, right          # row i sees keys [i - left, i + right]  (T + S: unbounded)
    const int64_t* key_len          # (B,) valid keys per batch, or NULL
    const void* add                 # additive mask (the data's type), or NULL
    const unsigned char* keep       # boolean mask (1 = attend), or NULL
    Py_ssize_t s0, s1, s2, s3       # element strides of the mask over (B, H, T, S); 0 = broadcast
    Drop dr                         # dropout on the probabilities (_dropout_mask.pxd); element
                                    # (b, h, i, j) is the mask's index ((b H + h) T + i) S + j


cdef inline Py_ssize_t row_lo_(Mask* mk, Py_ssize_t i) noexcept nogil:
    return 0 if i - mk.left < 0 else i - mk.left


cdef inline Py_ssize_t row_hi_(Mask* mk, Py_ssize_t i, Py_ssize_t klen) noexcept nogil:
    cdef Py_ssize_t h = i + mk.right + 1
    return klen if h > klen else h


cdef inline Py_ssize_t key_len_(Mask* mk, Py_ssize_t b, Py_ssize_t s) noexcept nogil:
    cdef Py_ssize_t n
    if mk.key_len == NULL:
        return s
    n = mk.key_len[b]
    return s if n > s else (0 if n < 0 else n)


cdef void apply_mask_(Mask* mk, real* sc, Py_ssize_t ldsc, Py_ssize_t b, Py_ssize_t h,
                      Py_ssize_t i0, Py_ssize_t nq, Py_ssize_t j0, Py_ssize_t nk, Py_ssize_t klen) noexcept nogil:
    """Add / apply the mask tensor, then -inf outside each row's visible key range."""
    cdef Py_ssize_t r, j, lo, hi, i
    cdef real* row
    cdef const real* ma
    cdef const unsigned char* mb
    for r in range(nq):
        i = i0 + r
        row = sc + r * ldsc
        if mk.add != NULL:
            ma = (<const real*> mk.add) + b * mk.s0 + h * mk.s1 + i * mk.s2 + j0 * mk.s3
            if mk.s3 == 1:
                for j in range(nk):
                    row[j] = row[j] + ma[j]
            else:
                for j in range(nk):
                    row[j] = row[j] + ma[j * mk.s3]
        if mk.keep != NULL:
            mb = mk.keep + b * mk.s0 + h * mk.s1 + i * mk.s2 + j0 * mk.s3
            for j in range(nk):
                if not mb[j * mk.s3]:
                    row[j] = -INFINITY
        lo = row_lo_(mk, i) - j0
        hi = row_hi_(mk, i, klen) - j0
        for j in range(0 if lo < 0 else (nk if lo > nk else lo)):
            row[j] = -INFINITY
        for j in range(0 if hi < 0 else hi, nk):
            row[j] = -INFINITY


cdef inline bint tile_is_plain_(Mask* mk, Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, Py_ssize_t j1,
                                Py_ssize_t klen) noexcept nogil:
    """True when every query of [i0, i1) sees every key of [j0, j1) and no mask tensor applies."""
    if mk.add != NULL or mk.keep != NULL:
        return False
    return j0 >= row_lo_(mk, i1 - 1) and j1 <= row_hi_(mk, i0, klen)


cdef inline void dropout_row_(Mask* mk, real* row, Py_ssize_t n, uint64_t index0) noexcept nogil:
    """row[j] *= Z_j / (1 - p) for the elements index0 + j: the forward's P~ = P o Z / (1 - p)."""
    cdef real mul[MASK_BLOCK]
    cdef Py_ssize_t j, j0, nb
    for j0 in range(0, n, 512):                 # step MASK_BLOCK (a literal for a C loop)
        nb = min(<Py_ssize_t> MASK_BLOCK, n - j0)
        keep_mul_(mul, index0 + <uint64_t> j0, nb, &mk.dr)
        for j in range(nb):
            row[j0 + j] = row[j0 + j] * mul[j]


cdef inline void dropout_grad_row_(Mask* mk, real* prow, real* dprow, real dl, Py_ssize_t n,
                                   uint64_t index0) noexcept nogil:
    """With m = Z / (1 - p) drawn once for both rows: dS = P o (dP~ o m - Delta) into dprow, and
    P~ = P o m into prow (the backward's two uses of the regenerated mask)."""
    cdef real mul[MASK_BLOCK]
    cdef Py_ssize_t j, j0, nb
    for j0 in range(0, n, 512):                 # step MASK_BLOCK
        nb = min(<Py_ssize_t> MASK_BLOCK, n - j0)
        keep_mul_(mul, index0 + <uint64_t> j0, nb, &mk.dr)
        for j in range(nb):
            dprow[j0 + j] = prow[j0 + j] * (dprow[j0 + j] * mul[j] - dl)
            prow[j0 + j] = prow[j0 + j] * mul[j]


cdef void init_mask_(Mask* mk, Py_ssize_t T, Py_ssize_t S, Py_ssize_t left, Py_ssize_t right,
                     const int64_t* key_len, const void* add, const unsigned char* keep,
                     Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t s3,
                     double p, uint64_t seed) noexcept nogil:
    """Everything that hides or drops a (query, key) pair, shared by forward and backward."""
    mk.left = T + S if left > T + S else left
    mk.right = S if right > S else right
    mk.key_len, mk.add, mk.keep = key_len, add, keep
    mk.s0, mk.s1, mk.s2, mk.s3 = s0, s1, s2, s3
    mk.dr = drop_(p, seed)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

cdef struct KVLayout:
    Py_ssize_t kb, kh, ks          # element strides of K over (batch, head, key); D is contiguous
    Py_ssize_t vb, vh, vs          # and of V


cdef void fwd_unit_(const real* q, const real* k, const real* v, real* o, real* lse, Mask* mk,
                    KVLayout* kv, Py_ssize_t b, Py_ssize_t h, Py_ssize_t i0, Py_ssize_t Hq, Py_ssize_t Hk,
                    Py_ssize_t T, Py_ssize_t S, Py_ssize_t D, Py_ssize_t Dv, real scale,
                    real* work) noexcept nogil:
    cdef Py_ssize_t i1 = T if i0 + BQ > T else i0 + BQ
    cdef Py_ssize_t nq = i1 - i0, hk = h // (Hq // Hk), klen = key_len_(mk, b, S)
    cdef const real* qt = q + ((b * Hq + h) * T + i0) * D
    cdef const real* kb = k + b * kv.kb + hk * kv.kh       # K and V may be views into a larger
    cdef const real* vb = v + b * kv.vb + hk * kv.vh       # cache: rows kv.ks / kv.vs apart
    # short query tiles (decode: nq = 1) take proportionally wider key tiles from the same
    # (BQ * BK) score buffer: fewer, larger GEMM calls
    cdef Py_ssize_t bk = (BQ * BK) // nq
    cdef real* sc = work                     # (nq, bk)
    cdef real* acc = work + BQ * BK          # (BQ, Dv)
    cdef real* m = acc + BQ * Dv             # (BQ,)
    cdef real* l = m + BQ                    # (BQ,)
    cdef Py_ssize_t r, j, c, j0, j1, nk, jlo, jhi
    cdef real mx, mnew, alpha, s
    cdef real* row
    for r in range(nq):
        m[r] = -INFINITY
        l[r] = 0
        for c in range(Dv):
            acc[r * Dv + c] = 0
    jlo = row_lo_(mk, i0)
    jhi = row_hi_(mk, i1 - 1, klen)
    j0 = jlo
    while j0 < jhi:
        j1 = jhi if j0 + bk > jhi else j0 + bk
        nk = j1 - j0
        if nq == 1:                          # decode: one query row, no BLAS call per tile
            scores_1_(qt, kb + j0 * kv.ks, kv.ks, nk, D, scale, sc)
        else:
            gemm_rm(False, True, <int> nq, <int> nk, <int> D, scale, qt, <int> D, kb + j0 * kv.ks, <int> kv.ks,
                    0, sc, <int> bk)
        if not tile_is_plain_(mk, i0, i1, j0, j1, klen):
            apply_mask_(mk, sc, bk, b, h, i0, nq, j0, nk, klen)
        for r in range(nq):
            row = sc + r * bk
            mx = row_max_(row, nk)
            mnew = mx if mx > m[r] else m[r]
            if mnew == -INFINITY:            # nothing visible in this row yet (or all NaN)
                for j in range(nk):
                    if row[j] != row[j]:
                        l[r] = row[j]        # NaN scores: the row's output is NaN
                    row[j] = 0
                continue
            alpha = exp_(m[r] - mnew)
            s = 0
            for j in range(nk):
                x = exp_(row[j] - mnew)
                row[j] = x
                s = s + x
            l[r] = l[r] * alpha + s
            m[r] = mnew
            if alpha != 1:
                for c in range(Dv):
                    acc[r * Dv + c] = acc[r * Dv + c] * alpha
            if mk.dr.on:                     # l keeps the undropped sum: softmax, then dropout
                dropout_row_(mk, row, nk, <uint64_t> (((b * Hq + h) * T + i0 + r) * S + j0))
        if nq == 1:
            accumulate_1_(sc, vb + j0 * kv.vs, kv.vs, nk, Dv, acc)
        else:
            gemm_rm(False, False, <int> nq, <int> Dv, <int> nk, 1, sc, <int> bk, vb + j0 * kv.vs, <int> kv.vs, 1,
                    acc, <int> Dv)
        j0 = j1
    for r in range(nq):
        row = o + ((b * Hq + h) * T + i0 + r) * Dv
        if l[r] > 0:
            s = 1 / l[r]
            for c in range(Dv):
                row[c] = acc[r * Dv + c] * s
            lse[(b * Hq + h) * T + i0 + r] = m[r] + log(l[r])
        elif l[r] != l[r]:                  # NaN scores reached this row
            for c in range(Dv):
                row[c] = l[r]
            lse[(b * Hq + h) * T + i0 + r] = l[r]
        else:                               # no visible key: 0, as torch
            for c in range(Dv):
                row[c] = 0
            lse[(b * Hq + h) * T + i0 + r] = INFINITY


def forward(real[::1] q, real[::1] k, real[::1] v, real[::1] o, real[::1] lse,
            real[::1] mask_add, const unsigned char[::1] mask_keep, const int64_t[::1] key_len,
            Py_ssize_t B, Py_ssize_t Hq, Py_ssize_t Hk, Py_ssize_t T, Py_ssize_t S, Py_ssize_t D,
            Py_ssize_t Dv, double scale, Py_ssize_t left, Py_ssize_t right,
            Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t s3, double dropout_p, uint64_t seed,
            real[::1] work, int num_threads, kv_strides=None):
    """o, lse = attention(q, k, v), with dropout_p > 0 dropping probabilities by the keyed
    counter-based draw of `seed` (lse stays the undropped normalizer).  kv_strides: the six
    element strides (K batch, head, key; V batch, head, key) when k and v are flat views of a
    larger buffer (a KV cache); None for contiguous k, v.  mask_add / mask_keep / key_len: empty when absent; mask
    strides s0..s3 over (B, Hq, T, S).  left / right: visible key window per query (T + S for
    none; causal is right = 0).  work: (num_threads * work_size(D, Dv, False),)."""
    cdef KVLayout kv
    if kv_strides is None:
        kv.kb, kv.kh, kv.ks = Hk * S * D, S * D, D
        kv.vb, kv.vh, kv.vs = Hk * S * Dv, S * Dv, Dv
    else:
        kv.kb, kv.kh, kv.ks, kv.vb, kv.vh, kv.vs = kv_strides
    with nogil:
        forward_core_(ptr_(q), ptr_(k), ptr_(v), ptr_(o), ptr_(lse), <const void*> ptr_(mask_add),
                      &mask_keep[0] if mask_keep.shape[0] > 0 else NULL,
                      &key_len[0] if key_len.shape[0] > 0 else NULL, &kv, B, Hq, Hk, T, S, D, Dv, <real> scale,
                      left, right, s0, s1, s2, s3, dropout_p, seed, ptr_(work), num_threads)


def forward_ptr(size_t q, size_t k, size_t v, size_t o, size_t lse, size_t mask_add, size_t mask_keep,
                size_t key_len, Py_ssize_t B, Py_ssize_t Hq, Py_ssize_t Hk, Py_ssize_t T, Py_ssize_t S,
                Py_ssize_t D, Py_ssize_t Dv, double scale, Py_ssize_t left, Py_ssize_t right,
                Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t s3, double dropout_p, uint64_t seed,
                size_t work, int num_threads, Py_ssize_t kb, Py_ssize_t kh, Py_ssize_t ks,
                Py_ssize_t vb, Py_ssize_t vh, Py_ssize_t vs, bint dbl):
    """forward() on addresses (tensor.data_ptr(), 0 for an absent buffer), for the per-call path
    (a typed-memoryview argument costs ~0.5-1 us, a tensor's .numpy() view ~1-2 us; a decode
    step's kernel takes a few us).  kb..vs: the K and V element strides (batch, head, key);
    dbl: the buffers hold doubles, else floats."""
    cdef KVLayout kv
    kv.kb, kv.kh, kv.ks, kv.vb, kv.vh, kv.vs = kb, kh, ks, vb, vh, vs
    with nogil:
        if dbl:
            forward_core_(<double*> q, <double*> k, <double*> v, <double*> o, <double*> lse,
                          <const void*> mask_add, <const unsigned char*> mask_keep, <const int64_t*> key_len,
                          &kv, B, Hq, Hk, T, S, D, Dv, <double> scale, left, right, s0, s1, s2, s3,
                          dropout_p, seed, <double*> work, num_threads)
        else:
            forward_core_(<float*> q, <float*> k, <float*> v, <float*> o, <float*> lse,
                          <const void*> mask_add, <const unsigned char*> mask_keep, <const int64_t*> key_len,
                          &kv, B, Hq, Hk, T, S, D, Dv, <float> scale, left, right, s0, s1, s2, s3,
                          dropout_p, seed, <float*> work, num_threads)


cdef void forward_core_(real* pq, real* pk, real* pv, real* po, real* plse, const void* mask_add,
                        const unsigned char* mask_keep, const int64_t* key_len, KVLayout* kv,
                        Py_ssize_t B, Py_ssize_t Hq, Py_ssize_t Hk, Py_ssize_t T, Py_ssize_t S, Py_ssize_t D,
                        Py_ssize_t Dv, real sc, Py_ssize_t left, Py_ssize_t right,
                        Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t s3, double dropout_p,
                        uint64_t seed, real* pw, int num_threads) noexcept nogil:
    cdef Mask mk
    cdef Py_ssize_t u, b, h, i0, nqt = (T + BQ - 1) // BQ, units = B * Hq * nqt
    cdef Py_ssize_t ws = work_size_(D, Dv, False)
    cdef int nt = max(1, min(num_threads, units))
    init_mask_(&mk, T, S, left, right, key_len, mask_add, mask_keep, s0, s1, s2, s3, dropout_p, seed)
    if units == 0:
        return
    if nt == 1:                       # one thread: no OpenMP region
        for u in range(units):
            fwd_unit_(pq, pk, pv, po, plse, &mk, kv, u // (Hq * nqt), (u // nqt) % Hq, (u % nqt) * BQ,
                      Hq, Hk, T, S, D, Dv, sc, pw)
        return
    # round-robin units: neighbouring query tiles (unequal under causal masks) go to different threads
    for u in prange(units, num_threads=nt, schedule="static", chunksize=1):
        b = u // (Hq * nqt)
        h = (u // nqt) % Hq
        i0 = (u % nqt) * BQ
        fwd_unit_(pq, pk, pv, po, plse, &mk, kv, b, h, i0, Hq, Hk, T, S, D, Dv, sc,
                  pw + threadid() * ws)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

cdef void bwd_unit_(const real* q, const real* k, const real* v, const real* do_, const real* lse,
                    const real* delta, real* dq_part, real* dk, real* dv, Mask* mk,
                    Py_ssize_t b, Py_ssize_t hk, Py_ssize_t j0, Py_ssize_t Hq, Py_ssize_t Hk,
                    Py_ssize_t T, Py_ssize_t S, Py_ssize_t D, Py_ssize_t Dv, real scale,
                    real* work) noexcept nogil:
    cdef Py_ssize_t j1 = S if j0 + BK > S else j0 + BK
    cdef Py_ssize_t nk = j1 - j0, group = Hq // Hk, klen = key_len_(mk, b, S)
    cdef const real* kt = k + ((b * Hk + hk) * S + j0) * D
    cdef const real* vt = v + ((b * Hk + hk) * S + j0) * Dv
    cdef real* sc = work                     # (BQ, BK): S, then P, then dS
    cdef real* dp = sc + BQ * BK             # (BQ, BK)
    cdef real* dk_acc = dp + BQ * BK         # (BK, D)
    cdef real* dv_acc = dk_acc + BK * D      # (BK, Dv)
    cdef Py_ssize_t r, j, c, h, i0, i1, nq, ilo, ihi, row_base
    cdef real lr, dl
    cdef real* prow
    cdef real* dprow
    for j in range(nk * D):
        dk_acc[j] = 0
    for j in range(nk * Dv):
        dv_acc[j] = 0
    if j0 < klen:
        # queries that may see a key of [j0, j1): j >= i - left and j <= i + right
        ilo = j0 - mk.right
        ilo = 0 if ilo < 0 else ilo
        ihi = (j1 - 1) + mk.left + 1
        ihi = T if ihi > T else ihi
        ilo = (ilo // BQ) * BQ               # align to the forward's query tiles
        for h in range(hk * group, (hk + 1) * group):
            i0 = ilo
            while i0 < ihi:
                i1 = T if i0 + BQ > T else i0 + BQ
                nq = i1 - i0
                row_base = (b * Hq + h) * T + i0
                gemm_rm(False, True, <int> nq, <int> nk, <int> D, scale, q + row_base * D, <int> D, kt, <int> D,
                        0, sc, BK)
                if not tile_is_plain_(mk, i0, i1, j0, j1, klen):
                    apply_mask_(mk, sc, BK, b, h, i0, nq, j0, nk, klen)
                for r in range(nq):                       # P = exp(S - lse)
                    prow = sc + r * BK
                    lr = lse[row_base + r]
                    for j in range(nk):
                        prow[j] = exp_(prow[j] - lr)
                # dP~ = dO V^T  (the gradient at the dropped probabilities P~ = P o Z / (1 - p))
                gemm_rm(False, True, <int> nq, <int> nk, <int> Dv, 1, do_ + row_base * Dv, <int> Dv, vt, <int> Dv,
                        0, dp, BK)
                for r in range(nq):
                    prow = sc + r * BK
                    dprow = dp + r * BK
                    dl = delta[row_base + r]
                    if mk.dr.on:                          # dP = dP~ o Z / (1 - p);  sc becomes P~
                        dropout_grad_row_(mk, prow, dprow, dl, nk, <uint64_t> ((row_base + r) * S + j0))
                    else:
                        for j in range(nk):
                            dprow[j] = prow[j] * (dprow[j] - dl)        # dS = P o (dP - Delta)
                # dV += P~^T dO ;  dQ += scale dS K ;  dK += scale dS^T Q
                gemm_rm(True, False, <int> nk, <int> Dv, <int> nq, 1, sc, BK, do_ + row_base * Dv, <int> Dv,
                        1, dv_acc, <int> Dv)
                gemm_rm(False, False, <int> nq, <int> D, <int> nk, scale, dp, BK, kt, <int> D,
                        1, dq_part + row_base * D, <int> D)
                gemm_rm(True, False, <int> nk, <int> D, <int> nq, scale, dp, BK, q + row_base * D, <int> D,
                        1, dk_acc, <int> D)
                i0 = i1
    for j in range(nk * D):
        dk[((b * Hk + hk) * S + j0) * D + j] = dk_acc[j]
    for j in range(nk * Dv):
        dv[((b * Hk + hk) * S + j0) * Dv + j] = dv_acc[j]


def backward(real[::1] q, real[::1] k, real[::1] v, real[::1] o, real[::1] do_, real[::1] lse,
             real[::1] delta, real[::1] dq, real[::1] dk, real[::1] dv, real[::1] dq_part,
             real[::1] mask_add, const unsigned char[::1] mask_keep, const int64_t[::1] key_len,
             Py_ssize_t B, Py_ssize_t Hq, Py_ssize_t Hk, Py_ssize_t T, Py_ssize_t S, Py_ssize_t D,
             Py_ssize_t Dv, double scale, Py_ssize_t left, Py_ssize_t right,
             Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t s3, double dropout_p, uint64_t seed,
             real[::1] work, int num_threads):
    """dq, dk, dv of forward() (same dropout_p and seed: the mask is regenerated, never stored).  delta: (B*Hq*T,) scratch; dq_part: (num_threads * B*Hq*T*D,)
    per-thread dQ partials; work: (num_threads * work_size(D, Dv, True),)."""
    cdef Mask mk
    cdef Py_ssize_t u, b, hk, j0, r, c, t, lo, hi, nkt = (S + BK - 1) // BK, units = B * Hk * nkt
    cdef Py_ssize_t rows = B * Hq * T, nq_el = rows * D, ws = work_size(D, Dv, True)
    cdef int nt = max(1, min(num_threads, max(units, 1)))
    cdef real* pq = ptr_(q)
    cdef real* pk = ptr_(k)
    cdef real* pv = ptr_(v)
    cdef real* po = ptr_(o)
    cdef real* pdo = ptr_(do_)
    cdef real* plse = ptr_(lse)
    cdef real* pdelta = ptr_(delta)
    cdef real* pdq = ptr_(dq)
    cdef real* pdk = ptr_(dk)
    cdef real* pdv = ptr_(dv)
    cdef real* ppart = ptr_(dq_part)
    cdef real* pw = ptr_(work)
    cdef real sc = <real> scale, acc
    init_mask_(&mk, T, S, left, right, &key_len[0] if key_len.shape[0] > 0 else NULL,
               <const void*> ptr_(mask_add), &mask_keep[0] if mask_keep.shape[0] > 0 else NULL,
               s0, s1, s2, s3, dropout_p, seed)
    with nogil:                             # the whole computation, at every thread count
        if rows == 0:
            for u in range(B * Hk * S * D):
                pdk[u] = 0
            for u in range(B * Hk * S * Dv):
                pdv[u] = 0
        else:
            # Delta = rowsum(dO o O); zero the dQ partials
            for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                lo, hi = chunk_(rows, nt, t)
                for r in range(lo, hi):
                    acc = 0
                    for c in range(Dv):
                        acc = acc + pdo[r * Dv + c] * po[r * Dv + c]
                    pdelta[r] = acc
                lo, hi = chunk_(nq_el * nt, nt, t)
                for r in range(lo, hi):
                    ppart[r] = 0
            if units > 0:
                for u in prange(units, num_threads=nt, schedule="static", chunksize=1):
                    b = u // (Hk * nkt)
                    hk = (u // nkt) % Hk
                    j0 = (u % nkt) * BK
                    bwd_unit_(pq, pk, pv, pdo, plse, pdelta, ppart + threadid() * nq_el, pdk, pdv, &mk,
                              b, hk, j0, Hq, Hk, T, S, D, Dv, sc, pw + threadid() * ws)
            # dQ = sum of the partials, in thread order
            for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                lo, hi = chunk_(nq_el, nt, t)
                for r in range(lo, hi):
                    acc = 0
                    for c in range(nt):
                        acc = acc + ppart[c * nq_el + r]
                    pdq[r] = acc
