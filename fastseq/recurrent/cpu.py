"""The CPU table of time loops: kernels/cpu/recurrent.pyx (fastseq._cpu.recurrent) taking torch
tensors.  cuda.py is the GPU's table, with the same functions and signatures; the autograd
Functions (functions.py) call LOOPS[backend].<cell>_<pass>(rows, ...).

Every function takes the layout (rows.Rows) and buffers: inputs, outputs allocated by the
caller, contiguous.  Per-call scratch (a step's pre-activations, the layer-normalized backwards'
per-thread sums) is this module's, one set per Python thread, reused.  The kernels take flat
typed memoryviews; a tensor becomes one through a zero-copy numpy view (about 1 us each).

The gate columns of the plain cells (LSTM, GRU) are in blocks of `ub` units (recurrent.pyx's
module docstring); the layer-normalized cells keep torch's order.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from .. import _blas, _dispatch

_K = None


def kernels():
    """fastseq._cpu.recurrent with its GEMM installed."""
    global _K
    if _K is None:
        _K = _blas.cpu_kernels("recurrent")
    return _K


def _a(t: torch.Tensor) -> np.ndarray:
    """Flat zero-copy numpy view of a contiguous CPU tensor."""
    if t.requires_grad:
        t = t.detach()
    return t.numpy().reshape(-1)


_NP = {torch.float32: np.float32, torch.float64: np.float64}
_local = threading.local()


def scratch(n: int, dtype: torch.dtype, zero: bool = False) -> np.ndarray:
    """n elements of this thread's scratch of `dtype` (grown on demand; zeroed if asked)."""
    key = (dtype, zero)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.shape[0] < n:
        buf = bufs[key] = np.empty(max(n, 1), _NP[dtype])
    out = buf[:n]
    if zero:
        out.fill(0)
    return out


def lstm_forward(rows, ub, xp, w_hh, h0, c0, y, cs, gates):
    """Saves every step's h (y), c (cs) and activated gates (blocked); xp blocked."""
    kernels().lstm_forward(_a(xp), _a(w_hh), _a(h0), _a(c0), _a(y), _a(cs), _a(gates),
                           scratch(rows.B * gates.shape[1], xp.dtype), rows.offs_np, rows.T, w_hh.shape[1], ub,
                           _dispatch.num_threads())


def lstm_infer(rows, ub, xp, w_hh, h0, c0, y):
    """Inference: xp in torch's order, nothing kept; writes y, returns c_n (B, H)."""
    B, H = rows.B, w_hh.shape[1]
    cs = torch.empty(2 * B, H, dtype=xp.dtype)                        # c of steps t % 2 (the kernel's doc)
    step = scratch(B * 4 * H, xp.dtype)
    kernels().lstm_forward(_a(xp), _a(w_hh), _a(h0), _a(c0), _a(y), _a(cs), step, step, rows.offs_np, rows.T, H, ub,
                           _dispatch.num_threads(), False, False)
    if rows.padded:
        half = (rows.T - 1) % 2 * B
        return cs[half:half + B]
    return cs.index_select(0, rows.index("c_half", lambda: (rows.lengths() - 1) % 2 * B + np.arange(B), "cpu"))


def lstm_backward(rows, ub, dy, w_hh, c0, cs, gates, dgates, dh, dc):
    """w_hh with blocked rows; dh, dc (B, H) the carries (in: gradients at the final state, out:
    at the initial); writes dgates (N, 4H) blocked."""
    kernels().lstm_backward(_a(dy), _a(w_hh), _a(c0), _a(cs), _a(gates), _a(dgates), _a(dh), _a(dc), rows.offs_np,
                            rows.T, cs.shape[1], ub, _dispatch.num_threads())


def lstm_proj_forward(rows, ub, xp, w_hh, w_hr, h0, c0, y, cs, gates, m):
    """torch's proj_size: h_t = (o tanh(c_t)) W_hr^T; also saves m = o tanh(c)."""
    P, H = w_hr.shape
    kernels().lstm_proj_forward(_a(xp), _a(w_hh), _a(w_hr), _a(h0), _a(c0), _a(y), _a(cs), _a(gates), _a(m),
                                scratch(rows.B * 4 * H, xp.dtype), rows.offs_np, rows.T, H, P, ub,
                                _dispatch.num_threads())


