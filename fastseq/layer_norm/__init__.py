"""Layer normalization family: LayerNorm, RMSNorm, and the fused residual-add + norm.

The package, read in this order: reference.py (the pure-torch references, the test oracle),
dispatch.py (input checks and which backend runs), kernels.py (the per-backend kernel calls),
functions.py (the autograd Function and the registered torch.library ops), functional.py (the
functional ops), nn.py (the modules).  The
"torch" backend runs torch's native ops (F.layer_norm, F.rms_norm), not the references: they
are faster than a composite and handle autocast and mixed weight dtypes, which is what a user
who falls back expects.

Every op normalizes over the last k dims (`normalized_shape`); the input is viewed as
(M, N) with N = prod(normalized_shape).  Forward saves only per-row mean and rstd.
"""
from .functional import (add_layer_norm, add_rms_norm, dropout_add_layer_norm, dropout_add_rms_norm, layer_norm,
                         rms_norm)
from .nn import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from .reference import add_layer_norm_ref, layer_norm_ref, rms_norm_ref

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dropout_add_layer_norm", "dropout_add_rms_norm",
           "LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "layer_norm_ref", "rms_norm_ref", "add_layer_norm_ref"]
