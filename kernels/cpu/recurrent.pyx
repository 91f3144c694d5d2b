# cython: language_level=3
"""Whole-sequence LSTM on the CPU: forward and backward through time, no Python per step.

The binding does the input projection for every step as one GEMM beforehand,
xp = x W_ih^T + b_ih + b_hh (T, B, 4H), and the weight GEMMs over all steps afterwards.  Per step
this kernel runs the recurrent GEMM through torch's BLAS and one fused OpenMP pass over the
gates (torch's order i, f, g, o):

    G   = xp_t + h_{t-1} W_hh^T                             (BLAS, B x 4H x H)
    i, f, o = sigmoid(G_i, G_f, G_o);  g = tanh(G_g)
    c_t = f c_{t-1} + i g;             h_t = o tanh(c_t)

The activated gates and c_t are saved for backward (T, B, 4H) and (T, B, H).

Backward, t = T-1 .. 0, with dh = dY_t + dh_next and dc = dc_next:
    dc += dh o (1 - tanh(c_t)^2)
    do  = dh tanh(c_t) o (1 - o)
    di  = dc g i (1 - i);   dg = dc i (1 - g^2);   df = dc c_{t-1} f (1 - f)
    dc_next = dc f;         dh_next = dG_t W_hh                (BLAS, B x H x 4H)
dG (T, B, 4H) is returned whole: the binding forms dW_hh = dG^T [h_0 .. h_{T-2}], dW_ih = dG^T x,
dx = dG W_ih and the bias gradients as large GEMMs / sums over all steps.
"""
from cython.parallel cimport prange
from libc.math cimport exp, tanh

from _common cimport real

include "_blas.pxi"

cdef extern from "_fastmath.h" nogil:
    float fs_expf(float x)


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


# Gate layout.  The binding permutes the 4H gate rows of the weights (and so the columns of the
# pre-activations) into blocks of `ub` hidden units: block k holds the i, f, g, o rows of units
# [k ub, (k + 1) ub) one after another.  Each OpenMP thread owns whole blocks, so one step is a
# single parallel region: the thread's own GEMM slice, then the gate math of its units, with no
# barrier in between and MKL running single-threaded inside it.

cdef void lstm_cell_fwd_(const real* g, Py_ssize_t gs, const real* cprev, real* c, real* h, real* act,
                         Py_ssize_t nb) noexcept nogil:
    """nb units of one batch row.  g: their pre-activations i, f, g, o at offsets 0, gs, 2 gs, 3 gs;
    writes c, h (nb,) and the activated gates to act (same layout).  One transcendental per loop:
    gcc if-converts and vectorizes each (a loop with five exps stays scalar)."""
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
    for j in range(nb):
        h[j] = act[3 * gs + j] * tanh_(c[j])


cdef void lstm_cell_bwd_(const real* act, Py_ssize_t gs, const real* c, const real* cprev, const real* dy,
                         const real* dh, real* dc, real* dg, Py_ssize_t nb) noexcept nogil:
    """nb units of one batch row: gate gradients dg (layout of act) and dc_next (in dc).
    dg's o slot holds tanh(c) until the last loop overwrites it (one transcendental per loop)."""
    cdef Py_ssize_t j
    cdef real ig, fg, gg, og, tc, dhe, dce
    for j in range(nb):
        dg[3 * gs + j] = tanh_(c[j])
    for j in range(nb):
        ig = act[j]
        fg = act[gs + j]
        gg = act[2 * gs + j]
        og = act[3 * gs + j]
        tc = dg[3 * gs + j]
        dhe = dy[j] + dh[j]
        dce = dc[j] + dhe * og * (1 - tc * tc)
        dg[j] = dce * gg * ig * (1 - ig)
        dg[gs + j] = dce * cprev[j] * fg * (1 - fg)
        dg[2 * gs + j] = dce * ig * (1 - gg * gg)
        dg[3 * gs + j] = dhe * tc * og * (1 - og)
        dc[j] = dce * fg


