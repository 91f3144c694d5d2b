"""Cross-entropy family: softmax cross-entropy with label smoothing and z-loss, fused into one pass
forward and one backward, and the LM head + loss (linear_cross_entropy) that never forms the
(N, V) logits.

Read top to bottom: the pure-torch reference (the test oracle), input checks, dispatch, the
kernel calls, the autograd Functions, the functional ops, the modules.

The loss of row i (logits z, target t, class weights w, W = sum_c w_c; w = 1 without weights):
    loss_i = A w_t (lse - z_t) + B sum_c w_c (lse - z_c) + z_loss lse^2,    lse = log sum_c exp z_c
    smoothing="torch":   A = 1 - eps, B = eps / V             (torch's label_smoothing: target
                         1 - eps + eps/V, every class eps/V; its weighted form, as F.cross_entropy)
    smoothing="fairseq": A = 1 - eps - eps/(V-1), B = eps/(V-1) (fairseq's
                         label_smoothed_nll_loss: target 1 - eps, the others eps/(V-1))
Rows whose target is ignore_index count 0.  reduction="mean" divides the sum by sum_i w_(t_i)
over the rows not ignored (torch's rule; NaN when every row is ignored), "sum" sums, "none"
returns the rows.  The z-loss term (PaLM's log-Z penalty) is added to each row that is not
ignored before the reduction.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _alloc, _dispatch, _library

SMOOTHINGS = ("torch", "fairseq")


# ============================================================================ reference

def smoothing_coefficients(label_smoothing: float, V: int, smoothing: str = "torch"):
    """(A, B) of the loss above."""
    eps = float(label_smoothing)
    if smoothing == "fairseq":
        b = eps / (V - 1) if V > 1 else 0.0
        return 1.0 - eps - b, b
    return 1.0 - eps, eps / V if V > 0 else 0.0


def cross_entropy_ref(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      smoothing="torch", z_loss=0.0, return_lse=False):
    """The loss above in torch ops, in the accumulator precision: input (N, V), target (N,) int64."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    z = input.to(acc)
    V = z.shape[-1]
    lse = torch.logsumexp(z, -1)                                           # (N,)
    live = target != ignore_index
    t = torch.where(live, target, torch.zeros_like(target))
    w = weight.to(acc) if weight is not None else torch.ones(V, dtype=acc, device=z.device)
    keep = live.to(acc)                                                    # (N,) 1 for the rows not ignored
    wt = w[t] * keep                                                       # (N,)
    A, B = smoothing_coefficients(label_smoothing, V, smoothing)
    nll = wt * (lse - z.gather(-1, t.unsqueeze(-1)).squeeze(-1))
    rows = A * nll
    if B != 0:
        rows = rows + B * keep * (w.sum() * lse - (z * w).sum(-1))
    if z_loss:
        rows = rows + z_loss * keep * lse * lse
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / wt.sum()
    out = out.to(input.dtype)
    return (out, lse.to(input.dtype)) if return_lse else out


def linear_cross_entropy_ref(input, linear_weight, target, linear_bias=None, weight=None, **kw):
    """cross_entropy_ref(F.linear(input, linear_weight, linear_bias), target, weight, ...): the
    logits formed whole."""
    return cross_entropy_ref(F.linear(input, linear_weight, linear_bias), target, weight, **kw)


# ============================================================================ input checks

def _check_common(op, V, target, weight, ignore_index, reduction, label_smoothing, smoothing, z_loss):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: {reduction} is not a valid value for reduction")
    if not 0.0 <= float(label_smoothing) <= 1.0:              # torch raises RuntimeError: both types
        raise _dispatch.ShapeError(f"{op}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"{op}: smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
    if not math.isfinite(float(z_loss)) or float(z_loss) < 0:
        raise ValueError(f"{op}: z_loss must be a finite coefficient >= 0, got {z_loss}")
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.shape != (V,)):
        raise _dispatch.ShapeError(f"{op}: expected a class weight of shape [{V}], got "
                         f"{list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")


def _check_targets(op, target, V, ignore_index):
    """A target outside [0, V) that is not ignore_index: torch's IndexError (never read past V)."""
    if target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise IndexError(f"{op}: Target {value} is out of bounds (the logits have {V} classes; "
                         f"ignore_index is {ignore_index})")


