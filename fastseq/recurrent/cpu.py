"""The CPU table of time loops: kernels/cpu/recurrent.pyx (fastseq._cpu.recurrent) on torch
tensors.  cuda.py is the GPU's table, with the same functions and signatures; the autograd
Functions (functions.py) call LOOPS[backend].<cell>_<pass>(rows, ...).

Every function takes the layout (rows.Rows) and its input tensors (contiguous), allocates its
outputs and returns them.  A small output is a NumPy array wrapped as a tensor: the kernels take
flat typed memoryviews, and allocating in NumPy hands them the array itself, where a torch.empty
output would cost a second conversion (the 2-core dev box measures np.empty + torch.from_numpy
at 0.9 us, torch.empty at 1.7 us, tensor -> numpy view at 1 us).  Large ones come from
fastseq._alloc, as the other families' (see _out).
Per-call scratch (a step's pre-activations, the layer-normalized backwards' per-thread sums) is
this module's, one set per Python thread, reused.

The gate columns of the plain cells (LSTM, GRU) are in blocks of `ub` units (recurrent.pyx's
module docstring); the layer-normalized cells keep torch's order.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

from .. import _alloc, _blas, _dispatch

_K = None


def kernels():
    """fastseq._cpu.recurrent with its GEMM installed (and FASTSEQ_PANEL_ISA applied: "avx512",
    "avx2" or "generic" runs the packed-panel kernels on that instruction set, for benchmarks)."""
    global _K
    if _K is None:
        _K = _blas.cpu_kernels("recurrent")
        if os.environ.get("FASTSEQ_PANEL_ISA"):
            panel_isa(os.environ["FASTSEQ_PANEL_ISA"])
    return _K


def _a(t: torch.Tensor) -> np.ndarray:
    """Flat zero-copy numpy view of a contiguous CPU tensor."""
    if t.requires_grad:
        t = t.detach()
    return t.numpy().reshape(-1)


_NP = {torch.float32: np.float32, torch.float64: np.float64}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}


def np_empty(shape, dtype) -> np.ndarray:
    """Every output's allocation (tests poison it with NaN)."""
    return np.empty(shape, dtype)


_SMALL = 1 << 20        # bytes: smaller outputs are NumPy's, larger ones fastseq._alloc's


def _out(n: int, width: int, dtype: torch.dtype):
    """A new (n, width) output: (tensor, flat numpy view of it).  Below 1 MiB a NumPy array (the
    cheapest allocation, ~1 us); above, memory reused from an earlier output no tensor holds any
    more (fastseq._alloc.reused: no pages to fault in per call; torch.empty when
    FASTSEQ_HUGEPAGES=0).  (NumPy's own huge-page advice on every array of 4 MiB and more had
    made the GRU (128, 32, 256) backward 30% slower: fresh pages per call.)"""
    if n * width * _ITEMSIZE[dtype] < _SMALL:
        a = np_empty((n, width), _NP[dtype])
        return torch.from_numpy(a), a.reshape(-1)
    t = _alloc.reused((n, width), dtype) if _alloc.ENABLED else _alloc.empty((n, width), dtype, "cpu")
    return t, t.numpy().reshape(-1)


def _vec(n: int, dtype: torch.dtype):
    t, a = _out(n, 1, dtype)
    return t.view(n), a


_local = threading.local()


def scratch(n: int, dtype: torch.dtype, zero: bool = False, name: str = "") -> np.ndarray:
    """n elements of this thread's scratch of `dtype` (grown on demand; zeroed if asked); a
    `name` keeps a buffer apart from the others (the packed panels from a step's scratch)."""
    key = (dtype, zero, name)
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


# ---------------------------------------------------------------------------- packed panels

_PANEL_MIN_T = 2      # steps: the panels cost one pass over W_hh (packing), a step of the old path one more
_FUSE_MIN_ROWS = 8    # rows a step, on average, from which the input projection runs inside the loop
_BLOCK_FWD_MIN_ROWS, _BLOCK_FWD_MIN_H = 8, 256    # the GRU / RNN forwards' panels from here (_block_panels)


