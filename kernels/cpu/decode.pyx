# cython: language_level=3
"""One decode step of a GPT-2-style decoder in one call: every layer, the final norm and the
output layer, for one new token per row, reading and appending to a preallocated KV cache.
Also here: the pieces other decoders' steps use (fastseq/generation/): `linear` (a GEMM with
the columns split over the threads) and `attend_cache` (one query a row over a KV cache layer,
through its origin table).

Per layer (pre-norm; x (B, E) is the residual stream, u its normalized copy):
    u    = ln_1(x)
    qkv  = u W_qkv^T + b_qkv                    (B, 3E): q, k, v, NH heads of D each
    K[n], V[n] = k, v                           written into the cache at position n, in place
    att  = softmax(q K[0..n]^T / sqrt(D) + mask) V[0..n]      per (row, head), one query row
    x   += att W_proj^T + b_proj
    u    = ln_2(x)
    h    = act(u W_fc^T + b_fc)                 (B, F)
    x   += h W_out^T + b_out
then u = ln_f(x) and logits = u W_head^T (B, V).  The embedding comes first:
x = W_tok[token] + W_pos[position].

Why one call.  The step's work at batch 1 is reading the weights (12 E^2 + V E floats: 94 MB
at E = 512, 6 layers, V = 8192, 3-4 ms at this project's machines' copy bandwidth); the
module-by-module step pays ~20 Python-level calls per layer on top (~1 ms at 6 layers), which
is what separates a Python library from a C++ engine.  Here the whole step is one parallel
region: each thread owns a contiguous slice of every GEMM's output columns (it reads only
its slice of the weight: the threads share the weight traffic, each with its own single-
threaded BLAS call, whose epilogue -- bias, activation, residual -- it applies to its own
columns while they are in cache; up to 8 rows the dot-product path of _dot_rows.h replaces
BLAS).  For the QKV projection the slice is the thread's heads
(their q, k and v columns), so it attends for those heads right after, without waiting for
the others; each thread normalizes every row itself (B E work, less than a barrier costs at
decode sizes).  The phases meet at 4 barriers a layer: after attention, after each residual
add, after the feed-forward's first GEMM.  (A barrier is cheap on an idle machine, ~1 us;
on a loaded one a thread waiting for a descheduled partner can lose a time slice, so fewer
is better.)

Masks.  mask (B, n + 1), 1 = token, 0 = left padding, as GPT.forward's attention_mask (Hugging
Face's rules): a key is visible when it is a token, and the query always sees itself; the new
token's position counts the tokens before it (cumsum(mask) - 1, a pad position is 1).

Beams.  origin (B, S_max), when given, names the cache row that holds position j of row i
(KVCache.origin: beam search reorders this table instead of copying the cache); the new
position n of row i is written into cache row i.  NULL: row i's positions are all in row i.

The kernels never allocate and never validate shapes (fastseq/generation/gpt_step.py does);
they check token ids against the vocabulary and return -1 for a bad one.
"""
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport INFINITY
from libc.stdint cimport int64_t

from _common cimport real, chunk_, col_slice_, exp_, row_max_, rsqrt_
from _row_norm cimport row_stats_
from _activation cimport act_fwd_
from _attention_row cimport scores_1_, accumulate_1_, scores_rows_, accumulate_rows_
from fastseq._cpu._blas cimport gemm_rm, install_blas, blas_installed

cdef extern from "_fastmath.h" nogil:
    void fs_barrier()
    int fs_team_size()


def set_blas(size_t sgemm_addr, size_t dgemm_addr):
    """Install the GEMM of every kernel module (fastseq._cpu._blas owns it; see _blas.pyx)."""
    install_blas(sgemm_addr, dgemm_addr)


def has_blas():
    return blas_installed()


