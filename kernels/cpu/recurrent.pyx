# cython: language_level=3
"""Whole-sequence recurrent layers on the CPU: forward and backward through time, no Python per step.

Cells (gate order as torch): LSTM (i, f, g, o), GRU (r, z, n), Elman RNN (tanh / relu), and the
layer-normalized LSTM and GRU (Ba et al. 2016).  The binding does the input projection of every
step as one GEMM beforehand and the weight GEMMs over all steps afterwards; these kernels run the
sequential part.  Per step: the recurrent GEMM through torch's BLAS, then one fused OpenMP pass
over the gates.

Rows.  The sequence is stored packed, as torch's PackedSequence: step t owns rows
[offs[t], offs[t + 1]) of every (rows, .) buffer, B_t = offs[t + 1] - offs[t] of them, and the
batch is sorted by decreasing length, so the sequences still running at step t are the first B_t
of step t - 1.  A padded (T, B) batch is offs[t] = t B.  Finished sequences cost nothing.
Backward carries dh (and dc) in (B_0, H) buffers: they enter holding the gradient at each
sequence's final state, and a row is overwritten only while its sequence runs, so each sequence
picks its final-state gradient up at its own last step.  They leave holding dh_0 (dc_0).

Gate layout of the plain cells.  The binding permutes the gate rows of the weights (and so the
gate columns of every buffer) into blocks of `ub` hidden units: block k holds the gate rows of
units [k ub, (k + 1) ub), gate after gate.  Each OpenMP thread owns whole blocks, so a forward
step needs no barrier between the thread's own GEMM slice and the gate math of its units (MKL
runs single-threaded inside the region).

Threads.  The forwards of the LSTM (plain and projected) and of the layer-normalized cells, and
every backward, run the whole time loop inside one parallel region and meet at a barrier
(fs_barrier) once per step; a region per step (fork and join) plus MKL's own threads for the
backward's dh_next = dG W_hh cost a third more at (64, 1, 256) and a quarter more at
(256, 16, 512).  In the backward each thread forms its own units' columns of dh_next from the
whole dG_t (a column slice of W_hh), which are exactly the columns its next step reads: one
barrier per step suffices.  The GRU and RNN forwards open a region per step (prange), which for
the LSTM forward measured the same as one region.  The layer-normalized cells normalize whole rows, so they keep
torch's column order and split each step in two phases with a barrier after each: columns (the
GEMM) and rows (norms and gate math).  Work is shared out by the size of the team OpenMP actually
started (fs_team_size), which OMP_THREAD_LIMIT or nesting can make smaller than asked.  A
one-thread team is never opened around MKL: MKL would see no enclosing parallel region and nest
a team of its own per call (21 ms instead of 9 us for a 4-step toy layer).

Memory per step and row (fp32): the recurrent GEMM reads W_hh (G H, shared by the rows); the
pointwise pass reads G gate columns and writes G + 2 columns (activations, c and h).  The weight
is the traffic: at B = 1 a step is a matrix-vector product, bound by the copy bandwidth.
"""
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport exp, tanh
from libc.stdint cimport int64_t

from _common cimport chunk_, real, rsqrt_

include "_blas.pxi"

cdef extern from "_fastmath.h" nogil:
    float fs_expf(float x)
    void fs_barrier()
    int fs_team_size()


cdef inline real sigmoid_(real x) noexcept nogil:
    cdef real one = 1
    if real is float:
        return one / (one + fs_expf(-x))
    else:
        return one / (one + exp(-x))


cdef inline real tanh_(real x) noexcept nogil:
    cdef real one = 1, two = 2
    if real is float:
        return two / (one + fs_expf(-two * x)) - one      # 2 sigmoid(2x) - 1, in float
    else:
        return tanh(x)