def panel_isa(name=None) -> str:
    """The instruction set of the packed-panel kernels ("avx512", "avx2", "generic"); with a name
    ("best": the widest the CPU has) use that one from now on.  For tests and benchmarks: not
    while another thread runs a recurrent kernel."""
    K = kernels()
    if name is not None:
        if name not in K.ISA_NAMES + ("best",) or K.panel_isa(-1 if name == "best" else K.ISA_NAMES.index(name)) < 0:
            have = [n for i, n in enumerate(K.ISA_NAMES) if K.panel_supported(i)]
            raise ValueError(f"panel_isa: {name!r} is not available on this CPU (it has: {have})")
    return K.ISA_NAMES[K.panel_isa()]


def uses_panels(rows, dtype, lstm_forward: bool = False) -> bool:
    """Whether the recurrent loops run on packed panels (kernels/cpu/_panel.h): fp32 and T >= 2;
    the LSTM's forward from 2 rows a step (a lone row's step is a matrix-vector product that BLAS's
    dot products run as fast without the packing: (T, 1, 256) forwards at T = 8, 16, 32, 64 took
    0.07, 0.19, 0.21, 0.80 ms against 0.12, 0.29, 0.29, 0.92 on panels; at (16, 2), (8, 4), (4, 8)
    the panels won 1.09-1.21x)."""
    if dtype != torch.float32 or rows.T < _PANEL_MIN_T:
        return False
    return not lstm_forward or rows.N >= 2 * rows.T


def fuses_projection(rows, dtype) -> bool:
    """Whether the LSTM's forward also runs its input projection on the panels: with at least
    _FUSE_MIN_ROWS rows a step, [x_t | h_{t-1}] [W_ih | W_hh]^T per step beats one large GEMM for
    x W_ih^T plus writing and reading back the (N, 4H) product.  With fewer rows the per-step
    read of W_ih's panels costs more (at (64, 1, 256) 0.96 ms against 0.67)."""
    return uses_panels(rows, dtype, True) and rows.N >= _FUSE_MIN_ROWS * rows.T


def _panels(H: int, K: int, ub: int, backward: bool, dt):
    return scratch(kernels().lstm_panel_floats(H, K, ub, backward), dt, name="panels")


def _block_panels(rows, G: int, H: int, ub: int, dt, forward: bool):
    """The packed-panel scratch of the GRU (G = 3) or RNN (G = 1) loops in blocks of ub units
    (fp32, T >= 2), else None (BLAS per step).  Their forwards take the panels only from 8 rows a
    step and H = 256 (A/B on the 2-core box, GRU inference: 1.13-1.19x at (128, 32, 256) and
    (256, 16, 512); 1.00x at (512, 64, 128); 0.80x at (64, 1, 256), where BLAS's dot products
    need no packing); their backwards everywhere (1.02-1.13x)."""
    if not uses_panels(rows, dt) or forward and (rows.N < _BLOCK_FWD_MIN_ROWS * rows.T or H < _BLOCK_FWD_MIN_H):
        return None
    return scratch(kernels().block_panel_floats(G, H, ub), dt, name="panels")


def _ln_panels(rows, G: int, H: int, dt):
    """The packed-panel scratch of a layer-normalized cell of G gates (fp32, T >= 2), else None
    (its loops then run BLAS per step)."""
    if not uses_panels(rows, dt):
        return None
    return scratch(kernels().ln_panel_floats(G, H, _dispatch.num_threads()), dt, name="panels")


def lstm_forward(rows, ub, xp, w_hh, h0, c0, x=None, w_ih=None, bias=None):
    """-> y, cs (N, H): every step's h and c; gates (N, 4H): the activated gates (blocked).  xp
    blocked; or, where fuses_projection(), xp None and x (N, I), w_ih (4H, I), bias (4H,) or
    None in torch's order."""
    N, H, dt = rows.N, w_hh.shape[1], w_hh.dtype
    (y, y_), (cs, cs_), (gates, g_) = _out(N, H, dt), _out(N, H, dt), _out(N, 4 * H, dt)
    if uses_panels(rows, dt, True):
        I = 0 if x is None else x.shape[1]
        kernels().lstm_forward_panels(None if xp is None else _a(xp), _a(w_hh), _a(h0), _a(c0), y_, cs_, g_,
                                      _panels(H, I + H, ub, False, dt), rows.offs_np, rows.T, H, ub,
                                      _dispatch.num_threads(), True, True, *_fused_args(x, w_ih, bias))
    else:
        kernels().lstm_forward(_a(xp), _a(w_hh), _a(h0), _a(c0), y_, cs_, g_, scratch(rows.B * 4 * H, dt),
                               rows.offs_np, rows.T, H, ub, _dispatch.num_threads())
    return y, cs, gates


