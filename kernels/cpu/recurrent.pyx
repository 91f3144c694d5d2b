# cython: language_level=3
"""Whole-sequence recurrent layers on the CPU: forward and backward through time, no Python per step.

Cells (gate order as torch): LSTM (i, f, g, o), GRU (r, z, n), Elman RNN (tanh / relu), and the
layer-normalized LSTM and GRU (Ba et al. 2016).  The binding does the input projection of every
step as one GEMM beforehand and the weight GEMMs over all steps afterwards; these kernels run the
sequential part.  Per step: the recurrent product, then one fused OpenMP pass over the gates.

The recurrent product.  In fp32 (layers of two steps and more) it runs on packed panels
(_panel.h): W_hh is the same for all T steps, so each thread packs its slice once per call
into the register-blocked kernel's layout and keeps it in its core's cache across the steps.
The LSTM's cell runs on the accumulators themselves (lstm_forward_panels: the (B, 4H)
pre-activations never reach memory), and with 8 rows a step or more its input projection runs
there too ([x_t | h_{t-1}] [W_ih | W_hh]^T: no (N, 4H) xp is written and read back).  Every
backward forms dh_next = dG W_hh on panels of W_hh's columns.  fp64 (and T = 1) take torch's
BLAS per step (step_gemm_).

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

Files.  This module holds what the cells share (the per-step GEMM, the gate math); the cells'
kernels are included from _recurrent_lstm.pxi (LSTM, with and without projection),
_recurrent_gru_rnn.pxi and _recurrent_layer_norm.pxi: one compiled module, fastseq._cpu.recurrent.

Memory per step and row (fp32): the recurrent GEMM reads W_hh (G H, shared by the rows); the
pointwise pass reads G gate columns and writes G + 2 columns (activations, c and h).  The weight
is the traffic: at B = 1 a step is a matrix-vector product, bound by the copy bandwidth.
"""
from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int64_t

from _common cimport chunk_, col_slice_, copy_, exp_, ptr_, real, tanh_
from _row_norm cimport row_norm_bwd_, row_normalize_, row_stats_
from fastseq._cpu._blas cimport gemm_rm, install_blas, blas_installed

cdef extern from "_fastmath.h" nogil:
    void fs_barrier()
    int fs_team_size()

cdef extern from "_panel.h" nogil:
    int fs_panel_supported(int isa)
    int fs_panel_select(int isa)
    int fs_panel_isa()
    int fs_panel_width()
    void fs_pack_gates(const float* W, long H, long K, long j0, long nb, int vw, long Kp, long k0, float* P)
    void fs_pack_units(const float* W, long G, long H, long ub, long u0, long nu, int vw, float* P)
    void fs_pack_rows(const float* W, long K, long r0, long nr, int vw, float* P)
    void fs_lstm_panel(long bt, long K1, const float* x, long ldx, long K2, const float* hprev, long ldh,
                       const float* P, const float* xp, long ldxp, long gx, const float* cprev, float* c, float* h,
                       long ldc, float* act, long ldact, long ga, int nu)
    void fs_panel_gemm(long bt, long K, const float* a, long lda, const float* P, float* out, long ldo, int ncol,
                       int add)


def set_blas(size_t sgemm_addr, size_t dgemm_addr):
    """Install the GEMM of every kernel module (fastseq._cpu._blas owns it; see _blas.pyx)."""
    install_blas(sgemm_addr, dgemm_addr)


def has_blas():
    return blas_installed()


cdef inline real sigmoid_(real x) noexcept nogil:
    cdef real one = 1
    return one / (one + exp_(-x))


cdef inline (Py_ssize_t, Py_ssize_t, Py_ssize_t) step_(const int64_t[::1] offs, Py_ssize_t t) noexcept nogil:
    """(first row of step t, its row count B_t, first row of step t - 1)."""
    return offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0


# ============================================================================ packed panels (fp32)

ISA_NAMES = ("generic", "avx2", "avx512")
fs_panel_select(-1)          # the widest this CPU has, chosen once here (not racily inside a parallel region)


def panel_isa(int isa=-2):
    """The instruction set of the packed-panel kernels (_panel.h), an index into ISA_NAMES.  With
    isa >= 0 (or -1: the widest), use it from now on; returns -1 if the CPU lacks it.  Switching
    while another thread runs a recurrent kernel is not supported (the panels' width changes):
    the knob is for tests and benchmarks (fastseq.recurrent.cpu.panel_isa)."""
    if isa >= -1:
        return fs_panel_select(isa)
    return fs_panel_isa()


def panel_supported(int isa):
    return bool(fs_panel_supported(isa))


def panel_width():
    """Floats per vector of the instruction set in use (the units of one forward panel)."""
    return fs_panel_width()


def lstm_panel_floats(Py_ssize_t H, Py_ssize_t K, Py_ssize_t ub, bint backward):
    """Floats of the packed weights of lstm_forward_panels (K = its panel rows: H, or I + H with the
    input projection fused) or of lstm_backward_panels (backward=True)."""
    cdef Py_ssize_t vw = fs_panel_width(), nblk = (H + ub - 1) // ub
    if backward:
        return nblk * ((ub + 4 * vw - 1) // (4 * vw)) * 4 * vw * 4 * H
    return nblk * ((ub + vw - 1) // vw) * 4 * vw * K


def ln_panel_floats(Py_ssize_t G, Py_ssize_t H, int num_threads):
    """Floats of the packed weights of a layer-normalized cell of G gates (ln_lstm_forward /
    _backward, ln_gru_*) for up to num_threads threads: the larger of its forward's and its
    backward's (ln_panels_fwd_ / ln_panels_bwd_)."""
    cdef Py_ssize_t n, most = 0
    for n in range(1, max(1, num_threads) + 1):        # the team OpenMP starts may be smaller
        most = max(most, n * max(ln_panel_stride_(G * H, H, n), ln_panel_stride_(H, G * H, n)))
    return most


cdef Py_ssize_t ln_panel_stride_(Py_ssize_t cols, Py_ssize_t K, Py_ssize_t nt) noexcept nogil:
    """Floats of one thread's panels over its column slice (col_slice_, align 8) of `cols` columns
    with K rows each."""
    cdef Py_ssize_t vw4 = 4 * fs_panel_width(), per = ((cols + nt - 1) // nt + 7) // 8 * 8
    return (per + vw4 - 1) // vw4 * vw4 * K


cdef void panel_cols_(Py_ssize_t bt, Py_ssize_t K, const float* a, Py_ssize_t lda, const float* P, Py_ssize_t n,
                      float* out, Py_ssize_t ldo, bint add) noexcept nogil:
    """out[:bt, :n] = (or +=, add) a P for n output columns packed as consecutive panels of
    4 panel_width()."""
    cdef Py_ssize_t p = 0, vw4 = 4 * fs_panel_width()
    while p * vw4 < n:
        fs_panel_gemm(bt, K, a, lda, P + p * vw4 * K, out + p * vw4, ldo, <int> min(vw4, n - p * vw4), add)
        p = p + 1


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


# ============================================================================ the cells

include "_recurrent_lstm.pxi"
include "_recurrent_gru_rnn.pxi"
include "_recurrent_layer_norm.pxi"
