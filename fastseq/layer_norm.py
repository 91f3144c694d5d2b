"""Layer normalization family: LayerNorm, RMSNorm, and the fused residual-add + norm.

Read top to bottom: the pure-torch references (the test oracle), the dispatch facts, the
per-backend kernel calls, the autograd Function, the functional ops, the nn modules.  The
"torch" backend runs torch's native ops (F.layer_norm, F.rms_norm), not the references: they
are faster than a composite and handle autocast and mixed weight dtypes, which is what a user
who falls back expects.

Every op normalizes over the last k dims (`normalized_shape`); the input is viewed as
(M, N) with N = prod(normalized_shape).  Forward saves only per-row mean and rstd.
"""
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _alloc, _dispatch, _library
from .dropout import _check_p, _dropout_kernel, draw_seed, dropout_mul

ShapeLike = Union[int, Sequence[int], torch.Size]


# ============================================================================ references

def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape) dims."""
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    mu = xa.mean(dims, keepdim=True)
    var = (xa - mu).square().mean(dims, keepdim=True)
    y = (xa - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def rms_norm_ref(x, normalized_shape, weight=None, eps=None):
    """y = x / sqrt(mean(x^2) + eps) * weight; eps=None means torch.finfo(x.dtype).eps."""
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    y = xa * torch.rsqrt(xa.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def add_layer_norm_ref(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5,
                       return_sum=False, rms=False, p=0.0, seed=0):
    """norm(x + residual); with return_sum, also x + residual (the pre-norm residual stream).
    p > 0: x is dropped first with the kernels' mask keyed by seed (fastseq.dropout.dropout_keep):
    norm(x Z / (1 - p) + residual)."""
    if p > 0:
        x = x * dropout_mul(seed, x.shape, p, x.dtype, x.device)
    s = x + residual
    y = rms_norm_ref(s, normalized_shape, weight, eps) if rms else \
        layer_norm_ref(s, normalized_shape, weight, bias, eps)
    return (y, s) if return_sum else y


# ============================================================================ input checks

def _as_shape(normalized_shape: ShapeLike) -> Tuple[int, ...]:
    t = type(normalized_shape)
    if t is tuple or t is torch.Size:
        return tuple(normalized_shape)
    if t is int or isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


def _check(op, x, shape, weight, bias, residual=None) -> Tuple[int, int]:
    """Validate at the boundary (attribute reads and comparisons only: this runs on every call);
    return (M, N).  `shape` is the normalized shape as a tuple of ints."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: expected input to be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{op}: expected a floating-point input, got {x.dtype}")
    k = len(shape)
    if k == 1:                                       # the common case, without building a Size
        n = shape[0]
        if x.dim() == 0 or x.shape[-1] != n:
            _shape_error(op, x, shape)
    else:
        if k == 0 or x.dim() < k or x.shape[x.dim() - k:] != shape:
            _shape_error(op, x, shape)
        n = 1
        for d in shape:
            n *= d
    if weight is not None:
        _check_param(op, "weight", weight, shape, x)
    if bias is not None:
        _check_param(op, "bias", bias, shape, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"{op}: expected residual to be a torch.Tensor, got {type(residual).__name__}")
        if residual.shape != x.shape or residual.device != x.device or not residual.dtype.is_floating_point:
            raise ValueError(f"{op}: expected a floating-point residual of the input's shape and device "
                             f"({list(x.shape)}, {x.device}), got ({list(residual.shape)}, {residual.dtype}, "
                             f"{residual.device})")
    return (x.numel() // n if n else 0), n


def _shape_error(op, x, shape):
    raise _dispatch.ShapeError(f"{op}: normalized_shape {list(shape)} must match the trailing dims of the "
                               f"input, got input of shape {list(x.shape)}")


def _check_param(op, name, p, shape, x):
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"{op}: expected {name} to be a torch.Tensor or None, got {type(p).__name__}")
    if p.shape != shape:
        raise _dispatch.ShapeError(f"{op}: expected {name} of shape {list(shape)}, got {list(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{op}: expected {name} on {x.device} (the input's), got {p.device}")


def _promote(x, residual):
    """input + residual in torch's type promotion (an fp32 residual stream plus a bf16 block
    output under autocast is fp32): both operands in the result dtype."""
    if residual is None or residual.dtype == x.dtype:
        return x, residual
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


# ============================================================================ dispatch

def _dtype_name(t):
    return str(t.dtype).replace("torch.", "")