# The weight table: addresses of contiguous tensors, per layer LAYER_SLOTS of them in this
# order, then the model's own (fastseq/generation/gpt_step.py builds it).
cdef enum:
    LN1_W = 0
    LN1_B = 1
    QKV_W = 2       # (3E, E)
    QKV_B = 3
    PROJ_W = 4      # (E, E)
    PROJ_B = 5
    LN2_W = 6
    LN2_B = 7
    FC_W = 8        # (F, E)
    FC_B = 9
    OUT_W = 10      # (E, F)
    OUT_B = 11
    LAYER_SLOTS = 12
    TOK_EMB = 0     # (V, E)          after the L * LAYER_SLOTS layer entries
    POS_EMB = 1     # (P, E)
    LNF_W = 2
    LNF_B = 3
    HEAD_W = 4      # (V, E)
    MODEL_SLOTS = 5
    COL_ALIGN = 16  # a thread's column slice starts at a multiple of this (whole cache lines)
    ACT_BLOCK = 256 # columns the activation epilogue takes at a time (its multipliers of one)


def slots():
    return LAYER_SLOTS, MODEL_SLOTS


cdef struct Step:
    Py_ssize_t B          # rows
    Py_ssize_t Bc         # cache rows (>= B: rows that finished left)
    Py_ssize_t E, NH, D, F, L, V
    Py_ssize_t S_max      # the cache's positions
    Py_ssize_t n          # positions already cached; the new token goes to n
    int act               # fastseq.dropout.ACTIVATIONS index
    double eps
    const int64_t* tok    # (B,)
    const int64_t* origin # (B, S_max) or NULL
    const int64_t* mask   # (B, n + 1) or NULL
    const size_t* w       # the weight table


cdef inline (Py_ssize_t, Py_ssize_t) cols_(Py_ssize_t N, int team, int tid) noexcept nogil:
    """Thread tid's slice [lo, hi) of N columns: near-equal, starting at multiples of COL_ALIGN."""
    return col_slice_(N, team, tid, COL_ALIGN)


cdef inline void norm_rows_(const real* x, real* u, Py_ssize_t B, Py_ssize_t E, const real* w, const real* b,
                            real eps) noexcept nogil:
    """u = layer_norm(x) * w + b, every row of B."""
    cdef Py_ssize_t i, j
    cdef real mu, rs
    for i in range(B):
        row_stats_(x + i * E, E, eps, True, &mu, &rs)
        for j in range(E):
            u[i * E + j] = (x[i * E + j] - mu) * rs * w[j] + b[j]


# y = a W^T for a few rows a: _dot_rows.h (fp32) streams each weight row once and dots it with
# every row of a; fp64 (the exactness reference, not a speed path) runs plain loops.
cdef extern from "_dot_rows.h" nogil:
    void fs_dot_rows_f32(const float* a, long B, long K, const float* W, long lo, long hi, float* y, long ldy,
                         int accumulate)

cdef int small_rows = 8          # batch sizes up to this take dot_rows_ (set_small_rows changes it)


def set_small_rows(int b):
    """Batch sizes up to b take the dot-product path instead of BLAS (0: BLAS always)."""
    global small_rows
    small_rows = b


cdef inline void dot_rows_(const real* a, Py_ssize_t B, Py_ssize_t K, const real* W, Py_ssize_t lo,
                           Py_ssize_t hi, real* y, Py_ssize_t ldy, bint accumulate) noexcept nogil:
    """y[i, j] (+)= a[i] . W[j] for every row i < B and weight row j in [lo, hi) (W (N, K))."""
    cdef Py_ssize_t i, j, k
    cdef real acc
    if real is float:
        fs_dot_rows_f32(a, B, K, W, lo, hi, y, ldy, accumulate)
        return
    for j in range(lo, hi):
        for i in range(B):
            acc = 0
            for k in range(K):
                acc = acc + W[j * K + k] * a[i * K + k]
            y[i * ldy + j] = (y[i * ldy + j] + acc) if accumulate else acc


cdef inline void matmul_t_(const real* a, Py_ssize_t B, Py_ssize_t K, const real* W, Py_ssize_t lo,
                           Py_ssize_t hi, real* y, Py_ssize_t ldy, bint accumulate) noexcept nogil:
    """Columns [lo, hi) of y (B, ldy) (+)= a (B, K) W^T: dot_rows_ for a few rows, else BLAS."""
    if B <= small_rows:
        dot_rows_(a, B, K, W, lo, hi, y, ldy, accumulate)
    else:
        gemm_rm(False, True, B, hi - lo, K, 1, a, K, W + lo * K, K, 1 if accumulate else 0, y + lo, ldy)


