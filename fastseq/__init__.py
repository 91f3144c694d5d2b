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
from .generation import generate

import torch as _torch


def _no_nested(m):
    m._torch_nested = m.use_nested_tensor     # what torch would do: fastseq's encoder mirrors its outputs
    m.use_nested_tensor = False     # torch's nested-tensor fast path would bypass the layers' forward
    return m


for _torch_cls, _twin, _fix in [
    (_torch.nn.Dropout, nn.Dropout, None),
    (_torch.nn.CrossEntropyLoss, nn.CrossEntropyLoss, None),
    (_torch.nn.LinearCrossEntropyLoss, nn.LinearCrossEntropyLoss, None),
    (_torch.nn.LayerNorm, nn.LayerNorm, None),
    (_torch.nn.RMSNorm, nn.RMSNorm, None),
    (_torch.nn.MultiheadAttention, nn.MultiheadAttention, None),
    (_torch.nn.TransformerEncoderLayer, nn.TransformerEncoderLayer, None),
    (_torch.nn.TransformerDecoderLayer, nn.TransformerDecoderLayer, None),
    (_torch.nn.TransformerEncoder, nn.TransformerEncoder, _no_nested),
    (_torch.nn.TransformerDecoder, nn.TransformerDecoder, None),
    (_torch.nn.Transformer, nn.Transformer, None),
    (_torch.nn.LSTM, nn.LSTM, None),
    (_torch.nn.GRU, nn.GRU, None),
    (_torch.nn.RNN, nn.RNN, None),
    (_torch.nn.LSTMCell, nn.LSTMCell, None),
    (_torch.nn.GRUCell, nn.GRUCell, None),
    (_torch.nn.RNNCell, nn.RNNCell, None),
]:
    register_converter(_torch_cls, (lambda twin, fix: lambda m: (fix or (lambda x: x))(rebind(m, twin)))(_twin, _fix))


def _warn_if_uncompiled():
    """A source checkout imported in place (python run inside the repository, or `python -m
    pytest` there) has no compiled kernels: every op would silently run on torch.  Say so once."""
    missing = _dispatch_module.backend_missing("cpu")
    if missing:
        import os
        import warnings
        warnings.warn(
            f"fastseq imported from {os.path.dirname(__file__)} has no compiled CPU kernels "
            f"({missing}): every fastseq op runs on torch's own ops here, not on fastseq's kernels. "
            "Build them: `pip install .` and run from outside the source tree (or `pip install -e .` "
            "to work inside it); inside a checkout run `pytest`, not `python -m pytest`.",
            RuntimeWarning, stacklevel=3)


from . import _dispatch as _dispatch_module  # noqa: E402

_warn_if_uncompiled()

__version__ = "0.1.0"
__all__ = ["functional", "nn", "convert", "available_backends", "use_backend", "explain", "generate"]