def _fusable_reasons(input, target, weight) -> List[str]:
    """Why the fused kernels cannot take this call at all (it then runs on torch's ops)."""
    out = []
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return ["input and target must be tensors"]
    if target.dtype.is_floating_point:
        out.append("probability (soft) targets run on torch's F.cross_entropy")
    elif target.dtype != torch.int64:
        out.append(f"class-index targets must be int64 (torch's rule), got {target.dtype}")
    if input.dim() > 2:
        out.append(f"the classes must be the last dim of 2-D (N, C) or 1-D (C,) logits; got {input.dim()}-D "
                   f"(reshape to (-1, C), as sequence models do)")
    elif input.dim() == 0 or target.dim() != input.dim() - 1 or \
            (input.dim() == 2 and target.shape[0] != input.shape[0]):
        out.append(f"logits {list(input.shape)} and targets {list(target.shape)} do not pair as (N, C) and (N,)")
    if weight is not None and weight.dtype != input.dtype:
        out.append(f"class weight dtype {weight.dtype} differs from the logits' {input.dtype}")
    devices = {t.device for t in (input, target, weight) if t is not None}
    if len(devices) > 1:
        out.append(f"logits, targets and class weight on different devices ({', '.join(map(str, devices))}): "
                   f"torch's op raises its error")
    return out


# ============================================================================ dispatch

def _facts(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
           label_smoothing=0.0, smoothing="torch", z_loss=0.0, return_lse=False):
    return {"device": input.device.type, "dtype": str(input.dtype).replace("torch.", ""),
            "shape_reasons": _fusable_reasons(input, target, weight)}


def _kernel_reasons(backend, dtypes):
    def reasons(f: dict) -> List[str]:
        out = list(f["shape_reasons"])
        if f["dtype"] not in dtypes:
            out.append(f"{backend} kernels take {', '.join(dtypes)}, got {f['dtype']}")
        return out
    return reasons


_dispatch.register_op("cross_entropy", _facts, cpu=_kernel_reasons("cpu", ("float32", "float64")),
                      cuda=_kernel_reasons("cuda", ("float16", "float32", "float64")), torch=lambda f: [])


def _backend(input, target, weight) -> str:
    if _library.transformed():
        return "torch"
    key = (input.device, input.dtype, target.dtype, input.dim(), target.dim(),
           None if weight is None else (weight.dtype, weight.device), target.device,
           input.dim() == 2 and target.shape[0] != input.shape[0])
    return _dispatch.choose_cached("cross_entropy", key, _facts, input, target, weight)


# ============================================================================ kernel calls

def _stat_dtype(x):
    return x.dtype if x.dtype == torch.float64 else torch.float32


class _Loss:
    """The options of one call, as the kernels take them."""
    __slots__ = ("ignore_index", "A", "B", "W", "Z", "weight")

    def __init__(self, V, weight, ignore_index, label_smoothing, smoothing, z_loss):
        self.ignore_index = int(ignore_index)
        self.A, self.B = smoothing_coefficients(label_smoothing, V, smoothing)
        self.W = float(weight.sum()) if weight is not None and self.B != 0 else float(V)
        self.Z = float(z_loss)
        self.weight = weight.contiguous() if weight is not None else None


def _threads(n, V):
    return _dispatch.num_threads() if n * V >= (1 << 15) else 1


def _rows(backend, z, target, L: _Loss, g=None, gs=0.0, dz=None):
    """Per row of logits z (n, V) (unit column stride): (loss, lse, weight of its target); with
    dz (may be z) also the rows' loss gradient times g (n,) or the scalar gs (g None), written
    in the same pass over z."""
    n, V = z.shape
    loss = torch.empty(n, dtype=_stat_dtype(z), device=z.device)
    lse = torch.empty(n, dtype=_stat_dtype(z), device=z.device)
    wrow = torch.empty(n, dtype=_stat_dtype(z), device=z.device)
    if backend == "cpu":
        _dispatch.cpu_kernels("cross_entropy").forward_ptr(
            z.data_ptr(), z.stride(0), target.data_ptr(), 0 if L.weight is None else L.weight.data_ptr(),
            L.ignore_index, L.A, L.B, L.W, L.Z, loss.data_ptr(), lse.data_ptr(), wrow.data_ptr(),
            0 if g is None else g.data_ptr(), float(gs), 0 if dz is None else dz.data_ptr(),
            0 if dz is None else dz.stride(0), n, V, _threads(n, V), z.dtype == torch.float64)
        return loss, lse, wrow
    from fastseq._cuda._common import as_array, on_device, torch_stream
    k = _dispatch.cuda_kernels("cross_entropy")
    with on_device(z.device):
        w = as_array(L.weight) if L.weight is not None else as_array(lse)
        k.forward(as_array(z), as_array(target), w, L.weight is not None, L.ignore_index, L.A, L.B, L.W, L.Z,
                  as_array(loss), as_array(lse), as_array(wrow), n, V, stream=torch_stream())
        if dz is not None:
            k.backward(as_array(z), as_array(target), w, L.weight is not None, L.ignore_index, L.A, L.B, L.W, L.Z,
                       as_array(lse), as_array(g) if g is not None else as_array(lse), g is not None, float(gs),
                       as_array(dz), n, V, stream=torch_stream())
    return loss, lse, wrow


