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

def _linear(x, w, b, b2=None):
    """x W^T + b (+ b2), the output huge-page backed where large (fastseq._alloc)."""
    if x.shape[0] * w.shape[0] * x.element_size() < _alloc.HUGE_BYTES:
        out = F.linear(x, w, b)
    else:
        out = _alloc.empty((x.shape[0], w.shape[0]), x.dtype, x.device)
        torch.addmm(b, x, w.t(), out=out) if b is not None else torch.mm(x, w.t(), out=out)
    return out if b2 is None else out.add_(b2)


class ProjectionFunction(torch.autograd.Function):
    """xp = x W^T + b (+ b2) for every step at once, (N, C) -> (N, G H), as F.linear: once
    differentiable like the cells' Functions, the output and the input gradient in fastseq's
    allocations (at (T, B) = (512, 64), G H = 512 the (N, G H) buffer is 64 MiB, and faulting in
    fresh 4 KiB pages for it cost as much as the GEMM itself), and a second bias (the LSTM's and
    RNN's b_hh) added in place instead of by one more autograd node."""

    @staticmethod
    def forward(ctx, x, w, b, b2):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _linear(x, w, b, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dxp):
        x, w = ctx.saved_tensors
        dx = dw = db = db2 = None
        needs = ctx.needs_input_grad
        if needs[0]:
            dx = torch.mm(dxp, w, out=_alloc.empty(x.shape, x.dtype, x.device))
        if needs[1]:
            dw = dxp.t() @ x
        if ctx.has_bias and (needs[2] or needs[3]):
            db = dxp.sum(0)
            db2 = db.clone() if needs[3] else None              # (two parameters never share a grad)
        return dx, dw, db, db2


def project(x, w, b, grad: bool, b2=None):
    """x W^T + b (+ b2) (N, G H).  With a gradient to form, on the CPU, through ProjectionFunction
    (once differentiable like the cells' Functions, so that a double backward through the layer
    raises instead of returning the projection's part alone).  Else F.linear."""
    if x.is_cuda or _library.captured(x):
        return F.linear(x, w, b if b2 is None else b + b2)
    if grad:
        return ProjectionFunction.apply(x, w, b, b2)
    return _linear(x, w, b if b2 is None else b + b2)


def project_blocked(x, w, b, perm, grad: bool, b2=None):
    """project() with the output columns in the blocked gate order perm: the weight's rows are
    permuted when that copies less than permuting the output's columns (N > C), else the output."""
    if perm is None:
        return project(x, w, b, grad, b2)
    if x.shape[0] > x.shape[1]:
        return project(x, permute(w, perm), permute(b, perm), grad, permute(b2, perm))
    return permute(project(x, w, b, grad, b2), perm, 1)


def _project_backward(dxp, x, w, perm, needs):
    """The gradients (dx, dW, db, db2) of xp = x W^T + b (+ b2) with xp's columns in the blocked
    order perm (None: torch's order), from dxp; needs: which of the four are wanted."""
    dx = dw = db = db2 = None
    if perm is not None:
        inv = torch.argsort(perm)
        if x.shape[0] > x.shape[1]:         # as the forward: the weight's rows permuted (project_blocked)
            if needs[0]:
                dx = dxp @ w.index_select(0, perm)
            if needs[1]:
                dw = (dxp.t() @ x).index_select(0, inv)
            if needs[2] or needs[3]:
                db = dxp.sum(0).index_select(0, inv)
            return dx, dw, db, (db.clone() if needs[3] else None)
        dxp = dxp.index_select(1, inv)
    if needs[0]:
        dx = torch.mm(dxp, w, out=_alloc.empty(x.shape, x.dtype, x.device))
    if needs[1]:
        dw = dxp.t() @ x
    if needs[2] or needs[3]:
        db = dxp.sum(0)
        db2 = db.clone() if needs[3] else None                  # (two parameters never share a grad)
    return dx, dw, db, db2