def _fused_args(x, w_ih, bias):
    if x is None:
        return None, 0, None, None
    return _a(x), x.shape[1], _a(w_ih), None if bias is None else _a(bias)


def lstm_infer(rows, ub, xp, w_hh, h0, c0, x=None, w_ih=None, bias=None):
    """Inference: xp in torch's order (or x, w_ih, bias as lstm_forward's), nothing kept -> y (N, H), c_n (B, H)."""
    B, H, dt = rows.B, w_hh.shape[1], w_hh.dtype
    y, y_ = _out(rows.N, H, dt)
    cs = np_empty((2 * B, H), _NP[dt])                            # c of steps t % 2 (the kernel's doc; B H small)
    if uses_panels(rows, dt, True):
        I = 0 if x is None else x.shape[1]
        kernels().lstm_forward_panels(None if xp is None else _a(xp), _a(w_hh), _a(h0), _a(c0), y_, cs.reshape(-1),
                                      None, _panels(H, I + H, ub, False, dt), rows.offs_np, rows.T, H, ub,
                                      _dispatch.num_threads(), False, False, *_fused_args(x, w_ih, bias))
    else:
        step = scratch(B * 4 * H, dt)
        kernels().lstm_forward(_a(xp), _a(w_hh), _a(h0), _a(c0), y_, cs.reshape(-1), step, step, rows.offs_np,
                               rows.T, H, ub, _dispatch.num_threads(), False, False)
    if rows.padded:
        half = (rows.T - 1) % 2 * B
        return y, torch.from_numpy(cs[half:half + B])
    return y, torch.from_numpy(cs[(rows.lengths() - 1) % 2 * B + np.arange(B)])


def lstm_backward(rows, ub, dy, w_hh, c0, cs, gates, dh, dc, reuse: bool = False):
    """w_hh in torch's row order; dh, dc (B, H) the carries (in: gradients at the final state,
    out: at the initial) -> dgates (N, 4H) blocked.  reuse: dgates may live in this thread's
    scratch (the caller drops it before the next call: no fresh (N, 4H) pages per call)."""
    H, dt = cs.shape[1], dy.dtype
    if reuse:
        dg_ = scratch(rows.N * 4 * H, dt, name="dgates")
        dg = torch.from_numpy(dg_).view(rows.N, 4 * H)
    else:
        dg, dg_ = _out(rows.N, 4 * H, dt)
    if uses_panels(rows, dt):
        kernels().lstm_backward_panels(_a(dy), _a(w_hh), _a(c0), _a(cs), _a(gates), dg_, _a(dh), _a(dc),
                                       _panels(H, H, ub, True, dt), rows.offs_np, rows.T, H, ub,
                                       _dispatch.num_threads())
    else:
        from .functions import gate_perm, permute         # (functions imports this module)
        kernels().lstm_backward(_a(dy), _a(permute(w_hh, gate_perm(H, ub, 4))), _a(c0), _a(cs), _a(gates), dg_,
                                _a(dh), _a(dc), rows.offs_np, rows.T, H, ub, _dispatch.num_threads())
    return dg


def lstm_proj_forward(rows, ub, xp, w_hh, w_hr, h0, c0):
    """torch's proj_size: h_t = (o tanh(c_t)) W_hr^T -> y (N, P), cs (N, H), gates (N, 4H), m = o tanh(c) (N, H)."""
    (P, H), N, dt = w_hr.shape, rows.N, xp.dtype
    (y, y_), (cs, cs_), (gates, g_), (m, m_) = _out(N, P, dt), _out(N, H, dt), _out(N, 4 * H, dt), _out(N, H, dt)
    kernels().lstm_proj_forward(_a(xp), _a(w_hh), _a(w_hr), _a(h0), _a(c0), y_, cs_, g_, m_,
                                scratch(rows.B * 4 * H, dt), rows.offs_np, rows.T, H, P, ub, _dispatch.num_threads())
    return y, cs, gates, m