def _facts_of(op, x, residual, normalized_shape, weight, bias) -> dict:
    """Facts of a call, after its boundary checks (a call that would raise, raises here too)."""
    x, residual = _promote(x, residual) if isinstance(residual, torch.Tensor) and isinstance(x, torch.Tensor) \
        else (x, residual)
    m, n = _check(op, x, _as_shape(normalized_shape), weight, bias, residual)
    params = [p for p in (weight, bias) if p is not None]
    return {"device": x.device.type, "dtype": _dtype_name(x), "N": n, "M": m,
            "param_dtypes": sorted({_dtype_name(p) for p in params} - {_dtype_name(x)})}


# one facts function per op, with the functional op's own signature (fastseq.explain passes the
# call's arguments through unchanged, keywords included)
def _facts_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _facts_of("layer_norm", input, None, normalized_shape, weight, bias)


def _facts_rms_norm(input, normalized_shape, weight=None, eps=None):
    return _facts_of("rms_norm", input, None, normalized_shape, weight, None)


def _facts_add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, return_sum=False):
    return _facts_of("add_layer_norm", input, residual, normalized_shape, weight, bias)


def _facts_add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, return_sum=False):
    return _facts_of("add_rms_norm", input, residual, normalized_shape, weight, None)


def _facts_dropout_add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, p=0.5,
                                  training=True, return_sum=False):
    _check_p("dropout_add_layer_norm", p)
    return _facts_of("dropout_add_layer_norm", input, residual, normalized_shape, weight, bias)


def _facts_dropout_add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, p=0.5, training=True,
                                return_sum=False):
    _check_p("dropout_add_rms_norm", p)
    return _facts_of("dropout_add_rms_norm", input, residual, normalized_shape, weight, None)


def _kernel_reasons(f: dict, backend: str, dtypes) -> List[str]:
    out = []
    if f["dtype"] not in dtypes:
        out.append(f"{backend} kernels take {', '.join(dtypes)}, got {f['dtype']}")
    if f.get("param_dtypes"):
        out.append(f"{backend} kernels need weight/bias in the input's dtype {f['dtype']}, got "
                   f"{', '.join(f['param_dtypes'])} (mixed precision runs on torch's native op)")
    return out


def _cpu_reasons(f: dict) -> List[str]:
    return _kernel_reasons(f, "cpu", ("float32", "float64"))


def _cuda_reasons(f: dict) -> List[str]:
    return _kernel_reasons(f, "cuda", ("float16", "float32", "float64"))


def _torch_reasons(f: dict) -> List[str]:
    return []


for _op, _f in (("layer_norm", _facts_layer_norm), ("rms_norm", _facts_rms_norm),
               ("add_layer_norm", _facts_add_layer_norm), ("add_rms_norm", _facts_add_rms_norm),
               ("dropout_add_layer_norm", _facts_dropout_add_layer_norm),
               ("dropout_add_rms_norm", _facts_dropout_add_rms_norm)):
    _dispatch.register_op(_op, _f, cpu=_cpu_reasons, cuda=_cuda_reasons, torch=_torch_reasons)


def _backend(op, x, weight, bias) -> str:
    """The backend for this call, remembered by everything the reasons above read."""
    return _dispatch.choose_cached(op, (x.device, x.dtype, None if weight is None else weight.dtype,
                                        None if bias is None else bias.dtype), _backend_facts, x, weight, bias)


def _backend_facts(x, weight, bias) -> dict:
    return {"device": x.device.type, "dtype": _dtype_name(x),
            "param_dtypes": sorted({_dtype_name(p) for p in (weight, bias) if p is not None} - {_dtype_name(x)})}


# ============================================================================ kernel calls

def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


_KERNELS = []


def _cpu_kernels():
    """fastseq._cpu.layer_norm (looked up once)."""
    if not _KERNELS:
        _KERNELS.append(_dispatch.cpu_kernels("layer_norm"))
    return _KERNELS[0]


_ONES, _ZEROS = {}, {}


def _affine(weight, bias, n, like):
    """weight and bias as contiguous n-vectors; absent ones as cached ones / zeros."""
    w = weight.contiguous() if weight is not None else _constant(_ONES, 1.0, n, like)
    b = bias.contiguous() if bias is not None else _constant(_ZEROS, 0.0, n, like)
    return w, b


