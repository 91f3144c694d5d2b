"""The pure-torch references of the layer-norm family: the test oracle."""

import torch

from ..dropout import dropout_mul
from .dispatch import _as_shape


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
