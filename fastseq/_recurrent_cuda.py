"""The GPU time loop of the recurrent layers: per step a torch GEMM (cuBLAS) and one fused
pointwise kernel of kernels/cuda/recurrent.py, both on torch's current stream, no host sync.

Every function here takes the buffers of its CPU twin in kernels/cpu/recurrent.pyx (same
packed-row layout offs, same carries), as torch tensors; the gate columns are in torch's order
(the CPU's unit-block size ub is H: one block), and ub / num_threads are ignored.  Differences:
the LSTM forward always saves (no inference-only mode), the layer-normalized backwards take no
per-thread `sums` (the binding reduces the norm-weight gradients with torch), and there is no
projected LSTM (proj_size runs torch's own forward on a GPU).  fastseq/recurrent.py calls one
or the other through _loops().  Buffers are flat and contiguous; rows [r0, r1) of a (rows, K)
buffer are the contiguous slice [r0 K, r1 K).

A step of the sequence is a GEMM launch plus a kernel launch, so at small B and H the launch
latency (a few us each) bounds it; the weights stream from L2 every step.
"""
from __future__ import annotations

import torch


def _k():
    from ._dispatch import cuda_kernels

    return cuda_kernels("recurrent")


def _arr(t):
    """A Numba view of tensor t (flat).  A CPU tensor (only the CUDA simulator's tests pass them)
    is viewed as numpy, which the simulator takes as a device array."""
    if t.device.type == "cpu":
        return t.detach().numpy().reshape(-1)
    from ._cuda._common import as_array

    return as_array(t.reshape(-1))


def _stream(t):
    if t.device.type == "cpu":
        return 0
    from ._cuda._common import torch_stream

    return torch_stream()


def _rows(buf, width, r0, r1):
    """Rows [r0, r1) of the flat (rows, width) buffer, as a (r1 - r0, width) view."""
    return buf.view(-1)[r0 * width:r1 * width].view(r1 - r0, width)


def _steps(offs, T, reverse=False):
    """(t, r0, r1, rp) per step: its rows [r0, r1) and the first row of step t - 1."""
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        r0, r1 = int(offs[t]), int(offs[t + 1])
        if r1 > r0:
            yield t, r0, r1, int(offs[t - 1]) if t > 0 else 0


def _prev(t, rp, bt, first, seq, H):
    """The (bt, H) rows of h_{t-1} (or c_{t-1}): the initial state at t = 0, else step t - 1's first rows."""
    return _rows(first, H, 0, bt) if t == 0 else _rows(seq, H, rp, rp + bt)


def lstm_forward(xp, w_hh, h0, c0, y, cs, gates, g_step, offs, T, H, ub=0, num_threads=0):
    K, s = _k(), _stream(xp)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(offs, T):
        bt = r1 - r0
        g = _rows(g_step, 4 * H, 0, bt)
        torch.addmm(_rows(xp, 4 * H, r0, r1), _prev(t, rp, bt, h0, y, H), w.t(), out=g)
        K.lstm_step_forward(_arr(g), _arr(_prev(t, rp, bt, c0, cs, H)), _arr(_rows(cs, H, r0, r1)),
                            _arr(_rows(y, H, r0, r1)), _arr(_rows(gates, 4 * H, r0, r1)), bt, H, s)


def lstm_backward(dy, w_hh, c0, cs, gates, dgates, dh, dc, offs, T, H, ub=0, num_threads=0):
    K, s = _k(), _stream(dy)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(offs, T, reverse=True):
        bt = r1 - r0
        dg = _rows(dgates, 4 * H, r0, r1)
        K.lstm_step_backward(_arr(_rows(gates, 4 * H, r0, r1)), _arr(_rows(cs, H, r0, r1)),
                             _arr(_prev(t, rp, bt, c0, cs, H)), _arr(_rows(dy, H, r0, r1)), _arr(_rows(dh, H, 0, bt)),
                             _arr(_rows(dc, H, 0, bt)), _arr(dg), bt, H, s)
        torch.mm(dg, w, out=_rows(dh, H, 0, bt))                    # dh_next = dG_t W_hh


def gru_forward(xp, w_hh, b_hh, h0, y, gates, ghn, g_step, offs, T, H, ub=0, num_threads=0):
    K, s = _k(), _stream(xp)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(offs, T):
        bt = r1 - r0
        hprev = _prev(t, rp, bt, h0, y, H)
        gh = _rows(g_step, 3 * H, 0, bt)
        torch.addmm(b_hh.view(1, 3 * H), hprev, w.t(), out=gh)
        K.gru_step_forward(_arr(_rows(xp, 3 * H, r0, r1)), _arr(gh), _arr(hprev), _arr(_rows(y, H, r0, r1)),
                           _arr(_rows(gates, 3 * H, r0, r1)), _arr(_rows(ghn, H, r0, r1)), bt, H, s)


def gru_backward(dy, w_hh, h0, y, gates, ghn, dxp, dgh, dh, offs, T, H, ub=0, num_threads=0):
    K, s = _k(), _stream(dy)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(offs, T, reverse=True):
        bt = r1 - r0
        d = _rows(dh, H, 0, bt)
        dgh_t = _rows(dgh, 3 * H, r0, r1)
        K.gru_step_backward(_arr(_rows(gates, 3 * H, r0, r1)), _arr(_rows(ghn, H, r0, r1)),
                            _arr(_prev(t, rp, bt, h0, y, H)), _arr(_rows(dy, H, r0, r1)), _arr(d),
                            _arr(_rows(dxp, 3 * H, r0, r1)), _arr(dgh_t), _arr(d), bt, H, s)
        d.addmm_(dgh_t, w)                                      # dh_next = dh_t z + dgh_t W_hh