def _constant(cache, value, n, like):
    key = (n, like.dtype, like.device)
    t = cache.get(key)
    if t is None:
        with torch.inference_mode(False):          # usable by autograd later, whatever mode made it
            t = cache[key] = torch.full((n,), value, dtype=like.dtype, device=like.device)
    return t


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Below this many elements (~10 us of one core's memory traffic) a forward runs on one thread:
# waking a second costs several microseconds, and on a busy machine a team waits for its slowest
# member's time slice.
_PARALLEL_ELEMENTS = 1 << 15


def _forward(backend, x, r, w, b, m, n, eps, center, want_sum, want_stats=True, p=0.0, seed=0):
    """Run the forward kernel; returns y, s (or None), mean, rstd (None unless want_stats: on the
    CPU the row statistics of an inference call go to scratch).  x, r, w, b contiguous; p > 0
    (with r): x is dropped with the mask keyed by seed before the add."""
    y = _alloc.empty_like(x)
    s = _alloc.empty_like(x) if want_sum else None
    if backend == "cpu":
        nt = torch.get_num_threads() if m * n >= _PARALLEL_ELEMENTS else 1
        need_scr = r is not None and not want_sum
        dbl = x.dtype == torch.float64
        if want_stats:
            mean, rstd = x.new_empty(m), x.new_empty(m)
            p_mean, p_rstd = mean.data_ptr(), rstd.data_ptr()
            p_scr = _alloc.scratch(nt * n, x.dtype).data_ptr() if need_scr else 0
        else:                                       # [mean | rstd | per-thread rows] in one buffer
            mean = rstd = None
            p_mean = _alloc.scratch(2 * m + (nt * n if need_scr else 0), x.dtype).data_ptr()
            p_rstd = p_mean + m * (8 if dbl else 4)
            p_scr = p_rstd + m * (8 if dbl else 4) if need_scr else 0
        _cpu_kernels().forward_ptr(
            x.data_ptr(), 0 if r is None else r.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(),
            0 if s is None else s.data_ptr(), p_scr, p_mean, p_rstd, m, n, eps, center, nt, dbl, p, seed)
    else:
        mean = _alloc.empty((m,), _stat_dtype(x), x.device)
        rstd = _alloc.empty((m,), _stat_dtype(x), x.device)
        k = _dispatch.cuda_kernels("layer_norm")
        from fastseq._cuda._common import as_array, on_device, torch_stream
        with on_device(x.device):
            dummy = as_array(w)                     # stands in for absent r / s (flags off)
            k.forward(as_array(x.view(-1)), as_array(r.view(-1)) if r is not None else dummy,
                      as_array(w), as_array(b), as_array(y.view(-1)),
                      as_array(s.view(-1)) if s is not None else dummy,
                      as_array(mean), as_array(rstd), m, n, float(eps), center, r is not None, want_sum,
                      p=p, seed=seed, stream=torch_stream())
    return y, s, mean, rstd


def _backward(backend, x, r, dy, ds, w, mean, rstd, m, n, center, want_dw, want_db, p=0.0, seed=0, want_dxd=False):
    """Run the backward kernel; returns dx, dxd (or None), dw (or None), db (or None).  dx is the
    gradient of the sum's summands; with p > 0 it is the residual's, and dxd (want_dxd) the
    dropped input's."""
    dx = _alloc.empty_like(x)
    dxd = _alloc.empty_like(x) if want_dxd else None
    dw = _alloc.empty((n,), x.dtype, x.device) if want_dw else None
    db = _alloc.empty((n,), x.dtype, x.device) if want_db else None
    if backend == "cpu":
        nt = max(1, min(_dispatch.num_threads(), m))
        size = x.element_size()
        need_part, need_scr = want_dw or want_db, r is not None
        work = _alloc.scratch((2 * nt * n if need_part else 0) + (nt * n if need_scr else 0), x.dtype).data_ptr()
        p_part = work if need_part else 0                          # [dw partials | db partials | rows]
        p_scr = work + (2 * nt * n * size if need_part else 0) if need_scr else 0
        _dispatch.cpu_kernels("layer_norm").backward_ptr(        # (looked up here: tests spy on it)
            x.data_ptr(), _ptr(r), dy.data_ptr(), _ptr(ds), w.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            dx.data_ptr(), _ptr(dxd), p_part, p_scr, _ptr(dw), _ptr(db), m, n, center, nt,
            x.dtype == torch.float64, p, seed)
    else:
        k = _dispatch.cuda_kernels("layer_norm")
        from fastseq._cuda._common import as_array, on_device, torch_stream
        chunks = k.partial_chunks(m)[1]
        part = torch.empty(2, chunks * n, dtype=_stat_dtype(x), device=x.device)
        with on_device(x.device):
            dummy = as_array(w)                     # stands in for absent r / ds / dw / db (flags off)
            k.backward(as_array(x.view(-1)), as_array(r.view(-1)) if r is not None else dummy,
                       as_array(dy.view(-1)), as_array(ds.view(-1)) if ds is not None else dummy,
                       as_array(w), as_array(mean), as_array(rstd), as_array(dx.view(-1)),
                       as_array(dw) if dw is not None else dummy, as_array(db) if db is not None else dummy,
                       as_array(part[0]), as_array(part[1]), m, n, center, r is not None, ds is not None,
                       want_dw, want_db, dxd=as_array(dxd.view(-1)) if dxd is not None else None, p=p, seed=seed,
                       stream=torch_stream())
    return dx, dxd, dw, db


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


# ============================================================================ functional

def _torch_native(x, residual, shape, weight, bias, eps, center, return_sum, p=0.0):
    """The "torch" backend: torch's own ops (they handle autocast and mixed dtypes)."""
    if p > 0:
        x = F.dropout(x, p, True)
    v = x if residual is None else x + residual
    y = F.layer_norm(v, shape, weight, bias, eps) if center else F.rms_norm(v, shape, weight, eps)
    return (y, v) if return_sum else y


def _run(op, x, residual, normalized_shape, weight, bias, eps, center, return_sum, p=0.0):
    shape = _as_shape(normalized_shape)
    if residual is not None and isinstance(x, torch.Tensor) and isinstance(residual, torch.Tensor) \
            and residual.dtype != x.dtype:
        x, residual = _promote(x, residual)
    m, n = _check(op, x, shape, weight, bias, residual)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):      # torch's CUDA autocast runs norms in fp32
        x, residual, weight, bias = (t.float() if t is not None and t.dtype != torch.float64 else t
                                     for t in (x, residual, weight, bias))
    backend = "torch" if _library.transformed() else _backend(op, x, weight, bias)
    if p > 0 and x.is_cuda and torch.cuda.is_current_stream_capturing():
        backend = "torch"                           # a captured CUDA graph would freeze the drawn seed
    if backend == "torch":
        return _torch_native(x, residual, shape, weight, bias, eps, center, return_sum, p)
    if _library.captured(x):
        return _run_captured(x, residual, n, weight, bias, eps, center, return_sum, backend, p)
    seed = draw_seed() if p > 0 else 0
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad) or
                                    (weight is not None and weight.requires_grad) or
                                    (bias is not None and bias.requires_grad)):
        return _apply_layer_norm(x, residual, weight, bias, shape, eps, center, return_sum, backend, p, seed)
    w, b = _affine(weight, bias, n, x)              # inference: no autograd node, nothing saved
    y, s, _, _ = _forward(backend, x.contiguous(), residual.contiguous() if residual is not None else None,
                          w, b, m, n, eps, center, return_sum, want_stats=False, p=p, seed=seed)
    return (y, s) if return_sum else y


