"""Transformer layers on fastseq attention and layer norm: drop-ins for torch.nn's.

TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and
Transformer keep torch's constructors, parameter names, state_dicts and forward signatures:
each builds torch's module and swaps its attention and norms for fastseq's twins (sharing the
parameters).  Where a layer adds a residual and then normalizes, it calls the fused
add_layer_norm: post-norm `norm(x + f(x))` in one pass, and in pre-norm layers the add that
closes one block is fused with the norm that opens the next (`add_layer_norm(...,
return_sum=True)` gives both the normalized input and the residual stream).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .convert import convert
from .layer_norm import add_layer_norm


def _add_norm(x: Tensor, y: Tensor, norm: torch.nn.LayerNorm, return_sum: bool = False):
    """norm(x + y) with the norm module's parameters, fused."""
    return add_layer_norm(x, y, norm.normalized_shape, norm.weight, norm.bias, norm.eps, return_sum)


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer on fastseq kernels (same arguments and state_dict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self, _inside=True)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x_sa = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            h, x = _add_norm(x, x_sa, self.norm2, return_sum=True)     # norm2(x + sa), x + sa
            return x + self._ff_block(h)
        x = _add_norm(x, self._sa_block(x, src_mask, src_key_padding_mask, is_causal), self.norm1)
        return _add_norm(x, self._ff_block(x), self.norm2)


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer on fastseq kernels (same arguments and state_dict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self, _inside=True)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        if self.norm_first:
            x_sa = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = _add_norm(x, x_sa, self.norm2, return_sum=True)
            x_ca = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = _add_norm(x, x_ca, self.norm3, return_sum=True)
            return x + self._ff_block(h)
        x = _add_norm(x, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), self.norm1)
        x = _add_norm(x, self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal),
                      self.norm2)
        return _add_norm(x, self._ff_block(x), self.norm3)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """torch.nn.TransformerEncoder over fastseq layers.  torch's nested-tensor fast path is off:
    it would bypass the layers' forward (fastseq's kernels take key padding as key lengths)."""

    def __init__(self, encoder_layer, num_layers, norm=None, enable_nested_tensor=False, mask_check=True):
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        self.use_nested_tensor = False
        convert(self, _inside=True)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch.nn.TransformerDecoder over fastseq layers."""

    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__(decoder_layer, num_layers, norm)
        convert(self, _inside=True)


class Transformer(torch.nn.Transformer):
    """torch.nn.Transformer on fastseq kernels: same arguments, initialization and state_dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self, _inside=True)
