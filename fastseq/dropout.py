"""Dropout family: counter-based dropout, dropout + residual add, and the fused bias + activation
+ dropout of a feed-forward block.

Read top to bottom: the mask and the pure-torch references (the test oracle), input checks,
dispatch, the kernel calls, the autograd Functions, the registered ops (graph capture), the
functional ops, the module.  The residual-add + norm with dropout on the branch
(dropout_add_layer_norm) lives in layer_norm.py: it extends that family's kernels.

The mask.  Element k of a tensor (its flat row-major index) is kept when a keyed hash of k is at
least p 2^32 (kernels/cpu/_fastmath.h's fs_rand32: two rounds of a 32-bit avalanche mix), and
kept elements are scaled by 1 / (1 - p).  The key (seed) is drawn from torch's generator once per
call, so torch.manual_seed reproduces a run; backward regenerates the mask from (seed, k), so it
is never stored.  The masks are not torch's (its draws are Philox/mt19937 streams), the
statistics are: each element kept independently with probability 1 - p to within 2^-32.

Why one family for plain dropout and bias + activation + dropout: both are one pass over a
row-major tensor that draws the same mask; the activation kernel is the dropout kernel with a
bias and a pointwise function in front, so the mask code and the threading are written once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# ============================================================================ mask and references

_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for int64 tensors x < 2^32 without overflowing int64."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keep_threshold(p: float) -> int:
    """An element is kept when its 32-bit draw is >= this (p 2^32, capped at 2^32 - 1)."""
    return min(int(p * 4294967296.0), _M32)


def dropout_keep(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The kernels' dropout mask, in torch: a bool tensor of `shape` whose element with flat
    row-major index k is True (kept) when fs_rand32(k, seed) >= p 2^32.  Attention's kernels
    index (B, H, T, S) the same way."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    lo, hi = index & _M32, (index >> 32) & _M32
    r = _mix32(_mix32(lo ^ (seed & _M32)) ^ hi ^ ((seed >> 32) & _M32))
    return r >= keep_threshold(p)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_ref(x, p: float, seed: int, residual=None):
    """x * mask / (1 - p) [+ residual], mask = dropout_keep(seed, x.shape, p); p = 1 gives x * 0."""
    acc = _acc(x.dtype)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    y = x.to(acc) * dropout_keep(seed, x.shape, p, x.device).to(acc) * scale
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
_GELU_K = math.sqrt(2.0 / math.pi)


def activation_ref(u, activation: str):
    """The activations bias_act_dropout fuses, written as formulas: relu max(u, 0); gelu
    u Phi(u) = u (1 + erf(u / sqrt 2)) / 2 (exact, F.gelu's default); gelu_tanh
    u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) / 2 (F.gelu(approximate="tanh"), GPT-2's);
    silu u sigmoid(u)."""
    if activation == "relu":
        return u.clamp(min=0)
    if activation == "gelu":
        return 0.5 * u * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        return 0.5 * u * (1.0 + torch.tanh(_GELU_K * (u + 0.044715 * u * u * u)))
    if activation == "silu":
        return u * torch.sigmoid(u)
    raise ValueError(f"bias_act_dropout: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def bias_act_dropout_ref(x, bias, activation: str, p: float, seed: int):
    """dropout(act(x + bias)) with the kernels' mask, in the accumulator precision; x (*, F),
    bias (F,) or None; the mask indexes x's flat elements."""
    acc = _acc(x.dtype)
    u = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    y = activation_ref(u, activation)
    if p > 0:
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        y = y * dropout_keep(seed, x.shape, p, x.device).to(acc) * scale
    return y.to(x.dtype)
