"""The recurrent cells in plain torch, step by step: the oracles of the tests and the "torch"
backend of the layer-normalized cells (torch has no fused op for them).

One step function per cell, all with the signature step(p, eps, x, h, c, w_hr) -> (h', c') on
rows x (b, C), h (b, H) (or (b, P) with a projection), c (b, H) for the LSTMs (None otherwise),
p = (w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c) (absent biases and norms None).  Gate order
i, f, g, o (LSTM) and r, z, n (GRU), as torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _zero_if_none(b, like):
    return b if b is not None else torch.zeros((), dtype=like.dtype, device=like.device)


def _ln(v, gamma, eps):
    return F.layer_norm(v, v.shape[-1:], gamma, None, eps)


def _lstm_cell(g, c, out_norm=None):
    i, f, gg, o = g.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    return torch.sigmoid(o) * torch.tanh(c if out_norm is None else out_norm(c)), c


def lstm_step_ref(p, eps, x, h, c, w_hr=None):
    """torch.nn.LSTMCell; w_hr (P, H): torch's proj_size, the state h is then (b, P)."""
    w_ih, w_hh, b_ih, b_hh = p[:4]
    g = x @ w_ih.t() + _zero_if_none(b_ih, x) + h @ w_hh.t() + _zero_if_none(b_hh, x)
    h, c = _lstm_cell(g, c)
    return (h if w_hr is None else h @ w_hr.t()), c


def layer_norm_lstm_step_ref(p, eps, x, h, c, w_hr=None):
    """G = LN(x W_ih^T) g_ih + LN(h W_hh^T) g_hh + b_ih + b_hh; c' = f c + i g;
    h' = o tanh(LN(c') g_c + b_c)  (Ba et al. 2016)."""
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c = p
    g = _ln(x @ w_ih.t(), g_ih, eps) + _zero_if_none(b_ih, x) + _zero_if_none(b_hh, x) + _ln(h @ w_hh.t(), g_hh, eps)
    return _lstm_cell(g, c, lambda c: _ln(c, g_c, eps) + b_c)


def _gru_cell(gi, gh, h):
    xr, xz, xn = gi.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, None


def gru_step_ref(p, eps, x, h, c=None, w_hr=None):
    """torch.nn.GRUCell: n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))."""
    w_ih, w_hh, b_ih, b_hh = p[:4]
    return _gru_cell(x @ w_ih.t() + _zero_if_none(b_ih, x), h @ w_hh.t() + _zero_if_none(b_hh, x), h)


def layer_norm_gru_step_ref(p, eps, x, h, c=None, w_hr=None):
    """The GRU on x-part = LN(x W_ih^T) g_ih + b_ih and h-part = LN(h W_hh^T) g_hh + b_hh."""
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh = p[:6]
    return _gru_cell(_ln(x @ w_ih.t(), g_ih, eps) + _zero_if_none(b_ih, x),
                     _ln(h @ w_hh.t(), g_hh, eps) + _zero_if_none(b_hh, x), h)


def _rnn_pre(p, x, h):
    w_ih, w_hh, b_ih, b_hh = p[:4]
    return x @ w_ih.t() + _zero_if_none(b_ih, x) + h @ w_hh.t() + _zero_if_none(b_hh, x)


def rnn_tanh_step_ref(p, eps, x, h, c=None, w_hr=None):
    """torch.nn.RNNCell(nonlinearity="tanh")."""
    return torch.tanh(_rnn_pre(p, x, h)), None


def rnn_relu_step_ref(p, eps, x, h, c=None, w_hr=None):
    """torch.nn.RNNCell(nonlinearity="relu")."""
    return torch.relu(_rnn_pre(p, x, h)), None


def recurrent_ref(cell, x, offs, h0, c0, params, eps: float = 1e-5, w_hr=None):
    """One layer, one direction, step by step in torch over packed rows x (N, C) (the layout of
    rows.Rows: step t owns rows offs[t]:offs[t+1], the sequences still running are the first
    ones).  `cell`: a cells.Cell or its name ("lstm", "gru", "rnn_tanh", "rnn_relu", "ln_lstm",
    "ln_gru").  Returns y (N, H) and the final states (h_n, c_n) (c_n None for GRU / RNN), each (B, H)."""
    if isinstance(cell, str):
        from .cells import CELLS
        cell = CELLS[cell]
    step = cell.step_ref
    h, c = h0, c0
    ys = []
    offs = [int(o) for o in offs]
    for t in range(len(offs) - 1):
        r0, r1 = offs[t], offs[t + 1]
        bt = r1 - r0
        h_new, c_new = step(params, eps, x[r0:r1], h[:bt], None if c is None else c[:bt], w_hr)
        ys.append(h_new)
        h = torch.cat([h_new, h[bt:]])
        if c is not None:
            c = torch.cat([c_new, c[bt:]])
    y = torch.cat(ys) if ys else h0.new_zeros(0, h0.shape[-1])
    return y, (h, c)


def lstm_ref(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None):
    """(T, B, C) -> y (T, B, H), (h_T, c_T): torch.nn.LSTM's recurrence step by step."""
    T, B = x.shape[:2]
    y, (h, c) = recurrent_ref("lstm", x.reshape(T * B, -1), [t * B for t in range(T + 1)], h0, c0,
                              (w_ih, w_hh, b_ih, b_hh) + (None,) * 4)
    return y.view(T, B, -1), (h, c)
