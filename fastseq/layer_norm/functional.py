"""The functional ops: layer_norm, rms_norm, add_layer_norm, add_rms_norm, dropout_add_layer_norm, dropout_add_rms_norm."""
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _library
from ..dropout import _check_p, draw_seed
from .dispatch import ShapeLike, _as_shape, _backend, _check, _promote
from .functions import _apply_layer_norm, _run_captured
from .kernels import _affine, _forward


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