cdef inline real* ptr_(real[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


cdef inline void copy_(real* dst, const real* src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


cdef inline (Py_ssize_t, Py_ssize_t, Py_ssize_t) step_(const int64_t[::1] offs, Py_ssize_t t) noexcept nogil:
    """(first row of step t, its row count B_t, first row of step t - 1)."""
    return offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0


# ============================================================================ the per-step GEMM

cdef int SMALL_M = 8    # at most this many rows: small_nt_ instead of BLAS (MKL wins from 16)


def set_small_rows(int m):
    """Benchmarks: route step GEMMs of at most m rows through small_nt_ (8 by default)."""
    global SMALL_M
    SMALL_M = m


cdef void step_gemm_(bint ta, bint tb, int m, int n, int k, real alpha, const real* a, int lda, const real* b,
                     int ldb, real beta, real* c, int ldc) noexcept nogil:
    """gemm_rm (row-major C = alpha op(A) op(B) + beta C) for the recurrent steps.  The forward's
    A B^T with at most SMALL_M rows (a small batch) goes through small_nt_, which beats MKL's sgemm
    there: the (64, B, 256) LSTM forward kernel at B = 1, 2, 4, 8 takes 0.72, 0.86, 1.85, 2.80 ms
    against MKL's 0.94, 1.81, 2.28, 3.25; from B = 16 MKL wins (its dot products need no
    horizontal sums).  The backward's A B keeps MKL: a plain axpy loop was 2.4x slower."""
    if tb and not ta and alpha == 1 and m <= SMALL_M:
        small_nt_(m, n, k, a, lda, b, ldb, beta, c, ldc)
    else:
        gemm_rm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void small_nt_(int m, int n, int k, const real* a, int lda, const real* b, int ldb, real beta, real* c,
                    int ldc) noexcept nogil:
    """C (m, n) = A (m, k) B^T + beta C, B (n, k) row-major: dot products along the rows, a block of
    two rows of A against four rows of B at a time (eight independent vector accumulators, the
    B rows reused from L1 by every pair of A rows)."""
    cdef int i, j, p
    cdef real s00, s01, s02, s03, s10, s11, s12, s13, x0, x1
    cdef const real* a0
    cdef const real* a1
    cdef const real* b0
    cdef const real* b1
    cdef const real* b2
    cdef const real* b3
    j = 0
    while j + 4 <= n:
        b0 = b + j * ldb
        b1 = b0 + ldb
        b2 = b1 + ldb
        b3 = b2 + ldb
        i = 0
        while i + 2 <= m:
            a0 = a + i * lda
            a1 = a0 + lda
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0
            for p in range(k):
                x0 = a0[p]
                x1 = a1[p]
                s00 = s00 + b0[p] * x0
                s01 = s01 + b1[p] * x0
                s02 = s02 + b2[p] * x0
                s03 = s03 + b3[p] * x0
                s10 = s10 + b0[p] * x1
                s11 = s11 + b1[p] * x1
                s12 = s12 + b2[p] * x1
                s13 = s13 + b3[p] * x1
            store4_(c + i * ldc + j, beta, s00, s01, s02, s03)
            store4_(c + (i + 1) * ldc + j, beta, s10, s11, s12, s13)
            i = i + 2
        if i < m:
            a0 = a + i * lda
            s00 = s01 = s02 = s03 = 0
            for p in range(k):
                x0 = a0[p]
                s00 = s00 + b0[p] * x0
                s01 = s01 + b1[p] * x0
                s02 = s02 + b2[p] * x0
                s03 = s03 + b3[p] * x0
            store4_(c + i * ldc + j, beta, s00, s01, s02, s03)
        j = j + 4
    while j < n:                                         # the last n % 4 rows of B
        b0 = b + j * ldb
        for i in range(m):
            a0 = a + i * lda
            s00 = 0
            for p in range(k):
                s00 = s00 + b0[p] * a0[p]
            c[i * ldc + j] = s00 + beta * c[i * ldc + j] if beta != 0 else s00
        j = j + 1


cdef inline void store4_(real* c, real beta, real s0, real s1, real s2, real s3) noexcept nogil:
    if beta != 0:
        s0, s1, s2, s3 = s0 + beta * c[0], s1 + beta * c[1], s2 + beta * c[2], s3 + beta * c[3]
    c[0], c[1], c[2], c[3] = s0, s1, s2, s3


# ============================================================================ gate math
# One transcendental per loop: gcc if-converts and vectorizes each (a loop with five exps stays
# scalar).  `gs` is the stride between a row's gates: ub in the blocked layout, H in torch's.

cdef void lstm_gates_(const real* g, Py_ssize_t gs, const real* cprev, real* c, real* act,
                      Py_ssize_t nb) noexcept nogil:
    """nb units of one row: activates the pre-activations g (i, f, g, o at offsets 0, gs, 2 gs,
    3 gs) into act (same layout) and writes c = f cprev + i g."""
    cdef Py_ssize_t j
    for j in range(nb):
        act[j] = sigmoid_(g[j])
    for j in range(nb):
        act[gs + j] = sigmoid_(g[gs + j])
    for j in range(nb):
        act[2 * gs + j] = tanh_(g[2 * gs + j])
    for j in range(nb):
        act[3 * gs + j] = sigmoid_(g[3 * gs + j])
    for j in range(nb):
        c[j] = act[gs + j] * cprev[j] + act[j] * act[2 * gs + j]


cdef void lstm_gates_bwd_(const real* act, Py_ssize_t gs, const real* cprev, const real* dce,
                           real* dc, real* dg, Py_ssize_t nb) noexcept nogil:
    """nb units: from dce = dL/dc_t (all paths), the i, f, g gradients into dg and dc_next = dce f.
    (The o gradient is the caller's: it depends on how h reads c.)"""
    cdef Py_ssize_t j
    cdef real ig, fg, gg, d
    for j in range(nb):
        ig = act[j]
        fg = act[gs + j]
        gg = act[2 * gs + j]
        d = dce[j]
        dg[j] = d * gg * ig * (1 - ig)
        dg[gs + j] = d * cprev[j] * fg * (1 - fg)
        dg[2 * gs + j] = d * ig * (1 - gg * gg)
        dc[j] = d * fg


cdef void lstm_cell_bwd_(const real* act, Py_ssize_t gs, const real* c, const real* cprev, const real* dy,
                         const real* dh, real* dc, real* dg, Py_ssize_t nb) noexcept nogil:
    """Plain LSTM, nb units of one row (h = o tanh(c)):
        dh_t = dy + dh_next;  dc_t = dc_next + dh_t o (1 - tanh(c)^2);  do = dh_t tanh(c) o (1 - o)
    then lstm_gates_bwd_.  dg's i slot holds dc_t and its o slot tanh(c) until overwritten."""
    cdef Py_ssize_t j
    cdef real og, tc, dhe
    for j in range(nb):
        dg[3 * gs + j] = tanh_(c[j])
    for j in range(nb):
        og = act[3 * gs + j]
        tc = dg[3 * gs + j]
        dhe = dy[j] + dh[j]
        dg[j] = dc[j] + dhe * og * (1 - tc * tc)
        dg[3 * gs + j] = dhe * tc * og * (1 - og)
    lstm_gates_bwd_(act, gs, cprev, dg, dc, dg, nb)


cdef void gru_cell_fwd_(const real* xp, const real* gh, Py_ssize_t gs, const real* hprev, real* h, real* act,
                        real* ghn, Py_ssize_t nb) noexcept nogil:
    """GRU, nb units of one row.  xp = x W_ih^T + b_ih, gh = h_{t-1} W_hh^T + b_hh (r, z, n at 0,
    gs, 2 gs):  r = s(x_r + h_r), z = s(x_z + h_z), n = tanh(x_n + r h_n), h = (1 - z) n + z h_{t-1}.
    Saves act = (r, z, n) and ghn = h_n."""
    cdef Py_ssize_t j
    for j in range(nb):
        act[j] = sigmoid_(xp[j] + gh[j])
    for j in range(nb):
        act[gs + j] = sigmoid_(xp[gs + j] + gh[gs + j])
    for j in range(nb):
        ghn[j] = gh[2 * gs + j]
        act[2 * gs + j] = tanh_(xp[2 * gs + j] + act[j] * gh[2 * gs + j])
    for j in range(nb):
        h[j] = act[2 * gs + j] + act[gs + j] * (hprev[j] - act[2 * gs + j])


cdef void gru_cell_bwd_(const real* act, const real* ghn, Py_ssize_t gs, const real* hprev, const real* dy,
                        real* dh, real* dxp, real* dgh, Py_ssize_t nb) noexcept nogil:
    """GRU backward, nb units of one row; dh holds dh_next and leaves holding dh_t z, the direct
    path to h_{t-1} (the caller adds dgh W_hh).
        dh_t = dy + dh_next;  dn = dh_t (1 - z);  dz = dh_t (h_{t-1} - n)
        da_n = dn (1 - n^2);  da_r = da_n h_n r (1 - r);  da_z = dz z (1 - z)
        dxp = (da_r, da_z, da_n);  dgh = (da_r, da_z, da_n r)"""
    cdef Py_ssize_t j
    cdef real r, z, n, dhe, dan
    for j in range(nb):
        r = act[j]
        z = act[gs + j]
        n = act[2 * gs + j]
        dhe = dy[j] + dh[j]
        dan = dhe * (1 - z) * (1 - n * n)
        dxp[j] = dan * ghn[j] * r * (1 - r)
        dxp[gs + j] = dhe * (hprev[j] - n) * z * (1 - z)
        dxp[2 * gs + j] = dan
        dgh[j] = dxp[j]
        dgh[gs + j] = dxp[gs + j]
        dgh[2 * gs + j] = dan * r
        dh[j] = dhe * z


# ============================================================================ LSTM

def lstm_forward(real[::1] xp, real[::1] w_hh, real[::1] h0, real[::1] c0, real[::1] y, real[::1] cs,
                 real[::1] gates, real[::1] g_step, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                 Py_ssize_t ub, int num_threads, bint save=True):
    """One LSTM layer over T steps, gates in blocks of ub units (see the module docstring).

        G = xp_t + h_{t-1} W_hh^T;  i, f, o = s(G_i, G_f, G_o), g = tanh(G_g)
        c_t = f c_{t-1} + i g;      h_t = o tanh(c_t)

    xp (N, 4H): projected inputs with both biases, blocked columns.  w_hh (4H, H): blocked rows.
    h0, c0 (B_0, H).  Writes y, cs (N, H): every step's h and c; gates (N, 4H): the activated
    gates (blocked).  g_step (B_0 4H,): one step's pre-activations.

    save=False (inference): nothing is kept for backward.  The gates are activated in place in
    g_step and c alternates between the two halves of cs (2 B_0 H,): step t writes half t % 2, so
    sequence b's final c is in half (L_b - 1) % 2.  gates is not touched.  This skips writing
    (N, 4H) + (N, H) elements and faulting their pages in."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:         # no one-thread team: MKL would see no parallel region and nest its own
        lstm_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates), ptr_(g_step),
                         &offs[0], T, H, ub, save, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates), ptr_(g_step),
                         &offs[0], T, H, ub, save, tid, fs_team_size())


cdef void lstm_fwd_thread_(const real* xp, const real* w, const real* h0, const real* c0, real* y, real* cs,
                           real* gates, real* gs, const int64_t* offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub,
                           bint save, int tid, int nt) noexcept nogil:
    """Thread tid's part of lstm_forward, inside one parallel region for the whole sequence: the
    unit blocks k = tid, tid + nt, ... at every step, then a barrier (step t + 1's GEMM reads all
    of h_t).  Each thread writes only its own columns of every buffer."""
    cdef Py_ssize_t t, k, r0, bt, rp, H4 = 4 * H, nblk = (H + ub - 1) // ub, B0 = offs[1] - offs[0]
    cdef const real* hprev
    cdef const real* cprev
    cdef real* act
    cdef real* c
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * H
        if save:
            cprev = c0 if t == 0 else cs + rp * H
            act, c = gates + r0 * H4, cs + r0 * H
        else:
            cprev = c0 if t == 0 else cs + ((t - 1) % 2) * B0 * H
            act, c = gs, cs + (t % 2) * B0 * H
        k = tid
        while k < nblk:
            lstm_fwd_block_(xp + r0 * H4, w, hprev, cprev, gs, act, c, y + r0 * H, bt, H, ub, k)
            k = k + nt
        fs_barrier()


cdef void lstm_fwd_block_(const real* xp, const real* w, const real* hprev, const real* cprev, real* gs, real* act,
                          real* c, real* h, Py_ssize_t bt, Py_ssize_t H, Py_ssize_t ub, Py_ssize_t k) noexcept nogil:
    """Block k of one forward step (bt rows): G[:, block] = xp_t[:, block] + h_{t-1} W_block^T in
    gs (bt, 4H), then the gate math of its units.  xp, act (bt, 4H), c, h (bt, H) of step t
    (act may be gs itself: the gates activate in place)."""
    cdef Py_ssize_t b, j0 = k * ub, nb = min(ub, H - k * ub), col = 4 * k * ub, H4 = 4 * H
    for b in range(bt):
        copy_(gs + b * H4 + col, xp + b * H4 + col, 4 * nb)
    step_gemm_(False, True, <int> bt, <int> (4 * nb), <int> H, 1, hprev, <int> H, w + col * H, <int> H,
            1, gs + col, <int> H4)
    for b in range(bt):
        lstm_gates_(gs + b * H4 + col, nb, cprev + b * H + j0, c + b * H + j0, act + b * H4 + col, nb)
        lstm_h_(act + b * H4 + col + 3 * nb, c + b * H + j0, h + b * H + j0, nb)


cdef void lstm_h_(const real* o, const real* c, real* h, Py_ssize_t nb) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(nb):
        h[j] = o[j] * tanh_(c[j])


def lstm_backward(real[::1] dy, real[::1] w_hh, real[::1] c0, real[::1] cs, real[::1] gates, real[::1] dgates,
                  real[::1] dh, real[::1] dc, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub,
                  int num_threads):
    """Backward through time of lstm_forward (same blocked layout), t = T-1 .. 0:

        dh_t = dy_t + dh_next;  dc_t = dc_next + dh_t o (1 - tanh(c_t)^2)
        do = dh_t tanh(c_t) o (1 - o);  di = dc_t g i (1 - i);  dg = dc_t i (1 - g^2)
        df = dc_t c_{t-1} f (1 - f);    dc_next = dc_t f;       dh_next = dG_t W_hh   (BLAS)

    dy (N, H).  dh, dc (B_0, H): the carries (see the module docstring).  Writes dgates (N, 4H),
    the pre-activation gradients dG, from which the binding forms every weight gradient."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates), ptr_(dh), ptr_(dc),
                         &offs[0], T, H, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates), ptr_(dh), ptr_(dc),
                         &offs[0], T, H, ub, tid, fs_team_size())


cdef void lstm_bwd_thread_(const real* dy, const real* w, const real* c0, const real* cs, const real* gates,
                           real* dg, real* dh, real* dc, const int64_t* offs, Py_ssize_t T, Py_ssize_t H,
                           Py_ssize_t ub, int tid, int nt) noexcept nogil:
    """Thread tid's part of lstm_backward, inside one parallel region for the whole sequence.  Per
    step: the gate gradients of its unit blocks k = tid, tid + nt, ...; a barrier (dh_next needs
    every gate); then its own units' columns of dh_next = dG_t W_hh (a column slice of W_hh).
    The next step reads only those columns of dh, so one barrier per step suffices: a thread
    already at step t - 1 writes dG_{t-1} while the others still read dG_t."""
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef const real* cprev
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        k = tid
        while k < nblk:                                    # the gate gradients of this thread's blocks
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            for b in range(bt):
                lstm_cell_bwd_(gates + (r0 + b) * H4 + col, nb, cs + (r0 + b) * H + j0, cprev + b * H + j0,
                               dy + (r0 + b) * H + j0, dh + b * H + j0, dc + b * H + j0, dg + (r0 + b) * H4 + col, nb)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:                                    # dh_next[:, its units] = dG_t W_hh[:, its units]
            j0 = k * ub
            step_gemm_(False, False, <int> bt, <int> min(ub, H - j0), <int> H4, 1, dg + r0 * H4, <int> H4, w + j0,
                    <int> H, 0, dh + j0, <int> H)
            k = k + nt


# ============================================================================ LSTM with projection

def lstm_proj_forward(real[::1] xp, real[::1] w_hh, real[::1] w_hr, real[::1] h0, real[::1] c0, real[::1] y,
                      real[::1] cs, real[::1] gates, real[::1] m, real[::1] g_step, const int64_t[::1] offs,
                      Py_ssize_t T, Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub, int num_threads):
    """lstm_forward with torch's proj_size P: the state that recurs and is output is the
    projection h_t = m_t W_hr^T (P,) of m_t = o tanh(c_t) (H,).

    w_hh (4H, P) blocked rows; w_hr (P, H).  h0 (B_0, P), c0 (B_0, H).  Writes y (N, P), cs, m
    (N, H), gates (N, 4H).  Per step: the thread's unit blocks (GEMM slice, gates, m), a barrier,
    its columns of h_t = m_t W_hr^T, a barrier."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        lstm_proj_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(w_hr), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates),
                              ptr_(m), ptr_(g_step), &offs[0], T, H, P, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_proj_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(w_hr), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates),
                              ptr_(m), ptr_(g_step), &offs[0], T, H, P, ub, tid, fs_team_size())


cdef void lstm_proj_fwd_thread_(const real* xp, const real* w, const real* wr, const real* h0, const real* c0,
                                real* y, real* cs, real* gates, real* m, real* gs, const int64_t* offs, Py_ssize_t T,
                                Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub, int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, rp, p0, p1, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef const real* hprev
    cdef const real* cprev
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * P
        cprev = c0 if t == 0 else cs + rp * H
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            for b in range(bt):
                copy_(gs + b * H4 + col, xp + (r0 + b) * H4 + col, 4 * nb)
            step_gemm_(False, True, <int> bt, <int> (4 * nb), <int> P, 1, hprev, <int> P, w + col * P, <int> P,
                    1, gs + col, <int> H4)
            for b in range(bt):
                lstm_gates_(gs + b * H4 + col, nb, cprev + b * H + j0, cs + (r0 + b) * H + j0,
                            gates + (r0 + b) * H4 + col, nb)
                lstm_h_(gates + (r0 + b) * H4 + col + 3 * nb, cs + (r0 + b) * H + j0, m + (r0 + b) * H + j0, nb)
            k = k + nt
        fs_barrier()
        p0, p1 = cols_(P, nt, tid)
        if p1 > p0:                                      # h_t[:, p0:p1] = m_t W_hr[p0:p1]^T
            step_gemm_(False, True, <int> bt, <int> (p1 - p0), <int> H, 1, m + r0 * H, <int> H, wr + p0 * H, <int> H,
                    0, y + r0 * P + p0, <int> P)
        fs_barrier()


def lstm_proj_backward(real[::1] dy, real[::1] w_hh, real[::1] w_hr, real[::1] c0, real[::1] cs, real[::1] gates,
                       real[::1] dgates, real[::1] dhp, real[::1] dm, real[::1] dh, real[::1] dc,
                       const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub,
                       int num_threads):
    """Backward through time of lstm_proj_forward.  With dhp_t = dy_t + dh_next (P,), the total
    gradient at h_t:

        dm_t = dhp_t W_hr  (H,);   then the LSTM cell backward with dm_t as dh_t;
        dh_next = dG_t W_hh  (P,),  dW_hr = sum_t dhp_t^T m_t  (the binding, one GEMM)

    dy (N, P); dh (B_0, P) and dc (B_0, H) the carries.  Writes dgates (N, 4H) and dhp (N, P);
    dm (B_0 H,) is scratch.  Per step: the thread's units (dm columns, gate gradients), a barrier,
    its P columns of dh_next and of the next step's dhp, a barrier."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        lstm_proj_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(w_hr), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates),
                              ptr_(dhp), ptr_(dm), ptr_(dh), ptr_(dc), &offs[0], T, H, P, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_proj_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(w_hr), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates),
                              ptr_(dhp), ptr_(dm), ptr_(dh), ptr_(dc), &offs[0], T, H, P, ub, tid, fs_team_size())


