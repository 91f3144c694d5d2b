"""The recurrent family's autograd Functions: one per cell around its backend's whole-sequence
time loop (cpu.py / cuda.py, the LOOPS tables), and the input projection of all steps.

Each Function takes only tensors, ints, floats, bools, None and the backend's name: the backend
(chosen by dispatch, kept on ctx so that backward runs where forward ran), the layout as its
step offsets `offs` ((T + 1,) CPU int64; rows.of() finds the cached layout by value), then the
projected input xp (rows, G H) in the loops' gate layout, the initial states and the recurrent
weights.  It returns y (rows, H) and the final states; its backward runs the backward-through-
time loop and returns dxp, from which autograd of the projection forms dx, dW_ih and the input
biases' gradients.  T, B and N come from the shapes (offs, h0, xp).

Without a gradient to form, the layers call each Function's compute() directly: autograd's
apply() costs several microseconds per call even under no_grad.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _alloc, _library
from . import cpu, cuda
from . import rows as R

LOOPS = {"cpu": cpu, "cuda": cuda}          # backend -> its table of time loops


def _carry(grad, like):
    """The backward carry (B, H), entering as the gradient at the final state."""
    return grad.contiguous().clone() if grad is not None else torch.zeros_like(like)


def _grad_or_zeros(g, n, width, like):
    return g.contiguous() if g is not None else torch.zeros(n, width, dtype=like.dtype, device=like.device)


# ============================================================================ the blocked gate layout

_PERMS = {}
_INVERSE = {}


def gate_perm(H: int, ub: int, gates: int) -> Optional[torch.Tensor]:
    """Row order of the blocked gate layout (kernels/cpu/recurrent.pyx): for each block of ub
    units, its rows of every gate in turn.  None when it is torch's order (one block)."""
    if ub >= H or gates == 1:
        return None
    key = (H, ub, gates)
    perm = _PERMS.get(key)
    if perm is None:
        rows = []
        for j0 in range(0, H, ub):
            for gate in range(gates):
                rows.extend(range(gate * H + j0, gate * H + min(H, j0 + ub)))
        with torch.inference_mode(False):           # a cached index must serve autograd later too
            perm = _PERMS[key] = torch.tensor(rows, dtype=torch.int64)
            _INVERSE[key] = torch.argsort(perm)
    return perm


def inverse_perm(H: int, ub: int, gates: int) -> Optional[torch.Tensor]:
    return None if gate_perm(H, ub, gates) is None else _INVERSE[(H, ub, gates)]


def permute(t, perm, dim: int = 0):
    """t's rows (dim 0) or columns (dim 1) in the blocked gate order; a copy per call (a cache
    keyed on the parameter's version would miss writes through .data, which EMA and
    weight-averaging code make)."""
    return t if t is None or perm is None else t.index_select(dim, perm.to(t.device) if t.is_cuda else perm)


# ============================================================================ the input projection

def _linear(x, w, b):
    out = _alloc.empty((x.shape[0], w.shape[0]), x.dtype, x.device)
    if b is not None:
        return torch.addmm(b, x, w.t(), out=out)
    return torch.mm(x, w.t(), out=out)


class ProjectionFunction(torch.autograd.Function):
    """xp = x W^T + b for every step at once, (N, C) -> (N, G H), as F.linear, with the output
    and the input gradient in fastseq's allocations: at (T, B) = (512, 64), G H = 512 the (N, G H)
    buffer is 64 MiB, and faulting in fresh 4 KiB pages for it cost as much as the GEMM itself."""

    @staticmethod
    def forward(ctx, x, w, b):
        out = _linear(x, w, b)
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


def project(x, w, b, grad: bool):
    """x W^T + b (N, G H).  With a gradient to form, on the CPU, through ProjectionFunction: once
    differentiable like the loops' Functions, so that a double backward through the layer raises
    instead of returning the projection's part alone.  Else F.linear."""
    if x.is_cuda or _library.captured(x):
        return F.linear(x, w, b)
    if grad:
        return ProjectionFunction.apply(x, w, b)
    if x.shape[0] * w.shape[0] * x.element_size() >= _alloc.HUGE_BYTES:
        return _linear(x, w, b)                 # (huge pages, as ProjectionFunction)
    return F.linear(x, w, b)


def project_blocked(x, w, b, perm, grad: bool):
    """project() with the output columns in the blocked gate order perm: the weight's rows are
    permuted when that copies less than permuting the output's columns (N > C), else the output."""
    if perm is None:
        return project(x, w, b, grad)
    if x.shape[0] > x.shape[1]:
        return project(x, permute(w, perm), permute(b, perm), grad)
    return permute(project(x, w, b, grad), perm, 1)


# ============================================================================ the cells' Functions

class LSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one LSTM layer: (xp, h0, c0, W_hh) -> y, h_n, c_n.  W_hh in torch's
    row order, xp in the blocked gate layout of unit block ub (the backward returns its gradient
    dG blocked); saves every step's h and c and the activated gates.  Inference (nothing saved,
    xp in torch's order) is infer() below, outside autograd."""

    @staticmethod
    def compute(backend: str, offs, ub: int, xp, h0, c0, w_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        H = w_hh.shape[1]
        h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
        y, cs, gates = LOOPS[backend].lstm_forward(rows, ub, xp, w_hh, h0, c0)
        return (y, rows.final(y, h0, alias), rows.final(cs, c0, alias)), (offs, h0, c0, w_hh, y, cs, gates)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, xp, h0, c0, w_hh):
        out, saved = LSTMLayerFunction.compute(backend, offs, ub, xp, h0, c0, w_hh)
        ctx.save_for_backward(*saved)
        ctx.backend, ctx.ub = backend, ub
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        offs, h0, c0, w_hh, y, cs, gates = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg = LOOPS[ctx.backend].lstm_backward(rows, ctx.ub, dy, permute(w_hh, gate_perm(H, ctx.ub, 4)), c0, cs, gates,
                                              dh, dc)
        dw_hh = None
        if ctx.needs_input_grad[6]:
            dw_hh = permute(dg.t() @ rows.h_prev(h0, y), inverse_perm(H, ctx.ub, 4))     # (4H, H)
        return None, None, None, dg, dh, dc, dw_hh

    @staticmethod
    def infer(backend: str, offs, ub: int, xp, h0, c0, w_hh, alias: bool = False):
        """Forward keeping nothing, xp in torch's order: y, h_n, c_n."""
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        y, c_n = LOOPS[backend].lstm_infer(rows, ub, xp, w_hh.contiguous(), h0.contiguous(), c0.contiguous())
        return y, rows.final(y, h0, alias), c_n


