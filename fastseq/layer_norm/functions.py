"""The autograd Function (eager calls) and the same kernels as registered torch.library ops (graph capture)."""
import math
from typing import Optional, Tuple

import torch

from .. import _library
from ..dropout import _dropout_kernel, dropout_mul
from .kernels import _affine, _backward, _forward, _stat_dtype
from .reference import layer_norm_ref, rms_norm_ref


# ============================================================================ autograd

class LayerNormFunction(torch.autograd.Function):
    """norm(x [+ residual]) * weight + bias, LayerNorm (center=True) or RMSNorm (center=False).

    Returns y, or (y, x + residual) when return_sum.  Saves per-row mean/rstd and the normalized
    input: x (or x and residual, rebuilding the sum in backward, when the sum is not returned;
    the returned sum itself when it is).  Backward runs on the backend that ran forward.
    A backward under create_graph (double backward) differentiates the reference instead, so
    higher-order gradients are right rather than fast.  p > 0 (with residual): x is dropped
    before the add, the mask keyed by seed and regenerated in backward.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, normalized_shape, eps, center, return_sum, backend, p, seed):
        m, n = x.numel() // max(1, math.prod(normalized_shape)), math.prod(normalized_shape)
        xc = x.contiguous()
        rc = residual.contiguous() if residual is not None else None
        w, b = _affine(weight, bias, n, x)
        y, s, mean, rstd = _forward(backend, xc, rc, w, b, m, n, eps, center, return_sum, p=p, seed=seed)
        # the inputs themselves (not contiguous copies), so a double backward stays connected
        if return_sum:
            ctx.save_for_backward(s, None, weight, bias, mean, rstd)
        else:
            ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
        ctx.meta = (backend, m, n, tuple(normalized_shape), eps, center, residual is not None, p, seed)
        ctx.set_materialize_grads(False)
        return (y, s) if return_sum else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        backend, m, n, shape, eps, center, has_r, p, seed = ctx.meta
        v, r, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None and ds is None:
            return (None,) * 11
        if torch.is_grad_enabled():                 # create_graph=True
            return _double_differentiable_backward(ctx, v, r, weight, bias, dy, ds, shape, eps, center, has_r,
                                                   p, seed)
        dropped = p > 0 and has_r
        if dy is None:                              # only the returned sum was used downstream
            dx = ds
            dxd = _dropout_grad(backend, ds, p, seed) if dropped and ctx.needs_input_grad[0] else None
            dw = torch.zeros(shape, dtype=v.dtype, device=v.device) if weight is not None else None
            db = torch.zeros(shape, dtype=v.dtype, device=v.device) if bias is not None else None
        else:
            w, _ = _affine(weight, None, n, v)
            dx, dxd, dw, db = _backward(backend, v.contiguous(), r.contiguous() if r is not None else None,
                                        dy.contiguous(), ds.contiguous() if ds is not None else None, w, mean,
                                        rstd, m, n, center, weight is not None and ctx.needs_input_grad[2],
                                        bias is not None and ctx.needs_input_grad[3], p if dropped else 0.0, seed,
                                        dropped and ctx.needs_input_grad[0])
            dx = dx.view(v.shape)
            dxd = dxd.view(v.shape) if dxd is not None else None
            dw = dw.view(shape) if dw is not None else None
            db = db.view(shape) if db is not None else None
        if not dropped:
            dxd = dx
        return dxd, (dx if has_r else None), dw, db, None, None, None, None, None, None, None


_apply_layer_norm = _library.direct_apply(LayerNormFunction)


def _dropout_grad(backend, g, p, seed):
    """g Z / (1 - p): the gradient of the dropped input from the sum's."""
    return _dropout_kernel(backend, g.contiguous(), None, p, seed).view(g.shape)


def _double_differentiable_backward(ctx, v, r, weight, bias, dy, ds, shape, eps, center, has_r, p, seed):
    """First-order gradients as a differentiable graph of torch ops (the reference recomputed)."""
    s = v if r is None else v + r
    if r is not None and p > 0:                 # v is the dropped input: rebuild the sum with its mask
        s = v * dropout_mul(seed, v.shape, p, v.dtype, v.device) + r
    y = layer_norm_ref(s, shape, weight, bias, eps) if center else rms_norm_ref(s, shape, weight, eps)
    inputs = [v] if r is None else [v, r]
    wants = [(weight, weight is not None), (bias, bias is not None)]
    live = [t for t in inputs if t.requires_grad] + [t for t, ok in wants if ok and t.requires_grad]
    got = iter(torch.autograd.grad(y, live, dy, create_graph=True, allow_unused=True) if dy is not None
               else [None] * len(live))
    grads = [next(got) if t.requires_grad else None for t in inputs]
    dw, db = [next(got) if ok and t.requires_grad else None for t, ok in wants]
    if r is None:                               # v is the returned sum (or the only input)
        ds_total = grads[0]
        if ds is not None:
            ds_total = ds if ds_total is None else ds_total + ds
        dxd = ds_total
        if has_r and p > 0 and ds_total is not None:
            dxd = ds_total * dropout_mul(seed, v.shape, p, v.dtype, v.device)
        return dxd, (ds_total if has_r else None), dw, db, None, None, None, None, None, None, None
    dxd, dr = grads
    if ds is not None:                          # the sum was returned too: ds reaches both summands
        dr = ds if dr is None else dr + ds
        dsd = ds * dropout_mul(seed, v.shape, p, v.dtype, v.device) if p > 0 else ds
        dxd = dsd if dxd is None else dxd + dsd
    return dxd, dr, dw, db, None, None, None, None, None, None, None