cdef inline void linear_cols_(const real* a, Py_ssize_t B, Py_ssize_t K, const real* W, const real* bias,
                              real* y, Py_ssize_t N, bint accumulate, int act, int team, int tid) noexcept nogil:
    """This thread's columns of y (B, N) = a (B, K) W^T + bias (W (N, K)); accumulate: y += that
    (the residual add); act >= 0: y = act(that) (bias given).  bias may be NULL (no bias)."""
    cdef Py_ssize_t lo, hi, i, j, nb
    cdef real ones[ACT_BLOCK]
    cdef real zeros[ACT_BLOCK]
    lo, hi = cols_(N, team, tid)
    if lo >= hi:
        return
    matmul_t_(a, B, K, W, lo, hi, y, N, accumulate)
    if act >= 0:                                # y = act(y + bias): the bias as blocks, zeros if none
        for j in range(ACT_BLOCK):
            ones[j] = 1
            zeros[j] = 0
        for i in range(B):
            j = lo
            while j < hi:
                nb = min(<Py_ssize_t> ACT_BLOCK, hi - j)
                act_fwd_(y + i * N + j, (bias + j) if bias != NULL else zeros, ones, y + i * N + j, nb, act)
                j += nb
    elif bias != NULL:
        for i in range(B):
            for j in range(lo, hi):
                y[i * N + j] = y[i * N + j] + bias[j]


cdef inline Py_ssize_t position_(const Step* s, Py_ssize_t r) noexcept nogil:
    """The new token's position in cache row r (see Masks above)."""
    cdef const int64_t* m
    cdef Py_ssize_t j, c = 0
    if s.mask == NULL:
        return s.n
    m = s.mask + r * (s.n + 1)
    if m[s.n] == 0:
        return 1
    for j in range(s.n):
        c += m[j] != 0
    return c


cdef inline void attend_row_(const real* q, const real* kc, const real* vc, const int64_t* org,
                             Py_ssize_t row_stride, Py_ssize_t nk, Py_ssize_t D, const int64_t* m, real* sc,
                             real* o) noexcept nogil:
    """o = softmax(q K^T / sqrt(D)) V over nk cached positions of one (row, head): position j's
    key and value are kc + j D and vc + j D in the row's own cache row (org NULL), or in cache
    row org[j], row_stride elements from row 0's.  m (nk,) or NULL: 0 = a pad key (the last key,
    the query's own, is always seen).  sc: nk scores of scratch."""
    cdef Py_ssize_t j, c
    cdef real mx, tot, inv, scale = rsqrt_(<real> D)
    if org == NULL:
        scores_1_(q, kc, D, nk, D, scale, sc)
    else:
        scores_rows_(q, kc, org, row_stride, nk, D, scale, sc)
    if m != NULL:
        for j in range(nk - 1):
            if m[j] == 0:
                sc[j] = -INFINITY
    mx = row_max_(sc, nk)
    tot = 0
    for j in range(nk):
        sc[j] = exp_(sc[j] - mx)
        tot = tot + sc[j]
    for c in range(D):
        o[c] = 0
    if org == NULL:
        accumulate_1_(sc, vc, D, nk, D, o)
    else:
        accumulate_rows_(sc, vc, org, row_stride, nk, D, o)
    inv = 1 / tot
    for c in range(D):
        o[c] = o[c] * inv