class LSTMProjLayerFunction(torch.autograd.Function):
    """LSTMLayerFunction with torch's proj_size (CPU): (xp, h0 (B, P), c0 (B, H), W_hh (4H, P)
    blocked rows, W_hr (P, H)) -> y (N, P), h_n (B, P), c_n (B, H), h_t = (o tanh(c_t)) W_hr^T.
    Saves m = o tanh(c) too."""

    @staticmethod
    def compute(backend: str, offs, ub: int, xp, h0, c0, w_hh, w_hr, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, c0, w_hh, w_hr = h0.contiguous(), c0.contiguous(), w_hh.contiguous(), w_hr.contiguous()
        y, cs, gates, m = LOOPS[backend].lstm_proj_forward(rows, ub, xp, w_hh, w_hr, h0, c0)
        return (y, rows.final(y, h0, alias), rows.final(cs, c0, alias)), (offs, h0, c0, w_hh, w_hr, y, cs, gates, m)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, xp, h0, c0, w_hh, w_hr):
        out, saved = LSTMProjLayerFunction.compute(backend, offs, ub, xp, h0, c0, w_hh, w_hr)
        ctx.save_for_backward(*saved)
        ctx.backend, ctx.ub = backend, ub
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        offs, h0, c0, w_hh, w_hr, y, cs, gates, m = ctx.saved_tensors
        rows, (P, H) = R.of(offs, h0.shape[0], y.shape[0]), w_hr.shape
        dy = _grad_or_zeros(dy, rows.N, P, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dhp = LOOPS[ctx.backend].lstm_proj_backward(rows, ctx.ub, dy, w_hh, w_hr, c0, cs, gates, dh, dc)
        dw_hh = dg.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[6] else None
        dw_hr = dhp.t() @ m if ctx.needs_input_grad[7] else None
        return None, None, None, dg, dh, dc, dw_hh, dw_hr


class GRULayerFunction(torch.autograd.Function):
    """The sequential part of one GRU layer: (xp = x W_ih^T + b_ih, h0, W_hh, b_hh) -> y, h_n,
    blocked gate layout (W_hh's rows and b_hh too).  Saves h, the activated gates and the
    recurrent n pre-activation."""

    @staticmethod
    def compute(backend: str, offs, ub: int, xp, h0, w_hh, b_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        b_hh = b_hh.contiguous() if b_hh is not None else xp.new_zeros(w_hh.shape[0])
        y, gates, ghn = LOOPS[backend].gru_forward(rows, ub, xp, w_hh, b_hh, h0)
        return (y, rows.final(y, h0, alias)), (offs, h0, w_hh, y, gates, ghn)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, xp, h0, w_hh, b_hh):
        out, saved = GRULayerFunction.compute(backend, offs, ub, xp, h0, w_hh, b_hh)
        ctx.save_for_backward(*saved)
        ctx.backend, ctx.ub = backend, ub
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        offs, h0, w_hh, y, gates, ghn = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dxp, dgh = LOOPS[ctx.backend].gru_backward(rows, ctx.ub, dy, w_hh, h0, y, gates, ghn, dh)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        db_hh = dgh.sum(0) if ctx.needs_input_grad[6] else None
        return None, None, None, dxp, dh, dw_hh, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """The sequential part of one Elman RNN layer: (xp = x W_ih^T + b_ih + b_hh, h0, W_hh) -> y, h_n."""

    @staticmethod
    def compute(backend: str, offs, ub: int, relu: bool, xp, h0, w_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        y = LOOPS[backend].rnn_forward(rows, ub, relu, xp, w_hh, h0)
        return (y, rows.final(y, h0, alias)), (offs, h0, w_hh, y)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, relu: bool, xp, h0, w_hh):
        out, saved = RNNLayerFunction.compute(backend, offs, ub, relu, xp, h0, w_hh)
        ctx.save_for_backward(*saved)
        ctx.backend, ctx.ub, ctx.relu = backend, ub, relu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        offs, h0, w_hh, y = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dg = LOOPS[ctx.backend].rnn_backward(rows, ctx.ub, ctx.relu, dy, w_hh, y, dh)
        dw_hh = dg.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[6] else None
        return None, None, None, None, dg, dh, dw_hh


class LayerNormLSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized LSTM layer: (xp = LN(x W_ih^T) gamma_ih + b,
    h0, c0, W_hh, gamma_hh, gamma_c, beta_c) -> y, h_n, c_n (torch's gate order).  Saves h, c,
    the gates, the normalized recurrent term and cell and their rstd."""

    @staticmethod
    def compute(backend: str, offs, eps: float, xp, h0, c0, w_hh, g_hh, g_c, b_c, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, c0, w_hh, g_hh, g_c, b_c = (t.contiguous() for t in (h0, c0, w_hh, g_hh, g_c, b_c))
        y, cs, gates, ghat, rstd_h, chat, rstd_c = LOOPS[backend].ln_lstm_forward(rows, eps, xp, w_hh, g_hh, g_c, b_c,
                                                                                  h0, c0)
        return ((y, rows.final(y, h0, alias), rows.final(cs, c0, alias)),
                (offs, h0, c0, w_hh, g_hh, g_c, b_c, y, cs, gates, ghat, rstd_h, chat, rstd_c))

    @staticmethod
    def forward(ctx, backend: str, offs, eps: float, xp, h0, c0, w_hh, g_hh, g_c, b_c):
        out, saved = LayerNormLSTMLayerFunction.compute(backend, offs, eps, xp, h0, c0, w_hh, g_hh, g_c, b_c)
        ctx.save_for_backward(*saved)
        ctx.backend = backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        offs, h0, c0, w_hh, g_hh, g_c, b_c, y, cs, gates, ghat, rstd_h, chat, rstd_c = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        N = rows.N
        dy = _grad_or_zeros(dy, N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dgh, dg_hh, dg_c, db_c = LOOPS[ctx.backend].ln_lstm_backward(rows, dy, w_hh, g_hh, g_c, b_c, c0, cs, gates,
                                                                          ghat, rstd_h, chat, rstd_c, dh, dc)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[6] else None
        keep = ctx.needs_input_grad
        return (None, None, None, dg, dh, dc, dw_hh, dg_hh if keep[7] else None, dg_c if keep[8] else None,
                db_c if keep[9] else None)


class LayerNormGRULayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized GRU layer: (xp = LN(x W_ih^T) gamma_ih + b_ih,
    h0, W_hh, gamma_hh, b_hh) -> y, h_n (torch's gate order)."""

    @staticmethod
    def compute(backend: str, offs, eps: float, xp, h0, w_hh, g_hh, b_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        b_hh = b_hh if b_hh is not None else xp.new_zeros(w_hh.shape[0])
        h0, w_hh, g_hh, b_hh = (t.contiguous() for t in (h0, w_hh, g_hh, b_hh))
        y, gates, ghat, rstd_h, ghn = LOOPS[backend].ln_gru_forward(rows, eps, xp, w_hh, g_hh, b_hh, h0)
        return (y, rows.final(y, h0, alias)), (offs, h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn)

    @staticmethod
    def forward(ctx, backend: str, offs, eps: float, xp, h0, w_hh, g_hh, b_hh):
        out, saved = LayerNormGRULayerFunction.compute(backend, offs, eps, xp, h0, w_hh, g_hh, b_hh)
        ctx.save_for_backward(*saved)
        ctx.backend = backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        offs, h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        N = rows.N
        dy = _grad_or_zeros(dy, N, H, y)
        dh = _carry(dh_n, h0)
        dxp, dgh, dg_hh, db_hh = LOOPS[ctx.backend].ln_gru_backward(rows, dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h,
                                                                     ghn, dh)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        keep = ctx.needs_input_grad
        return None, None, None, dxp, dh, dw_hh, dg_hh if keep[6] else None, db_hh if keep[7] else None
