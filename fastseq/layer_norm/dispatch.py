"""Input checks at the boundary and the dispatch facts: which backend runs a call, and why not the others."""
import numbers
from typing import List, Sequence, Tuple, Union

import torch

from .. import _dispatch
from ..dropout import _check_p

ShapeLike = Union[int, Sequence[int], torch.Size]


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