def lstm_proj_backward(rows, ub, dy, w_hh, w_hr, c0, cs, gates, dgates, dhp, dh, dc):
    P, H = w_hr.shape
    kernels().lstm_proj_backward(_a(dy), _a(w_hh), _a(w_hr), _a(c0), _a(cs), _a(gates), _a(dgates), _a(dhp),
                                 scratch(rows.B * H, dy.dtype), _a(dh), _a(dc), rows.offs_np, rows.T, H, P, ub,
                                 _dispatch.num_threads())


def gru_forward(rows, ub, xp, w_hh, b_hh, h0, y, gates, ghn):
    H = w_hh.shape[1]
    kernels().gru_forward(_a(xp), _a(w_hh), _a(b_hh), _a(h0), _a(y), _a(gates), _a(ghn),
                          scratch(rows.B * 3 * H, xp.dtype), rows.offs_np, rows.T, H, ub, _dispatch.num_threads())


def gru_backward(rows, ub, dy, w_hh, h0, y, gates, ghn, dxp, dgh, dh):
    kernels().gru_backward(_a(dy), _a(w_hh), _a(h0), _a(y), _a(gates), _a(ghn), _a(dxp), _a(dgh), _a(dh),
                           rows.offs_np, rows.T, w_hh.shape[1], ub, _dispatch.num_threads())


def rnn_forward(rows, ub, relu, xp, w_hh, h0, y):
    kernels().rnn_forward(_a(xp), _a(w_hh), _a(h0), _a(y), rows.offs_np, rows.T, w_hh.shape[1], ub, relu,
                          _dispatch.num_threads())


def rnn_backward(rows, ub, relu, dy, w_hh, y, dg, dh):
    kernels().rnn_backward(_a(dy), _a(w_hh), _a(y), _a(dg), _a(dh), rows.offs_np, rows.T, w_hh.shape[1], ub, relu,
                           _dispatch.num_threads())


def ln_lstm_forward(rows, eps, xp, w_hh, g_hh, g_c, b_c, h0, c0, y, cs, gates, ghat, rstd_h, chat, rstd_c):
    H = w_hh.shape[1]
    kernels().ln_lstm_forward(_a(xp), _a(w_hh), _a(g_hh), _a(g_c), _a(b_c), _a(h0), _a(c0), _a(y), _a(cs),
                              _a(gates), _a(ghat), _a(rstd_h), _a(chat), _a(rstd_c), scratch(rows.B * 4 * H, xp.dtype),
                              rows.offs_np, rows.T, H, eps, _dispatch.num_threads())


def ln_lstm_backward(rows, dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dgates, dgh, dcn,
                     dh, dc):
    """Returns the norm parameters' gradients (dgamma_hh (4H,), dgamma_c (H,), dbeta_c (H,))."""
    H, nt = w_hh.shape[1], _dispatch.num_threads()
    sums = scratch(nt * 6 * H, dy.dtype, zero=True)          # per thread: sum dG ghat, dcn chat, dcn
    kernels().ln_lstm_backward(_a(dy), _a(w_hh), _a(g_hh), _a(g_c), _a(b_c), _a(c0), _a(cs), _a(gates), _a(ghat),
                               _a(rstd_h), _a(chat), _a(rstd_c), _a(dgates), _a(dgh), _a(dcn), _a(dh), _a(dc), sums,
                               rows.offs_np, rows.T, H, nt)
    return torch.from_numpy(sums).view(nt, 6 * H).sum(0).split([4 * H, H, H])


def ln_gru_forward(rows, eps, xp, w_hh, g_hh, b_hh, h0, y, gates, ghat, rstd_h, ghn):
    H = w_hh.shape[1]
    kernels().ln_gru_forward(_a(xp), _a(w_hh), _a(g_hh), _a(b_hh), _a(h0), _a(y), _a(gates), _a(ghat), _a(rstd_h),
                             _a(ghn), scratch(rows.B * 3 * H, xp.dtype), rows.offs_np, rows.T, H, eps,
                             _dispatch.num_threads())


def ln_gru_backward(rows, dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dxp, da, dgh, dh):
    """Returns (dgamma_hh (3H,), db_hh (3H,))."""
    H, nt = w_hh.shape[1], _dispatch.num_threads()
    sums = scratch(nt * 6 * H, dy.dtype, zero=True)          # per thread: sum da ghat, da
    kernels().ln_gru_backward(_a(dy), _a(w_hh), _a(g_hh), _a(h0), _a(y), _a(gates), _a(ghat), _a(rstd_h), _a(ghn),
                              _a(dxp), _a(da), _a(dgh), _a(dh), sums, rows.offs_np, rows.T, H, nt)
    return torch.from_numpy(sums).view(nt, 6 * H).sum(0).split([3 * H, 3 * H])
