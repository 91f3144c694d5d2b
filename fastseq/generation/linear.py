"""A linear layer for decode-sized inputs: y = act(x W^T + b) with the columns split over the
threads, each thread one single-threaded BLAS call on its slice of W (or, for a few rows, the
dot-product path that streams W once) and the bias / activation applied to its own columns.

Why.  A decode step multiplies few rows (a batch times its beams: 1 to a few hundred) by
weights of megabytes.  One multi-threaded BLAS call splits such a product poorly: measured on
this project's 2-core machines, (128, 512) x (512, 8000) ran at 89-115 GFLOP/s through
torch.nn.functional.linear and at 116 split by columns; (16, 512) x (512, 2048) at 86 against
117; large products (1024^3) are unaffected and keep BLAS's own threading.  The seq2seq
decoders' cached steps take it (fastseq/models/seq2seq_transformer.py); GPT's fused step has
the same split inside its one call (kernels/cpu/decode.pyx).

Reference: torch.nn.functional.linear (+ the activation), which it falls back to wherever the
kernel does not run: a gradient wanted, another device or dtype, more than MAX_ROWS rows,
`use_backend("torch")`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _blas, _dispatch, _library
from ..dropout import ACTIVATIONS

MAX_ROWS = 512          # more rows: BLAS's own threading does as well


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """act(x W^T + b), inference only.

    Args:
        x: the input rows.
        weight: (N, K), as nn.Linear's.
        bias: (N,) or None.
        activation: None or one of fastseq.dropout.ACTIVATIONS (relu, gelu, gelu_tanh, silu).
    Returns:
        y.
    Shapes:
        x (..., K); y (..., N).
    """
    K = weight.shape[1]
    M = x.numel() // K if K else 0
    if _runs(x, weight, bias, M):
        x2 = x.reshape(M, K).contiguous()
        y = x.new_empty(*x.shape[:-1], weight.shape[0])
        _blas.cpu_kernels("decode").linear(x2.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                           y.data_ptr(), M, K, weight.shape[0],
                                           -1 if activation is None else ACTIVATIONS.index(activation),
                                           _dispatch.num_threads(), x.dtype == torch.float64)
        return y
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "silu": F.silu}[activation](y)


def _runs(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int) -> bool:
    if _library.transformed() or torch.compiler.is_compiling():
        return False
    if not (0 < M <= MAX_ROWS and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1]):
        return False
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != x.dtype or not bias.is_contiguous()
                             or bias.shape != weight.shape[:1]):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return _dispatch.forced_backend() in (None, "cpu") and _dispatch.backend_missing("cpu") is None