cdef void add_rows_(const real* a, const real* b, real* out, Py_ssize_t rows, Py_ssize_t p0, Py_ssize_t p1,
                    Py_ssize_t P) noexcept nogil:
    """out[:rows, p0:p1] = a[:rows, p0:p1] + b[:rows, p0:p1], row stride P."""
    cdef Py_ssize_t r, j
    for r in range(rows):
        for j in range(p0, p1):
            out[r * P + j] = a[r * P + j] + b[r * P + j]


cdef void lstm_proj_bwd_thread_(const real* dy, const real* w, const real* wr, const real* c0, const real* cs,
                                const real* gates, real* dg, real* dhp, real* dm, real* dh, real* dc,
                                const int64_t* offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub, int tid,
                                int nt) noexcept nogil:
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, p0, p1, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef const real* cprev
    p0, p1 = cols_(P, nt, tid)
    r0, bt = offs[T - 1], offs[T] - offs[T - 1]
    add_rows_(dy + r0 * P, dh, dhp + r0 * P, bt, p0, p1, P)          # dhp_{T-1} = dy + dh_n
    fs_barrier()
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            # dm[:, its units] = dhp_t W_hr[:, its units]: the gradient at o tanh(c) of its units
            step_gemm_(False, False, <int> bt, <int> nb, <int> P, 1, dhp + r0 * P, <int> P, wr + j0, <int> H, 0,
                    dm + j0, <int> H)
            for b in range(bt):
                lstm_proj_cell_bwd_(gates + (r0 + b) * H4 + col, nb, cs + (r0 + b) * H + j0, cprev + b * H + j0,
                                    dm + b * H + j0, dc + b * H + j0, dg + (r0 + b) * H4 + col, nb)
            k = k + nt
        fs_barrier()
        if p1 > p0:                                      # dh_next[:, p0:p1] = dG_t W_hh[:, p0:p1]
            step_gemm_(False, False, <int> bt, <int> (p1 - p0), <int> H4, 1, dg + r0 * H4, <int> H4, w + p0, <int> P,
                    0, dh + p0, <int> P)
            if t > 0:                                    # dhp_{t-1} = dy_{t-1} + dh_next, its columns
                add_rows_(dy + offs[t - 1] * P, dh, dhp + offs[t - 1] * P, offs[t] - offs[t - 1], p0, p1, P)
        fs_barrier()


