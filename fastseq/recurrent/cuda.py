"""The GPU table of time loops: per step a torch GEMM (cuBLAS) and one fused pointwise kernel of
kernels/cuda/recurrent.py, both on torch's current stream, no host sync.  Numba is imported on
the first call only (importing this module imports torch alone).

Every function has its CPU twin's signature and returns (cpu.py): the layout and the input
tensors in, the outputs (allocated here, torch.empty on the inputs' device) out.  Gate columns
are in torch's order (the caller passes ub = H: one block) and ub is ignored.  Differences:
lstm_infer runs the saving forward into temporaries (there is no inference-only kernel), the
layer-normalized backwards reduce the norm-weight gradients with torch, and there is no
projected LSTM (proj_size runs torch's own forward on a GPU).  Buffers are contiguous; rows
[r0, r1) of a (rows, K) buffer are the contiguous slice [r0 K, r1 K).

A step of the sequence is a GEMM launch plus a kernel launch, so at small B and H the launch
latency (a few us each) bounds it; the weights stream from L2 every step.

The CUDA simulator's tests run these loops on CPU tensors (numpy views stand in for device
arrays), so nothing here assumes a CUDA tensor.
"""
from __future__ import annotations

import functools

import torch


def _k():
    from .._dispatch import cuda_kernels

    return cuda_kernels("recurrent")


def _arr(t):
    """A Numba view of tensor t (flat).  A CPU tensor (only the CUDA simulator's tests pass them)
    is viewed as numpy, which the simulator takes as a device array."""
    if t.device.type == "cpu":
        return t.detach().numpy().reshape(-1)
    from .._cuda._common import as_array

    return as_array(t.reshape(-1))


def _stream(t):
    if t.device.type == "cpu":
        return 0
    from .._cuda._common import torch_stream

    return torch_stream()


def _on_device(fn):
    """Run fn with torch's and Numba's current device set to its first buffer's."""
    @functools.wraps(fn)
    def call(rows, *args):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if not first.is_cuda:
            return fn(rows, *args)
        from .._cuda._common import on_device
        with on_device(first.device):
            return fn(rows, *args)
    return call


def _new(like, *shape):
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _rows(buf, width, r0, r1):
    """Rows [r0, r1) of the flat (rows, width) buffer, as a (r1 - r0, width) view."""
    return buf.view(-1)[r0 * width:r1 * width].view(r1 - r0, width)


def _steps(rows, reverse=False):
    """(t, r0, r1, rp) per step: its rows [r0, r1) and the first row of step t - 1."""
    offs = rows.offs_list
    order = range(rows.T - 1, -1, -1) if reverse else range(rows.T)
    for t in order:
        r0, r1 = offs[t], offs[t + 1]
        if r1 > r0:
            yield t, r0, r1, offs[t - 1] if t > 0 else 0


def _prev(t, rp, bt, first, seq, H):
    """The (bt, H) rows of h_{t-1} (or c_{t-1}): the initial state at t = 0, else step t - 1's first rows."""
    return _rows(first, H, 0, bt) if t == 0 else _rows(seq, H, rp, rp + bt)


def lstm_forward(rows, ub, xp, w_hh, h0, c0, x=None, w_ih=None, bias=None):
    """(x, w_ih, bias: the CPU's projection inside the loop; never passed here, cpu.fuses_projection.)"""
    H = w_hh.shape[1]
    y, cs, gates = _new(xp, rows.N, H), _new(xp, rows.N, H), _new(xp, rows.N, 4 * H)
    _lstm_forward(rows, xp, w_hh, h0, c0, y, cs, gates)
    return y, cs, gates


@_on_device
def _lstm_forward(rows, xp, w_hh, h0, c0, y, cs, gates):
    K, s, H = _k(), _stream(xp), w_hh.shape[1]
    g_step = torch.empty(rows.B * 4 * H, dtype=xp.dtype, device=xp.device)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(rows):
        bt = r1 - r0
        g = _rows(g_step, 4 * H, 0, bt)
        torch.addmm(_rows(xp, 4 * H, r0, r1), _prev(t, rp, bt, h0, y, H), w.t(), out=g)
        K.lstm_step_forward(_arr(g), _arr(_prev(t, rp, bt, c0, cs, H)), _arr(_rows(cs, H, r0, r1)),
                            _arr(_rows(y, H, r0, r1)), _arr(_rows(gates, 4 * H, r0, r1)), bt, H, s)


def lstm_infer(rows, ub, xp, w_hh, h0, c0, x=None, w_ih=None, bias=None):
    y, cs, _ = lstm_forward(rows, ub, xp, w_hh, h0, c0)
    return y, rows.final(cs, c0)