cdef void qkv_attend_(const Step* s, Py_ssize_t l, const size_t* w, real* kv, const real* u, real* qkv,
                      real* att, real* sc, int team, int tid) noexcept nogil:
    """This thread's heads [h0, h1): their q, k and v columns of qkv = u W_qkv^T + b_qkv (three
    column slices, one per projection), the new keys and values written into the cache, and
    attention for every row -- no other thread reads or writes these columns, so no barrier."""
    cdef Py_ssize_t E = s.E, D = s.D, NH = s.NH, n = s.n, S = s.S_max
    cdef Py_ssize_t h0, h1, part, i, h, j, c
    cdef const real* W = <const real*> w[QKV_W]
    cdef const real* bias = <const real*> w[QKV_B]
    cdef const real* q
    cdef real* kc
    cdef real* vc
    h0, h1 = chunk_(NH, team, tid)
    if h0 >= h1:
        return
    for part in range(3):                       # q, k, v: rows [part E + h0 D, part E + h1 D) of W_qkv
        c = part * E + h0 * D
        matmul_t_(u, s.B, E, W, c, c + (h1 - h0) * D, qkv, 3 * E, False)
        for i in range(s.B):
            for j in range((h1 - h0) * D):
                qkv[i * 3 * E + c + j] = qkv[i * 3 * E + c + j] + bias[c + j]
    for i in range(s.B):
        for h in range(h0, h1):
            q = qkv + i * 3 * E + h * D
            kc = kv + (((l * 2 + 0) * s.Bc + i) * NH + h) * S * D             # (S_max, D) of (l, row i, h)
            vc = kv + (((l * 2 + 1) * s.Bc + i) * NH + h) * S * D
            for c in range(D):
                kc[n * D + c] = q[E + c]
                vc[n * D + c] = q[2 * E + c]
            if s.origin != NULL:                        # positions in other rows: strides from row 0
                kc, vc = kc - i * NH * S * D, vc - i * NH * S * D
            attend_row_(q, kc, vc, (s.origin + i * S) if s.origin != NULL else NULL, NH * S * D, n + 1, D,
                        (s.mask + i * (n + 1)) if s.mask != NULL else NULL, sc, att + i * E + h * D)


cdef void step_(const Step* s, real* kv, real* ws, real* logits, int team, int tid) noexcept nogil:
    """The whole step, run by every thread of the team (tid of team); four barriers a layer.
    ws: x (B, E), qkv (B, 3E), att (B, E), h (B, F) shared; then per thread u (B, E), the
    normalized rows (each thread normalizes every row itself: B E work instead of a barrier),
    and S_max attention scores."""
    cdef Py_ssize_t B = s.B, E = s.E, F = s.F, l, i, j, lo, hi, pos
    cdef real eps = <real> s.eps
    cdef real* x = ws
    cdef real* qkv = x + B * E
    cdef real* att = qkv + B * 3 * E
    cdef real* hb = att + B * E
    cdef real* u = hb + B * F + tid * (B * E + s.S_max)
    cdef real* sc = u + B * E
    cdef const size_t* w
    cdef const size_t* g = s.w + s.L * LAYER_SLOTS
    cdef const real* tok_emb = <const real*> g[TOK_EMB]
    cdef const real* pos_emb = <const real*> g[POS_EMB]

    lo, hi = chunk_(B, team, tid)                   # x = W_tok[token] + W_pos[position]
    for i in range(lo, hi):
        pos = position_(s, i)
        for j in range(E):
            x[i * E + j] = tok_emb[s.tok[i] * E + j] + pos_emb[pos * E + j]
    fs_barrier()
    for l in range(s.L):
        w = s.w + l * LAYER_SLOTS
        norm_rows_(x, u, B, E, <const real*> w[LN1_W], <const real*> w[LN1_B], eps)
        qkv_attend_(s, l, w, kv, u, qkv, att, sc, team, tid)
        fs_barrier()
        linear_cols_(att, B, E, <const real*> w[PROJ_W], <const real*> w[PROJ_B], x, E, True, -1, team, tid)
        fs_barrier()
        norm_rows_(x, u, B, E, <const real*> w[LN2_W], <const real*> w[LN2_B], eps)
        linear_cols_(u, B, E, <const real*> w[FC_W], <const real*> w[FC_B], hb, F, False, s.act, team, tid)
        fs_barrier()
        linear_cols_(hb, B, F, <const real*> w[OUT_W], <const real*> w[OUT_B], x, E, True, -1, team, tid)
        fs_barrier()
    norm_rows_(x, u, B, E, <const real*> g[LNF_W], <const real*> g[LNF_B], eps)
    linear_cols_(u, B, E, <const real*> g[HEAD_W], NULL, logits, s.V, False, -1, team, tid)