def lstm_proj_backward(rows, ub, dy, w_hh, w_hr, c0, cs, gates, dh, dc):
    """-> dgates (N, 4H), dhp (N, P): the total gradient at each step's h."""
    (P, H), N, dt = w_hr.shape, rows.N, dy.dtype
    (dg, dg_), (dhp, dhp_) = _out(N, 4 * H, dt), _out(N, P, dt)
    kernels().lstm_proj_backward(_a(dy), _a(w_hh), _a(w_hr), _a(c0), _a(cs), _a(gates), dg_, dhp_,
                                 scratch(rows.B * H, dt), _a(dh), _a(dc), rows.offs_np, rows.T, H, P, ub,
                                 _dispatch.num_threads())
    return dg, dhp


def gru_forward(rows, ub, xp, w_hh, b_hh, h0):
    """-> y (N, H), gates (N, 3H) activated, ghn (N, H): the recurrent n pre-activation."""
    N, H, dt = rows.N, w_hh.shape[1], xp.dtype
    (y, y_), (gates, g_), (ghn, ghn_) = _out(N, H, dt), _out(N, 3 * H, dt), _out(N, H, dt)
    kernels().gru_forward(_a(xp), _a(w_hh), _a(b_hh), _a(h0), y_, g_, ghn_, scratch(rows.B * 3 * H, dt), rows.offs_np,
                          rows.T, H, ub, _dispatch.num_threads(), _block_panels(rows, 3, H, ub, dt, True))
    return y, gates, ghn


def gru_backward(rows, ub, dy, w_hh, h0, y, gates, ghn, dh):
    """-> dxp (N, 3H) (gradient of x W_ih^T + b_ih), dgh (N, 3H) (of h W_hh^T + b_hh)."""
    N, H, dt = rows.N, w_hh.shape[1], dy.dtype
    (dxp, dxp_), (dgh, dgh_) = _out(N, 3 * H, dt), _out(N, 3 * H, dt)
    kernels().gru_backward(_a(dy), _a(w_hh), _a(h0), _a(y), _a(gates), _a(ghn), dxp_, dgh_, _a(dh), rows.offs_np,
                           rows.T, H, ub, _dispatch.num_threads(), _block_panels(rows, 3, H, ub, dt, False))
    return dxp, dgh


def rnn_forward(rows, ub, relu, xp, w_hh, h0):
    """-> y (N, H)."""
    H = w_hh.shape[1]
    y, y_ = _out(rows.N, H, xp.dtype)
    kernels().rnn_forward(_a(xp), _a(w_hh), _a(h0), y_, rows.offs_np, rows.T, H, ub, relu, _dispatch.num_threads(),
                          _block_panels(rows, 1, H, ub, xp.dtype, True))
    return y


def rnn_backward(rows, ub, relu, dy, w_hh, y, dh):
    """-> dg (N, H): the pre-activation gradients."""
    H = w_hh.shape[1]
    dg, dg_ = _out(rows.N, H, dy.dtype)
    kernels().rnn_backward(_a(dy), _a(w_hh), _a(y), dg_, _a(dh), rows.offs_np, rows.T, H, ub, relu,
                           _dispatch.num_threads(), _block_panels(rows, 1, H, ub, dy.dtype, False))
    return dg