cdef void lstm_proj_cell_bwd_(const real* act, Py_ssize_t gs, const real* c, const real* cprev, const real* dmv,
                              real* dc, real* dg, Py_ssize_t nb) noexcept nogil:
    """lstm_cell_bwd_ with dh_t = dm (the gradient at o tanh(c)) and no separate carry."""
    cdef Py_ssize_t j
    cdef real og, tc
    for j in range(nb):
        dg[3 * gs + j] = tanh_(c[j])
    for j in range(nb):
        og = act[3 * gs + j]
        tc = dg[3 * gs + j]
        dg[j] = dc[j] + dmv[j] * og * (1 - tc * tc)
        dg[3 * gs + j] = dmv[j] * tc * og * (1 - og)
    lstm_gates_bwd_(act, gs, cprev, dg, dc, dg, nb)


# ============================================================================ GRU

def gru_forward(real[::1] xp, real[::1] w_hh, real[::1] b_hh, real[::1] h0, real[::1] y, real[::1] gates,
                real[::1] ghn, real[::1] g_step, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                Py_ssize_t ub, int num_threads):
    """One GRU layer over T steps (torch's r, z, n; gru_cell_fwd_), gates in blocks of ub units.

    xp (N, 3H): x W_ih^T + b_ih, blocked columns.  w_hh (3H, H), b_hh (3H,): blocked rows.
    h0 (B_0, H).  Writes y (N, H), gates (N, 3H) the activated r, z, n (blocked), ghn (N, H) the
    recurrent n pre-activation h_{t-1} W_hn^T + b_hn.  g_step (B_0 3H,): one step's h W_hh^T + b_hh."""
    cdef Py_ssize_t t, r0, bt, rp, k, H3 = 3 * H, nblk = (H + ub - 1) // ub
    cdef real* pxp = ptr_(xp)
    cdef real* pw = ptr_(w_hh)
    cdef real* pb = ptr_(b_hh)
    cdef real* py = ptr_(y)
    cdef real* pg = ptr_(gates)
    cdef real* pn = ptr_(ghn)
    cdef real* gs = ptr_(g_step)
    cdef const real* hprev
    cdef int nt = max(1, min(num_threads, nblk))
    for t in range(T):
        r0, bt, rp = step_(offs, t)
        if bt == 0 or H == 0:
            continue
        hprev = &h0[0] if t == 0 else py + rp * H
        if nt > 1:
            for k in prange(nblk, nogil=True, num_threads=nt, schedule="static", chunksize=1):
                gru_fwd_block_(pxp + r0 * H3, pw, pb, hprev, gs, pg + r0 * H3, pn + r0 * H, py + r0 * H, bt, H, ub, k)
        else:
            for k in range(nblk):
                gru_fwd_block_(pxp + r0 * H3, pw, pb, hprev, gs, pg + r0 * H3, pn + r0 * H, py + r0 * H, bt, H, ub, k)