cdef int run_(const Step* s, real* kv, real* ws, real* logits, int num_threads) noexcept nogil:
    cdef Py_ssize_t i
    cdef int tid
    for i in range(s.B):
        if s.tok[i] < 0 or s.tok[i] >= s.V:
            return -1
    if num_threads <= 1:        # no one-thread team around BLAS (it would nest a team per call)
        step_(s, kv, ws, logits, 1, 0)
        return 0
    with parallel(num_threads=num_threads):
        tid = threadid()
        step_(s, kv, ws, logits, fs_team_size(), tid)
    return 0


def workspace_size(Py_ssize_t B, Py_ssize_t E, Py_ssize_t F, Py_ssize_t S_max, int num_threads):
    """Elements of ws a step needs."""
    return B * (5 * E + F) + max(1, num_threads) * (B * E + S_max)


def gpt_step(size_t table, size_t tok, size_t origin, size_t mask, size_t kv, size_t ws, size_t logits,
             Py_ssize_t B, Py_ssize_t Bc, Py_ssize_t E, Py_ssize_t NH, Py_ssize_t F, Py_ssize_t L, Py_ssize_t V,
             Py_ssize_t S_max, Py_ssize_t n, int act, double eps, int num_threads, bint dbl):
    """One decode step (see the top of this file); addresses of contiguous buffers of doubles
    (dbl) or floats, origin / mask 0 when absent.  Releases the GIL.  Returns 0, or -1 when a token
    id is outside [0, V)."""
    cdef Step s
    cdef int rc
    s.B, s.Bc, s.E, s.NH, s.D, s.F, s.L, s.V = B, Bc, E, NH, E // NH, F, L, V
    s.S_max, s.n, s.act, s.eps = S_max, n, act, eps
    s.tok, s.origin, s.mask = <const int64_t*> tok, <const int64_t*> origin, <const int64_t*> mask
    s.w = <const size_t*> table
    with nogil:
        if dbl:
            rc = run_(&s, <double*> kv, <double*> ws, <double*> logits, num_threads)
        else:
            rc = run_(&s, <float*> kv, <float*> ws, <float*> logits, num_threads)
    return rc


# ---------------------------------------------------------------------------------------------
# a linear layer for decode-sized inputs (fastseq/generation/linear.py): y = act(x W^T + b)
# ---------------------------------------------------------------------------------------------

cdef void linear_run_(const real* x, const real* W, const real* b, real* y, Py_ssize_t M, Py_ssize_t K,
                      Py_ssize_t N, int act, int num_threads) noexcept nogil:
    cdef int tid
    if num_threads <= 1:
        linear_cols_(x, M, K, W, b, y, N, False, act, 1, 0)
        return
    with parallel(num_threads=num_threads):
        tid = threadid()
        linear_cols_(x, M, K, W, b, y, N, False, act, fs_team_size(), tid)


def linear(size_t x, size_t w, size_t b, size_t y, Py_ssize_t M, Py_ssize_t K, Py_ssize_t N, int act,
           int num_threads, bint dbl):
    """y (M, N) = act(x (M, K) W^T + b), W (N, K), b (N,) or 0, act -1 (none) or an activation
    code: each thread computes a contiguous slice of the columns with its own single-threaded BLAS
    call (or the dot-product path for M <= small_rows) and applies the epilogue to it.  At decode
    shapes (M ~ 1-256 rows, weights of MBs) this runs at ~2x the rate of one multi-threaded BLAS
    call, which splits such a product poorly.  Addresses of contiguous buffers.  Releases the GIL."""
    with nogil:
        if dbl:
            linear_run_(<const double*> x, <const double*> w, <const double*> b, <double*> y, M, K, N, act,
                        num_threads)
        else:
            linear_run_(<const float*> x, <const float*> w, <const float*> b, <float*> y, M, K, N, act,
                        num_threads)


# ---------------------------------------------------------------------------------------------
# one query per row over a KVCache layer, through its origin table (KVCache.attend_step)
# ---------------------------------------------------------------------------------------------