def _mean_denominator(target, class_weight, ignore_index) -> float:
    """sum_i w_(t_i) over the rows not ignored: the mean's divisor, known before any logit."""
    live = target != ignore_index
    if class_weight is None:
        return float(live.sum())
    return float(class_weight[target[live]].sum())


def _first_scale(reduction, target, class_weight, ignore_index) -> float:
    """The gradient scale of every row when the output's gradient is 1 ("none": 1, then the rows
    are scaled by their own gradients in backward)."""
    if reduction != "mean":
        return 1.0
    d = _mean_denominator(target, class_weight, ignore_index)
    return 1.0 / d if d != 0 else float("nan")


def _reduce(rows, wrow, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / wrow.sum()


def _scaled(d, grad, reduction, traced=False):
    """The saved gradient d (computed for an output gradient of 1) for the output's gradient
    (traced: inside a captured graph, where the value of grad cannot be looked at)."""
    if reduction == "none":
        return d * grad.to(d.dtype).reshape(-1, *([1] * (d.dim() - 1)))
    if not traced and not grad.is_cuda and float(grad) == 1.0:     # loss.backward(): no pass at all
        return d
    return d * grad.to(d.dtype)


# ============================================================================ autograd

class CrossEntropyFunction(torch.autograd.Function):
    """Fused softmax cross-entropy over (N, V) logits.  The gradient of the logits is written by
    the forward's own pass over them, for an output gradient of 1 (its row scale is known then:
    1 / sum of the live rows' target weights for "mean", 1 otherwise); backward returns it, scaled
    when the output's gradient is not 1.  The logits are read once and never saved."""

    @staticmethod
    def forward(ctx, z, target, weight, ignore_index, reduction, label_smoothing, smoothing, z_loss, backend):
        zc = z if z.stride(-1) == 1 else z.contiguous()
        L = _Loss(z.shape[1], weight, ignore_index, label_smoothing, smoothing, z_loss)
        dz = _alloc.empty_like(zc)
        rows, lse, wrow = _rows(backend, zc, target, L, None, _first_scale(reduction, target, weight, ignore_index),
                                dz)
        ctx.save_for_backward(dz)
        ctx.reduction = reduction
        lse = lse.to(z.dtype)
        ctx.mark_non_differentiable(lse)
        return _reduce(rows, wrow, reduction).to(z.dtype), lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        if torch.is_grad_enabled():
            raise NotImplementedError("cross_entropy: double backward through the fused loss is not supported; "
                                      "use fastseq.use_backend('torch') for higher-order gradients")
        dz, = ctx.saved_tensors
        return _scaled(dz, grad, ctx.reduction), None, None, None, None, None, None, None, None


_apply_cross_entropy = _library.direct_apply(CrossEntropyFunction)


def _chunk_rows(N, V, itemsize):
    """Rows per chunk of linear_cross_entropy: ~256 MiB of logits, and 256 to 4096 rows (2048 at
    V = 32000, 1335 at V = 50257, 256 from V = 262144, where the chunk grows past 256 MiB).  Each
    chunk's dW GEMM reads and writes all of dW (V, E); below ~1000 rows that traffic, not the
    FLOPs, sets its time (measured at N = 8192, E = 512, V = 32000, fwd + bwd: 7.8 s at 512 rows,
    6.6 s at 2048, 7.6 s at 8192, where the chunk is the whole (N, V) logits again).  The peak
    extra memory is then one chunk plus dx and dW: ~0.35 GB against torch's ~3 GB there."""
    return max(1, min(N, max(256, min(4096, (256 << 20) // max(1, V * itemsize)))))


def _linear_ce_chunks(backend, x, W, b, target, L: _Loss, g, gs, want, chunk, out_rows=None):
    """Run the chunks: logits = x W^T + b per chunk, the loss rows (into out_rows), and with
    `want` = (dx, dW, db) buffers the gradients for row scale g / gs accumulated.  Returns lse."""
    N = x.shape[0]
    V = W.shape[0]
    buf = _alloc.empty((min(chunk, N), V), x.dtype, x.device)       # huge pages from 32 MiB (fastseq/_alloc.py)
    lse_all = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
    dx, dW, db = want
    grads = dx is not None or dW is not None or db is not None
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        z = buf[: r1 - r0]
        xc = x[r0:r1]
        if b is not None:
            torch.addmm(b, xc, W.t(), out=z)                                  # (rows, V)
        else:
            torch.mm(xc, W.t(), out=z)
        rows, lse, wrow = _rows(backend, z, target[r0:r1], L, None if g is None else g[r0:r1], gs,
                                z if grads else None)                         # z becomes dz in place
        lse_all[r0:r1] = lse
        if out_rows is not None:
            out_rows[0][r0:r1] = rows
            out_rows[1][r0:r1] = wrow
        if dx is not None:
            torch.mm(z, W, out=dx[r0:r1])                                     # (rows, E)
        if dW is not None:
            dW.addmm_(z.t(), xc)                                             # (V, E)
        if db is not None:
            db.add_(z.sum(0))
    return lse_all


class LinearCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(x W^T + b, target) in chunks of rows: the (N, V) logits never exist whole.

    For reduction "mean" / "sum" the gradient's row scale is known in forward (the output's
    gradient is one scalar, applied in backward), so forward computes dx, dW, db chunk by chunk
    while each chunk of logits is in cache, and backward only scales them.  For "none" the row
    scales arrive with backward, which recomputes the chunks."""

    @staticmethod
    def forward(ctx, x, W, b, target, class_weight, ignore_index, reduction, label_smoothing, smoothing, z_loss,
                backend, chunk):
        N, V = x.shape[0], W.shape[0]
        xc, Wc = x.contiguous(), W.contiguous()
        L = _Loss(V, class_weight, ignore_index, label_smoothing, smoothing, z_loss)
        rows = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
        wrow = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
        need = ctx.needs_input_grad
        early = reduction != "none" and (need[0] or need[1] or need[2])
        want = (None, None, None)
        if early:
            want = (torch.empty_like(xc) if need[0] else None, torch.zeros_like(Wc) if need[1] else None,
                    torch.zeros(V, dtype=x.dtype, device=x.device) if need[2] else None)
        gs = _first_scale(reduction, target, class_weight, ignore_index) if early else 0.0
        lse = _linear_ce_chunks(backend, xc, Wc, b, target, L, None, gs, want, chunk, (rows, wrow))
        ctx.meta = (L, reduction, backend, chunk, early)
        if early:
            ctx.save_for_backward(*want)
        else:
            ctx.save_for_backward(xc, Wc, b, target)
        lse = lse.to(x.dtype)
        ctx.mark_non_differentiable(lse)
        return _reduce(rows, wrow, reduction).to(x.dtype), lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        L, reduction, backend, chunk, early = ctx.meta
        if torch.is_grad_enabled():
            raise NotImplementedError("linear_cross_entropy: double backward is not supported; use "
                                      "fastseq.use_backend('torch') for higher-order gradients")
        nones = (None,) * 9
        if early:
            return tuple(_scaled(d, grad, reduction) if d is not None else None for d in ctx.saved_tensors) + nones
        x, W, b, target = ctx.saved_tensors
        need = ctx.needs_input_grad
        want = (torch.empty_like(x) if need[0] else None, torch.zeros_like(W) if need[1] else None,
                torch.zeros(W.shape[0], dtype=x.dtype, device=x.device) if need[2] else None)
        _linear_ce_chunks(backend, x, W, b, target, L, grad.to(_stat_dtype(x)).contiguous(), 0.0, want, chunk)
        return want + nones


_apply_linear_cross_entropy = _library.direct_apply(LinearCrossEntropyFunction)


# ============================================================================ registered ops
# The same kernels as torch.library ops, for graph capture (fastseq/_library.py).  Each forward
# op also returns the gradients it computed for an output gradient of 1 (empty when not asked);
# the registered backward scales them, so a compiled graph holds one opaque kernel call.

@torch.library.custom_op("fastseq::cross_entropy", mutates_args=())
def _cross_entropy_op(z: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                      reduction: str, label_smoothing: float, smoothing: str, z_loss: float, want_grad: bool,
                      backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_targets("cross_entropy", target, z.shape[1], ignore_index)
    zc = z if z.stride(-1) == 1 else z.contiguous()
    L = _Loss(z.shape[1], weight, ignore_index, label_smoothing, smoothing, z_loss)
    dz = _alloc.empty_like(zc) if want_grad else None
    rows, lse, wrow = _rows(backend, zc, target, L, None, _first_scale(reduction, target, weight, ignore_index), dz)
    return (_reduce(rows, wrow, reduction).to(z.dtype), lse.to(z.dtype),
            dz if dz is not None else z.new_empty(0))


@_cross_entropy_op.register_fake
def _(z, target, weight, ignore_index, reduction, label_smoothing, smoothing, z_loss, want_grad, backend):
    out = z.new_empty((z.shape[0],) if reduction == "none" else ())
    return out, z.new_empty((z.shape[0],)), (torch.empty_like(z, memory_format=torch.contiguous_format)
                                             if want_grad else z.new_empty(0))


def _ce_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[4]
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _ce_op_backward(ctx, grad, _glse, _gdz):
    dz, = ctx.saved_tensors
    return (_scaled(dz, grad, ctx.reduction, traced=True),) + (None,) * 9


_cross_entropy_op.register_autograd(_ce_op_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("fastseq::linear_cross_entropy", mutates_args=())
def _linear_ce_op(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
                  class_weight: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float,
                  smoothing: str, z_loss: float, want_dx: bool, want_dw: bool, want_db: bool, backend: str,
                  chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    N, V = x.shape[0], W.shape[0]
    _check_targets("linear_cross_entropy", target, V, ignore_index)
    xc, Wc = x.contiguous(), W.contiguous()
    L = _Loss(V, class_weight, ignore_index, label_smoothing, smoothing, z_loss)
    rows = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
    wrow = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
    want = (torch.empty_like(xc) if want_dx else None, torch.zeros_like(Wc) if want_dw else None,
            torch.zeros(V, dtype=x.dtype, device=x.device) if want_db else None)
    gs = _first_scale(reduction, target, class_weight, ignore_index)
    lse = _linear_ce_chunks(backend, xc, Wc, b, target, L, None, gs, want, chunk, (rows, wrow))
    return (_reduce(rows, wrow, reduction).to(x.dtype), lse.to(x.dtype)) + \
        tuple(t if t is not None else x.new_empty(0) for t in want)


@_linear_ce_op.register_fake
def _(x, W, b, target, class_weight, ignore_index, reduction, label_smoothing, smoothing, z_loss, want_dx, want_dw,
      want_db, backend, chunk):
    out = x.new_empty((x.shape[0],) if reduction == "none" else ())
    return (out, x.new_empty((x.shape[0],)), x.new_empty(x.shape) if want_dx else x.new_empty(0),
            x.new_empty(W.shape) if want_dw else x.new_empty(0), x.new_empty((W.shape[0],) if want_db else (0,)))


def _lce_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[6]
    ctx.wants = inputs[10:13]
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])


def _lce_op_backward(ctx, grad, *_):
    grads = [_scaled(d, grad, ctx.reduction, traced=True) if want else None
             for d, want in zip(ctx.saved_tensors, ctx.wants)]
    return tuple(grads) + (None,) * 12


_linear_ce_op.register_autograd(_lce_op_backward, setup_context=_lce_setup_context)


# ============================================================================ functional

def _legacy(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, smoothing: str = "torch", z_loss: float = 0.0,
                  return_lse: bool = False):
    """Softmax cross-entropy, as torch.nn.functional.cross_entropy, fused: one pass over the
    logits forward (row max, then exponentials and sums: only lse (N,) is saved), one backward
    pass writing the logits' gradient.

    Args:
        input: (N, C) or (C,) logits.  (N, C, d1, ...) and probability targets run on torch's op.
        target: (N,) or () int64 class indices.
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: torch's.
        smoothing: keyword extra, "torch" (label_smoothing as torch: the target gets
            1 - eps + eps/C, every class eps/C) or "fairseq" (the target 1 - eps, the others
            eps/(C-1), as fairseq's label_smoothed_cross_entropy).
        z_loss: keyword extra, coefficient of lse^2 added to every row not ignored.
        return_lse: keyword extra, also return the rows' log-sum-exp (N,) (no gradient).
    Returns:
        The loss (a scalar, or (N,) for reduction="none"), and lse when return_lse.
    Shapes:
        input (N, C), target (N,) -> () or (N,); lse (N,).
    """
    reduction = _legacy(size_average, reduce, reduction)
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: expected tensors, got input {type(input).__name__} and target "
                        f"{type(target).__name__}")
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        input = input.float()                      # autocast runs cross-entropy in fp32, as torch's policy
    V = input.shape[1] if input.dim() >= 2 else (input.shape[0] if input.dim() == 1 else 0)     # the class dim
    _check_common("cross_entropy", V, target, weight, ignore_index, reduction, label_smoothing, smoothing, z_loss)
    backend = _backend(input, target, weight)
    if backend == "torch" or (weight is not None and weight.requires_grad and torch.is_grad_enabled()):
        return _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, smoothing,
                                    z_loss, return_lse)
    unbatched = input.dim() == 1
    z = input.unsqueeze(0) if unbatched else input
    t = target.reshape(1) if unbatched else target
    if _library.captured(input):
        want = torch.is_grad_enabled() and input.requires_grad
        out, lse, _ = _cross_entropy_op(z, t.contiguous(), weight, ignore_index, reduction, float(label_smoothing),
                                        smoothing, float(z_loss), want, backend)
        if unbatched:
            out, lse = (out.reshape(()) if reduction == "none" else out), lse.reshape(())
        return (out, lse) if return_lse else out
    _check_targets("cross_entropy", t, V, ignore_index)
    if torch.is_grad_enabled() and input.requires_grad:
        out, lse = _apply_cross_entropy(z, t.contiguous(), weight, ignore_index, reduction, label_smoothing,
                                        smoothing, z_loss, backend)
    else:
        zc = z if z.stride(-1) == 1 else z.contiguous()
        L = _Loss(V, weight, ignore_index, label_smoothing, smoothing, z_loss)
        rows, lse, wrow = _rows(backend, zc, t.contiguous(), L)
        out, lse = _reduce(rows, wrow, reduction).to(input.dtype), lse.to(input.dtype)
    if unbatched:
        out, lse = (out.reshape(()) if reduction == "none" else out), lse.reshape(())
    return (out, lse) if return_lse else out


def _shaped(out, lse, target, reduction, return_lse):
    """The rows' outputs in the target's shape (() for an unbatched call), as torch returns them."""
    if reduction == "none":
        out = out.reshape(target.shape)
    lse = lse.reshape(target.shape)
    return (out, lse) if return_lse else out


def _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, smoothing, z_loss,
                         return_lse):
    """The "torch" backend: torch's F.cross_entropy where it has the option, the reference
    (torch ops) for the extras."""
    plain = smoothing == "torch" or label_smoothing == 0
    if plain and not z_loss and not return_lse:
        return F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if input.dim() != 2 and input.dim() != 1 or target.dtype.is_floating_point:
        raise NotImplementedError("cross_entropy: smoothing='fairseq', z_loss and return_lse take (N, C) or (C,) "
                                  "logits with class-index targets")
    z = input.unsqueeze(0) if input.dim() == 1 else input
    t = target.reshape(1) if input.dim() == 1 else target
    out = cross_entropy_ref(z, t, weight, ignore_index, reduction, label_smoothing, smoothing, z_loss, True)
    loss, lse = out
    if input.dim() == 1:
        loss, lse = (loss.reshape(()) if reduction == "none" else loss), lse.reshape(())
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         options=None, smoothing: str = "torch", z_loss: float = 0.0, return_lse: bool = False,
                         chunk_rows: Optional[int] = None):
    """cross_entropy(F.linear(input, linear_weight, linear_bias), target) without forming the
    (N, V) logits: torch.nn.functional.linear_cross_entropy's signature and result.

    The rows run in chunks (_chunk_rows: ~256 MiB of logits, 256-4096 rows): per chunk one GEMM
    forms the logits, the fused loss pass turns them into their gradient in place, and two GEMMs
    accumulate dx and dW.  Peak extra memory is one chunk plus dx and dW, instead of the logits,
    their log-softmax and their gradient (3 N V).

    Args:
        input: (N, E) or (*, E) (flattened to rows); linear_weight: (V, E) (a tied embedding
            works); target: (N,) / (*,) int64 class indices; linear_bias: (V,) or None.
        weight, reduction, label_smoothing: as cross_entropy; ignore_index: None means -100.
        options: torch's LinearCrossEntropyOptions (its chunking); a call with options, K-dim
            logits or probability targets runs on torch's op.
        smoothing, z_loss, return_lse: keyword extras, as cross_entropy.
        chunk_rows: keyword extra, rows per chunk (default: from V, see above).
    Returns:
        The loss (and lse (N,) when return_lse).
    Shapes:
        input (N, E), linear_weight (V, E), target (N,) -> () or (N,) for reduction="none";
        (*, E) and (*,) rows flatten, and "none" returns the target's shape.
    """
    bias, class_weight = linear_bias, weight
    weight = linear_weight
    ignore_index = -100 if ignore_index is None else ignore_index
    if not all(isinstance(t, torch.Tensor) for t in (input, weight, target)):
        raise TypeError("linear_cross_entropy: expected tensors for input, weight and target")
    if options is not None or target.dtype.is_floating_point or weight.dim() != 2 or \
            (bias is not None and bias.dim() != 1):               # torch's op: its options, K-dim and soft targets
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=class_weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, options=options)
    if input.dim() < 1 or weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected input (N, E) and weight (V, E), got {list(input.shape)} "
                         f"and {list(weight.shape)}")
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    V = weight.shape[0]
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"linear_cross_entropy: {x.shape[0]} rows of input but {t.shape[0]} targets")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (V,)):
        raise ValueError(f"linear_cross_entropy: expected bias of shape [{V}], got "
                         f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    _check_common("linear_cross_entropy", V, t, class_weight, ignore_index, reduction, label_smoothing, smoothing,
                  z_loss)
    backend = _backend(x, t, class_weight)
    if backend != "torch" and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        backend = "torch"
    devices = {u.device for u in (x, weight, bias, t, class_weight) if u is not None}
    if backend == "torch" or len(devices) > 1 or (class_weight is not None and class_weight.requires_grad):
        return _torch_cross_entropy(F.linear(x, weight, bias), t, class_weight, ignore_index, reduction,
                                    label_smoothing, smoothing, z_loss, return_lse)
    chunk = int(chunk_rows) if chunk_rows else _chunk_rows(x.shape[0], V, x.element_size())
    if _library.captured(x):
        grad = torch.is_grad_enabled()
        wants = (grad and x.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
        if reduction == "none" and any(wants):          # the row scales arrive with backward: torch's ops
            return _torch_cross_entropy(F.linear(x, weight, bias), t, class_weight, ignore_index, reduction,
                                        label_smoothing, smoothing, z_loss, return_lse)
        out, lse, *_ = _linear_ce_op(x, weight, bias, t.contiguous(), class_weight, ignore_index, reduction,
                                     float(label_smoothing), smoothing, float(z_loss), *wants, backend, chunk)
        return _shaped(out, lse, target, reduction, return_lse)
    _check_targets("linear_cross_entropy", t, V, ignore_index)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        out, lse = _apply_linear_cross_entropy(x, weight, bias, t.contiguous(), class_weight, ignore_index,
                                               reduction, label_smoothing, smoothing, z_loss, backend, chunk)
    else:                                          # no gradient wanted: the chunks' losses only
        L = _Loss(V, class_weight, ignore_index, label_smoothing, smoothing, z_loss)
        rows = torch.empty(x.shape[0], dtype=_stat_dtype(x), device=x.device)
        wrow = torch.empty_like(rows)
        lse = _linear_ce_chunks(backend, x.contiguous(), weight.contiguous(), bias, t.contiguous(), L, None, 0.0,
                                (None, None, None), chunk, (rows, wrow)).to(x.dtype)
        out = _reduce(rows, wrow, reduction).to(x.dtype)
    return _shaped(out, lse, target, reduction, return_lse)


# ============================================================================ modules

class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on the fused kernels: same constructor, buffers and forward."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """torch.nn.LinearCrossEntropyLoss (the LM head and its loss) on linear_cross_entropy's chunks:
    same constructor, parameters (self.linear) and state_dict; K-dimensional out_features and
    options run on torch's op."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.out_features or self.options is not None or input.dim() > 2:
            return super().forward(input, target)       # torch's op (and its errors)
        return linear_cross_entropy(input, self.linear.weight, target, linear_bias=self.linear.bias,
                                    weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing)
