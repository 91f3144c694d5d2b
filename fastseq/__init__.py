"""fastseq: fused CPU (Cython + OpenMP) and GPU (Numba CUDA) kernels for sequence models.

    import fastseq
    y = fastseq.functional.layer_norm(x, (768,), w, b)
    model = fastseq.convert(model)          # torch.nn layers -> fastseq twins, same parameters
    with fastseq.use_backend("torch"): ...  # force a backend
    print(fastseq.explain("layer_norm", x, (768,)))
"""
from . import functional, nn  # noqa: F401  (registers every op family)
from ._dispatch import available_backends, explain, use_backend
from .convert import convert, rebind, register_converter
from .layer_norm import LayerNorm as _LayerNorm, RMSNorm as _RMSNorm

import torch as _torch

register_converter(_torch.nn.LayerNorm, lambda m: rebind(m, _LayerNorm))
register_converter(_torch.nn.RMSNorm, lambda m: rebind(m, _RMSNorm))

__version__ = "0.1.0"
__all__ = ["functional", "nn", "convert", "available_backends", "use_backend", "explain"]