def layer_norm(input: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the last dims, as torch.nn.functional.layer_norm.

    Args:
        input: (*, *normalized_shape) floating-point tensor.
        normalized_shape: the trailing dims to normalize over (int or sequence of ints).
        weight, bias: optional (*normalized_shape) affine parameters on the input's device; a dtype
            other than the input's (mixed precision) runs on torch's native op.
        eps: added to the variance for numerical stability.
    Returns:
        A tensor of the input's shape and dtype:  (x - mean) / sqrt(var + eps) * weight + bias,
        mean and (biased) var taken over normalized_shape.
    Shapes:
        input (*, *normalized_shape) -> output (*, *normalized_shape); the input is viewed as
        (M, N), M = prod(*), N = prod(normalized_shape); weight, bias (*normalized_shape).
    """
    return _run("layer_norm", input, None, normalized_shape, weight, bias, eps, True, False)


def rms_norm(input: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None) -> torch.Tensor:
    """Root-mean-square normalization, as torch.nn.functional.rms_norm.

    Args:
        input: (*, *normalized_shape) floating-point tensor.
        normalized_shape: the trailing dims to normalize over.
        weight: optional (*normalized_shape) scale.
        eps: added to mean(x^2); None means torch.finfo(input.dtype).eps (torch's default).
    Returns:
        x / sqrt(mean(x^2) + eps) * weight, the input's shape and dtype.
    Shapes:
        input (*, *normalized_shape) -> output of the same shape; weight (*normalized_shape).
    """
    if eps is None and isinstance(input, torch.Tensor) and input.dtype.is_floating_point:
        eps = torch.finfo(input.dtype).eps
    return _run("rms_norm", input, None, normalized_shape, weight, None, eps, False, False)


def add_layer_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeLike,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, return_sum: bool = False):
    """Fused residual add + layer norm: layer_norm(input + residual) in one pass over memory.

    The sum is never written unless return_sum (backward rebuilds it from input and residual).
    Args:
        input, residual: (*, *normalized_shape) tensors of one shape, dtype and device.
        normalized_shape, weight, bias, eps: as layer_norm.
        return_sum: also return input + residual, for pre-norm residual streams.
    Returns:
        y, or (y, input + residual) when return_sum; both of the input's shape.
    Shapes:
        input, residual (*, *normalized_shape) (no broadcasting) -> y (and the sum) of that shape;
        weight, bias (*normalized_shape).
    """
    return _run("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, True, return_sum)


def add_rms_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeLike,
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None,
                 return_sum: bool = False):
    """Fused residual add + RMSNorm: rms_norm(input + residual); see add_layer_norm."""
    if eps is None and isinstance(input, torch.Tensor) and input.dtype.is_floating_point:
        eps = torch.finfo(input.dtype).eps
    return _run("add_rms_norm", input, residual, normalized_shape, weight, None, eps, False, return_sum)


def _check_dropped_residual(op, residual):
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: expected residual to be a torch.Tensor (the stream the dropped input joins), "
                        f"got {type(residual).__name__}")


def dropout_add_layer_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeLike,
                           weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                           eps: float = 1e-5, p: float = 0.5, training: bool = True, return_sum: bool = False):
    """layer_norm(dropout(input, p) + residual) in one pass forward and one backward.

    The Transformer's residual connection: `input` is a block's output (dropped), `residual` the
    stream it joins.  The mask is fastseq.dropout's counter-based draw over input's flat element
    index, keyed by a seed from torch's generator (torch.manual_seed reproduces it), regenerated
    in backward and never stored; the dropped input and the sum are never written unless
    return_sum.
    Args:
        input, residual: (*, *normalized_shape) tensors of one shape and device.
        normalized_shape, weight, bias, eps: as layer_norm.
        p: dropout probability on input, in [0, 1]; training=False (or p = 0) is add_layer_norm.
        return_sum: also return dropout(input) + residual, for pre-norm residual streams.
    Returns:
        y, or (y, dropout(input) + residual) when return_sum; both of the input's shape.
    Shapes:
        input, residual (*, *normalized_shape) -> y (and the sum) of that shape.
    """
    p = _check_p("dropout_add_layer_norm", p)
    p = p if training else 0.0
    _check_dropped_residual("dropout_add_layer_norm", residual)
    return _run("dropout_add_layer_norm", input, residual, normalized_shape, weight, bias, eps, True, return_sum, p)


def dropout_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeLike,
                         weight: Optional[torch.Tensor] = None, eps: Optional[float] = None, p: float = 0.5,
                         training: bool = True, return_sum: bool = False):
    """rms_norm(dropout(input, p) + residual), fused; see dropout_add_layer_norm."""
    p = _check_p("dropout_add_rms_norm", p)
    p = p if training else 0.0
    _check_dropped_residual("dropout_add_rms_norm", residual)
    if eps is None and isinstance(input, torch.Tensor) and input.dtype.is_floating_point:
        eps = torch.finfo(input.dtype).eps
    return _run("dropout_add_rms_norm", input, residual, normalized_shape, weight, None, eps, False, return_sum, p)


# ============================================================================ modules

class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fastseq kernels: same constructor, parameters and state_dict."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on fastseq kernels: same constructor, parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class AddLayerNorm(LayerNorm):
    """LayerNorm(dropout(input) + residual) fused; forward(input, residual) -> y, or (y, sum) when
    the module was built with return_sum=True.  dropout: the probability on input in training
    mode (0 by default: LayerNorm(input + residual)).  Parameters and state_dict as
    torch.nn.LayerNorm."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, return_sum=False, dropout=0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.return_sum = return_sum
        self.dropout = _check_p("AddLayerNorm", dropout)

    def forward(self, input: torch.Tensor, residual: torch.Tensor):
        if self.training and self.dropout > 0:
            return dropout_add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                          self.dropout, True, self.return_sum)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias,
                              self.eps, self.return_sum)


class AddRMSNorm(RMSNorm):
    """RMSNorm(dropout(input) + residual) fused; see AddLayerNorm."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 return_sum=False, dropout=0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.return_sum = return_sum
        self.dropout = _check_p("AddRMSNorm", dropout)

    def forward(self, input: torch.Tensor, residual: torch.Tensor):
        if self.training and self.dropout > 0:
            return dropout_add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, self.dropout,
                                        True, self.return_sum)
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, self.return_sum)