def rnn_forward(xp, w_hh, h0, y, offs, T, H, ub=0, relu=False, num_threads=0):
    K, s = _k(), _stream(xp)
    w = w_hh.view(H, H)
    for t, r0, r1, rp in _steps(offs, T):
        bt = r1 - r0
        h = _rows(y, H, r0, r1)
        torch.addmm(_rows(xp, H, r0, r1), _prev(t, rp, bt, h0, y, H), w.t(), out=h)
        K.rnn_step_forward(_arr(h), _arr(h), bt, H, bool(relu), s)


def rnn_backward(dy, w_hh, y, dg, dh, offs, T, H, ub=0, relu=False, num_threads=0):
    K, s = _k(), _stream(dy)
    w = w_hh.view(H, H)
    for t, r0, r1, rp in _steps(offs, T, reverse=True):
        bt = r1 - r0
        dg_t = _rows(dg, H, r0, r1)
        K.rnn_step_backward(_arr(_rows(y, H, r0, r1)), _arr(_rows(dy, H, r0, r1)), _arr(_rows(dh, H, 0, bt)),
                            _arr(dg_t), bt, H, bool(relu), s)
        torch.mm(dg_t, w, out=_rows(dh, H, 0, bt))


def ln_lstm_forward(xp, w_hh, g_hh, g_c, b_c, h0, c0, y, cs, gates, ghat, rstd_h, chat, rstd_c, g_step, offs,
                    T, H, eps, num_threads=0):
    K, s = _k(), _stream(xp)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(offs, T):
        bt = r1 - r0
        gh = _rows(g_step, 4 * H, 0, bt)
        torch.mm(_prev(t, rp, bt, h0, y, H), w.t(), out=gh)
        K.ln_lstm_step_forward(_arr(_rows(xp, 4 * H, r0, r1)), _arr(gh), _arr(g_hh), _arr(g_c), _arr(b_c),
                               _arr(_prev(t, rp, bt, c0, cs, H)), _arr(_rows(cs, H, r0, r1)), _arr(_rows(y, H, r0, r1)),
                               _arr(_rows(gates, 4 * H, r0, r1)), _arr(_rows(ghat, 4 * H, r0, r1)),
                               _arr(rstd_h[r0:r1]), _arr(_rows(chat, H, r0, r1)), _arr(rstd_c[r0:r1]), bt, H,
                               float(eps), s)


def ln_lstm_backward(dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dgates, dgh, dcn, dh, dc,
                     offs, T, H, num_threads=0):
    K, s = _k(), _stream(dy)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(offs, T, reverse=True):
        bt = r1 - r0
        dgh_t = _rows(dgh, 4 * H, r0, r1)
        K.ln_lstm_step_backward(_arr(_rows(gates, 4 * H, r0, r1)), _arr(_rows(ghat, 4 * H, r0, r1)),
                                _arr(rstd_h[r0:r1]), _arr(_rows(chat, H, r0, r1)), _arr(rstd_c[r0:r1]),
                                _arr(_prev(t, rp, bt, c0, cs, H)), _arr(g_hh), _arr(g_c), _arr(b_c),
                                _arr(_rows(dy, H, r0, r1)), _arr(_rows(dh, H, 0, bt)), _arr(_rows(dc, H, 0, bt)),
                                _arr(_rows(dgates, 4 * H, r0, r1)), _arr(dgh_t), _arr(_rows(dcn, H, r0, r1)), bt, H, s)
        torch.mm(dgh_t, w, out=_rows(dh, H, 0, bt))


def ln_gru_forward(xp, w_hh, g_hh, b_hh, h0, y, gates, ghat, rstd_h, ghn, g_step, offs, T, H, eps, num_threads=0):
    K, s = _k(), _stream(xp)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(offs, T):
        bt = r1 - r0
        hprev = _prev(t, rp, bt, h0, y, H)
        gh = _rows(g_step, 3 * H, 0, bt)
        torch.mm(hprev, w.t(), out=gh)
        K.ln_gru_step_forward(_arr(_rows(xp, 3 * H, r0, r1)), _arr(gh), _arr(g_hh), _arr(b_hh), _arr(hprev),
                              _arr(_rows(y, H, r0, r1)), _arr(_rows(gates, 3 * H, r0, r1)),
                              _arr(_rows(ghat, 3 * H, r0, r1)), _arr(rstd_h[r0:r1]), _arr(_rows(ghn, H, r0, r1)),
                              bt, H, float(eps), s)


def ln_gru_backward(dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dxp, da, dgh, dh, offs, T, H, num_threads=0):
    K, s = _k(), _stream(dy)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(offs, T, reverse=True):
        bt = r1 - r0
        d = _rows(dh, H, 0, bt)
        dgh_t = _rows(dgh, 3 * H, r0, r1)
        K.ln_gru_step_backward(_arr(_rows(gates, 3 * H, r0, r1)), _arr(_rows(ghat, 3 * H, r0, r1)),
                               _arr(rstd_h[r0:r1]), _arr(_rows(ghn, H, r0, r1)), _arr(_prev(t, rp, bt, h0, y, H)),
                               _arr(g_hh), _arr(_rows(dy, H, r0, r1)), _arr(d), _arr(_rows(dxp, 3 * H, r0, r1)),
                               _arr(_rows(da, 3 * H, r0, r1)), _arr(dgh_t), _arr(d), bt, H, s)
        d.addmm_(dgh_t, w)

