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
    if real is float:
        return 1.0 / (1.0 + fs_expf(-x))
    else:
        return 1.0 / (1.0 + exp(-x))


cdef inline real tanh_(real x) noexcept nogil:
    if real is float:
        return 2.0 / (1.0 + fs_expf(-2.0 * x)) - 1.0
    else:
        return tanh(x)


cdef inline real* ptr_(real[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


def lstm_forward(real[::1] xp, real[::1] w_hh, real[::1] h0, real[::1] c0, real[::1] y, real[::1] cs,
                 real[::1] gates, real[::1] g_step, Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, int num_threads):
    """One LSTM layer over T steps.

    xp (T*B*4H,): projected inputs with both biases.  w_hh (4H*H,) row-major (4H, H).
    h0, c0 (B*H,).  Outputs: y (T*B*H,) hidden states, cs (T*B*H,) cell states, gates (T*B*4H,)
    activated i, f, g, o.  g_step (B*4H,): scratch for one step's pre-activations."""
    cdef Py_ssize_t t, e, b, j, n = B * H, H4 = 4 * H
    cdef real* pxp = ptr_(xp)
    cdef real* pw = ptr_(w_hh)
    cdef real* py = ptr_(y)
    cdef real* pc = ptr_(cs)
    cdef real* pg = ptr_(gates)
    cdef real* gs = ptr_(g_step)
    cdef const real* hprev
    cdef const real* cprev
    cdef real* gt
    cdef real ig, fg, gg, og, c
    cdef int nt = max(1, num_threads)
    if T == 0 or n == 0:
        return
    for t in range(T):
        hprev = &h0[0] if t == 0 else py + (t - 1) * n
        cprev = &c0[0] if t == 0 else pc + (t - 1) * n
        for e in range(B * H4):
            gs[e] = pxp[t * B * H4 + e]
        # G = xp_t + h_{t-1} W_hh^T   (B x 4H)
        gemm_rm(False, True, <int> B, <int> H4, <int> H, 1, hprev, <int> H, pw, <int> H, 1, gs, <int> H4)
        gt = pg + t * B * H4
        for e in prange(n, nogil=True, num_threads=nt, schedule="static"):
            b = e // H
            j = e % H
            ig = sigmoid_(gs[b * H4 + j])
            fg = sigmoid_(gs[b * H4 + H + j])
            gg = tanh_(gs[b * H4 + 2 * H + j])
            og = sigmoid_(gs[b * H4 + 3 * H + j])
            c = fg * cprev[e] + ig * gg
            pc[t * n + e] = c
            py[t * n + e] = og * tanh_(c)
            gt[b * H4 + j] = ig
            gt[b * H4 + H + j] = fg
            gt[b * H4 + 2 * H + j] = gg
            gt[b * H4 + 3 * H + j] = og


def lstm_backward(real[::1] dy, real[::1] dh_n, real[::1] dc_n, real[::1] w_hh, real[::1] c0, real[::1] cs,
                  real[::1] gates, real[::1] dgates, real[::1] dh0, real[::1] dc0,
                  Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, int num_threads):
    """Backward through time of lstm_forward.

    dy (T*B*H,): gradient at every step's output; dh_n, dc_n (B*H,): at the final states.
    Outputs: dgates (T*B*4H,) pre-activation gradients dG, dh0 / dc0 (B*H,) the gradients at the
    initial states.  dh0 and dc0 also carry dh_next / dc_next between steps."""
    cdef Py_ssize_t t, e, b, j, n = B * H, H4 = 4 * H
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
    cdef real ig, fg, gg, og, tc, dhe, dce
    cdef int nt = max(1, num_threads)
    if n == 0:
        return
    for e in range(n):
        dh[e] = dh_n[e]
        dc[e] = dc_n[e]
    for t in range(T - 1, -1, -1):
        cprev = &c0[0] if t == 0 else pc + (t - 1) * n
        gt = pg + t * B * H4
        dgt = pdg + t * B * H4
        for e in prange(n, nogil=True, num_threads=nt, schedule="static"):
            b = e // H
            j = e % H
            ig = gt[b * H4 + j]
            fg = gt[b * H4 + H + j]
            gg = gt[b * H4 + 2 * H + j]
            og = gt[b * H4 + 3 * H + j]
            tc = tanh_(pc[t * n + e])
            dhe = pdy[t * n + e] + dh[e]
            dce = dc[e] + dhe * og * (1 - tc * tc)
            dgt[b * H4 + j] = dce * gg * ig * (1 - ig)
            dgt[b * H4 + H + j] = dce * cprev[e] * fg * (1 - fg)
            dgt[b * H4 + 2 * H + j] = dce * ig * (1 - gg * gg)
            dgt[b * H4 + 3 * H + j] = dhe * tc * og * (1 - og)
            dc[e] = dce * fg
        # dh_next = dG_t W_hh   (B x H)
        gemm_rm(False, False, <int> B, <int> H, <int> H4, 1, dgt, <int> H4, pw, <int> H, 0, dh, <int> H)