@_on_device
def lstm_backward(rows, ub, dy, w_hh, c0, cs, gates, dh, dc, reuse: bool = False):
    K, s, H = _k(), _stream(dy), w_hh.shape[1]
    dgates = _new(dy, rows.N, 4 * H)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(rows, reverse=True):
        bt = r1 - r0
        dg = _rows(dgates, 4 * H, r0, r1)
        K.lstm_step_backward(_arr(_rows(gates, 4 * H, r0, r1)), _arr(_rows(cs, H, r0, r1)),
                             _arr(_prev(t, rp, bt, c0, cs, H)), _arr(_rows(dy, H, r0, r1)), _arr(_rows(dh, H, 0, bt)),
                             _arr(_rows(dc, H, 0, bt)), _arr(dg), bt, H, s)
        torch.mm(dg, w, out=_rows(dh, H, 0, bt))                    # dh_next = dG_t W_hh
    return dgates


@_on_device
def gru_forward(rows, ub, xp, w_hh, b_hh, h0):
    K, s, H = _k(), _stream(xp), w_hh.shape[1]
    y, gates, ghn = _new(xp, rows.N, H), _new(xp, rows.N, 3 * H), _new(xp, rows.N, H)
    g_step = torch.empty(rows.B * 3 * H, dtype=xp.dtype, device=xp.device)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(rows):
        bt = r1 - r0
        hprev = _prev(t, rp, bt, h0, y, H)
        gh = _rows(g_step, 3 * H, 0, bt)
        torch.addmm(b_hh.view(1, 3 * H), hprev, w.t(), out=gh)
        K.gru_step_forward(_arr(_rows(xp, 3 * H, r0, r1)), _arr(gh), _arr(hprev), _arr(_rows(y, H, r0, r1)),
                           _arr(_rows(gates, 3 * H, r0, r1)), _arr(_rows(ghn, H, r0, r1)), bt, H, s)
    return y, gates, ghn


@_on_device
def gru_backward(rows, ub, dy, w_hh, h0, y, gates, ghn, dh):
    K, s, H = _k(), _stream(dy), w_hh.shape[1]
    dxp, dgh = _new(dy, rows.N, 3 * H), _new(dy, rows.N, 3 * H)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(rows, reverse=True):
        bt = r1 - r0
        d = _rows(dh, H, 0, bt)
        dgh_t = _rows(dgh, 3 * H, r0, r1)
        K.gru_step_backward(_arr(_rows(gates, 3 * H, r0, r1)), _arr(_rows(ghn, H, r0, r1)),
                            _arr(_prev(t, rp, bt, h0, y, H)), _arr(_rows(dy, H, r0, r1)), _arr(d),
                            _arr(_rows(dxp, 3 * H, r0, r1)), _arr(dgh_t), _arr(d), bt, H, s)
        d.addmm_(dgh_t, w)                                      # dh_next = dh_t z + dgh_t W_hh
    return dxp, dgh


@_on_device
def rnn_forward(rows, ub, relu, xp, w_hh, h0):
    K, s, H = _k(), _stream(xp), w_hh.shape[1]
    y = _new(xp, rows.N, H)
    w = w_hh.view(H, H)
    for t, r0, r1, rp in _steps(rows):
        bt = r1 - r0
        h = _rows(y, H, r0, r1)
        torch.addmm(_rows(xp, H, r0, r1), _prev(t, rp, bt, h0, y, H), w.t(), out=h)
        K.rnn_step_forward(_arr(h), _arr(h), bt, H, bool(relu), s)
    return y


@_on_device
def rnn_backward(rows, ub, relu, dy, w_hh, y, dh):
    K, s, H = _k(), _stream(dy), w_hh.shape[1]
    dg = _new(dy, rows.N, H)
    w = w_hh.view(H, H)
    for t, r0, r1, rp in _steps(rows, reverse=True):
        bt = r1 - r0
        dg_t = _rows(dg, H, r0, r1)
        K.rnn_step_backward(_arr(_rows(y, H, r0, r1)), _arr(_rows(dy, H, r0, r1)), _arr(_rows(dh, H, 0, bt)),
                            _arr(dg_t), bt, H, bool(relu), s)
        torch.mm(dg_t, w, out=_rows(dh, H, 0, bt))
    return dg