cdef void gru_fwd_block_(const real* xp, const real* w, const real* bias, const real* hprev, real* gs, real* act,
                         real* ghn, real* h, Py_ssize_t bt, Py_ssize_t H, Py_ssize_t ub, Py_ssize_t k) noexcept nogil:
    """Block k of one GRU forward step: gs[:, block] = b_hh + h_{t-1} W_block^T, then the gates."""
    cdef Py_ssize_t b, j0 = k * ub, nb = min(ub, H - k * ub), col = 3 * k * ub, H3 = 3 * H
    for b in range(bt):
        copy_(gs + b * H3 + col, bias + col, 3 * nb)
    step_gemm_(False, True, <int> bt, <int> (3 * nb), <int> H, 1, hprev, <int> H, w + col * H, <int> H,
            1, gs + col, <int> H3)
    for b in range(bt):
        gru_cell_fwd_(xp + b * H3 + col, gs + b * H3 + col, nb, hprev + b * H + j0, h + b * H + j0,
                      act + b * H3 + col, ghn + b * H + j0, nb)


def gru_backward(real[::1] dy, real[::1] w_hh, real[::1] h0, real[::1] y, real[::1] gates, real[::1] ghn,
                 real[::1] dxp, real[::1] dgh, real[::1] dh, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                 Py_ssize_t ub, int num_threads):
    """Backward through time of gru_forward (gru_cell_bwd_ per step, then dh_next += dgh_t W_hh).

    dy (N, H); dh (B_0, H) the carry.  Writes dxp (N, 3H) (gradient of x W_ih^T + b_ih) and dgh
    (N, 3H) (of h W_hh^T + b_hh), blocked; the binding forms the weight gradients from them."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghn), ptr_(dxp), ptr_(dgh),
                        ptr_(dh), &offs[0], T, H, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghn), ptr_(dxp), ptr_(dgh),
                        ptr_(dh), &offs[0], T, H, ub, tid, fs_team_size())


cdef void gru_bwd_thread_(const real* dy, const real* w, const real* h0, const real* y, const real* gates,
                          const real* ghn, real* dxp, real* dgh, real* dh, const int64_t* offs, Py_ssize_t T,
                          Py_ssize_t H, Py_ssize_t ub, int tid, int nt) noexcept nogil:
    """Thread tid's part of gru_backward, one parallel region for the sequence (as lstm_bwd_thread_):
    its blocks' gate gradients (leaving dh_t z in its columns of dh), a barrier, then its columns
    of dh_next = dh_t z + dgh_t W_hh."""
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, H3 = 3 * H, nblk = (H + ub - 1) // ub
    cdef const real* hprev
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        hprev = h0 if t == 0 else y + offs[t - 1] * H
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 3 * j0
            for b in range(bt):
                gru_cell_bwd_(gates + (r0 + b) * H3 + col, ghn + (r0 + b) * H + j0, nb, hprev + b * H + j0,
                              dy + (r0 + b) * H + j0, dh + b * H + j0, dxp + (r0 + b) * H3 + col,
                              dgh + (r0 + b) * H3 + col, nb)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:
            j0 = k * ub
            step_gemm_(False, False, <int> bt, <int> min(ub, H - j0), <int> H3, 1, dgh + r0 * H3, <int> H3, w + j0,
                    <int> H, 1, dh + j0, <int> H)
            k = k + nt


# ============================================================================ Elman RNN

cdef void rnn_act_(real* g, Py_ssize_t nb, bint relu) noexcept nogil:
    cdef Py_ssize_t j
    cdef real zero = 0
    if relu:
        for j in range(nb):                     # NaN stays NaN, as torch.relu
            g[j] = zero if g[j] < zero else g[j]
    else:
        for j in range(nb):
            g[j] = tanh_(g[j])


def rnn_forward(real[::1] xp, real[::1] w_hh, real[::1] h0, real[::1] y, const int64_t[::1] offs, Py_ssize_t T,
                Py_ssize_t H, Py_ssize_t ub, bint relu, int num_threads):
    """Elman RNN over T steps: h_t = act(xp_t + h_{t-1} W_hh^T), act = tanh or relu, computed in
    place in y (N, H).  xp (N, H) holds both biases.  Threads own column blocks of ub units."""
    cdef Py_ssize_t t, r0, bt, rp, k, nblk = (H + ub - 1) // ub
    cdef real* pxp = ptr_(xp)
    cdef real* pw = ptr_(w_hh)
    cdef real* py = ptr_(y)
    cdef const real* hprev
    cdef int nt = max(1, min(num_threads, nblk))
    for t in range(T):
        r0, bt, rp = step_(offs, t)
        if bt == 0 or H == 0:
            continue
        hprev = &h0[0] if t == 0 else py + rp * H
        if nt > 1:
            for k in prange(nblk, nogil=True, num_threads=nt, schedule="static", chunksize=1):
                rnn_fwd_block_(pxp + r0 * H, pw, hprev, py + r0 * H, bt, H, ub, k, relu)
        else:
            for k in range(nblk):
                rnn_fwd_block_(pxp + r0 * H, pw, hprev, py + r0 * H, bt, H, ub, k, relu)


cdef void rnn_fwd_block_(const real* xp, const real* w, const real* hprev, real* h, Py_ssize_t bt, Py_ssize_t H,
                         Py_ssize_t ub, Py_ssize_t k, bint relu) noexcept nogil:
    """Units [k ub, k ub + nb) of one RNN step: h = act(xp + h_{t-1} W_block^T), in place in h."""
    cdef Py_ssize_t b, j0 = k * ub, nb = min(ub, H - k * ub)
    for b in range(bt):
        copy_(h + b * H + j0, xp + b * H + j0, nb)
    step_gemm_(False, True, <int> bt, <int> nb, <int> H, 1, hprev, <int> H, w + j0 * H, <int> H, 1, h + j0, <int> H)
    for b in range(bt):
        rnn_act_(h + b * H + j0, nb, relu)


cdef void rnn_cell_bwd_(const real* h, const real* dy, const real* dh, real* dg, Py_ssize_t nb,
                        bint relu) noexcept nogil:
    """dG = (dy + dh_next) act'(G), act' from the output: 1 - h^2 (tanh) or [h > 0] (relu)."""
    cdef Py_ssize_t j
    cdef real zero = 0
    if relu:
        for j in range(nb):                     # as torch: zero gradient where h <= 0 (not at NaN)
            dg[j] = zero if h[j] <= zero else dy[j] + dh[j]
    else:
        for j in range(nb):
            dg[j] = (dy[j] + dh[j]) * (1 - h[j] * h[j])


def rnn_backward(real[::1] dy, real[::1] w_hh, real[::1] y, real[::1] dg, real[::1] dh, const int64_t[::1] offs,
                 Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, bint relu, int num_threads):
    """Backward through time of rnn_forward: dG_t = (dy_t + dh_next) act'(G_t) into dg (N, H),
    dh_next = dG_t W_hh (BLAS).  dh (B_0, H) is the carry."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        rnn_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(y), ptr_(dg), ptr_(dh), &offs[0], T, H, ub, relu, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        rnn_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(y), ptr_(dg), ptr_(dh), &offs[0], T, H, ub, relu, tid, fs_team_size())


