"""The nn modules: LayerNorm, RMSNorm and the fused residual-add norms AddLayerNorm, AddRMSNorm."""

import torch

from ..dropout import _check_p
from .functional import add_layer_norm, add_rms_norm, dropout_add_layer_norm, dropout_add_rms_norm, layer_norm, rms_norm


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