@_on_device
def ln_lstm_forward(rows, eps, xp, w_hh, g_hh, g_c, b_c, h0, c0):
    K, s, H, N = _k(), _stream(xp), w_hh.shape[1], rows.N
    y, cs, gates, ghat = _new(xp, N, H), _new(xp, N, H), _new(xp, N, 4 * H), _new(xp, N, 4 * H)
    rstd_h, chat, rstd_c = _new(xp, N), _new(xp, N, H), _new(xp, N)
    g_step = torch.empty(rows.B * 4 * H, dtype=xp.dtype, device=xp.device)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(rows):
        bt = r1 - r0
        gh = _rows(g_step, 4 * H, 0, bt)
        torch.mm(_prev(t, rp, bt, h0, y, H), w.t(), out=gh)
        K.ln_lstm_step_forward(_arr(_rows(xp, 4 * H, r0, r1)), _arr(gh), _arr(g_hh), _arr(g_c), _arr(b_c),
                               _arr(_prev(t, rp, bt, c0, cs, H)), _arr(_rows(cs, H, r0, r1)), _arr(_rows(y, H, r0, r1)),
                               _arr(_rows(gates, 4 * H, r0, r1)), _arr(_rows(ghat, 4 * H, r0, r1)),
                               _arr(rstd_h[r0:r1]), _arr(_rows(chat, H, r0, r1)), _arr(rstd_c[r0:r1]), bt, H,
                               float(eps), s)
    return y, cs, gates, ghat, rstd_h, chat, rstd_c


@_on_device
def ln_lstm_backward(rows, dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dh, dc):
    K, s, H, N = _k(), _stream(dy), w_hh.shape[1], rows.N
    dgates, dgh, dcn = _new(dy, N, 4 * H), _new(dy, N, 4 * H), _new(dy, N, H)
    w = w_hh.view(4 * H, H)
    for t, r0, r1, rp in _steps(rows, reverse=True):
        bt = r1 - r0
        dgh_t = _rows(dgh, 4 * H, r0, r1)
        K.ln_lstm_step_backward(_arr(_rows(gates, 4 * H, r0, r1)), _arr(_rows(ghat, 4 * H, r0, r1)),
                                _arr(rstd_h[r0:r1]), _arr(_rows(chat, H, r0, r1)), _arr(rstd_c[r0:r1]),
                                _arr(_prev(t, rp, bt, c0, cs, H)), _arr(g_hh), _arr(g_c), _arr(b_c),
                                _arr(_rows(dy, H, r0, r1)), _arr(_rows(dh, H, 0, bt)), _arr(_rows(dc, H, 0, bt)),
                                _arr(_rows(dgates, 4 * H, r0, r1)), _arr(dgh_t), _arr(_rows(dcn, H, r0, r1)), bt, H, s)
        torch.mm(dgh_t, w, out=_rows(dh, H, 0, bt))
    return dgates, dgh, (dgates * ghat).sum(0), (dcn * chat).sum(0), dcn.sum(0)


@_on_device
def ln_gru_forward(rows, eps, xp, w_hh, g_hh, b_hh, h0):
    K, s, H, N = _k(), _stream(xp), w_hh.shape[1], rows.N
    y, gates, ghat, rstd_h, ghn = _new(xp, N, H), _new(xp, N, 3 * H), _new(xp, N, 3 * H), _new(xp, N), _new(xp, N, H)
    g_step = torch.empty(rows.B * 3 * H, dtype=xp.dtype, device=xp.device)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(rows):
        bt = r1 - r0
        hprev = _prev(t, rp, bt, h0, y, H)
        gh = _rows(g_step, 3 * H, 0, bt)
        torch.mm(hprev, w.t(), out=gh)
        K.ln_gru_step_forward(_arr(_rows(xp, 3 * H, r0, r1)), _arr(gh), _arr(g_hh), _arr(b_hh), _arr(hprev),
                              _arr(_rows(y, H, r0, r1)), _arr(_rows(gates, 3 * H, r0, r1)),
                              _arr(_rows(ghat, 3 * H, r0, r1)), _arr(rstd_h[r0:r1]), _arr(_rows(ghn, H, r0, r1)),
                              bt, H, float(eps), s)
    return y, gates, ghat, rstd_h, ghn


@_on_device
def ln_gru_backward(rows, dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dh):
    K, s, H, N = _k(), _stream(dy), w_hh.shape[1], rows.N
    dxp, da, dgh = _new(dy, N, 3 * H), _new(dy, N, 3 * H), _new(dy, N, 3 * H)
    w = w_hh.view(3 * H, H)
    for t, r0, r1, rp in _steps(rows, reverse=True):
        bt = r1 - r0
        d = _rows(dh, H, 0, bt)
        dgh_t = _rows(dgh, 3 * H, r0, r1)
        K.ln_gru_step_backward(_arr(_rows(gates, 3 * H, r0, r1)), _arr(_rows(ghat, 3 * H, r0, r1)),
                               _arr(rstd_h[r0:r1]), _arr(_rows(ghn, H, r0, r1)), _arr(_prev(t, rp, bt, h0, y, H)),
                               _arr(g_hh), _arr(_rows(dy, H, r0, r1)), _arr(d), _arr(_rows(dxp, 3 * H, r0, r1)),
                               _arr(_rows(da, 3 * H, r0, r1)), _arr(dgh_t), _arr(d), bt, H, s)
        d.addmm_(dgh_t, w)
    return dxp, dgh, (da * ghat).sum(0), da.sum(0)