def ln_lstm_forward(rows, eps, xp, w_hh, g_hh, g_c, b_c, h0, c0):
    """-> y, cs (N, H), gates, ghat (N, 4H), rstd_h (N,), chat (N, H), rstd_c (N,)."""
    N, H, dt = rows.N, w_hh.shape[1], xp.dtype
    (y, y_), (cs, cs_), (gates, g_), (ghat, ghat_) = _out(N, H, dt), _out(N, H, dt), _out(N, 4 * H, dt), \
        _out(N, 4 * H, dt)
    (rstd_h, rh_), (chat, chat_), (rstd_c, rc_) = _vec(N, dt), _out(N, H, dt), _vec(N, dt)
    kernels().ln_lstm_forward(_a(xp), _a(w_hh), _a(g_hh), _a(g_c), _a(b_c), _a(h0), _a(c0), y_, cs_, g_, ghat_, rh_,
                              chat_, rc_, scratch(rows.B * 4 * H, dt), rows.offs_np, rows.T, H, eps,
                              _dispatch.num_threads(), _ln_panels(rows, 4, H, dt))
    return y, cs, gates, ghat, rstd_h, chat, rstd_c


def ln_lstm_backward(rows, dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dh, dc):
    """-> dgates (N, 4H) (of the gate pre-activations), dgh (N, 4H) (of h W_hh^T), and the norm
    parameters' gradients dgamma_hh (4H,), dgamma_c (H,), dbeta_c (H,)."""
    N, H, dt, nt = rows.N, w_hh.shape[1], dy.dtype, _dispatch.num_threads()
    (dg, dg_), (dgh, dgh_), (_, dcn_) = _out(N, 4 * H, dt), _out(N, 4 * H, dt), _out(N, H, dt)
    sums = scratch(nt * 6 * H, dt, zero=True)                  # per thread: sum dG ghat, dcn chat, dcn
    kernels().ln_lstm_backward(_a(dy), _a(w_hh), _a(g_hh), _a(g_c), _a(b_c), _a(c0), _a(cs), _a(gates), _a(ghat),
                               _a(rstd_h), _a(chat), _a(rstd_c), dg_, dgh_, dcn_, _a(dh), _a(dc), sums, rows.offs_np,
                               rows.T, H, nt, _ln_panels(rows, 4, H, dt))
    dg_hh, dg_c, db_c = torch.from_numpy(sums.reshape(nt, 6 * H).sum(0)).split([4 * H, H, H])
    return dg, dgh, dg_hh, dg_c, db_c


def ln_gru_forward(rows, eps, xp, w_hh, g_hh, b_hh, h0):
    """-> y (N, H), gates, ghat (N, 3H), rstd_h (N,), ghn (N, H)."""
    N, H, dt = rows.N, w_hh.shape[1], xp.dtype
    (y, y_), (gates, g_), (ghat, ghat_), (rstd_h, rh_), (ghn, ghn_) = _out(N, H, dt), _out(N, 3 * H, dt), \
        _out(N, 3 * H, dt), _vec(N, dt), _out(N, H, dt)
    kernels().ln_gru_forward(_a(xp), _a(w_hh), _a(g_hh), _a(b_hh), _a(h0), y_, g_, ghat_, rh_, ghn_,
                             scratch(rows.B * 3 * H, dt), rows.offs_np, rows.T, H, eps, _dispatch.num_threads(),
                             _ln_panels(rows, 3, H, dt))
    return y, gates, ghat, rstd_h, ghn


def ln_gru_backward(rows, dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dh):
    """-> dxp (N, 3H), dgh (N, 3H) (of h W_hh^T), dgamma_hh (3H,), db_hh (3H,)."""
    N, H, dt, nt = rows.N, w_hh.shape[1], dy.dtype, _dispatch.num_threads()
    (dxp, dxp_), (dgh, dgh_), (_, da_) = _out(N, 3 * H, dt), _out(N, 3 * H, dt), _out(N, 3 * H, dt)
    sums = scratch(nt * 6 * H, dt, zero=True)                  # per thread: sum da ghat, da
    kernels().ln_gru_backward(_a(dy), _a(w_hh), _a(g_hh), _a(h0), _a(y), _a(gates), _a(ghat), _a(rstd_h), _a(ghn),
                              dxp_, da_, dgh_, _a(dh), sums, rows.offs_np, rows.T, H, nt, _ln_panels(rows, 3, H, dt))
    dg_hh, db_hh = torch.from_numpy(sums.reshape(nt, 6 * H).sum(0)).split([3 * H, 3 * H])
    return dxp, dgh, dg_hh, db_hh