cdef void attend_cache_(const real* q, real* kv, const int64_t* origin, real* o, real* work,
                        Py_ssize_t N, Py_ssize_t Bc, Py_ssize_t NH, Py_ssize_t D, Py_ssize_t S, Py_ssize_t nk,
                        int num_threads) noexcept nogil:
    cdef Py_ssize_t u, i, h, stride = NH * S * D
    cdef const real* k0
    cdef const real* v0
    cdef int tid
    for u in prange(N * NH, num_threads=max(1, num_threads), schedule="static"):
        i, h = u // NH, u % NH
        tid = threadid()
        k0 = kv + ((0 * Bc + (0 if origin != NULL else i)) * NH + h) * S * D
        v0 = kv + ((1 * Bc + (0 if origin != NULL else i)) * NH + h) * S * D
        attend_row_(q + u * D, k0, v0, (origin + i * S) if origin != NULL else NULL, stride, nk, D, NULL,
                    work + tid * nk, o + u * D)


def attend_cache(size_t q, size_t kv, size_t origin, size_t o, size_t work, Py_ssize_t N,
                 Py_ssize_t Bc, Py_ssize_t NH, Py_ssize_t D, Py_ssize_t S, Py_ssize_t nk, int num_threads, bint dbl):
    """o (N, NH, D) = attention of q (N, NH, D), one query a row, over the nk positions held in
    kv (2, Bc, NH, S, D), one layer of a KVCache: row i's position j in cache row origin[i, j]
    (origin (N, S); 0: row i); every position is a token (a decoder's own cache has no padding).
    work: num_threads * nk scratch.
    Releases the GIL."""
    with nogil:
        if dbl:
            attend_cache_(<const double*> q, <double*> kv, <const int64_t*> origin, <double*> o, <double*> work,
                          N, Bc, NH, D, S, nk, num_threads)
        else:
            attend_cache_(<const float*> q, <float*> kv, <const int64_t*> origin, <float*> o, <float*> work,
                          N, Bc, NH, D, S, nk, num_threads)


# ---------------------------------------------------------------------------------------------
# one query per row over its source's keys (a seq2seq decoder's cross-attention step)
# ---------------------------------------------------------------------------------------------

cdef void attend_sources_(const real* q, const real* kv, const int64_t* source_of, const int64_t* lengths,
                          real* o, real* work, Py_ssize_t N, Py_ssize_t Bs, Py_ssize_t NH, Py_ssize_t D,
                          Py_ssize_t S, int num_threads) noexcept nogil:
    cdef Py_ssize_t u, i, h, src, nk
    cdef int tid
    for u in prange(N * NH, num_threads=max(1, num_threads), schedule="static"):
        i, h = u // NH, u % NH
        tid = threadid()
        src = source_of[i]
        nk = S if lengths == NULL else lengths[src]
        attend_row_(q + u * D, kv + ((0 * Bs + src) * NH + h) * S * D, kv + ((1 * Bs + src) * NH + h) * S * D,
                    NULL, 0, nk, D, NULL, work + tid * S, o + u * D)


def attend_sources(size_t q, size_t kv, size_t source_of, size_t lengths, size_t o, size_t work, Py_ssize_t N,
                   Py_ssize_t Bs, Py_ssize_t NH, Py_ssize_t D, Py_ssize_t S, int num_threads, bint dbl):
    """o (N, NH, D) = attention of q (N, NH, D), one query a row, over the keys and values of row
    i's source, kv (2, Bs, NH, S, D) (one layer of a seq2seq decoder's cross-attention memory):
    source source_of[i], its first lengths[source] positions (lengths 0: all S).  No copy of a
    source per row, however the rows were reordered.  work: num_threads * S scratch.  Releases
    the GIL."""
    with nogil:
        if dbl:
            attend_sources_(<const double*> q, <const double*> kv, <const int64_t*> source_of,
                            <const int64_t*> lengths, <double*> o, <double*> work, N, Bs, NH, D, S, num_threads)
        else:
            attend_sources_(<const float*> q, <const float*> kv, <const int64_t*> source_of,
                            <const int64_t*> lengths, <float*> o, <float*> work, N, Bs, NH, D, S, num_threads)
