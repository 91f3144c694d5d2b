"""The recurrent family's autograd Functions: one per cell around its fused whole-sequence
kernel (kernels/cpu/recurrent.pyx on the CPU, the time loops of fastseq/_recurrent_cuda.py on a
GPU), and the input projection of all steps.  fastseq/recurrent.py builds the layers from them.

Each Function takes the projected input xp (rows, G H) in the kernels' gate layout, the initial
states and the recurrent weights, and returns y (rows, H) and the final states; its backward
runs the fused backward-through-time kernel and returns dxp, from which autograd of the
projection forms dx, dW_ih and the input biases' gradients.  `rows` is a recurrent._Rows.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _alloc, _blas, _dispatch


def _np(t):
    return t.detach().numpy().reshape(-1)


def _kernels():
    return _blas.cpu_kernels("recurrent")


class _CpuLoops:
    """kernels/cpu/recurrent.pyx taking tensors where it takes numpy arrays: the same signatures
    as fastseq/_recurrent_cuda.py, the GPU's time loops."""

    def __getattr__(self, name):
        fn = getattr(_kernels(), name)
        return lambda *args: fn(*[_np(a) if isinstance(a, torch.Tensor) else a for a in args])


_CPU_LOOPS = _CpuLoops()


class _CudaLoops:
    """fastseq/_recurrent_cuda.py, each call with torch's and Numba's current device set to the
    first tensor's.  (The CUDA simulator's tests run it on CPU tensors.)"""

    def __getattr__(self, name):
        from . import _recurrent_cuda
        fn = getattr(_recurrent_cuda, name)

        def call(*args):
            if args[0].device.type != "cuda":
                return fn(*args)
            from ._cuda._common import on_device
            with on_device(args[0].device):
                return fn(*args)
        return call


_CUDA_LOOPS = _CudaLoops()


def _loops(t: torch.Tensor):
    """The time loops for tensors on t's device."""
    return _CUDA_LOOPS if t.device.type == "cuda" else _CPU_LOOPS


_PERMS = {}


def _gate_perm(H: int, ub: int, gates: int = 4) -> Optional[torch.Tensor]:
    """Row order of the blocked gate layout (kernels/cpu/recurrent.pyx): for each block of ub
    units, its rows of every gate in turn.  None when it is torch's order (one block)."""
    if ub >= H or gates == 1:
        return None
    key = (H, ub, gates)
    if key not in _PERMS:
        rows = []
        for j0 in range(0, H, ub):
            for gate in range(gates):
                rows.extend(range(gate * H + j0, gate * H + min(H, j0 + ub)))
        with torch.inference_mode(False):           # a cached index must serve autograd later too
            _PERMS[key] = torch.tensor(rows, dtype=torch.int64)
    return _PERMS[key]


def _inverse_perm(perm):
    return None if perm is None else _INVERSE.setdefault(id(perm), torch.argsort(perm))


_INVERSE = {}


def _permute(t, perm):
    """t's rows in the blocked gate order (a copy per call: a cache keyed on the parameter's
    version would miss writes through .data, which EMA and weight-averaging code make)."""
    return t if t is None or perm is None else t.index_select(0, perm)


def _empty(rows, cols, like):
    return _alloc.empty((rows, cols), like.dtype, like.device)


def _final(rows, seq, s0):
    """Final state (B, H) of every sequence: its last row of seq (N, H); s0 when T = 0."""
    return seq.index_select(0, rows.last(seq.device)) if rows.N else s0.clone()


def _carry(grad, like):
    """The backward carry (B, H), entering as the gradient at the final state."""
    return grad.contiguous().clone() if grad is not None else torch.zeros_like(like)


def _grad_or_zeros(g, rows, H, like):
    return g.contiguous() if g is not None else torch.zeros(rows, H, dtype=like.dtype, device=like.device)


class LSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one LSTM layer: (xp, h0, c0, W_hh) -> y, h_n, c_n.  W_hh in torch's
    row order.  Training: xp in the blocked gate layout of unit block ub (the backward returns its
    gradient dG blocked); saves every step's h and c and the activated gates.  infer=True (no
    gradient wanted, the caller checked): xp in torch's order, and nothing is kept."""

    @staticmethod
    def forward(ctx, rows, ub, xp, h0, c0, w_hh, infer=False):
        H = w_hh.shape[1]
        h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
        step = torch.empty(rows.B * 4 * H, dtype=xp.dtype, device=xp.device)
        y = _empty(rows.N, H, xp)
        if infer and _loops(xp) is _CPU_LOOPS:                              # inference: keep nothing
            cs = torch.empty(2 * rows.B, H, dtype=xp.dtype)                # c of steps t % 2 (the kernel's doc)
            _loops(xp).lstm_forward(xp, w_hh, h0, c0, y, cs, step, step, rows.offs, rows.T, H, ub,
                                    _dispatch.num_threads(), False, False)
            half = torch.from_numpy((rows.lengths() - 1) % 2 * rows.B + np.arange(rows.B))
            return y, _final(rows, y, h0), cs.index_select(0, half) if rows.N else c0.clone()
        if infer and _gate_perm(H, ub, 4) is not None:
            raise RuntimeError("LSTMLayerFunction: infer=True runs on the CPU loops only")
        cs, gates = _empty(rows.N, H, xp), _empty(rows.N, 4 * H, xp)
        _loops(xp).lstm_forward(xp, w_hh, h0, c0, y, cs, gates, step,
                                rows.offs, rows.T, H, ub, _dispatch.num_threads())
        ctx.save_for_backward(h0, c0, w_hh, y, cs, gates)
        ctx.rows, ctx.ub = rows, ub
        return y, _final(rows, y, h0), _final(rows, cs, c0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        h0, c0, w_hh, y, cs, gates = ctx.saved_tensors
        rows, H = ctx.rows, w_hh.shape[1]
        perm = _gate_perm(H, ctx.ub, 4)
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg = _empty(rows.N, 4 * H, y)
        _loops(dy).lstm_backward(dy, _permute(w_hh, perm), c0, cs, gates, dg, dh, dc,
                                 rows.offs, rows.T, H, ctx.ub, _dispatch.num_threads())
        dw_hh = None
        if ctx.needs_input_grad[5]:
            dw_hh = dg.t() @ rows.h_prev(h0, y)                              # (4H, H), blocked rows
            dw_hh = _permute(dw_hh, _inverse_perm(perm))
        return None, None, dg, dh, dc, dw_hh, None


class LSTMProjLayerFunction(torch.autograd.Function):
    """LSTMLayerFunction with torch's proj_size: (xp, h0 (B, P), c0 (B, H), W_hh (4H, P), W_hr (P, H))
    -> y (N, P), h_n (B, P), c_n (B, H), h_t = (o tanh(c_t)) W_hr^T.  Saves m = o tanh(c) too."""

    @staticmethod
    def forward(ctx, rows, ub, xp, h0, c0, w_hh, w_hr):
        P, H = w_hr.shape
        h0, c0, w_hh, w_hr = h0.contiguous(), c0.contiguous(), w_hh.contiguous(), w_hr.contiguous()
        y, cs, m, gates = _empty(rows.N, P, xp), _empty(rows.N, H, xp), _empty(rows.N, H, xp), _empty(rows.N, 4 * H, xp)
        step = torch.empty(rows.B * 4 * H, dtype=xp.dtype)
        _CPU_LOOPS.lstm_proj_forward(xp, w_hh, w_hr, h0, c0, y, cs, gates, m, step, rows.offs, rows.T, H, P, ub,
                                     _dispatch.num_threads())
        ctx.save_for_backward(h0, c0, w_hh, w_hr, y, cs, gates, m)
        ctx.rows, ctx.ub = rows, ub
        return y, _final(rows, y, h0), _final(rows, cs, c0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        h0, c0, w_hh, w_hr, y, cs, gates, m = ctx.saved_tensors
        rows, (P, H) = ctx.rows, w_hr.shape
        dy = _grad_or_zeros(dy, rows.N, P, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dhp = _empty(rows.N, 4 * H, y), _empty(rows.N, P, y)
        dm = torch.empty(rows.B * H, dtype=y.dtype)
        _CPU_LOOPS.lstm_proj_backward(dy, w_hh, w_hr, c0, cs, gates, dg, dhp, dm, dh, dc, rows.offs, rows.T, H, P,
                                      ctx.ub, _dispatch.num_threads())
        dw_hh = dg.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        dw_hr = dhp.t() @ m if ctx.needs_input_grad[6] else None
        return None, None, dg, dh, dc, dw_hh, dw_hr


class GRULayerFunction(torch.autograd.Function):
    """The sequential part of one GRU layer: (xp = x W_ih^T + b_ih, h0, W_hh, b_hh) -> y, h_n,
    blocked gate layout.  Saves h, the activated gates and the recurrent n pre-activation."""

    @staticmethod
    def forward(ctx, rows, ub, xp, h0, w_hh, b_hh):
        H = w_hh.shape[1]
        y, gates, ghn = _empty(rows.N, H, xp), _empty(rows.N, 3 * H, xp), _empty(rows.N, H, xp)
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        b_hh = b_hh.contiguous() if b_hh is not None else torch.zeros(3 * H, dtype=xp.dtype, device=xp.device)
        step = torch.empty(rows.B * 3 * H, dtype=xp.dtype, device=xp.device)
        _loops(xp).gru_forward(xp, w_hh, b_hh, h0, y, gates, ghn, step,
                               rows.offs, rows.T, H, ub, _dispatch.num_threads())
        ctx.save_for_backward(h0, w_hh, y, gates, ghn)
        ctx.rows, ctx.ub = rows, ub
        return y, _final(rows, y, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        h0, w_hh, y, gates, ghn = ctx.saved_tensors
        rows, H = ctx.rows, w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dxp, dgh = _empty(rows.N, 3 * H, y), _empty(rows.N, 3 * H, y)
        _loops(dy).gru_backward(dy, w_hh, h0, y, gates, ghn, dxp, dgh, dh, rows.offs, rows.T, H, ctx.ub, _dispatch.num_threads())
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[4] else None
        db_hh = dgh.sum(0) if ctx.needs_input_grad[5] else None
        return None, None, dxp, dh, dw_hh, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """The sequential part of one Elman RNN layer: (xp = x W_ih^T + b_ih + b_hh, h0, W_hh) -> y, h_n."""

    @staticmethod
    def forward(ctx, rows, ub, relu, xp, h0, w_hh):
        H = w_hh.shape[1]
        y = _empty(rows.N, H, xp)
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        _loops(xp).rnn_forward(xp, w_hh, h0, y, rows.offs, rows.T, H, ub, relu,
                               _dispatch.num_threads())
        ctx.save_for_backward(h0, w_hh, y)
        ctx.rows, ctx.ub, ctx.relu = rows, ub, relu
        return y, _final(rows, y, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        h0, w_hh, y = ctx.saved_tensors
        rows, H = ctx.rows, w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dg = _empty(rows.N, H, y)
        _loops(dy).rnn_backward(dy, w_hh, y, dg, dh, rows.offs, rows.T, H, ctx.ub,
                                ctx.relu, _dispatch.num_threads())
        dw_hh = dg.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        return None, None, None, dg, dh, dw_hh


class LayerNormLSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized LSTM layer: (xp = LN(x W_ih^T) gamma_ih + b,
    h0, c0, W_hh, gamma_hh, gamma_c, beta_c) -> y, h_n, c_n (torch's gate order).  Saves h, c,
    the gates, the normalized recurrent term and cell and their rstd."""

    @staticmethod
    def forward(ctx, rows, eps, xp, h0, c0, w_hh, g_hh, g_c, b_c):
        H, N = w_hh.shape[1], rows.N
        y, cs, chat = _empty(N, H, xp), _empty(N, H, xp), _empty(N, H, xp)
        gates, ghat = _empty(N, 4 * H, xp), _empty(N, 4 * H, xp)
        rstd_h, rstd_c = (torch.empty(N, dtype=xp.dtype, device=xp.device) for _ in range(2))
        h0, c0, w_hh, g_hh, g_c, b_c = (t.contiguous() for t in (h0, c0, w_hh, g_hh, g_c, b_c))
        step = torch.empty(rows.B * 4 * H, dtype=xp.dtype, device=xp.device)
        _loops(xp).ln_lstm_forward(xp, w_hh, g_hh, g_c, b_c, h0, c0, y, cs, gates, ghat, rstd_h, chat,
                                    rstd_c, step, rows.offs, rows.T, H, eps, _dispatch.num_threads())
        ctx.save_for_backward(h0, c0, w_hh, g_hh, g_c, b_c, y, cs, gates, ghat, rstd_h, chat, rstd_c)
        ctx.rows = rows
        return y, _final(rows, y, h0), _final(rows, cs, c0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        h0, c0, w_hh, g_hh, g_c, b_c, y, cs, gates, ghat, rstd_h, chat, rstd_c = ctx.saved_tensors
        rows, H, N = ctx.rows, w_hh.shape[1], ctx.rows.N
        dy = _grad_or_zeros(dy, N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dgh, dcn = _empty(N, 4 * H, y), _empty(N, 4 * H, y), _empty(N, H, y)
        if _loops(dy) is _CPU_LOOPS:
            nt = _dispatch.num_threads()
            sums = torch.zeros(nt, 6 * H, dtype=y.dtype)      # per thread: sum dG ghat, dcn chat, dcn
            _loops(dy).ln_lstm_backward(dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dg,
                                         dgh, dcn, dh, dc, sums, rows.offs, rows.T, H, nt)
            dg_hh, dg_c, db_c = sums.sum(0).split([4 * H, H, H])
        else:
            _loops(dy).ln_lstm_backward(dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dg,
                                         dgh, dcn, dh, dc, rows.offs, rows.T, H)
            dg_hh, dg_c, db_c = (dg * ghat).sum(0), (dcn * chat).sum(0), dcn.sum(0)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        keep = ctx.needs_input_grad
        return (None, None, dg, dh, dc, dw_hh, dg_hh if keep[6] else None, dg_c if keep[7] else None,
                db_c if keep[8] else None)


class LayerNormGRULayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized GRU layer: (xp = LN(x W_ih^T) gamma_ih + b_ih,
    h0, W_hh, gamma_hh, b_hh) -> y, h_n (torch's gate order)."""

    @staticmethod
    def forward(ctx, rows, eps, xp, h0, w_hh, g_hh, b_hh):
        H, N = w_hh.shape[1], rows.N
        y, ghn = _empty(N, H, xp), _empty(N, H, xp)
        gates, ghat = _empty(N, 3 * H, xp), _empty(N, 3 * H, xp)
        rstd_h = torch.empty(N, dtype=xp.dtype, device=xp.device)
        b_hh = b_hh if b_hh is not None else torch.zeros(3 * H, dtype=xp.dtype, device=xp.device)
        h0, w_hh, g_hh, b_hh = (t.contiguous() for t in (h0, w_hh, g_hh, b_hh))
        step = torch.empty(rows.B * 3 * H, dtype=xp.dtype, device=xp.device)
        _loops(xp).ln_gru_forward(xp, w_hh, g_hh, b_hh, h0, y, gates, ghat, rstd_h, ghn, step, rows.offs, rows.T, H, eps, _dispatch.num_threads())
        ctx.save_for_backward(h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn)
        ctx.rows = rows
        return y, _final(rows, y, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn = ctx.saved_tensors
        rows, H, N = ctx.rows, w_hh.shape[1], ctx.rows.N
        dy = _grad_or_zeros(dy, N, H, y)
        dh = _carry(dh_n, h0)
        dxp, da, dgh = _empty(N, 3 * H, y), _empty(N, 3 * H, y), _empty(N, 3 * H, y)
        if _loops(dy) is _CPU_LOOPS:
            nt = _dispatch.num_threads()
            sums = torch.zeros(nt, 6 * H, dtype=y.dtype)      # per thread: sum da ghat, da
            _loops(dy).ln_gru_backward(dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dxp, da, dgh, dh, sums,
                                       rows.offs, rows.T, H, nt)
            dg_hh, db_hh = sums.sum(0).split([3 * H, 3 * H])
        else:
            _loops(dy).ln_gru_backward(dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dxp, da, dgh, dh, rows.offs,
                                       rows.T, H)
            dg_hh, db_hh = (da * ghat).sum(0), da.sum(0)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[4] else None
        keep = ctx.needs_input_grad
        return None, None, dxp, dh, dw_hh, dg_hh if keep[5] else None, db_hh if keep[6] else None


def _sum_bias(a, b):
    return None if a is None else a + b


class ProjectionFunction(torch.autograd.Function):
    """xp = x W^T + b for every step at once, (N, C) -> (N, G H), as F.linear, with the output
    and the input gradient in fastseq's allocations: at (T, B) = (512, 64), G H = 512 the (N, G H)
    buffer is 64 MiB, and faulting in fresh 4 KiB pages for it cost as much as the GEMM itself."""

    @staticmethod
    def forward(ctx, x, w, b):
        out = _alloc.empty((x.shape[0], w.shape[0]), x.dtype, x.device)
        if b is not None:
            torch.addmm(b, x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dxp):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dxp, w, out=_alloc.empty(x.shape, x.dtype, x.device))
        if ctx.needs_input_grad[1]:
            dw = dxp.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dxp.sum(0)
        return dx, dw, db


def _project(x, w, b):
    return ProjectionFunction.apply(x, w, b) if x.device.type == "cpu" else F.linear(x, w, b)