# ============================================================================ registered ops
# The same kernels as torch.library ops, for graph capture (fastseq/_library.py): forward returns
# (y, s, mean, rstd), s empty unless return_sum; backward is an op too, so a compiled graph
# holds both as opaque kernel calls.  The dropout seed is a 0-dim int64 tensor drawn in the graph.

@torch.library.custom_op("fastseq::norm_forward", mutates_args=())
def _norm_forward_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], n: int, eps: float, center: bool, return_sum: bool,
                     backend: str, p: float, seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    m = x.numel() // n if n else 0
    w, b = _affine(weight, bias, n, x)
    y, s, mean, rstd = _forward(backend, x.contiguous(), residual.contiguous() if residual is not None else None,
                                w, b, m, n, eps, center, return_sum, p=p, seed=int(seed))
    return y.view(x.shape), (s.view(x.shape) if s is not None else x.new_empty(0)), mean, rstd


@_norm_forward_op.register_fake
def _(x, residual, weight, bias, n, eps, center, return_sum, backend, p, seed):
    m = x.numel() // n if n else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format) if return_sum else x.new_empty(0),
            x.new_empty((m,), dtype=_stat_dtype(x)), x.new_empty((m,), dtype=_stat_dtype(x)))


@torch.library.custom_op("fastseq::norm_backward", mutates_args=())
def _norm_backward_op(v: torch.Tensor, residual: Optional[torch.Tensor], dy: torch.Tensor, ds: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, n: int, center: bool,
                      want_dw: bool, want_db: bool, backend: str, p: float, seed: torch.Tensor,
                      want_dxd: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m = v.numel() // n if n else 0
    w, _ = _affine(weight, None, n, v)
    dx, dxd, dw, db = _backward(backend, v.contiguous(), residual.contiguous() if residual is not None else None,
                                dy.contiguous(), ds.contiguous() if ds is not None else None, w, mean, rstd, m, n,
                                center, want_dw, want_db, p, int(seed), want_dxd)
    return (dx.view(v.shape), dxd.view(v.shape) if dxd is not None else v.new_empty(0),
            dw if dw is not None else v.new_empty(0), db if db is not None else v.new_empty(0))


@_norm_backward_op.register_fake
def _(v, residual, dy, ds, weight, mean, rstd, n, center, want_dw, want_db, backend, p, seed, want_dxd):
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format) if want_dxd else v.new_empty(0),
            v.new_empty((n,) if want_dw else (0,)), v.new_empty((n,) if want_db else (0,)))


def _norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, n, eps, center, return_sum, backend, p, seed = inputs
    y, s, mean, rstd = output
    if return_sum:
        ctx.save_for_backward(s, None, weight, mean, rstd, seed)
    else:
        ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
    affine = weight if weight is not None else bias
    pshape = affine.shape if affine is not None else None         # normalized_shape, for dw / db
    ctx.meta = (n, center, backend, residual is not None, bias is not None, pshape, p)


def _norm_op_backward(ctx, dy, ds, dmean, drstd):
    n, center, backend, has_r, has_b, shape, p = ctx.meta
    v, r, weight, mean, rstd, seed = ctx.saved_tensors
    want_dw = weight is not None and ctx.needs_input_grad[2]
    want_db = has_b and ctx.needs_input_grad[3]
    dropped = has_r and p > 0
    want_dxd = dropped and ctx.needs_input_grad[0]
    dx, dxd, dw, db = _norm_backward_op(v, r, dy, ds if ds.numel() else None, weight, mean, rstd, n, center,
                                        want_dw, want_db, backend, p if dropped else 0.0, seed, want_dxd)
    return ((dxd if want_dxd else None) if dropped else dx, dx if has_r else None,
            dw.view(shape) if want_dw else None, db.view(shape) if want_db else None,
            None, None, None, None, None, None, None)


_norm_forward_op.register_autograd(_norm_op_backward, setup_context=_norm_setup_context)


def _run_captured(x, residual, n, weight, bias, eps, center, return_sum, backend, p):
    seed = _library.seed_tensor() if p > 0 else torch.zeros((), dtype=torch.int64)
    y, s, _, _ = _norm_forward_op(x, residual, weight, bias, n, eps, center, return_sum, backend, p, seed)
    return (y, s) if return_sum else y