def lstm_forward(real[::1] xp, real[::1] w_hh, real[::1] h0, real[::1] c0, real[::1] y, real[::1] cs,
                 real[::1] gates, real[::1] g_step, Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t ub,
                 int num_threads):
    """One LSTM layer over T steps, gates in blocks of ub units (see above).

    xp (T*B*4H,): projected inputs with both biases, blocked columns.  w_hh (4H*H,): blocked
    rows of (4H, H).  h0, c0 (B*H,).  Outputs: y (T*B*H,) hidden states, cs (T*B*H,) cell states,
    gates (T*B*4H,) activated gates (blocked).  g_step (B*4H,): one step's pre-activations."""
    cdef Py_ssize_t t, k, b, j0, nb, col, n = B * H, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef real* pxp = ptr_(xp)
    cdef real* pw = ptr_(w_hh)
    cdef real* py = ptr_(y)
    cdef real* pc = ptr_(cs)
    cdef real* pg = ptr_(gates)
    cdef real* gs = ptr_(g_step)
    cdef const real* hprev
    cdef const real* cprev
    cdef const real* xt
    cdef real* gt
    cdef int nt = max(1, min(num_threads, nblk))
    if T == 0 or n == 0:
        return
    for t in range(T):
        hprev = &h0[0] if t == 0 else py + (t - 1) * n
        cprev = &c0[0] if t == 0 else pc + (t - 1) * n
        xt = pxp + t * B * H4
        gt = pg + t * B * H4
        for k in prange(nblk, nogil=True, num_threads=nt, schedule="static", chunksize=1):
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            for b in range(B):                   # G[:, block] = xp_t[:, block] + h_{t-1} W_block^T
                copy_(gs + b * H4 + col, xt + b * H4 + col, 4 * nb)
            gemm_rm(False, True, <int> B, <int> (4 * nb), <int> H, 1, hprev, <int> H, pw + col * H, <int> H,
                    1, gs + col, <int> H4)
            for b in range(B):
                lstm_cell_fwd_(gs + b * H4 + col, nb, cprev + b * H + j0, pc + t * n + b * H + j0,
                               py + t * n + b * H + j0, gt + b * H4 + col, nb)


cdef inline void copy_(real* dst, const real* src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


def lstm_backward(real[::1] dy, real[::1] dh_n, real[::1] dc_n, real[::1] w_hh, real[::1] c0, real[::1] cs,
                  real[::1] gates, real[::1] dgates, real[::1] dh0, real[::1] dc0,
                  Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t ub, int num_threads):
    """Backward through time of lstm_forward (the same blocked gate layout).

    dy (T*B*H,): gradient at every step's output; dh_n, dc_n (B*H,): at the final states.
    Outputs: dgates (T*B*4H,) pre-activation gradients dG, dh0 / dc0 (B*H,) the gradients at the
    initial states.  dh0 and dc0 also carry dh_next / dc_next between steps."""
    cdef Py_ssize_t t, e, k, b, j0, nb, col, n = B * H, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef real* pdy = ptr_(dy)
    cdef real* pw = ptr_(w_hh)
    cdef real* pc = ptr_(cs)
    cdef real* pg = ptr_(gates)
    cdef real* pdg = ptr_(dgates)
    cdef real* dh = ptr_(dh0)
    cdef real* dc = ptr_(dc0)
    cdef const real* cprev
    cdef real* gt
    cdef real* dgt
    cdef int nt = max(1, min(num_threads, nblk))
    if n == 0:
        return
    for e in range(n):
        dh[e] = dh_n[e]
        dc[e] = dc_n[e]
    for t in range(T - 1, -1, -1):
        cprev = &c0[0] if t == 0 else pc + (t - 1) * n
        gt = pg + t * B * H4
        dgt = pdg + t * B * H4
        for k in prange(nblk, nogil=True, num_threads=nt, schedule="static", chunksize=1):
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            for b in range(B):
                lstm_cell_bwd_(gt + b * H4 + col, nb, pc + t * n + b * H + j0, cprev + b * H + j0,
                               pdy + t * n + b * H + j0, dh + b * H + j0, dc + b * H + j0, dgt + b * H4 + col, nb)
        # dh_next = dG_t W_hh   (B x H; every output unit needs every gate: after the barrier)
        gemm_rm(False, False, <int> B, <int> H, <int> H4, 1, dgt, <int> H4, pw, <int> H, 0, dh, <int> H)