class _Ctx:
    """Stands in for autograd's ctx when a cell Function runs inside ProjectedLayerFunction."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _keep(ctx, fn, args, alias=False):
    """A cell Function's forward: its compute() on args, keeping on ctx what its backward needs
    (the saved tensors and the arguments fn.CTX names)."""
    out, saved = fn.compute(*args, alias=alias)
    ctx.save_for_backward(*saved)
    for attr, i in fn.CTX:
        setattr(ctx, attr, args[i])
    return out


class ProjectedLayerFunction(torch.autograd.Function):
    """One layer as one autograd node: the input projection xp = x W_ih^T + b_ih (+ b_hh), its
    columns in the blocked gate order perm, then the cell Function FUNCTION[name] (below) on
    args with args[k] = xp, forward and backward.  The layers use it whenever a gradient is formed
    on the eager path: one autograd node per layer instead of two (ProjectionFunction and the
    cell's), ~10 us less per call, and once differentiable as a whole.  (Its final states are
    copies, never y itself: y is saved for backward, and an in-place change of a returned state
    must not invalidate it, as it does not in torch's own cells.)"""

    @staticmethod
    def forward(ctx, name: str, k: int, x, w_ih, b_ih, b_hh, perm, *args):
        fn = FUNCTION[name]
        inner = _Ctx()
        if name == "lstm_layer" and args[0] == "cpu" and _fuses_projection(args[1], args[4], x, w_ih):
            backend, offs, ub, _, h0, c0, w_hh = args          # the projection inside the loop: no xp
            out, saved = LSTMLayerFunction.compute_projected(backend, offs, ub, x, w_ih, b_ih, b_hh, h0, c0, w_hh)
            inner.save_for_backward(*saved)
            inner.backend, inner.ub = backend, ub
        else:
            xp = project_blocked(x, w_ih, b_ih, perm, False, b_hh)
            out = _keep(inner, fn, (*args[:k], xp, *args[k + 1:]))
        ctx.save_for_backward(x, w_ih, perm, *inner.saved_tensors)
        del inner.saved_tensors
        ctx.name, ctx.k, ctx.inner = name, k, inner          # inner: the cell Function's ctx attributes
        ctx.has_bias = b_ih is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, w_ih, perm, *saved = ctx.saved_tensors
        inner, k, needs = ctx.inner, ctx.k, ctx.needs_input_grad[7:]
        inner.saved_tensors = tuple(saved)
        inner.needs_input_grad = needs[:k] + (any(ctx.needs_input_grad[2:6]),) + needs[k + 1:]
        inner.dxp_scratch = True            # dG is used up here (the projection's gradients): reusable memory
        try:
            g = FUNCTION[ctx.name].backward(inner, *grads)
        finally:                            # y among them: ctx -> inner -> y -> y.grad_fn -> ctx would be a
            del inner.saved_tensors         # cycle, its buffers held until Python's cyclic GC ran
        n = ctx.needs_input_grad
        dx, dw, db, db2 = _project_backward(g[k], x, w_ih, perm, (n[2], n[3], n[4] and ctx.has_bias,
                                                                  n[5] and ctx.has_bias))
        return (None, None, dx, dw, db, db2, None) + tuple(g[:k]) + (None,) + tuple(g[k + 1:])


def _fuses_projection(offs, h0, x, w_ih) -> bool:
    """Whether the CPU LSTM's forward runs x's projection inside its loop (cpu.fuses_projection)."""
    return w_ih.dtype == x.dtype and cpu.fuses_projection(R.of(offs, h0.shape[0], x.shape[0]), x.dtype)


# entered at the C++ apply (fastseq/_library.py, direct_apply): the layers reach it only outside torch.func
apply_projected = _library.direct_apply(ProjectedLayerFunction)


# ============================================================================ the cells' Functions

class LSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one LSTM layer: (xp, h0, c0, W_hh) -> y, h_n, c_n.  W_hh in torch's
    row order, xp in the blocked gate layout of unit block ub (the backward returns its gradient
    dG blocked); saves every step's h and c and the activated gates.  Inference (nothing saved,
    xp in torch's order) is infer() below, outside autograd."""

    CTX = (("backend", 0), ("ub", 2))        # what forward keeps on ctx: (attribute, argument index)

    @staticmethod
    def compute(backend: str, offs, ub: int, xp, h0, c0, w_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        H = w_hh.shape[1]
        h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
        y, cs, gates = LOOPS[backend].lstm_forward(rows, ub, xp, w_hh, h0, c0)
        return (y, rows.final(y, h0, alias), rows.final(cs, c0, alias)), (offs, h0, c0, w_hh, y, cs, gates)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, xp, h0, c0, w_hh):
        return _keep(ctx, LSTMLayerFunction, (backend, offs, ub, xp, h0, c0, w_hh))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        offs, h0, c0, w_hh, y, cs, gates = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg = LOOPS[ctx.backend].lstm_backward(rows, ctx.ub, dy, w_hh, c0, cs, gates, dh, dc,
                                              getattr(ctx, "dxp_scratch", False))
        dw_hh = None
        if ctx.needs_input_grad[6]:
            dw_hh = permute(rows.grad_w_hh(dg, h0, y), inverse_perm(H, ctx.ub, 4))     # (4H, H)
        return None, None, None, dg, dh, dc, dw_hh

    @staticmethod
    def compute_projected(backend: str, offs, ub: int, x, w_ih, b_ih, b_hh, h0, c0, w_hh, alias: bool = False):
        """compute() with the input projection inside the time loop (the CPU's fused forward,
        cpu.fuses_projection): x (N, I) and W_ih, b_ih, b_hh in torch's order instead of xp.
        The same outputs and saved tensors as compute() on xp = x W_ih^T + b_ih + b_hh."""
        rows = R.of(offs, h0.shape[0], x.shape[0])
        h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
        y, cs, gates = LOOPS[backend].lstm_forward(rows, ub, None, w_hh, h0, c0, x.contiguous(), w_ih.contiguous(),
                                                   _bias(b_ih, b_hh))
        return (y, rows.final(y, h0, alias), rows.final(cs, c0, alias)), (offs, h0, c0, w_hh, y, cs, gates)

    @staticmethod
    def infer(backend: str, offs, ub: int, xp, h0, c0, w_hh, alias: bool = False):
        """Forward keeping nothing, xp in torch's order: y, h_n, c_n."""
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        y, c_n = LOOPS[backend].lstm_infer(rows, ub, xp, w_hh.contiguous(), h0.contiguous(), c0.contiguous())
        return y, rows.final(y, h0, alias), c_n

    @staticmethod
    def infer_projected(backend: str, offs, ub: int, x, w_ih, b_ih, b_hh, h0, c0, w_hh, alias: bool = False):
        """infer() with the input projection inside the time loop (as compute_projected)."""
        rows = R.of(offs, h0.shape[0], x.shape[0])
        y, c_n = LOOPS[backend].lstm_infer(rows, ub, None, w_hh.contiguous(), h0.contiguous(), c0.contiguous(),
                                           x.contiguous(), w_ih.contiguous(), _bias(b_ih, b_hh))
        return y, rows.final(y, h0, alias), c_n


def _bias(b_ih, b_hh):
    """The LSTM's two biases as one (4H,), or None."""
    if b_ih is None:
        return b_hh.detach().contiguous() if b_hh is not None else None
    return (b_ih.detach() + b_hh.detach()) if b_hh is not None else b_ih.detach().contiguous()


class LSTMProjLayerFunction(torch.autograd.Function):
    """LSTMLayerFunction with torch's proj_size (CPU): (xp, h0 (B, P), c0 (B, H), W_hh (4H, P)
    blocked rows, W_hr (P, H)) -> y (N, P), h_n (B, P), c_n (B, H), h_t = (o tanh(c_t)) W_hr^T.
    Saves m = o tanh(c) too."""

    CTX = (("backend", 0), ("ub", 2))        # what forward keeps on ctx: (attribute, argument index)

    @staticmethod
    def compute(backend: str, offs, ub: int, xp, h0, c0, w_hh, w_hr, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, c0, w_hh, w_hr = h0.contiguous(), c0.contiguous(), w_hh.contiguous(), w_hr.contiguous()
        y, cs, gates, m = LOOPS[backend].lstm_proj_forward(rows, ub, xp, w_hh, w_hr, h0, c0)
        return (y, rows.final(y, h0, alias), rows.final(cs, c0, alias)), (offs, h0, c0, w_hh, w_hr, y, cs, gates, m)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, xp, h0, c0, w_hh, w_hr):
        return _keep(ctx, LSTMProjLayerFunction, (backend, offs, ub, xp, h0, c0, w_hh, w_hr))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        offs, h0, c0, w_hh, w_hr, y, cs, gates, m = ctx.saved_tensors
        rows, (P, H) = R.of(offs, h0.shape[0], y.shape[0]), w_hr.shape
        dy = _grad_or_zeros(dy, rows.N, P, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dhp = LOOPS[ctx.backend].lstm_proj_backward(rows, ctx.ub, dy, w_hh, w_hr, c0, cs, gates, dh, dc)
        dw_hh = rows.grad_w_hh(dg, h0, y) if ctx.needs_input_grad[6] else None
        dw_hr = dhp.t() @ m if ctx.needs_input_grad[7] else None
        return None, None, None, dg, dh, dc, dw_hh, dw_hr


class GRULayerFunction(torch.autograd.Function):
    """The sequential part of one GRU layer: (xp = x W_ih^T + b_ih, h0, W_hh, b_hh) -> y, h_n,
    blocked gate layout (W_hh's rows and b_hh too).  Saves h, the activated gates and the
    recurrent n pre-activation."""

    CTX = (("backend", 0), ("ub", 2))        # what forward keeps on ctx: (attribute, argument index)

    @staticmethod
    def compute(backend: str, offs, ub: int, xp, h0, w_hh, b_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        b_hh = b_hh.contiguous() if b_hh is not None else xp.new_zeros(w_hh.shape[0])
        y, gates, ghn = LOOPS[backend].gru_forward(rows, ub, xp, w_hh, b_hh, h0)
        return (y, rows.final(y, h0, alias)), (offs, h0, w_hh, y, gates, ghn)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, xp, h0, w_hh, b_hh):
        return _keep(ctx, GRULayerFunction, (backend, offs, ub, xp, h0, w_hh, b_hh))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        offs, h0, w_hh, y, gates, ghn = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dxp, dgh = LOOPS[ctx.backend].gru_backward(rows, ctx.ub, dy, w_hh, h0, y, gates, ghn, dh)
        dw_hh = rows.grad_w_hh(dgh, h0, y) if ctx.needs_input_grad[5] else None
        db_hh = dgh.sum(0) if ctx.needs_input_grad[6] else None
        return None, None, None, dxp, dh, dw_hh, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """The sequential part of one Elman RNN layer: (xp = x W_ih^T + b_ih + b_hh, h0, W_hh) -> y, h_n."""

    CTX = (("backend", 0), ("ub", 2), ("relu", 3))        # what forward keeps on ctx: (attribute, argument index)

    @staticmethod
    def compute(backend: str, offs, ub: int, relu: bool, xp, h0, w_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        y = LOOPS[backend].rnn_forward(rows, ub, relu, xp, w_hh, h0)
        return (y, rows.final(y, h0, alias)), (offs, h0, w_hh, y)

    @staticmethod
    def forward(ctx, backend: str, offs, ub: int, relu: bool, xp, h0, w_hh):
        return _keep(ctx, RNNLayerFunction, (backend, offs, ub, relu, xp, h0, w_hh))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        offs, h0, w_hh, y = ctx.saved_tensors
        rows, H = R.of(offs, h0.shape[0], y.shape[0]), w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dg = LOOPS[ctx.backend].rnn_backward(rows, ctx.ub, ctx.relu, dy, w_hh, y, dh)
        dw_hh = rows.grad_w_hh(dg, h0, y) if ctx.needs_input_grad[6] else None
        return None, None, None, None, dg, dh, dw_hh


class LayerNormLSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized LSTM layer: (xp = LN(x W_ih^T) gamma_ih + b,
    h0, c0, W_hh, gamma_hh, gamma_c, beta_c) -> y, h_n, c_n (torch's gate order).  Saves h, c,
    the gates, the normalized recurrent term and cell and their rstd."""

    CTX = (("backend", 0),)        # what forward keeps on ctx: (attribute, argument index)

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
        return _keep(ctx, LayerNormLSTMLayerFunction, (backend, offs, eps, xp, h0, c0, w_hh, g_hh, g_c, b_c))

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
        dw_hh = rows.grad_w_hh(dgh, h0, y) if ctx.needs_input_grad[6] else None
        keep = ctx.needs_input_grad
        return (None, None, None, dg, dh, dc, dw_hh, dg_hh if keep[7] else None, dg_c if keep[8] else None,
                db_c if keep[9] else None)


class LayerNormGRULayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized GRU layer: (xp = LN(x W_ih^T) gamma_ih + b_ih,
    h0, W_hh, gamma_hh, b_hh) -> y, h_n (torch's gate order)."""

    CTX = (("backend", 0),)        # what forward keeps on ctx: (attribute, argument index)

    @staticmethod
    def compute(backend: str, offs, eps: float, xp, h0, w_hh, g_hh, b_hh, alias: bool = False):
        rows = R.of(offs, h0.shape[0], xp.shape[0])
        b_hh = b_hh if b_hh is not None else xp.new_zeros(w_hh.shape[0])
        h0, w_hh, g_hh, b_hh = (t.contiguous() for t in (h0, w_hh, g_hh, b_hh))
        y, gates, ghat, rstd_h, ghn = LOOPS[backend].ln_gru_forward(rows, eps, xp, w_hh, g_hh, b_hh, h0)
        return (y, rows.final(y, h0, alias)), (offs, h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn)

    @staticmethod
    def forward(ctx, backend: str, offs, eps: float, xp, h0, w_hh, g_hh, b_hh):
        return _keep(ctx, LayerNormGRULayerFunction, (backend, offs, eps, xp, h0, w_hh, g_hh, b_hh))

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
        dw_hh = rows.grad_w_hh(dgh, h0, y) if ctx.needs_input_grad[5] else None
        keep = ctx.needs_input_grad
        return None, None, None, dxp, dh, dw_hh, dg_hh if keep[6] else None, db_hh if keep[7] else None


FUNCTION = {"lstm_layer": LSTMLayerFunction, "lstm_proj_layer": LSTMProjLayerFunction, "gru_layer": GRULayerFunction,
            "rnn_layer": RNNLayerFunction, "layer_norm_lstm_layer": LayerNormLSTMLayerFunction,
            "layer_norm_gru_layer": LayerNormGRULayerFunction}