cdef void rnn_bwd_thread_(const real* dy, const real* w, const real* y, real* dg, real* dh, const int64_t* offs,
                          Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, bint relu, int tid, int nt) noexcept nogil:
    """Thread tid's part of rnn_backward (as lstm_bwd_thread_): its units' dG, a barrier, its
    columns of dh_next = dG_t W_hh."""
    cdef Py_ssize_t t, k, b, j0, nb, r0, bt, nblk = (H + ub - 1) // ub
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            for b in range(bt):
                rnn_cell_bwd_(y + (r0 + b) * H + j0, dy + (r0 + b) * H + j0, dh + b * H + j0, dg + (r0 + b) * H + j0,
                              nb, relu)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:
            j0 = k * ub
            step_gemm_(False, False, <int> bt, <int> min(ub, H - j0), <int> H, 1, dg + r0 * H, <int> H, w + j0, <int> H,
                    0, dh + j0, <int> H)
            k = k + nt


# ============================================================================ layer-normalized cells
# Torch's column order (no blocks): the row norms need whole rows, so a step has a columns
# phase (the recurrent GEMM) and a rows phase (norms and gate math); see ln_lstm_forward.

cdef void row_norm_(const real* v, real* vhat, real* rstd, Py_ssize_t n, real eps) noexcept nogil:
    """vhat = (v - mean) rstd over the row (biased variance, two passes); writes rstd[0]."""
    cdef Py_ssize_t j
    cdef real s = 0, q = 0, mu, rs
    for j in range(n):
        s = s + v[j]
    mu = s / n
    for j in range(n):
        q = q + (v[j] - mu) * (v[j] - mu)
    rs = rsqrt_(q / n + eps)
    for j in range(n):
        vhat[j] = (v[j] - mu) * rs
    rstd[0] = rs


cdef void row_norm_bwd_(const real* dvhat, const real* vhat, real rstd, real* dv, Py_ssize_t n) noexcept nogil:
    """Gradient through vhat = (v - mean) rstd:  dv = rstd (dvhat - mean(dvhat) - vhat mean(dvhat vhat))."""
    cdef Py_ssize_t j
    cdef real s = 0, sx = 0
    for j in range(n):
        s = s + dvhat[j]
        sx = sx + dvhat[j] * vhat[j]
    s = s / n
    sx = sx / n
    for j in range(n):
        dv[j] = rstd * (dvhat[j] - s - vhat[j] * sx)


cdef inline void sum_prod_(real* acc, const real* a, const real* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + a[j] * b[j]


cdef inline void sum_(real* acc, const real* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + a[j]


cdef inline (Py_ssize_t, Py_ssize_t) cols_(Py_ssize_t G, int nt, int tid) noexcept nogil:
    """Thread tid's columns [c0, c1) of G, in slices of a multiple of 8 (a vector of floats)."""
    cdef Py_ssize_t per = ((G + nt - 1) // nt + 7) // 8 * 8
    cdef Py_ssize_t c0 = min(G, tid * per)
    return c0, min(G, c0 + per)


cdef inline int ln_threads_(int num_threads, Py_ssize_t G) noexcept nogil:
    """Threads for a layer-normalized cell: at least 64 gate columns each, else one (a small step
    costs less than the barriers)."""
    return <int> max(1, min(<Py_ssize_t> num_threads, G // 64))


# One parallel region per sequence, each step in two phases separated by barriers:
#   columns: thread tid's slice of the recurrent GEMM (all rows);
#   rows:    thread tid's rows: the row norms and the gate math, which need whole rows.
# With nt = 1 the thread functions run outside any region (the barriers do nothing).

def ln_lstm_forward(real[::1] xp, real[::1] w_hh, real[::1] gamma_hh, real[::1] gamma_c, real[::1] beta_c,
                    real[::1] h0, real[::1] c0, real[::1] y, real[::1] cs, real[::1] gates, real[::1] ghat,
                    real[::1] rstd_h, real[::1] chat, real[::1] rstd_c, real[::1] g_step, const int64_t[::1] offs,
                    Py_ssize_t T, Py_ssize_t H, double eps, int num_threads):
    """Layer-normalized LSTM (Ba et al. 2016) over T steps:

        G   = xp_t + gamma_hh LN(h_{t-1} W_hh^T)        (xp_t = LN(x_t W_ih^T) gamma_ih + biases)
        i, f, o = s(G_i, G_f, G_o);  g = tanh(G_g);   c_t = f c_{t-1} + i g
        h_t = o tanh(gamma_c LN(c_t) + beta_c)

    LN normalizes a whole row (4H for the gates, H for the cell).  Saves y, cs (N, H); gates,
    ghat (N, 4H) the activations and the normalized recurrent term; chat (N, H) the normalized
    cell; rstd_h, rstd_c (N,).  g_step (B_0 4H,)."""
    cdef int tid, nt = ln_threads_(num_threads, 4 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        ln_lstm_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(h0), ptr_(c0),
                            ptr_(y), ptr_(cs), ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c),
                            ptr_(g_step), &offs[0], T, H, eps, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_lstm_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(h0), ptr_(c0),
                            ptr_(y), ptr_(cs), ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c),
                            ptr_(g_step), &offs[0], T, H, eps, tid, fs_team_size())


cdef void ln_lstm_fwd_thread_(const real* xp, const real* w, const real* ghh, const real* gc, const real* bc,
                              const real* h0, const real* c0, real* y, real* cs, real* gates, real* ghat,
                              real* rstd_h, real* chat, real* rstd_c, real* gs, const int64_t* offs, Py_ssize_t T,
                              Py_ssize_t H, double eps, int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, b, j, row, r0, bt, rp, k0, k1, lo, hi, H4 = 4 * H
    cdef const real* hprev
    cdef const real* cprev
    cdef real e = <real> eps
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * H
        cprev = c0 if t == 0 else cs + rp * H
        k0, k1 = cols_(H4, nt, tid)
        if k1 > k0:                                      # gs[:, k0:k1] = h_{t-1} W_hh[k0:k1]^T
            step_gemm_(False, True, <int> bt, <int> (k1 - k0), <int> H, 1, hprev, <int> H, w + k0 * H, <int> H,
                    0, gs + k0, <int> H4)
        fs_barrier()
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            row_norm_(gs + b * H4, ghat + row * H4, rstd_h + row, H4, e)
            for j in range(H4):
                gs[b * H4 + j] = xp[row * H4 + j] + ghh[j] * ghat[row * H4 + j]
            lstm_gates_(gs + b * H4, H, cprev + b * H, cs + row * H, gates + row * H4, H)
            row_norm_(cs + row * H, chat + row * H, rstd_c + row, H, e)
            ln_h_(gates + row * H4 + 3 * H, chat + row * H, gc, bc, y + row * H, H)
        fs_barrier()


cdef void ln_h_(const real* o, const real* chat, const real* gc, const real* bc, real* h, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        h[j] = o[j] * tanh_(gc[j] * chat[j] + bc[j])


def ln_lstm_backward(real[::1] dy, real[::1] w_hh, real[::1] gamma_hh, real[::1] gamma_c, real[::1] beta_c,
                     real[::1] c0, real[::1] cs, real[::1] gates, real[::1] ghat, real[::1] rstd_h, real[::1] chat,
                     real[::1] rstd_c, real[::1] dgates, real[::1] dgh, real[::1] dcn, real[::1] dh, real[::1] dc,
                     real[::1] sums, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, int num_threads):
    """Backward through time of ln_lstm_forward, per row of step t:

        dh_t = dy + dh_next;  u = gamma_c chat + beta_c;  dcn = dh_t o (1 - tanh(u)^2)   (dL/du)
        do = dh_t tanh(u) o (1 - o);   dc_t = dc_next + LN'(gamma_c dcn)      (through LN(c_t))
        di, df, dg, dc_next as the plain LSTM;            dG = (di, df, dg, do)  -> dgates
        dgh = LN'(gamma_hh dG)  (gradient of h_{t-1} W_hh^T);   dh_next = dgh W_hh   (BLAS)

    with LN'(d) = rstd (d - mean(d) - vhat mean(d vhat)) the gradient through a row norm.
    Writes dgates, dgh (N, 4H) and dcn (N, H), from which the binding forms the weight gradients,
    and accumulates the norm weights' gradients while the rows are in cache: sums (num_threads,
    6H), zeroed by the caller, gets per thread sum_rows dG ghat (4H), dcn chat (H) and dcn (H)."""
    cdef int tid, nt = ln_threads_(num_threads, 4 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        ln_lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(c0), ptr_(cs),
                            ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c), ptr_(dgates), ptr_(dgh),
                            ptr_(dcn), ptr_(dh), ptr_(dc), ptr_(sums), &offs[0], T, H, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(c0), ptr_(cs),
                            ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c), ptr_(dgates), ptr_(dgh),
                            ptr_(dcn), ptr_(dh), ptr_(dc), ptr_(sums), &offs[0], T, H, tid, fs_team_size())


cdef void ln_lstm_bwd_thread_(const real* dy, const real* w, const real* ghh, const real* gc, const real* bc,
                              const real* c0, const real* cs, const real* gates, const real* ghat,
                              const real* rstd_h, const real* chat, const real* rstd_c, real* dg, real* dgh,
                              real* dcn, real* dh, real* dc, real* sums, const int64_t* offs, Py_ssize_t T,
                              Py_ssize_t H, int tid, int nt) noexcept nogil:
    """Rows phase (its rows: everything up to dgh), barrier, columns phase (its columns of
    dh_next = dgh_t W_hh), barrier (the next rows phase reads whole rows of dh)."""
    cdef Py_ssize_t t, b, j, row, r0, bt, k0, k1, lo, hi, H4 = 4 * H
    cdef const real* cprev
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            ln_lstm_row_bwd_(gates + row * H4, chat + row * H, rstd_c[row], cprev + b * H, gc, bc, dy + row * H,
                             dh + b * H, dc + b * H, dcn + row * H, dg + row * H4, H)
            for j in range(H4):                         # dgh's row holds gamma_hh dG, then LN' of it
                dgh[row * H4 + j] = ghh[j] * dg[row * H4 + j]
            row_norm_bwd_(dgh + row * H4, ghat + row * H4, rstd_h[row], dgh + row * H4, H4)
            sum_prod_(sums + tid * 6 * H, dg + row * H4, ghat + row * H4, H4)
            sum_prod_(sums + tid * 6 * H + H4, dcn + row * H, chat + row * H, H)
            sum_(sums + tid * 6 * H + 5 * H, dcn + row * H, H)
        fs_barrier()
        k0, k1 = cols_(H, nt, tid)
        if k1 > k0:
            step_gemm_(False, False, <int> bt, <int> (k1 - k0), <int> H4, 1, dgh + r0 * H4, <int> H4, w + k0, <int> H,
                    0, dh + k0, <int> H)
        fs_barrier()


cdef void ln_lstm_row_bwd_(const real* act, const real* chat, real rstd_c, const real* cprev, const real* gc,
                           const real* bc, const real* dy, const real* dh, real* dc, real* dcn, real* dg,
                           Py_ssize_t H) noexcept nogil:
    """One row of ln_lstm_backward up to dG.  dg's g slot is scratch for tanh(u), its f slot for
    gamma_c dcn and its i slot for dc_t before the final gate gradients overwrite them."""
    cdef Py_ssize_t j
    cdef real og, tu, dhe
    for j in range(H):
        dg[2 * H + j] = tanh_(gc[j] * chat[j] + bc[j])
    for j in range(H):
        og = act[3 * H + j]
        tu = dg[2 * H + j]
        dhe = dy[j] + dh[j]
        dcn[j] = dhe * og * (1 - tu * tu)
        dg[3 * H + j] = dhe * tu * og * (1 - og)
        dg[H + j] = gc[j] * dcn[j]
    row_norm_bwd_(dg + H, chat, rstd_c, dg, H)           # dg[i slot] = LN'(gamma_c dcn)
    for j in range(H):
        dg[j] = dg[j] + dc[j]
    lstm_gates_bwd_(act, H, cprev, dg, dc, dg, H)


def ln_gru_forward(real[::1] xp, real[::1] w_hh, real[::1] gamma_hh, real[::1] b_hh, real[::1] h0, real[::1] y,
                   real[::1] gates, real[::1] ghat, real[::1] rstd_h, real[::1] ghn, real[::1] g_step,
                   const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, double eps, int num_threads):
    """Layer-normalized GRU over T steps: the GRU with its recurrent term
    a = gamma_hh LN(h_{t-1} W_hh^T) + b_hh (LN over the 3H row) in place of h_{t-1} W_hh^T + b_hh,
    and xp = LN(x W_ih^T) gamma_ih + b_ih.  Saves y (N, H), gates, ghat (N, 3H), rstd_h (N,),
    ghn (N, H) the n slice of a.  g_step (B_0 3H,)."""
    cdef int tid, nt = ln_threads_(num_threads, 3 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        ln_gru_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(b_hh), ptr_(h0), ptr_(y), ptr_(gates),
                           ptr_(ghat), ptr_(rstd_h), ptr_(ghn), ptr_(g_step), &offs[0], T, H, eps, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_gru_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(b_hh), ptr_(h0), ptr_(y), ptr_(gates),
                           ptr_(ghat), ptr_(rstd_h), ptr_(ghn), ptr_(g_step), &offs[0], T, H, eps, tid, fs_team_size())


cdef void ln_gru_fwd_thread_(const real* xp, const real* w, const real* ghh, const real* bhh, const real* h0,
                             real* y, real* gates, real* ghat, real* rstd_h, real* ghn, real* gs, const int64_t* offs,
                             Py_ssize_t T, Py_ssize_t H, double eps, int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, b, j, row, r0, bt, k0, k1, lo, hi, H3 = 3 * H
    cdef const real* hprev
    cdef real e = <real> eps
    for t in range(T):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        hprev = h0 if t == 0 else y + offs[t - 1] * H
        k0, k1 = cols_(H3, nt, tid)
        if k1 > k0:
            step_gemm_(False, True, <int> bt, <int> (k1 - k0), <int> H, 1, hprev, <int> H, w + k0 * H, <int> H,
                    0, gs + k0, <int> H3)
        fs_barrier()
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            row_norm_(gs + b * H3, ghat + row * H3, rstd_h + row, H3, e)
            for j in range(H3):
                gs[b * H3 + j] = ghh[j] * ghat[row * H3 + j] + bhh[j]
            gru_cell_fwd_(xp + row * H3, gs + b * H3, H, hprev + b * H, y + row * H, gates + row * H3,
                          ghn + row * H, H)
        fs_barrier()


def ln_gru_backward(real[::1] dy, real[::1] w_hh, real[::1] gamma_hh, real[::1] h0, real[::1] y, real[::1] gates,
                    real[::1] ghat, real[::1] rstd_h, real[::1] ghn, real[::1] dxp, real[::1] da, real[::1] dgh,
                    real[::1] dh, real[::1] sums, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, int num_threads):
    """Backward through time of ln_gru_forward: the GRU step backward (gru_cell_bwd_) gives dxp
    and da (gradient of the recurrent term a, (N, 3H)); then dgh = LN'(gamma_hh da), the gradient
    of h_{t-1} W_hh^T, and dh_next = dh_t z + dgh W_hh.  sums (num_threads, 6H), zeroed by the
    caller, gets per thread sum_rows da ghat (3H) and da (3H): gamma_hh's and b_hh's gradients."""
    cdef int tid, nt = ln_threads_(num_threads, 3 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        ln_gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghat),
                           ptr_(rstd_h), ptr_(ghn), ptr_(dxp), ptr_(da), ptr_(dgh), ptr_(dh), ptr_(sums), &offs[0], T, H,
                           0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghat),
                           ptr_(rstd_h), ptr_(ghn), ptr_(dxp), ptr_(da), ptr_(dgh), ptr_(dh), ptr_(sums), &offs[0], T, H,
                           tid, fs_team_size())


cdef void ln_gru_bwd_thread_(const real* dy, const real* w, const real* ghh, const real* h0, const real* y,
                             const real* gates, const real* ghat, const real* rstd_h, const real* ghn, real* dxp,
                             real* da, real* dgh, real* dh, real* sums, const int64_t* offs, Py_ssize_t T, Py_ssize_t H,
                             int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, b, j, row, r0, bt, k0, k1, lo, hi, H3 = 3 * H
    cdef const real* hprev
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        hprev = h0 if t == 0 else y + offs[t - 1] * H
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            gru_cell_bwd_(gates + row * H3, ghn + row * H, H, hprev + b * H, dy + row * H, dh + b * H,
                          dxp + row * H3, da + row * H3, H)
            for j in range(H3):
                dgh[row * H3 + j] = ghh[j] * da[row * H3 + j]
            row_norm_bwd_(dgh + row * H3, ghat + row * H3, rstd_h[row], dgh + row * H3, H3)
            sum_prod_(sums + tid * 6 * H, da + row * H3, ghat + row * H3, H3)
            sum_(sums + tid * 6 * H + H3, da + row * H3, H3)
        fs_barrier()
        k0, k1 = cols_(H, nt, tid)
        if k1 > k0:                                      # dh_next[:, k0:k1] = dh_t z + dgh_t W_hh[:, k0:k1]
            step_gemm_(False, False, <int> bt, <int> (k1 - k0), <int> H3, 1, dgh + r0 * H3, <int> H3, w + k0, <int> H,
                    1, dh + k0, <int> H)
        fs_barrier()
